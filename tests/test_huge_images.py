"""Huge images: windowed TIFF reads, chunked mask rows, and a 12000 x 12000 TIFF through the job in
bounded memory (pipeline.tiff, pipeline.predictor, pipeline.masks)."""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from jobs.cli import main
from models import build_model, load_model, save_native
from pipeline import tiff as huge
from pipeline import source as source_module
from pipeline.predictor import segment_tiff
from pipeline.config import InputConfig
from pipeline.decode import decode_image
from pipeline.rows import Prediction, StreamSource
from pipeline.tiff import StreamError, TiffWindows, probe_stream
from pipeline.metrics import class_areas
from pipeline.predictor import ModelScorer
from pipeline.runstore import RunStore, part_name
from pipeline.masks import ChunkedMaskWriter, PngRows, assemble_mask, chunk_boxes, quantize_probability, read_mask
from pipeline.sink import part_tables
from pipeline.rows import SourceUnit
from pipeline.source import ImageFolderReader
from pipeline.tiling import TilingSettings, segment_images, with_tta

ROOT = Path(__file__).resolve().parents[1]
# a SegFormer small enough to push ~600 windows of 500 x 500 through on one CPU thread in seconds
TINY_SEGFORMER = dict(hidden_sizes=[8, 16, 32, 64], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], decoder_dim=16,
                      strides=[8, 2, 2, 2], patch_sizes=[8, 3, 3, 3])


# --------------------------------------------------------------------------- windowed reads

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (301, 517, 3), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (301, 517), dtype=np.uint16)
LAYOUTS = {
    "tiled-zlib": (RGB, dict(tile=(64, 128), compression="zlib")),
    "tiled-zlib-predictor": (RGB, dict(tile=(64, 64), compression="zlib", predictor=True)),
    "tiled-uncompressed": (RGB, dict(tile=(32, 96))),
    "strips-zlib": (RGB, dict(rowsperstrip=13, compression="zlib")),
    "one-uncompressed-strip": (RGB, dict(rowsperstrip=301)),
    "planar-separate-tiled": (np.moveaxis(RGB, 2, 0).copy(), dict(tile=(64, 64), planarconfig="separate", photometric="rgb", compression="zlib")),
    "planar-separate-strips": (np.moveaxis(RGB, 2, 0).copy(), dict(rowsperstrip=20, planarconfig="separate", photometric="rgb")),
    "gray16-tiled-lzma": (GRAY16, dict(tile=(64, 64), compression="lzma")),
    "big-endian-strips": (GRAY16, dict(rowsperstrip=9, byteorder=">")),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tiff_windows_read_what_tifffile_wrote(tmp_path, layout):
    array, kwargs = LAYOUTS[layout]
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, array, **kwargs)
    expected = np.moveaxis(array, 0, 2) if "separate" in layout else array
    expected = expected if expected.ndim == 3 else expected[..., None]
    rng = np.random.default_rng(1)
    with TiffWindows.open(str(path), cache_rows=40) as tiff:
        assert tiff.problem == ""
        assert (tiff.height, tiff.width, tiff.samples) == (301, 517, expected.shape[2])
        for _ in range(25):
            y, x = int(rng.integers(0, 301)), int(rng.integers(0, 517))
            h, w = int(rng.integers(1, 302 - y)), int(rng.integers(1, 518 - x))
            np.testing.assert_array_equal(tiff.read(y, x, h, w), expected[y : y + h, x : x + w])
        rgb = tiff.rgb(10, 20, 30, 40)
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    if expected.dtype == np.uint16:  # scaled like decode_image: the full 16-bit range to 0..255
        gray = np.round(expected[10:40, 20:60, 0] * (255 / 65535)).astype(np.uint8)
        np.testing.assert_array_equal(rgb, np.repeat(gray[..., None], 3, axis=2))
    else:
        np.testing.assert_array_equal(rgb, expected[10:40, 20:60])


def test_overlapping_windows_decode_each_tile_once(tmp_path):
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, RGB, tile=(32, 32), compression="zlib")
    settings = TilingSettings(window=(64, 64), stride=(40, 40))
    plan_rows = [0, 40, 80, 120, 160, 200, 237]  # window starts of 301 rows, as plan_windows puts them
    with TiffWindows.open(str(path), cache_rows=settings.window[0]) as tiff:
        for y in plan_rows:
            for x in [*range(0, 517 - 64, 40), 517 - 64]:
                tiff.read(y, x, 64, 64)
        tiles = math.ceil(301 / 32) * math.ceil(517 / 32)
        assert tiff.segments_decoded == tiles  # every tile once, though windows overlap in both axes
    with TiffWindows.open(str(path), cache_rows=0) as tiff:
        tiff.cache_bytes = 0  # no cache at all: overlapping windows decode tiles again
        for y in plan_rows:
            for x in [*range(0, 517 - 64, 40), 517 - 64]:
                tiff.read(y, x, 64, 64)
        assert tiff.segments_decoded > 2 * tiles


def test_probe_stream_decides_from_the_header(tmp_path, monkeypatch):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    tifffile.imwrite(images / "big.tif", RGB, tile=(64, 64), compression="zlib")
    tifffile.imwrite(labels / "big.tif", (GRAY16 % 3).astype(np.uint8), rowsperstrip=16)
    tifffile.imwrite(labels / "small.tif", np.zeros((300, 517), np.uint8))
    Image.fromarray(RGB).save(images / "big.png")
    Image.fromarray((GRAY16 % 3).astype(np.uint8)).save(labels / "big.png")
    cfg = InputConfig(uri=str(images), stream_above_pixels=100_000, max_pixels=120_000)
    source = probe_stream(str(images / "big.tif"), str(labels / "big.tif"), cfg)
    assert source == StreamSource(str(images / "big.tif"), str(labels / "big.tif"), 301, 517)
    assert probe_stream(str(images / "big.png"), None, cfg) is None  # not a TIFF: decoded whole (or a max_pixels error)
    assert probe_stream(str(images / "big.tif"), None, cfg.model_copy(update={"stream_above_pixels": 200_000})) is None
    assert probe_stream(str(images / "big.tif"), None, cfg.model_copy(update={"stream_above_pixels": None})) is None
    with pytest.raises(StreamError, match="must be a tiled or striped TIFF"):
        probe_stream(str(images / "big.tif"), str(labels / "big.png"), cfg)
    with pytest.raises(StreamError, match="label is 517 x 300 but the image is 517 x 301"):
        probe_stream(str(images / "big.tif"), str(labels / "small.tif"), cfg)
    # a layout it cannot read in parts: decoded whole within max_pixels, an error beyond
    tifffile.imwrite(images / "strip.tif", RGB, rowsperstrip=301, compression="zlib")
    monkeypatch.setattr(huge, "MAX_SEGMENT_BYTES", 100_000)
    assert probe_stream(str(images / "strip.tif"), None, cfg.model_copy(update={"max_pixels": 200_000})) is None
    with pytest.raises(StreamError, match="over the limit of 120000 .*re-save it tiled"):
        probe_stream(str(images / "strip.tif"), None, cfg)


# --------------------------------------------------------------------------- bounds


def sparse_tiff(path: Path, height: int, width: int, tile: int = 512) -> None:
    """A tiled RGB TIFF whose header claims height x width but holds one tile: tifffile writes the
    others empty (byte count 0, read as zeros), so a 120000 x 120000 header is a file of 440 kB."""
    count = math.ceil(height / tile) * math.ceil(width / tile)
    tiles = (np.zeros((tile, tile, 3), np.uint8) if i == 0 else None for i in range(count))
    tifffile.imwrite(path, tiles, shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="zlib")


def patch_tag(path: Path, code: int, value: int) -> None:
    """Overwrite the value of a one-value SHORT or LONG tag of the first page in place."""
    with tifffile.TiffFile(path) as tiff:
        tag = tiff.pages.first.tags[code]
        assert tag.count == 1 and tag.dtype in (3, 4), (tag.count, tag.dtype)
        offset, fmt = tag.valueoffset, tiff.byteorder + ("H" if tag.dtype == 3 else "I")
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def test_probe_stream_bounds_every_image_by_its_header(tmp_path):
    sparse_tiff(tmp_path / "120k.tif", 120_000, 120_000)
    sparse_tiff(tmp_path / "60k.tif", 60_000, 60_000)
    sparse_tiff(tmp_path / "60k-label.tif", 60_000, 60_000)  # RGB: were it read, not a label
    assert (tmp_path / "120k.tif").stat().st_size < 2**20
    defaults = InputConfig(uri=str(tmp_path))
    assert defaults.max_stream_pixels == 10_000_000_000 < 120_000**2
    for name, cfg in (("120k.tif", defaults), ("60k.tif", defaults.model_copy(update={"max_stream_pixels": 1_000_000_000}))):
        with pytest.raises(StreamError) as error:
            probe_stream(str(tmp_path / name), None, cfg)
        message = str(error.value)
        assert "\n" not in message and "input.max_pixels" in message and "input.max_stream_pixels" in message, message
        assert f"{cfg.max_pixels} pixels" in message and str(cfg.max_stream_pixels) in message, message
    # within both limits it streams; its label is bounded by the image's size before anything else
    uri = str(tmp_path / "60k.tif")
    assert probe_stream(uri, None, defaults) == StreamSource(uri, None, 60_000, 60_000)
    with pytest.raises(StreamError, match="label is 120000 x 120000 but the image is 60000 x 60000"):
        probe_stream(uri, str(tmp_path / "120k.tif"), defaults)
    with pytest.raises(StreamError, match="label .*60k-label.tif cannot be read window by window: 3 samples"):
        probe_stream(uri, str(tmp_path / "60k-label.tif"), defaults)
    # over max_stream_pixels but within max_pixels: decoded whole, which max_pixels bounds
    tifffile.imwrite(tmp_path / "small.tif", RGB, tile=(64, 64), compression="zlib")
    small = InputConfig(uri=str(tmp_path), stream_above_pixels=100_000, max_stream_pixels=120_000, max_pixels=200_000)
    assert probe_stream(str(tmp_path / "small.tif"), None, small) is None
    with pytest.raises(StreamError, match="over the limits of 150000 pixels .*input.max_pixels.* and 120000 .*input.max_stream_pixels"):
        probe_stream(str(tmp_path / "small.tif"), None, small.model_copy(update={"max_pixels": 150_000}))


def test_a_bomb_is_an_error_sample_and_no_bytes_are_read(tmp_path, monkeypatch):
    sparse_tiff(tmp_path / "bomb.tif", 120_000, 120_000)
    fetched = []
    monkeypatch.setattr(source_module, "read_bytes", lambda fs, uri, **kw: fetched.append(uri) or b"")
    unit = SourceUnit(index=0, format="images", uris=(str(tmp_path / "bomb.tif"),), image_ids=("bomb.tif",))
    [sample] = ImageFolderReader(InputConfig(uri=str(tmp_path))).read_unit(unit)
    assert sample.error and "120000 x 120000" in sample.error and "input.max_stream_pixels" in sample.error
    assert sample.image_bytes is None and sample.stream is None and fetched == []


@pytest.mark.parametrize("layout", ["tiled-zlib", "strips-uncompressed"])
def test_a_header_that_claims_more_than_its_file_holds(tmp_path, layout):
    kwargs = dict(tile=(64, 64), compression="zlib") if layout == "tiled-zlib" else dict(rowsperstrip=16)
    cfg = InputConfig(uri=str(tmp_path), stream_above_pixels=100_000)
    kind = "tile" if layout == "tiled-zlib" else "strip"
    # a size its segment table does not cover: 517 wide claimed 4 x as wide
    tifffile.imwrite(tmp_path / "wide.tif", RGB, **kwargs)
    patch_tag(tmp_path / "wide.tif", 256, 4 * 517)  # ImageWidth
    if kind == "tile":
        with pytest.raises(StreamError, match=r"claims 2068 x 301 pixels, 165 tiles of 64 x 64, but lists 45 tile offsets"):
            probe_stream(str(tmp_path / "wide.tif"), None, cfg)
    else:  # the same number of strips, each of them too short for rows 4 x as wide
        with pytest.raises(StreamError, match=r"strip 0 of 19 holds 24816 bytes where its uncompressed pixels take 99264"):
            probe_stream(str(tmp_path / "wide.tif"), None, cfg)
    # segments past the end of the file: the pixel data cut off behind the header
    tifffile.imwrite(tmp_path / "cut.tif", RGB, **kwargs)
    with tifffile.TiffFile(tmp_path / "cut.tif") as tiff:
        assert max(tiff.pages.first.dataoffsets) > 100_000  # tifffile writes the header first
    data = (tmp_path / "cut.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) - 50_000])
    with pytest.raises(StreamError, match=rf"claims 517 x 301 pixels but {kind} \d+ of \d+ ends at byte \d+, past the end of the file \({len(data) - 50_000} bytes\)"):
        probe_stream(str(tmp_path / "cut.tif"), None, cfg)
    # a damaged label likewise, once its size matches
    tifffile.imwrite(tmp_path / "image.tif", RGB, tile=(64, 64))
    label = (GRAY16 % 3).astype(np.uint8)
    tifffile.imwrite(tmp_path / "label.tif", label, **kwargs)
    data = (tmp_path / "label.tif").read_bytes()
    (tmp_path / "label.tif").write_bytes(data[: len(data) - 20_000])
    with pytest.raises(StreamError, match=r"label .*label.tif cannot be read: .*past the end of the file"):
        probe_stream(str(tmp_path / "image.tif"), str(tmp_path / "label.tif"), cfg)


def test_a_turned_tiff_is_not_streamed_while_images_are_turned_upright(tmp_path):
    orientation = [(274, "H", 1, 6, True)]  # Orientation 6: shown turned 90 degrees clockwise
    tifffile.imwrite(tmp_path / "turned.tif", RGB, tile=(64, 64), compression="zlib", extratags=orientation)
    tifffile.imwrite(tmp_path / "label.tif", (GRAY16 % 3).astype(np.uint8), tile=(64, 64), extratags=orientation)
    tifffile.imwrite(tmp_path / "upright.tif", RGB, tile=(64, 64), compression="zlib")
    # decoded whole it is turned upright, as a viewer shows it; windows read it as stored
    np.testing.assert_array_equal(decode_image((tmp_path / "turned.tif").read_bytes()), np.rot90(RGB, -1))
    cfg = InputConfig(uri=str(tmp_path), stream_above_pixels=100_000, max_pixels=200_000)
    assert probe_stream(str(tmp_path / "turned.tif"), None, cfg) is None  # decoded whole, turned
    with pytest.raises(StreamError, match=r"over the limit of 120000 .*: its Orientation tag \(6\)"):
        probe_stream(str(tmp_path / "turned.tif"), None, cfg.model_copy(update={"max_pixels": 120_000}))
    with pytest.raises(StreamError, match=r"label .*label.tif cannot be read window by window: its Orientation tag \(6\)"):
        probe_stream(str(tmp_path / "upright.tif"), str(tmp_path / "label.tif"), cfg)
    as_stored = cfg.model_copy(update={"exif_transpose": False})
    turned = str(tmp_path / "turned.tif")
    assert probe_stream(turned, str(tmp_path / "label.tif"), as_stored) == StreamSource(turned, str(tmp_path / "label.tif"), 301, 517)


def test_segment_tiff_reports_rows_as_bands_finish(tmp_path):
    tifffile.imwrite(tmp_path / "scene.tif", RGB, tile=(64, 64), compression="zlib")
    tifffile.imwrite(tmp_path / "label.tif", (GRAY16 % 2).astype(np.uint8), rowsperstrip=32)
    seen = []
    chunks, areas = segment_tiff(
        lambda pixels: pixels[:, :2].float(), StreamSource(str(tmp_path / "scene.tif"), str(tmp_path / "label.tif"), 301, 517),
        TilingSettings(window=(64, 64), stride=(48, 48), batch_size=4), num_classes=2, chunk_size=128,
        on_rows=lambda done, total: seen.append((done, total)),
    )
    assert len(seen) > 2 and seen[-1] == (301, 301) and {total for _, total in seen} == {301}
    assert all(a < b for (a, _), (b, _) in zip(seen, seen[1:]))
    assert areas is not None and len(chunks) == 3 * 5
    # a label replaced by one of another size since the probe is refused, not misread
    tifffile.imwrite(tmp_path / "label.tif", np.zeros((300, 517), np.uint8))
    with pytest.raises(StreamError, match="label .* is 517 x 300 but the image is 517 x 301"):
        segment_tiff(lambda pixels: pixels[:, :2].float(), StreamSource(str(tmp_path / "scene.tif"), str(tmp_path / "label.tif"), 301, 517),
                          TilingSettings(window=(64, 64), stride=(48, 48)), num_classes=2, chunk_size=None)


# --------------------------------------------------------------------------- chunked masks


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_png_rows_encodes_bands_that_pillow_decodes(bit_depth):
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 2**bit_depth, (37, 53)).astype(np.uint8 if bit_depth == 8 else np.uint16)
    for row_filter in ("up", "sub"):
        png = PngRows(37, 53, bit_depth, row_filter)
        for band in (rows[:10], rows[10:11], rows[11:11], rows[11:]):
            png.add(band)
        np.testing.assert_array_equal(np.asarray(Image.open(__import__("io").BytesIO(png.finish()))), rows)
    with pytest.raises(ValueError, match="36 of 37 rows"):
        short = PngRows(37, 53, bit_depth)
        short.add(rows[:36])
        short.finish()


def test_chunked_mask_rows_round_trip_through_the_sink(tmp_path):
    rng = np.random.default_rng(3)
    big_labels = rng.integers(0, 2, (300, 410)).astype(np.uint8)
    big_probability = rng.random((300, 410)).astype(np.float32)
    small_labels = rng.integers(0, 2, (50, 60)).astype(np.uint8)
    writer = ChunkedMaskWriter(300, 410, 128, num_classes=2, binary=True)
    done = []
    for y0, y1 in ((0, 100), (100, 128), (128, 129), (129, 300)):  # bands that do not follow chunk rows
        done += writer.add(y0, big_labels[y0:y1], big_probability[y0:y1])
    assert len(done) == 12 and [(c.y, c.x, c.height, c.width) for c in done] == chunk_boxes(300, 410, 128)
    small = ChunkedMaskWriter(50, 60, 128, num_classes=2, binary=True)
    small.add(0, small_labels, np.zeros((50, 60), np.float32))

    rows = [Prediction(0, "big.tif", 300, 410, writer.finish()), Prediction(0, "small.png", 50, 60, small.finish())]
    RunStore(str(tmp_path), {}, "r").write_part(part_name(0, 0, 0), *part_tables(rows, binary=True, attempt=0))
    table = pq.read_table(next((tmp_path / "r" / "masks").glob("*.parquet")))
    assert table.num_rows == 13
    by_image = {}
    for row in table.select(["image_id", "height", "width", "chunk_y", "chunk_x", "chunk_height", "chunk_width"]).to_pylist():
        by_image.setdefault(row.pop("image_id"), []).append(tuple(row.values()))
    assert by_image["small.png"] == [(50, 60, 0, 0, 50, 60)]  # one row, chunk fields 0, 0, H, W
    assert all(r[:2] == (300, 410) for r in by_image["big.tif"])  # full size in every chunk row
    np.testing.assert_array_equal(read_mask(str(tmp_path / "r"), "big.tif"), big_labels)
    np.testing.assert_array_equal(read_mask(str(tmp_path / "r"), "big.tif", "probability"), quantize_probability(big_probability))
    np.testing.assert_array_equal(read_mask(table, "small.png"), small_labels)
    incomplete = table.filter(pa.compute.equal(table.column("image_id"), "big.tif")).slice(1)
    with pytest.raises(ValueError, match="cover"):
        assemble_mask(incomplete)


# --------------------------------------------------------------------------- through `segpipe run`


def test_streamed_tiff_through_segpipe_run(ray_session, tmp_path):
    """A tiled TIFF over input.max_pixels is streamed (decoding it whole would be an error row),
    with TTA, a striped TIFF label and chunked mask rows; it equals the in-memory computation."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)
    label = rng.integers(0, 2, (333, 517)).astype(np.uint8)
    label[:5] = 255
    tifffile.imwrite(images / "scene.tif", image, tile=(64, 64), compression="zlib", photometric="rgb")
    tifffile.imwrite(labels / "scene.tif", label, rowsperstrip=10, compression="zlib")
    small = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(small).save(images / "small.png")
    tifffile.imwrite(images / "float.tif", np.zeros((400, 400), np.float32), tile=(64, 64))  # cannot be streamed
    model = build_model("segformer-b0", num_classes=2, **TINY_SEGFORMER)
    checkpoint = tmp_path / "binary.safetensors"
    save_native(model, checkpoint)
    inference = {"mode": "slide", "window": [64, 64], "stride": [48, 48], "blend": "gaussian", "batch_size": 4,
                 "tta": {"flip": True, "scales": [1.0, 0.75]}}
    config = {
        "run_id": "streamed",
        "input": {"uri": str(images), "labels": {"uri": str(labels)}, "stream_above_pixels": 100_000, "max_pixels": 150_000},
        "model": {"checkpoint": str(checkpoint)},
        "inference": inference,
        "resources": {"actors": 1},
        "output": {"uri": str(tmp_path / "runs"), "chunk_size": 128},
        "max_error_fraction": 0.5,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    run = tmp_path / "runs" / "streamed"
    masks = pq.read_table([str(p) for p in sorted((run / "masks").glob("*.parquet"))])
    ids = masks.column("image_id").to_pylist()
    assert ids.count("scene.tif") == 3 * 5 and ids.count("small.png") == 1
    errors = pq.read_table([str(p) for p in sorted((run / "errors").glob("*.parquet"))]).to_pylist()
    assert [e["image_id"] for e in errors] == ["float.tif"] and "cannot be read window by window" in errors[0]["error"]
    assert json.loads((run / "summary.json").read_text())["images"] == 2  # images, not chunk rows

    loaded = load_model(str(checkpoint)).eval()
    score_fn = with_tta(ModelScorer(loaded, torch.device("cpu")), flip=True, scales=[1.0, 0.75])
    settings = TilingSettings(window=(64, 64), stride=(48, 48), blend="gaussian", batch_size=4, binary=True)
    expected = segment_images(score_fn, [image, small], settings)
    streamed = read_mask(str(run), "scene.tif")
    assert streamed.shape == (333, 517)
    assert (streamed == expected[0].labels).mean() >= 0.999
    probability = read_mask(str(run), "scene.tif", "probability").astype(int)
    assert (np.abs(probability - quantize_probability(expected[0].probability)) <= 1).mean() >= 0.999
    assert (read_mask(str(run), "small.png") == expected[1].labels).mean() >= 0.999
    # class areas summed band by band equal those of the whole written mask against the whole label
    metrics = {r["image_id"]: r for r in pq.read_table([str(p) for p in (run / "metrics").glob("*.parquet")]).to_pylist()}
    areas = class_areas(streamed, label.astype(np.int64), 2, 255)
    for name in ("intersection", "union", "pred_area", "label_area"):
        assert metrics["scene.tif"][name] == getattr(areas, name).tolist()


def test_streamed_images_need_slide_mode(tmp_path):
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, RGB, tile=(64, 64))
    with pytest.raises(StreamError, match="inference.mode must be 'slide'"):
        segment_tiff(lambda x: x[:, :2], StreamSource(str(path), None, 301, 517), TilingSettings(mode="whole"),
                          num_classes=2, chunk_size=None)


# --------------------------------------------------------------------------- 12000 x 12000 in bounded memory

# The short image comes first in the same job: the actor's peak when it opens the huge one is the
# peak of a 500-row image; whatever the remaining 11500 rows add shows as growth beyond it.
HUGE, SHORT = (12000, 12000), (500, 12000)  # (height, width): the same width, 24x the rows
CLASSES = 4
WINDOW = 500  # divides 12000: windows do not overlap, so a crop on the window grid is computed alone
IGNORED_ROWS = 7


def scene_tile(y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Pixels of the synthetic scene at any region: bands and checks that deflate well, no noise.
    Each channel is an outer sum (or xor) of a row and a column pattern, in uint8 (wrapping mod 256)."""
    ys, xs = np.arange(y0, y0 + height), np.arange(x0, x0 + width)
    out = np.empty((height, width, 3), np.uint8)
    np.add.outer((ys // 37 * 53 % 256).astype(np.uint8), (xs // 29 * 17 % 256).astype(np.uint8), out=out[..., 0])
    np.add.outer((ys // 11 * 3 % 256).astype(np.uint8), (xs // 13 % 256).astype(np.uint8), out=out[..., 1])
    np.bitwise_xor.outer((ys // 200 % 2 * 200).astype(np.uint8), (xs // 300 % 2 * 200).astype(np.uint8), out=out[..., 2])
    out[..., 2] += (xs % 50).astype(np.uint8)
    return out


def scene_label(y0: int, x0: int, height: int, width: int) -> np.ndarray:
    yy = np.arange(y0, y0 + height)[:, None]
    xx = np.arange(x0, x0 + width)[None, :]
    label = (((yy // 400) + (xx // 700)) % 2).astype(np.uint8)
    label[yy[:, 0] < IGNORED_ROWS] = 255
    return label


def write_tiled(path: Path, shape: tuple[int, int], tile: int, pixels, **kwargs) -> None:
    """A tiled TIFF written tile by tile: never more than one tile in memory."""
    height, width = shape

    def tiles():
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                region = pixels(y, x, min(tile, height - y), min(tile, width - x))
                padded = np.zeros((tile, tile, *region.shape[2:]), np.uint8)
                padded[: region.shape[0], : region.shape[1]] = region
                yield padded

    channels = (3,) if kwargs.get("photometric") == "rgb" else ()
    tifffile.imwrite(path, tiles(), shape=(height, width, *channels), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", compressionargs={"level": 1}, **kwargs)


MEASURE = textwrap.dedent('''
    """Run one job in a local Ray, watching the peak RSS (VmHWM) of every process it starts, and the
    predictor actor's peak at the moment it opens the file named by argv[2]."""
    import json, os, resource, sys, threading, time
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, object_store_memory=256 * 2**20)
    from pipeline.config import load_config
    from pipeline.plan import run_job

    config, marker = json.loads(sys.argv[1]), sys.argv[2]

    def status(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            return int(fields["PPid"]), int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None

    def name(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().split(b"\\0")[0].decode(errors="replace")
        except OSError:
            return ""

    def descendants():
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (found := status(int(entry))):
                parents[int(entry)] = found[0]
        mine, todo = set(), [os.getpid()]
        while todo:
            parent = todo.pop()
            children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in mine]
            mine.update(children)
            todo.extend(children)
        return mine

    def has_open(pid, path):
        try:
            return any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return False

    peaks, names, at_marker, stop = {}, {}, {}, threading.Event()

    def watch():
        # VmHWM is the kernel's own peak of each process: polling only has to see every process
        # (a tree scan every 0.5 s) and notice the actor opening the marker file (every 0.1 s)
        tick = 0
        while not stop.is_set():
            if tick % 5 == 0:
                for pid in descendants() - names.keys():
                    names[pid] = name(pid)
            for pid in list(names):
                found = status(pid)
                if found:
                    peaks[pid] = max(peaks.get(pid, 0), found[1])
                    if "Predictor" not in names[pid]:
                        names[pid] = name(pid) or names[pid]  # workers are renamed as they start tasks and actors
                if "Predictor" in names[pid] and pid not in at_marker and has_open(pid, marker):
                    at_marker[pid] = peaks[pid]
            tick += 1
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.time()
    result = run_job(load_config(config), progress=lambda line: None)
    elapsed = time.time() - started
    stop.set()
    watcher.join()
    workers = {pid: peak for pid, peak in peaks.items() if names[pid].startswith("ray::")}
    actors = [pid for pid in workers if "Predictor" in names[pid]]
    print("RESULTS " + json.dumps({
        "status": result.status, "message": result.message, "seconds": round(elapsed, 1),
        "worker_peak": max(workers.values()), "actor_peak": max(workers[pid] for pid in actors) if actors else 0,
        "actor_peak_at_marker": max(at_marker.values()) if at_marker else 0,
        "other_workers_peak": max([peak for pid, peak in workers.items() if pid not in actors] or [0]),
        "driver_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
''')


def test_huge_tiff_is_segmented_in_bounded_memory(tmp_path):
    """A 12000 x 12000 RGB TIFF (432 MB decoded, 2.3 GB of float32 scores for 4 classes) with its
    label, through `run_job` in a subprocess: the predictor actor's peak barely moves between a
    500-row image of the same width and the 11500 rows more of the huge one, and the chunked mask
    reassembles and matches a direct computation on a crop."""
    started = time.time()
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for shape, name in ((SHORT, "0-short.tif"), (HUGE, "1-huge.tif")):  # listed, and segmented, in this order
        write_tiled(images / name, shape, 256, scene_tile, photometric="rgb")
        write_tiled(labels / name, shape, 512, scene_label, photometric="minisblack")
    checkpoint = tmp_path / "tiny.safetensors"
    torch.manual_seed(0)
    save_native(build_model("segformer-b0", num_classes=CLASSES, **TINY_SEGFORMER), checkpoint)
    config = {
        "run_id": "huge",
        "input": {"uri": str(images), "labels": {"uri": str(labels)}, "stream_above_pixels": 4_000_000},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"mode": "slide", "window": [WINDOW, WINDOW], "stride": [WINDOW, WINDOW], "batch_size": 8},
        "resources": {"actors": 1},
        "output": {"uri": str(tmp_path / "runs"), "chunk_size": 4096},
    }
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    written = time.time()
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(config), str(images / "1-huge.tif")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    measured_at = time.time()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    measured = json.loads(lines[-1][len("RESULTS "):])
    print("\nmeasured:", {k: f"{v / 2**20:.0f} MB" if k.endswith("peak") or k.endswith("marker") else v for k, v in measured.items()})
    assert measured["status"] == "succeeded", measured["message"]

    decoded_image = HUGE[0] * HUGE[1] * 3  # 432 MB
    scores = HUGE[0] * HUGE[1] * CLASSES * 4  # 2.3 GB of float32 scores
    # 11500 more rows cost little: what grows is mostly the compressed mask the actor hands on;
    # decoding the image whole would add 414 MB for those rows, holding its scores 2.2 GB more
    assert measured["actor_peak_at_marker"] > 0, "the watcher never saw the actor open the huge image"
    growth = measured["actor_peak"] - measured["actor_peak_at_marker"]
    assert growth < decoded_image // 4, f"the actor's peak grew by {growth / 2**20:.0f} MB with the image's height"
    # the whole actor process, Ray, torch and the model included, stays well under the scores alone;
    # the read tasks only read headers
    assert measured["actor_peak"] < scores // 2
    assert measured["other_workers_peak"] < measured["actor_peak"]

    run = tmp_path / "runs" / "huge"
    table = pq.read_table([str(p) for p in sorted((run / "masks").glob("*.parquet"))])
    huge_rows = table.filter(pa.compute.equal(table.column("image_id"), "1-huge.tif"))
    assert huge_rows.num_rows == 9  # 3 x 3 chunks of at most 4096 x 4096
    assert max(len(cell) for cell in huge_rows.column("mask").to_pylist()) < 64 * 2**20
    mask = assemble_mask(huge_rows, "mask")
    assert mask.shape == HUGE

    # a crop on the window grid, computed directly with the same model and windows
    y0, x0, size = 5000, 11000, 1000
    model = load_model(str(checkpoint)).eval()
    settings = TilingSettings(window=(WINDOW, WINDOW), stride=(WINDOW, WINDOW), batch_size=8)
    direct = segment_images(ModelScorer(model, torch.device("cpu")), [scene_tile(y0, x0, size, size)], settings)[0]
    assert (mask[y0 : y0 + size, x0 : x0 + size] == direct.labels).mean() >= 0.999

    # class areas summed band by band in the actor: predicted areas are the written mask's, labeled
    # ones the label's (all but the ignored rows); exact intersections are checked on the small
    # streamed image above
    metrics = {m["image_id"]: m for m in pq.read_table([str(p) for p in (run / "metrics").glob("*.parquet")]).to_pylist()}
    assert sorted(metrics) == ["0-short.tif", "1-huge.tif"]
    areas = metrics["1-huge.tif"]
    assert areas["pred_area"] == np.bincount(mask[IGNORED_ROWS:].ravel(), minlength=CLASSES).tolist()
    assert sum(areas["label_area"]) == (HUGE[0] - IGNORED_ROWS) * HUGE[1]
    assert all(i <= min(p, q) for i, p, q in zip(areas["intersection"], areas["pred_area"], areas["label_area"]))
    print(f"seconds: write {written - started:.1f}, job {measured_at - written:.1f}, checks {time.time() - measured_at:.1f}")
