"""pipeline.metrics.areas: per-class areas in square metres (rasters, on the ellipsoid for a geographic CRS)
and square microns (slides), checked against a direct computation of each pixel's area. The end-to-end
runs that carry them to the metrics table and summary.json are tests/test_raster.py's and tests/test_slide.py's."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import LONLAT_TRANSFORM, pixel_area_by_geod, write_raster

from pipeline.io.raster import georef_of, open_dataset
from pipeline.metrics.areas import M2, UM2, PhysicalAreas, PixelAreas, weighted_class_sums
from pipeline.metrics.semantic import LabelAreas, LabelReading
from pipeline.predict.predictor import finish_image


def test_a_geographic_rasters_class_areas_are_the_sum_of_each_pixels_area_on_the_ellipsoid(tmp_path):
    path = write_raster(tmp_path / "lonlat.tif", np.zeros((1, 5, 4), np.uint8), crs="EPSG:4326", transform=LONLAT_TRANSFORM)
    with open_dataset(str(path)) as ds:
        georef = georef_of(ds)
    assert georef["pixel_area_m2"] is None  # geographic: no one pixel area
    pixels = PixelAreas.of_raster(georef, 5, 4)
    direct = np.array([[pixel_area_by_geod(LONLAT_TRANSFORM, r, c) for c in range(4)] for r in range(5)])
    assert pixels.unit == M2 and np.allclose(pixels.rows(0, 5), direct[:, 0], rtol=1e-12)
    assert np.allclose(direct, direct[:, :1], rtol=1e-12)  # north-up: a row's pixels are alike
    assert direct[0, 0] < direct[-1, 0] * 0.95  # and they shrink towards the pole

    mask = np.array([[0, 0, 1, 1], [0, 1, 1, 255], [2, 2, 2, 2], [0, 0, 0, 0], [1, 255, 255, 1]], np.uint8)
    label = np.array([[0, 0, 0, 1], [1, 1, 1, 1], [2, 2, 9, 2], [0, 0, 0, 0], [1, 1, 1, 1]], np.uint8)  # 9: ignored
    physical = PhysicalAreas(pixels, 3)
    chunks, areas = finish_image(
        iter([(0, mask[:2], None), (2, mask[2:], None)]),  # the second band straddles the chunk rows
        5,
        4,
        lambda y, n: label[y : y + n],
        num_classes=3,
        chunk_size=3,
        binary=False,
        ignore_index=9,
        physical=physical,
    )
    record = physical.record(areas.reading)
    # every pixel of a class (255: no data, in none) and every labeled pixel (9: ignored, in none)
    assert record["unit"] == M2
    assert np.allclose(record["pred"], [direct[mask == k].sum() for k in range(3)], rtol=1e-12)
    assert np.allclose(record["label"], [direct[label == k].sum() for k in range(3)], rtol=1e-12)
    # each chunk of the mask (3 x 3, cut at the edges): its own pixels' areas, in the order of the chunks
    assert [(c.y, c.x, c.height, c.width) for c in chunks] == [(0, 0, 3, 3), (0, 3, 3, 1), (3, 0, 2, 3), (3, 3, 2, 1)]
    for c, chunk_areas in zip(chunks, record["chunks"], strict=True):
        box = (slice(c.y, c.y + c.height), slice(c.x, c.x + c.width))
        assert np.allclose(chunk_areas, [direct[box][mask[box] == k].sum() for k in range(3)], rtol=1e-12)


def test_a_projected_rasters_pixels_are_its_pixel_area_and_one_without_crs_has_none():
    pixels = PixelAreas.of_raster({"crs": "EPSG:32633", "transform": [10, 0, 0, 0, -10, 0], "pixel_area_m2": 100.0}, 3, 3)
    assert pixels == PixelAreas(M2, 100.0) and pixels.rows(1, 2).tolist() == [100.0, 100.0]
    assert PixelAreas.of_raster({"crs": None, "transform": None, "pixel_area_m2": None}, 3, 3) is None


def test_slide_areas_are_mpp_squared_times_the_class_pixels_and_skipped_pixels_count_in_none():
    assert PixelAreas.of_slide(None) is None
    pixels = PixelAreas.of_slide(0.5)
    mask = np.random.default_rng(0).integers(0, 3, (37, 29)).astype(np.uint8)
    mask[:5] = 255  # no tissue: not segmented
    physical = PhysicalAreas(pixels, 3)
    for y0 in range(0, 37, 8):
        physical.add_pred(y0, mask[y0 : y0 + 8])
    record = physical.record(None)
    expected = pytest.approx([0.25 * (mask == k).sum() for k in range(3)])
    assert record == {"unit": UM2, "pred": expected, "chunks": [expected], "label": None}  # unchunked: one chunk, the whole mask


def test_a_binary_mask_labels_physical_area_follows_the_reading_it_gets():
    # auto reading: a 0/255 label is a mask (foreground above 128); its areas are those of that reading
    reading = LabelReading(2, None, binary="auto", positive=1)
    physical = PhysicalAreas(PixelAreas(UM2, 4.0), 2)
    areas = LabelAreas(reading, physical)
    label = np.array([[0, 255], [255, 255]], np.uint8)
    areas.add(np.zeros((2, 2), np.uint8), label)
    result = areas.finish()
    assert result.reading == "mask" and physical.record(result.reading)["label"] == [4.0, 12.0]


def test_weighted_class_sums_weigh_each_row_and_leave_out_values_outside_the_classes():
    values = np.array([[0, 1, 7], [1, 1, -1]])
    assert weighted_class_sums(values, np.array([2.0, 3.0]), 2).tolist() == [2.0, 8.0]
    assert weighted_class_sums(values, np.array([2.0, 3.0]), 2, keep=np.array([[True, False, True], [True, True, True]])).tolist() == [
        2.0,
        6.0,
    ]
