"""pipeline.io.coco_codec: COCO's RLE and polygons against pycocotools, panoptic ids."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from pipeline.io.coco_codec import annotation_mask, decode_rle, encode_rle, rle_area, rle_bbox

# pycocotools' decode on numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# ---------------------------------------------------------------------------------------------
# COCO RLE
# ---------------------------------------------------------------------------------------------


def rle_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    cases = [
        np.zeros((5, 7), bool),
        np.ones((5, 7), bool),
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
        np.eye(6, 9, dtype=bool)[::-1],
        rng.random((37, 53)) < 0.5,  # many short runs
        rng.random((1, 101)) < 0.3,  # one row: every pixel its own column
        rng.random((101, 1)) < 0.3,  # one column
    ]
    single = np.zeros((13, 11), bool)
    single[12, 10] = True  # the last pixel
    cases.append(single)
    first = np.zeros((13, 11), bool)
    first[0, 0] = True
    cases.append(first)
    blob = np.zeros((300, 257), bool)
    blob[40:260, 17:200] = rng.random((220, 183)) < 0.97  # long runs: counts of many 5-bit groups
    cases.append(blob)
    column_crossing = np.zeros((10, 4), bool)
    column_crossing[8:, 1] = column_crossing[:3, 2] = True  # a run over a column's end
    cases.append(column_crossing)
    return cases


@pytest.mark.parametrize("index", range(len(rle_cases())))
def test_rle_equals_pycocotools(index):
    mask = rle_cases()[index]
    reference = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    ours = encode_rle(mask)
    assert ours == {"size": list(mask.shape), "counts": reference["counts"].decode("ascii")}
    assert np.array_equal(decode_rle(ours), mask) and decode_rle(ours).dtype == bool
    assert np.array_equal(decode_rle(reference), coco_mask.decode(reference).astype(bool))  # bytes counts too
    assert rle_area(ours) == int(coco_mask.area(reference)) == int(mask.sum())
    assert rle_bbox(ours) == coco_mask.toBbox(reference).astype(int).tolist()


def test_rle_of_a_crop_placed_in_a_larger_image():
    rng = np.random.default_rng(1)
    for crop_shape, size, offset in [((7, 5), (20, 30), (3, 11)), ((20, 4), (20, 9), (0, 2)), ((6, 6), (6, 6), (0, 0))]:
        crop = rng.random(crop_shape) < 0.6
        crop[:, 0] = crop[:, -1] = True  # full columns: runs join across columns when the crop is full height
        full = np.zeros(size, bool)
        full[offset[0] : offset[0] + crop_shape[0], offset[1] : offset[1] + crop_shape[1]] = crop
        assert encode_rle(crop, size=size, offset=offset) == encode_rle(full)
        assert encode_rle(full)["counts"] == coco_mask.encode(np.asfortranarray(full.astype(np.uint8)))["counts"].decode()
    with pytest.raises(ValueError, match="does not fit"):
        encode_rle(np.ones((4, 4), bool), size=(5, 5), offset=(2, 0))


def test_uncompressed_rle_decodes():
    mask = rle_cases()[5]
    flat = mask.ravel(order="F")
    runs = np.diff([0, *(np.flatnonzero(flat[1:] != flat[:-1]) + 1), len(flat)])
    uncompressed = {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs.tolist()}
    assert np.array_equal(decode_rle(uncompressed), mask)
    assert rle_area(uncompressed) == int(mask.sum())


# ---------------------------------------------------------------------------------------------
# Segmentations (polygons or RLE) as masks
# ---------------------------------------------------------------------------------------------


def _random_polygons(rng: np.random.Generator, h: int, w: int) -> list[list[float]]:
    """One to three parts of 3-8 vertices: fractional, whole, half-pixel (centres and edges) or
    tenth-pixel coordinates, some outside the image, some with a repeated vertex."""
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        n, kind, top = int(rng.integers(3, 9)), int(rng.integers(0, 4)), max(h, w)
        if kind == 0:
            xy = rng.uniform(-5, top + 5, 2 * n)
        elif kind == 1:
            xy = rng.integers(-2, top + 2, 2 * n).astype(float)
        elif kind == 2:
            xy = np.round(rng.uniform(-1, top + 1, 2 * n) * 2) / 2
        else:
            xy = np.round(rng.uniform(-1, top + 1, 2 * n) * 10) / 10
            xy[2:4] = xy[0:2]
        parts.append([float(v) for v in xy])
    return parts


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools merge under numpy 2
def test_polygons_rasterise_bit_for_bit_as_pycocotools_and_rle_decodes_exactly():
    """Mask AP against polygon labels is COCOeval's only if the polygons are its masks: before, PIL's
    fill differed from pycocotools' on edge pixels."""
    from pycocotools import mask as coco_mask

    def reference(parts, h, w):
        return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(parts, h, w))).astype(bool)

    polygon = [[3.0, 4.0, 40.5, 6.0, 35.0, 30.0, 8.0, 27.5]]
    np.testing.assert_array_equal(annotation_mask(polygon, (36, 48)), reference(polygon, 36, 48))
    special = [
        [[1, 1, 8, 1, 8, 8, 1, 8], [2.0, 2.0, 6.0, 6.0]],  # a later part of 4 values
        [[1, 1, 8, 1, 8, 8, 1, 8, 3.3]],  # an odd number of values: the last one dropped
        [[0, 0, 12, 0, 12, 10, 0, 10]],  # edges on the image's border
        [[-0.5, -0.5, 11.5, -0.5, 11.5, 9.5, -0.5, 9.5]],  # edges through the outer pixels' centres
        [[0, 0, 10, 0, 10, 10, 0, 10, 0, 0, 3, 3, 3, 7, 7, 7, 7, 3, 3, 3]],  # a hole through a bridge: even-odd
        [[1, 1, 8, 1, 8, 8, 1, 8], [4, 4, 11, 4, 11, 9, 4, 9]],  # overlapping parts: their union
    ]
    for parts in special:
        np.testing.assert_array_equal(annotation_mask(parts, (10, 12)), reference(parts, 10, 12), err_msg=str(parts))
    assert annotation_mask(special[4], (10, 12)).sum() == 100 - 16
    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        parts = _random_polygons(rng, h, w)
        np.testing.assert_array_equal(annotation_mask(parts, (h, w)), reference(parts, h, w), err_msg=f"{h} x {w}: {parts}")
    mask = rng.random((23, 31)) > 0.6
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    np.testing.assert_array_equal(annotation_mask(rle, (23, 31)), mask)
