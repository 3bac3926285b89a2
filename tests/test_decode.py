"""pipeline.io.decode: bytes to arrays. Images in any common mode to RGB uint8, labels to class ids, EXIF
orientation applied to both, failures as DecodeErrors, and `decode_sample`: the read stage's
sample to the predictor's row (pixels, or the error, or a TIFF to stream)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from helpers import image_bytes
from PIL import Image, ImageOps

from pipeline.io.decode import DecodeError, decode_image, decode_label, decode_sample, image_size
from pipeline.rows import RawSample, StreamSource


def test_every_common_mode_decodes_to_rgb_uint8():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    cases = {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, np.full((7, 5), 9, np.uint8)])),
        "L": Image.fromarray(rgb[..., 0]),
        "P": Image.fromarray(rgb).convert("P"),
        "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
    }
    for mode, img in cases.items():
        assert img.mode == mode
        out = decode_image(image_bytes(img, "TIFF" if mode == "CMYK" else "PNG"))
        assert out.shape == (7, 5, 3) and out.dtype == np.uint8, mode
    np.testing.assert_array_equal(decode_image(image_bytes(cases["RGBA"])), rgb)
    np.testing.assert_array_equal(decode_image(image_bytes(cases["L"]))[..., 1], rgb[..., 0])
    # 16-bit: the full range maps onto 0..255
    np.testing.assert_array_equal(decode_image(image_bytes(cases["I;16"]))[..., 0], rgb[..., 0])
    np.testing.assert_array_equal(decode_image(image_bytes(cases["P"])), np.asarray(cases["P"].convert("RGB")))


def test_empty_garbage_truncated_oversized_images_and_rgb_labels_raise_decode_errors():
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(DecodeError, match="not a readable image"):
        decode_image(b"this is not an image at all")
    good = image_bytes(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(DecodeError, match=r"corrupt|not a readable"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(DecodeError, match="over the limit"):
        decode_image(good, max_pixels=64 * 64 - 1)
    with pytest.raises(DecodeError, match="single-channel"):
        decode_label(good)


def test_labels_decode_to_class_ids_from_gray_palette_indices_and_16_bit():
    lab = np.array([[0, 1], [2, 255]], np.uint8)
    np.testing.assert_array_equal(decode_label(image_bytes(lab)), lab)
    # a palette label (as VOC and CamVid ship them): the class is the index, whatever its colour, so
    # a palette of one colour for every index must still decode to the indices
    palette = Image.frombytes("P", (2, 2), lab.tobytes())
    palette.putpalette([0] * 768)
    np.testing.assert_array_equal(decode_label(image_bytes(palette)), lab)
    big = np.array([[0, 300], [1000, 2]], np.uint16)
    np.testing.assert_array_equal(decode_label(image_bytes(big)), big)


def _oriented(img: Image.Image, fmt: str, orientation: int) -> bytes:
    """img saved with an EXIF Orientation tag, as a camera (or an editor) writes a turned photo."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _viewer(data: bytes) -> np.ndarray:
    """What a viewer shows: Pillow's own exif_transpose, the reference."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))


def _exif_after_pixels(png: bytes) -> bytes:
    """The same PNG with its eXIf chunk moved behind the pixel data (IDAT), where the spec allows it too."""
    chunks, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        chunks.append(png[pos : pos + 12 + length])
        pos += 12 + length
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(exif) == 1 and rest[-1][4:8] == b"IEND"
    return png[:8] + b"".join(rest[:-1] + exif + rest[-1:])


# orientation -> np.rot90 turns (counter-clockwise) that show the stored pixels upright
TURNS = {6: -1, 3: 2, 8: 1}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
@pytest.mark.parametrize("orientation", sorted(TURNS))
def test_exif_orientation_turns_images_upright(fmt, orientation):
    rgb = np.zeros((6, 10, 3), np.uint8)  # not square: a turn swaps the sides
    rgb[1:3, 6:9] = 255  # a white block in the top-right corner as stored
    rgb[..., 2] = np.arange(10) * 20  # a ramp along the stored rows
    data = _oriented(Image.fromarray(rgb), fmt, orientation)
    stored = decode_image(data, exif_transpose=False)
    if fmt != "JPEG":  # lossless: as stored is the array that was saved
        np.testing.assert_array_equal(stored, rgb)
    upright = decode_image(data)
    np.testing.assert_array_equal(upright, np.rot90(stored, TURNS[orientation]))
    np.testing.assert_array_equal(upright, _viewer(data))
    assert image_size(data) == upright.shape[:2] and image_size(data, exif_transpose=False) == stored.shape[:2]
    # the bomb guard still reads the header alone, upright or not
    with pytest.raises(DecodeError, match="over the limit"):
        decode_image(data, max_pixels=59)


def test_exif_orientation_stored_after_the_pixel_data_of_a_png_is_found_and_applied():
    data = _exif_after_pixels(_oriented(Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10)), "PNG", 6))
    assert "exif" not in Image.open(io.BytesIO(data)).info  # Pillow's header does not see it
    upright = decode_label(data)
    np.testing.assert_array_equal(upright, np.rot90(np.arange(60).reshape(6, 10), -1))
    np.testing.assert_array_equal(upright, _viewer(data))
    assert image_size(data) == (10, 6)


def test_exif_orientation_moves_label_ids_and_keeps_them():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 40, (6, 10)).astype(np.uint8)
    ids[1:3, 6:9] = 7
    palette = Image.frombytes("P", (10, 6), ids.tobytes())
    palette.putpalette([0] * 768)  # every index the same colour: only the index tells the class
    wide = Image.fromarray(ids.astype(np.uint16) * 1000 + 300)  # 16-bit ids, none below 256
    assert wide.mode == "I;16"
    for fmt, img, stored in (("PNG", palette, ids), ("TIFF", palette, ids), ("PNG", wide, ids.astype(np.int64) * 1000 + 300)):
        for orientation, turns in TURNS.items():
            data = _oriented(img, fmt, orientation)
            assert Image.open(io.BytesIO(data)).mode == img.mode
            upright = decode_label(data)
            np.testing.assert_array_equal(upright, np.rot90(stored, turns), err_msg=f"{fmt} {img.mode} {orientation}")
            np.testing.assert_array_equal(upright, _viewer(data))
            np.testing.assert_array_equal(decode_label(data, exif_transpose=False), stored)
    # a label drawn on the upright photo lands on the photo's pixels: both turn the same way
    rgb = np.zeros((6, 10, 3), np.uint8)
    rgb[ids == 7] = 255
    image = decode_image(_oriented(Image.fromarray(rgb), "JPEG", 6))
    label = decode_label(_oriented(Image.fromarray((ids == 7).astype(np.uint8)), "PNG", 6))
    assert label.shape == image.shape[:2] == (10, 6)
    np.testing.assert_array_equal(label == 1, image[..., 0] > 127)


def test_decode_sample_makes_empty_bytes_a_decode_error_and_keeps_read_errors_at_read():
    row = decode_sample(RawSample(3, 0, "x.png", b"", None), max_pixels=100)
    assert row.stage == "decode" and "empty" in row.error and row.unit == 3
    row = decode_sample(RawSample(3, 1, "y.png", None, None, error="read: boom"), max_pixels=100)
    assert row.stage == "read" and row.error == "read: boom" and not row.is_unit_end


def test_decode_sample_decodes_image_and_label_and_refuses_a_label_of_another_size():
    rgb = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    label = np.arange(54, dtype=np.uint8).reshape(6, 9) % 3
    row = decode_sample(RawSample(1, 0, "a.png", image_bytes(rgb), image_bytes(label), has_label=True), max_pixels=100)
    assert not row.error and (row.height, row.width) == (6, 9) and row.unit == 1 and row.image_id == "a.png"
    np.testing.assert_array_equal(row.image, rgb)
    np.testing.assert_array_equal(row.label, label)
    assert row.label.dtype == np.uint8  # an 8-bit label stays 8-bit: a quarter of the bytes to the predictor
    row = decode_sample(RawSample(1, 1, "b.png", image_bytes(rgb), image_bytes(label[:5])), max_pixels=100)
    assert row.stage == "decode" and row.error == "label is 9 x 5 but the image is 9 x 6" and row.label is None
    row = decode_sample(RawSample(1, 2, "c.png", image_bytes(rgb), image_bytes(rgb)), max_pixels=100)
    assert row.stage == "decode" and row.error.startswith("label: ") and "single-channel" in row.error


def test_decode_sample_passes_a_tiff_to_stream_on_without_pixels():
    stream = StreamSource("/data/big.tif", "/labels/big.tif", 30_000, 20_000)
    row = decode_sample(RawSample(0, 0, "big.tif", None, None, has_label=True, stream=stream), max_pixels=100)
    assert row.stream == stream and (row.height, row.width) == (30_000, 20_000)
    assert not row.error and row.image.size == 0 and row.has_label


def test_a_floating_point_image_holding_nan_is_a_decode_error_not_black_pixels():
    """A 32-bit float TIFF (mode F) with NaN: before, its maximum was NaN and every pixel came out 0
    (a black image segmented without a word); now the image's errors row says why and where such
    images are read. A finite one decodes, scaled by its maximum."""
    values = np.linspace(0, 2000, 35, dtype=np.float32).reshape(7, 5)
    assert decode_image(image_bytes(Image.fromarray(values), "TIFF"))[-1, -1, 0] == 255
    values[2, 3] = np.nan
    with pytest.raises(DecodeError, match=r"NaN or inf \(1 of 35 pixels\): input.format raster"):
        decode_image(image_bytes(Image.fromarray(values), "TIFF"))


def test_a_16_bit_min_is_white_tiff_decodes_as_its_window_by_window_reading_does(tmp_path):
    """PhotometricInterpretation 0 (min-is-white), 16 bits: stored 0 is white. Pillow inverts such
    8-bit files but not 16-bit ones, so an image read whole (up to input.stream_above_pixels) came
    out inverted while a larger one, read window by window (TiffWindows), did not."""
    import tifffile

    from pipeline.io.tiff import TiffWindows

    data = np.zeros((64, 64), np.uint16)
    data[:, 32:] = 65535
    data[:8, :8] = 4112  # 16 on the 8-bit scale
    path = tmp_path / "miw16.tif"
    tifffile.imwrite(path, data, photometric="miniswhite", tile=(32, 32), metadata=None)
    whole = decode_image(path.read_bytes())
    with TiffWindows.open(str(path)) as windows:
        np.testing.assert_array_equal(whole, windows.rgb(0, 0, 64, 64))
    assert whole[20, 0].tolist() == [255] * 3 and whole[0, 63].tolist() == [0] * 3 and whole[0, 0].tolist() == [239] * 3
