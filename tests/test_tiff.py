"""pipeline.io.tiff: huge TIFFs read window by window (TiffWindows), and `probe_stream`, which decides from
the header alone whether an image is streamed, decoded whole or refused (decompression bombs,
damaged tile tables, turned images)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import sparse_tiff, write_png

from pipeline.config import InputConfig
from pipeline.io import source as source_module
from pipeline.io import tiff as tiff_module
from pipeline.io.decode import decode_image
from pipeline.io.source import ImageFolderReader
from pipeline.io.tiff import StreamError, TiffWindows, probe_stream
from pipeline.predict.tiling import TilingSettings
from pipeline.rows import SourceUnit, StreamSource

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
    "planar-separate-tiled": (
        np.moveaxis(RGB, 2, 0).copy(),
        dict(tile=(64, 64), planarconfig="separate", photometric="rgb", compression="zlib"),
    ),
    "planar-separate-strips": (np.moveaxis(RGB, 2, 0).copy(), dict(rowsperstrip=20, planarconfig="separate", photometric="rgb")),
    "gray16-tiled-lzma": (GRAY16, dict(tile=(64, 64), compression="lzma")),
    "big-endian-strips": (GRAY16, dict(rowsperstrip=9, byteorder=">")),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tiff_windows_read_any_region_as_tifffile_wrote_it(tmp_path, layout):
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


def test_overlapping_windows_decode_each_tile_once_with_the_row_cache_and_again_without(tmp_path):
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


def test_probe_stream_streams_large_tiled_tiffs_and_decodes_the_rest_whole_from_the_header(tmp_path, monkeypatch):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    tifffile.imwrite(images / "big.tif", RGB, tile=(64, 64), compression="zlib")
    tifffile.imwrite(labels / "big.tif", (GRAY16 % 3).astype(np.uint8), rowsperstrip=16)
    tifffile.imwrite(labels / "small.tif", np.zeros((300, 517), np.uint8))
    write_png(images / "big.png", RGB)
    write_png(labels / "big.png", (GRAY16 % 3).astype(np.uint8))
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
    monkeypatch.setattr(tiff_module, "MAX_SEGMENT_BYTES", 100_000)
    assert probe_stream(str(images / "strip.tif"), None, cfg.model_copy(update={"max_pixels": 200_000})) is None
    with pytest.raises(StreamError, match=r"over the limit of 120000 .*re-save it tiled"):
        probe_stream(str(images / "strip.tif"), None, cfg)


# --------------------------------------------------------------------------- bounds


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
    with pytest.raises(StreamError, match=r"label .*60k-label.tif cannot be read window by window: 3 samples"):
        probe_stream(uri, str(tmp_path / "60k-label.tif"), defaults)
    # over max_stream_pixels but within max_pixels: decoded whole, which max_pixels bounds
    tifffile.imwrite(tmp_path / "small.tif", RGB, tile=(64, 64), compression="zlib")
    small = InputConfig(uri=str(tmp_path), stream_above_pixels=100_000, max_stream_pixels=120_000, max_pixels=200_000)
    assert probe_stream(str(tmp_path / "small.tif"), None, small) is None
    with pytest.raises(StreamError, match=r"over the limits of 150000 pixels .*input.max_pixels.* and 120000 .*input.max_stream_pixels"):
        probe_stream(str(tmp_path / "small.tif"), None, small.model_copy(update={"max_pixels": 150_000}))


def test_a_decompression_bomb_is_an_error_sample_and_none_of_its_bytes_are_read(tmp_path, monkeypatch):
    sparse_tiff(tmp_path / "bomb.tif", 120_000, 120_000)
    fetched = []
    monkeypatch.setattr(source_module, "read_bytes", lambda fs, uri, **kw: fetched.append(uri) or b"")
    unit = SourceUnit(index=0, format="images", uris=(str(tmp_path / "bomb.tif"),), image_ids=("bomb.tif",))
    [sample] = ImageFolderReader(InputConfig(uri=str(tmp_path))).read_unit(unit)
    assert sample.error and "120000 x 120000" in sample.error and "input.max_stream_pixels" in sample.error
    assert sample.image_bytes is None and sample.stream is None and fetched == []


@pytest.mark.parametrize("layout", ["tiled-zlib", "strips-uncompressed"])
def test_a_header_that_claims_more_pixels_than_its_segments_hold_is_refused(tmp_path, layout):
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
    with pytest.raises(
        StreamError,
        match=rf"claims 517 x 301 pixels but {kind} \d+ of \d+ ends at byte \d+, past the end of the file \({len(data) - 50_000} bytes\)",
    ):
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
