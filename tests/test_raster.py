"""pipeline.io.raster and `input.format: raster`: geospatial rasters read window by window through rasterio,
bands picked and scaled per band, no-data pixels 255 in the masks and in no metric, windows of no data
not run, georeferencing carried to the masks table, run.json and summary.json.

Rasters are written here with rasterio (tests/helpers.write_raster): a four-band uint16 scene of a
12-bit sensor in UTM 33N with a border of no data (0). One end-to-end run (`test_raster_run_...`)
asserts what needs Ray; the rest are the reader's and the predictor's functions."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from affine import Affine
from helpers import (
    LONLAT_TRANSFORM,
    TINY_SEGFORMER,
    UTM_33N,
    UTM_TRANSFORM,
    job_config,
    pixel_area_by_geod,
    scene_12bit,
    segpipe_run,
    tiny_checkpoint,
    write_raster,
)
from s3_server import SECRET_KEY

from models import build_model
from pipeline.config import ConfigError, InputConfig, PercentileScale, load_config
from pipeline.io.raster import NODATA_LABEL, RasterWindows, check_raster_job, georef_of, open_dataset, percentile_scale
from pipeline.metrics.semantic import LabelReading, class_areas
from pipeline.predict.predictor import ModelScorer, segment_raster
from pipeline.predict.tiling import TilingSettings, segment_streaming
from pipeline.results.masks import assemble_mask, decode_png
from pipeline.rows import StreamSource

BANDS = [4, 3, 2, 1]


def raster_input(uri, **fields) -> InputConfig:
    return InputConfig(uri=str(uri), format="raster", **fields)


def by_hand(data: np.ndarray, bands: list[int], low: float, high: float) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """The percentile stretch done by hand: per band the low/high percentiles of the valid pixels
    (no band 0), rint(clip((v - lo) / (hi - lo), 0, 1) * 255) as uint8, no data 0; H x W x C, the valid mask, the ranges."""
    picked = data[[b - 1 for b in bands]].astype(np.float64)
    valid = (data != 0).all(axis=0)
    out, ranges = [], []
    for band in picked:
        lo, hi = np.percentile(band[valid], [low, high])
        ranges.append([float(lo), float(hi)])
        out.append(np.rint(np.clip((band - lo) / (hi - lo), 0, 1) * 255))
    image = np.stack(out, axis=-1).astype(np.uint8)
    image[~valid] = 0
    return image, valid, ranges


def tiny_four_band_model(num_classes: int = 3, seed: int = 1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("segformer-b0", num_classes=num_classes, in_channels=4, **TINY_SEGFORMER).eval()


# --------------------------------------------------------------------------- config


def test_raster_config_takes_bands_and_the_three_scales_and_refuses_them_elsewhere(tmp_path):
    cfg = raster_input(tmp_path, bands=[4, 3, 2], scale={"mode": "range", "min": [0, 0, 0], "max": [4095, 4095, 4095]})
    assert cfg.bands == [4, 3, 2] and cfg.scale.mode == "range" and cfg.lists_files
    assert raster_input(tmp_path, scale={"mode": "percentile"}).scale.high == 98
    assert raster_input(tmp_path, scale={"mode": "standard", "mean": [1.0], "std": [2.0]}).scale.std == [2.0]
    base = {"model": {"name": "segformer-b0"}}
    bad = {
        "bands and scale are for input.format: raster": {"uri": str(tmp_path), "bands": [1, 2, 3]},
        "scale has 2 entries per band but bands lists 3": {
            "uri": str(tmp_path), "format": "raster", "bands": [1, 2, 3], "scale": {"mode": "range", "min": [0, 0], "max": [9, 9]}
        },
        "low 98.0 must be below high 2.0": {"uri": str(tmp_path), "format": "raster", "scale": {"mode": "percentile", "low": 98, "high": 2}},
        "input.bands.0: Input should be greater than or equal to 1": {"uri": str(tmp_path), "format": "raster", "bands": [0, 1, 2]},
        "std must be positive": {"uri": str(tmp_path), "format": "raster", "scale": {"mode": "standard", "mean": [0], "std": [0]}},
        "min has 2 entries, max 1: one of each per band": {"uri": str(tmp_path), "format": "raster", "scale": {"mode": "range", "min": [0, 1], "max": [9]}},
        "mean has 1 entries, std 2: one of each per band": {"uri": str(tmp_path), "format": "raster", "scale": {"mode": "standard", "mean": [0], "std": [0, 1]}},
    }  # fmt: skip
    for message, section in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config({**base, "input": section})


# --------------------------------------------------------------------------- the reader


def test_percentile_scale_of_12_bit_bands_is_the_hand_stretch_of_their_valid_pixels(tmp_path):
    data = scene_12bit(300, 400, border=40)
    path = write_raster(tmp_path / "scene.tif", data, nodata=0)
    cfg = raster_input(tmp_path, bands=BANDS, scale={"mode": "percentile", "low": 2, "high": 98})
    expected, valid, ranges = by_hand(data, BANDS, 2, 98)
    with RasterWindows.open(str(path), {}, cfg) as raster:
        assert np.allclose(raster.scale.record(), ranges)
        assert raster.scale.source == "full read"
        assert np.array_equal(raster.read(0, 0, 300, 400), expected)  # not /65535: a 12-bit range spans 0..255
        assert np.array_equal(raster.read(50, 70, 33, 45), expected[50:83, 70:115])
        assert np.array_equal(raster.valid_rows(10, 60), valid[10:70])
        assert raster.empty(0, 0, 40, 400) and not raster.empty(30, 30, 20, 20) and raster.skipped == 1
    # a decimated read (the overviews' way) gives nearly the same range
    with RasterWindows.open(str(path), {}, cfg) as raster, open_dataset(str(path)) as ds:
        from pipeline.io.raster import percentile_scale

        decimated = percentile_scale(ds, BANDS, cfg.scale, max_pixels=10_000)
        assert decimated.source.startswith("decimated read") and np.allclose(decimated.record(), ranges, atol=41)  # 1% of 12 bits


def test_range_and_standard_scales_and_a_remote_raster_read_through_fsspec(tmp_path):
    data = scene_12bit(60, 80, border=10)
    path = write_raster(tmp_path / "s.tif", data, nodata=0)
    fs = fsspec.filesystem("memory")
    fs.pipe("/rasters/s.tif", path.read_bytes())
    cfg = raster_input("memory://rasters", bands=[2], scale={"mode": "range", "min": [1000], "max": [3000]})
    with RasterWindows.open("memory://rasters/s.tif", {}, cfg) as raster:  # GDAL reads ranges through fsspec
        got = raster.read(0, 0, 60, 80)[..., 0]
    band = data[1].astype(np.float64)
    expected = np.rint(np.clip((band - 1000) / 2000, 0, 1) * 255).astype(np.uint8)
    expected[data[1] == 0] = 0
    assert np.array_equal(got, expected)
    standard = raster_input(tmp_path, bands=[1], scale={"mode": "standard", "mean": [2000.0], "std": [500.0]})
    with RasterWindows.open(str(path), {}, standard, ([100.0], [50.0])) as raster:
        window = raster.read(20, 20, 5, 5)[..., 0]
    # the model's normalization (x - 100) / 50 gives back (v - 2000) / 500
    assert window.dtype == np.float32
    assert np.allclose((window - 100) / 50, (data[0, 20:25, 20:25] - 2000) / 500, atol=1e-4)


def test_a_cog_on_s3_is_read_window_by_window_in_range_requests_never_whole(s3, tmp_path, capfd):
    """A 2048 x 2048 RGB COG (256-pixel tiles, overviews 2, 4, 8; random pixels, so tiles do not
    compress away) on the S3 endpoint, opened as the predictor opens it: its header and three windows
    (six tiles) fetch a small part of the file, the windows equal a local read, and a decimated read
    (the percentile scale's) is served from an overview. Before RangeOpener, s3fs's 50 MB read-ahead
    fetched the whole file at the first header read."""
    data = np.random.default_rng(0).integers(0, 256, (3, 2048, 2048), dtype=np.uint8)
    path = tmp_path / "scene.tif"
    profile = dict(driver="COG", width=2048, height=2048, count=3, dtype="uint8", blocksize=256, compress="deflate")
    with rasterio.open(path, "w", crs=UTM_33N, transform=Affine(*UTM_TRANSFORM), **profile) as dst:
        dst.write(data)
    with rasterio.open(path) as local:
        assert local.overviews(1) == [2, 4, 8]
    bucket = s3.bucket("cog")
    s3.fs.put(str(path), f"{bucket[5:]}/scene.tif")
    size = path.stat().st_size
    cfg = raster_input(bucket, storage_options=s3.storage_options)
    windows = [(0, 0, 128, 128), (1000, 1000, 256, 256), (1800, 300, 128, 128)]  # 1 + 4 + 1 tiles
    received = s3.received()
    with RasterWindows.open(f"{bucket}/scene.tif", s3.storage_options, cfg) as remote, RasterWindows.open(str(path), {}, cfg) as local:
        opened = received["GetObject"]
        for box in windows:
            assert not remote.empty(*box)  # as the predictor does: the window checked, then read
            assert np.array_equal(remote.read(*box), local.read(*box))
            top, left, h, w = box
            assert np.array_equal(remote.read(*box), np.moveaxis(data[:, top : top + h, left : left + w], 0, -1))
        windowed = received["GetObject"]
        percentile_scale(remote.ds, [1, 2, 3], PercentileScale(mode="percentile", low=2, high=98), max_pixels=256 * 256)
        decimated = received["GetObject"] - windowed
    tile_bytes = 256 * 256 * 3  # random pixels: a tile compresses to about its raw size
    assert opened < 300 * 1024  # the header: one read of RANGE_READ_AHEAD, not the file
    assert windowed - opened < 6 * tile_bytes + 6 * 256 * 1024  # six tiles, each read with a read-ahead at most
    assert windowed < size / 5, (windowed, size)
    assert decimated < 2 * tile_bytes + 256 * 1024  # the 256 x 256 overview (one tile), not the full-resolution tiles
    assert SECRET_KEY not in capfd.readouterr().err


def test_a_remote_rasters_side_files_are_found_by_listing_the_names_of_its_stem_only(s3, tmp_path):
    """A raster whose valid-data mask is a side file (`.msk`) in a folder of other rasters: read
    from S3, its mask is the local one, and GDAL's look for side files listed the raster's own keys
    (a listing prefixed by its stem), not the folder's."""
    data = np.full((3, 64, 64), 100, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False),
        rasterio.open(
            tmp_path / "m.tif",
            "w",
            driver="GTiff",
            width=64,
            height=64,
            count=3,
            dtype="uint8",
            crs=UTM_33N,
            transform=Affine(*UTM_TRANSFORM),
        ) as dst,
    ):
        dst.write(data)
        dst.write_mask(mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif", "m.tif.msk"]
    bucket = s3.bucket("sidecar")
    for name in ("m.tif", "m.tif.msk"):
        s3.fs.put(str(tmp_path / name), f"{bucket[5:]}/{name}")
    for i in range(20):  # the archive's other rasters
        s3.fs.pipe(f"{bucket[5:]}/n{i:02d}.tif", b"x")
    received = s3.received()
    cfg = raster_input(bucket, storage_options=s3.storage_options)
    with RasterWindows.open(f"{bucket}/m.tif", s3.storage_options, cfg) as remote:
        assert np.array_equal(remote.valid_rows(0, 64), mask > 0)
        assert remote.empty(0, 0, 64, 32) and not remote.empty(0, 32, 64, 32)
    assert 0 < received["listed"] <= 2 * 2  # m.tif and m.tif.msk, at most twice; not the 22 keys


def test_a_raster_without_crs_has_no_georeferencing_and_one_in_utm_has_its_own(tmp_path):
    with open_dataset(str(write_raster(tmp_path / "plain.tif", scene_12bit(20, 30, 2), crs=None))) as ds:
        assert georef_of(ds) == {"crs": None, "transform": None, "resolution": None, "pixel_area_m2": None}
    with open_dataset(str(write_raster(tmp_path / "utm.tif", scene_12bit(20, 30, 2)))) as ds:
        assert georef_of(ds) == {"crs": UTM_33N, "transform": list(UTM_TRANSFORM), "resolution": [10.0, 10.0], "pixel_area_m2": 100.0}
    # a CRS but no geotransform: GDAL's identity (1 m pixels at the origin) was taken as the raster's place and area
    profile = dict(driver="GTiff", width=30, height=20, count=1, dtype="uint8", crs=UTM_33N)
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning), rasterio.open(tmp_path / "nogt.tif", "w", **profile) as dst:
        dst.write(np.ones((1, 20, 30), np.uint8))
    with open_dataset(str(tmp_path / "nogt.tif")) as ds:
        assert georef_of(ds) == {"crs": None, "transform": None, "resolution": None, "pixel_area_m2": None}


def test_bands_the_raster_lacks_a_model_of_other_channels_and_16_bit_data_without_scale_are_refused_up_front(tmp_path):
    path = str(write_raster(tmp_path / "s.tif", scene_12bit(20, 30, 2), nodata=0))
    percentile = {"mode": "percentile"}
    refused = {
        "input.bands: .* has 4 bands, no band 5": (raster_input(tmp_path, bands=[5, 3, 2, 1], scale=percentile), 4, 3),
        "input.bands feeds 3 bands, but the model takes 4 input channels": (
            raster_input(tmp_path, bands=[3, 2, 1], scale=percentile),
            4,
            3,
        ),
        r"input.bands \(null: all 4 bands\) feeds 4 bands, but the model takes 3": (raster_input(tmp_path, scale=percentile), 3, 3),
        "input.scale: .* holds uint16 data, which needs a scale": (raster_input(tmp_path, bands=[3, 2, 1]), 3, 3),
        "the model's 300 classes include it": (raster_input(tmp_path, bands=[3, 2, 1], scale=percentile), 3, 300),
    }
    for message, (cfg, channels, classes) in refused.items():
        with pytest.raises(ConfigError, match=message):
            check_raster_job(cfg, path, channels, classes)
    assert check_raster_job(raster_input(tmp_path, scale=percentile), path, 4, 3)["crs"] == UTM_33N


def test_a_band_the_raster_lacks_is_exit_2_before_anything_is_written(tmp_path, capsys):
    write_raster(tmp_path / "in" / "s.tif", scene_12bit(20, 30, 2), nodata=0)
    ckpt = tiny_checkpoint(tmp_path / "four.safetensors", 3, in_channels=4)
    cfg = job_config(tmp_path, tmp_path / "in", ckpt, input={"format": "raster", "bands": [5, 3, 2, 1], "scale": {"mode": "percentile"}})
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 2
    assert "no band 5" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- masks and metrics


def test_class_areas_skip_pixels_outside_valid_data():
    pred = np.array([[0, 1], [1, 1]], np.uint8)
    label = np.array([[0, 1], [0, 1]], np.uint8)
    valid = np.array([[True, True], [False, True]])
    areas = class_areas(pred, label, 2, 255, valid)
    assert areas.label_area.tolist() == [1, 2] and areas.pred_area.tolist() == [1, 2] and areas.intersection.tolist() == [1, 2]


def test_masks_of_a_percentile_scaled_16_bit_raster_equal_the_hand_scaled_data_with_nodata_255_and_empty_windows_not_run(tmp_path):
    data = scene_12bit()
    path = write_raster(tmp_path / "scene.tif", data, nodata=0, tile=64)
    label = (np.arange(160)[None, :] // 40 % 3).repeat(120, 0).astype(np.uint8)[None]
    label_path = write_raster(tmp_path / "label.tif", label)
    model = tiny_four_band_model()
    scored = []

    def score_fn(pixels):
        scored.append(len(pixels))
        return ModelScorer(model, torch.device("cpu"))(pixels)

    settings = TilingSettings(window=(32, 32), stride=(24, 24), batch_size=16)
    cfg = raster_input(tmp_path, bands=BANDS, scale={"mode": "percentile", "low": 2, "high": 98})
    source = StreamSource(str(path), str(label_path), 120, 160, kind="raster")
    chunks, areas, facts = segment_raster(score_fn, source, settings, cfg, num_classes=3, chunk_size=64, reading=LabelReading(3, 255))
    mask = assemble_mask(
        [
            {
                "image_id": "s",
                "height": 120,
                "width": 160,
                "chunk_y": c.y,
                "chunk_x": c.x,
                "chunk_height": c.height,
                "chunk_width": c.width,
                "mask": c.mask,
            }
            for c in chunks
        ]
    )

    expected_image, valid, ranges = by_hand(data, BANDS, 2, 98)
    hand = np.concatenate(
        [
            band
            for _, band, _ in segment_streaming(
                ModelScorer(model, torch.device("cpu")),
                lambda y, x, h, w: expected_image[y : y + h, x : x + w],
                120,
                160,
                settings,
                channels=None,
            )
        ]
    )
    assert np.array_equal(mask[valid], hand[valid])  # windows of no data skipped: the valid pixels' labels unchanged
    assert (mask[~valid] == NODATA_LABEL).all() and len(np.unique(hand[valid])) > 1
    from pipeline.predict.tiling import plan_windows

    windows = len(plan_windows(120, 160, (32, 32), (24, 24)).windows)
    assert facts["nodata_windows"] > 0 and sum(scored) == windows - facts["nodata_windows"]
    assert np.allclose(facts["band_scale"], ranges) and facts["crs"] == UTM_33N
    assert facts["nodata_pixels"] == int((~valid).sum()) and sum(facts["class_pixels"]) == int(valid.sum())
    # the metrics count valid pixels only
    assert areas.label_area.sum() == valid.sum() and areas.pred_area.sum() == valid.sum()
    assert areas.label_area.tolist() == np.bincount(label[0][valid], minlength=3).tolist()


@pytest.mark.parametrize("scale", [{"mode": "percentile", "low": 2, "high": 98}, {"mode": "range", "min": [0] * 4, "max": [4095] * 4}])
def test_nan_and_inf_in_a_float_raster_are_no_data_as_a_declared_nodata_value_is(tmp_path, scale):
    """A float32 raster declaring no nodata, its no-data pixels NaN (one pixel inf), segments as the
    same scene in uint16 with nodata 0 does: the same masks, percentiles, no-data pixels and skipped
    windows. Before: GDAL's mask calls NaN data where no nodata is declared; one NaN made every
    percentile NaN and the whole raster's input 0 (a mask of nothing, written without a word), and
    a range scale cast NaN to 0, a black pixel segmented as one; declared NaN, an inf pixel was given a
    class in the mask (GDAL's mask calls inf data)."""
    data = scene_12bit()
    data[:, 60, 80] = data[:, 61, 81] = 0  # inside the scene: the inf pixels below
    floats = data.astype(np.float32)
    floats[data == 0] = np.nan
    floats[2, 60, 80] = np.inf
    floats[:, 61, 81] = np.inf  # inf in every band, no NaN beside it: GDAL's mask of a NaN nodata calls it data
    declared = write_raster(tmp_path / "declared.tif", data, nodata=0, tile=64)
    undeclared = write_raster(tmp_path / "nan.tif", floats, tile=64)
    nan_declared = write_raster(tmp_path / "nan_nodata.tif", floats, nodata=np.nan, tile=64)  # GDAL's mask: NaN only, not inf
    model = tiny_four_band_model()
    settings = TilingSettings(window=(32, 32), stride=(24, 24), batch_size=16)
    cfg = raster_input(tmp_path, bands=BANDS, scale=scale)
    runs = [
        segment_raster(
            ModelScorer(model, torch.device("cpu")),
            StreamSource(str(path), None, 120, 160, kind="raster"),
            settings,
            cfg,
            num_classes=3,
            chunk_size=64,
            reading=LabelReading(3, 255),
        )
        for path in (declared, undeclared, nan_declared)
    ]
    (chunks, _, facts), *floating = runs
    for nan_chunks, _, nan_facts in floating:
        assert [c.mask for c in nan_chunks] == [c.mask for c in chunks]
        for key in ("band_scale", "nodata_windows", "nodata_pixels", "class_pixels"):
            assert nan_facts[key] == facts[key], key
    assert facts["nodata_pixels"] == int((data == 0).any(axis=0).sum()) and facts["nodata_windows"] > 0
    assert all(np.isfinite(facts["band_scale"]).ravel())


def test_a_label_rasters_nodata_pixels_count_in_no_class(tmp_path):
    """A label raster that declares nodata 0 (land-cover labels often do) over classes 1 and 2: its
    nodata pixels count nowhere, as ignore_index does, not as class 0 of the model; the same label
    without the declaration counts them as class 0, as before. Before: class 0's label area was the
    nodata pixels, its IoU and every mean with it."""
    data = scene_12bit()
    path = write_raster(tmp_path / "scene.tif", data, nodata=0, tile=64)
    label = (1 + np.arange(160)[None, :] // 40 % 2).repeat(120, 0).astype(np.uint8)
    label[:50] = 0  # the scene is valid from row 32
    declared = write_raster(tmp_path / "declared.tif", label[None], nodata=0)
    undeclared = write_raster(tmp_path / "undeclared.tif", label[None])
    model = tiny_four_band_model()
    settings = TilingSettings(window=(32, 32), stride=(24, 24), batch_size=16)
    cfg = raster_input(tmp_path, bands=BANDS, scale={"mode": "percentile", "low": 2, "high": 98})
    areas = {}
    for name, label_path in (("declared", declared), ("undeclared", undeclared)):
        source = StreamSource(str(path), str(label_path), 120, 160, kind="raster")
        chunks, areas[name], _ = segment_raster(
            ModelScorer(model, torch.device("cpu")), source, settings, cfg, num_classes=3, chunk_size=None, reading=LabelReading(3, 255)
        )
        mask = decode_png(chunks[0].mask)
    valid = (data != 0).all(axis=0)
    expected = class_areas(mask, np.where(label == 0, 255, label), 3, 255, valid)
    for field in ("intersection", "union", "pred_area", "label_area"):
        assert np.array_equal(getattr(areas["declared"], field), getattr(expected, field)), field
    assert areas["declared"].label_area[0] == 0
    assert areas["undeclared"].label_area[0] == int((valid & (label == 0)).sum()) > 0


# --------------------------------------------------------------------------- one run, end to end


def test_raster_run_masks_nodata_metrics_georeferencing_and_cog_export(ray_session, tmp_path, capsys):
    from jobs.cli import main

    data = scene_12bit()
    write_raster(tmp_path / "in" / "scene.tif", data, nodata=0, tile=64)
    write_raster(tmp_path / "in" / "plain.tif", scene_12bit(40, 50, border=5), crs=None, nodata=0)
    lonlat = scene_12bit(40, 50, border=5, seed=2)
    write_raster(tmp_path / "in" / "lonlat.tif", lonlat, crs="EPSG:4326", transform=LONLAT_TRANSFORM, nodata=0)
    label = (np.arange(160)[None, :] // 40 % 3).repeat(120, 0).astype(np.uint8)[None]
    write_raster(tmp_path / "labels" / "scene.tif", label)
    ckpt = tiny_checkpoint(tmp_path / "four.safetensors", 3, seed=1, in_channels=4)
    cfg = job_config(
        tmp_path,
        tmp_path / "in",
        ckpt,
        labels=tmp_path / "labels",
        input={"format": "raster", "bands": BANDS, "scale": {"mode": "percentile", "low": 2, "high": 98}},
        output={"chunk_size": 64},
    )
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    printed = capsys.readouterr().out
    assert printed.count("without a CRS or geotransform (first: plain.tif)") == 1  # said once
    run = tmp_path / "runs" / "t1"
    masks = pq.read_table(run / "masks").to_pylist()
    scene_rows = [r for r in masks if r["image_id"] == "scene.tif"]
    assert {r["crs"] for r in scene_rows} == {UTM_33N} and scene_rows[0]["transform"] == list(UTM_TRANSFORM)
    assert scene_rows[0]["resolution"] == [10.0, 10.0] and scene_rows[0]["nodata_windows"] > 0
    assert {r["crs"] for r in masks if r["image_id"] == "plain.tif"} == {None}
    mask = assemble_mask(scene_rows)
    valid = (data != 0).all(axis=0)
    assert (mask[~valid] == NODATA_LABEL).all() and (mask[valid] < 3).all()
    # the metrics table: one row per LABELED image (the public contract), its counts and its areas in m^2
    metrics = pq.read_table(run / "metrics").to_pylist()
    assert [m["image_id"] for m in metrics] == ["scene.tif"] and sum(metrics[0]["label_area"]) == valid.sum()
    scene = metrics[0]
    assert scene["pred_area_m2"] == [100.0 * (mask == k).sum() for k in range(3)]  # 10 m pixels; no data (255) in none
    assert scene["label_area_m2"] == [100.0 * (label[0][valid] == k).sum() for k in range(3)]
    # every raster's predicted m^2 in its masks rows, each chunk's row its own pixels' (null without a CRS)
    assert len(scene_rows) == 6  # 120 x 160 in chunks of 64
    for r in scene_rows:
        chunk = mask[r["chunk_y"] : r["chunk_y"] + r["chunk_height"], r["chunk_x"] : r["chunk_x"] + r["chunk_width"]]
        assert r["class_area_m2"] == [100.0 * (chunk == k).sum() for k in range(3)]
    assert {tuple(r["class_area_m2"] or ()) for r in masks if r["image_id"] == "plain.tif"} == {()}
    lonlat_rows = [r for r in masks if r["image_id"] == "lonlat.tif"]
    lonlat_mask = assemble_mask(lonlat_rows)
    pixel_m2 = np.array([pixel_area_by_geod(LONLAT_TRANSFORM, row, 0) for row in range(40)])[:, None].repeat(50, 1)
    assert (lonlat_mask[~(lonlat != 0).all(axis=0)] == NODATA_LABEL).all()
    lonlat_m2 = [pixel_m2[lonlat_mask == k].sum() for k in range(3)]
    assert len(lonlat_rows) == 1 and lonlat_rows[0]["class_area_m2"] == pytest.approx(lonlat_m2, rel=1e-9)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["labeled_images"] == 1
    area = summary["area_m2"]
    assert area["images"] == 2 and area["labeled_images"] == 1 and list(area["predicted"]) == ["0", "1", "2"]
    assert area["predicted"] == pytest.approx({str(k): scene["pred_area_m2"][k] + lonlat_m2[k] for k in range(3)}, rel=1e-9)
    assert area["predicted_labeled"] == dict(zip(["0", "1", "2"], scene["pred_area_m2"]))
    assert sum(area["labeled"].values()) == pytest.approx(valid.sum() * 100.0)
    assert "predicted m²" in printed and "areas in m² over 2 images, labels of 1" in printed
    info = json.loads((run / "run.json").read_text())
    raster = info["raster"]
    assert raster["without_crs"] == ["plain.tif"] and raster["nodata_windows"] >= scene_rows[0]["nodata_windows"]
    assert np.allclose(raster["rasters"]["scene.tif"]["band_scale"], by_hand(data, BANDS, 2, 98)[2])

    # the COG of the run: its input's CRS, transform and nodata, overviews, a valid COG
    from rio_cogeo.cogeo import cog_validate

    assert main(["export", str(run), "--to", str(tmp_path / "cog"), "--format", "cog"]) == 0
    assert "plain.tif: its raster has no CRS" in capsys.readouterr().err
    with rasterio.open(tmp_path / "cog" / "scene.tif") as cog, rasterio.open(tmp_path / "in" / "scene.tif") as src:
        assert cog.crs == src.crs and cog.transform == src.transform and cog.nodata == NODATA_LABEL
        assert np.array_equal(cog.read(1), mask) and cog.colormap(1)[NODATA_LABEL] == (0, 0, 0, 0)
    assert cog_validate(str(tmp_path / "cog" / "scene.tif"))[0]


def test_an_instance_run_over_a_raster_merges_objects_across_windows_skips_nodata_and_exports_a_polygon_per_instance(ray_session, tmp_path):
    """The instance task through `segpipe run` over an 8-bit three-band raster with a no-data block:
    windows of no data are not run, objects come merged across windows (the streaming instance merger)
    into the instances table, the label map has 255 over no data, its masks rows their m^2 (no label, no metrics row); the
    GeoParquet export has one (multi)polygon per instance that rasterises back to its mask."""
    import geopandas as gpd
    from affine import Affine
    from helpers import tiny_hf_checkpoint
    from pycocotools import mask as coco_mask
    from rasterio.features import rasterize

    from pipeline.analysis.export import export_run

    rng = np.random.default_rng(4)
    data = rng.integers(1, 256, (3, 64, 160)).astype(np.uint8)
    data[:, :, :64] = 0  # no data: the first window (columns 0-63) is not run, the two after it are
    write_raster(tmp_path / "in" / "rgb.tif", data, nodata=0)
    tiny_hf_checkpoint("maskformer", tmp_path / "maskformer", seed=3)  # seed 3: its queries name classes
    cfg = job_config(
        tmp_path,
        tmp_path / "in",
        tmp_path / "maskformer",
        run_id="inst",
        input={"format": "raster"},
        inference={"task": "instance", "window": [64, 64], "stride": [48, 48], "objects": {"threshold": 0.0, "top_k": 4}},
        output={"chunk_size": 64},
    )
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run = tmp_path / "runs" / "inst"
    masks = pq.read_table(run / "masks").to_pylist()
    assert masks[0]["nodata_windows"] > 0
    valid = (data != 0).all(axis=0)
    label_map = assemble_mask(masks)
    assert (label_map[~valid] == NODATA_LABEL).all() and (label_map[valid] < 7).all()
    assert pq.read_table(run / "metrics").num_rows == 0  # no label: no metrics row
    assert sum(sum(r["class_area_m2"]) for r in masks) == pytest.approx(valid.sum() * 100.0)  # its chunks' m^2
    instances = sorted(pq.read_table(run / "instances").to_pylist(), key=lambda r: r["instance_id"])
    assert instances and all((r["height"], r["width"]) == (64, 160) for r in instances)
    rle = lambda r: {"size": [64, 160], "counts": r["rle"]}
    # an object merged across windows spans more than one window's columns; none lies in the skipped no-data windows alone
    assert any(r["bbox"][2] > 64 for r in instances)
    assert all(coco_mask.decode(rle(r))[:, 64:].any() for r in instances)

    assert export_run(str(run), str(tmp_path / "gpq"), "geoparquet").written == ["rgb.parquet"]
    frame = gpd.read_parquet(tmp_path / "gpq" / "rgb.parquet")
    assert list(frame.instance_id) == [r["instance_id"] for r in instances] and frame.crs.to_epsg() == 32633
    assert frame.score.tolist() == pytest.approx([r["score"] for r in instances])
    for geometry, r, area in zip(frame.geometry, instances, frame["area"]):
        back = rasterize([(geometry, 1)], out_shape=(64, 160), transform=Affine(*UTM_TRANSFORM), fill=0, dtype="uint8")
        assert np.array_equal(back, coco_mask.decode(rle(r))) and area == pytest.approx(r["area"] * 100.0)
