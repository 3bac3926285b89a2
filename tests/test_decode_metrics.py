import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.decode import DecodeError, decode_image, decode_label, image_size
from pipeline.masks import decode_png, encode_chunks
from pipeline.metrics import ClassAreas, class_areas, summarize


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_every_common_mode_decodes_to_rgb_uint8():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    cases = {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, np.full((7, 5), 9, np.uint8)])),
        "L": Image.fromarray(rgb[..., 0]),
        "P": Image.fromarray(rgb).convert("P"),
        "I;16": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
    }
    for mode, img in cases.items():
        assert img.mode == mode
        out = decode_image(_png(img, "TIFF" if mode == "CMYK" else "PNG"))
        assert out.shape == (7, 5, 3) and out.dtype == np.uint8, mode
    np.testing.assert_array_equal(decode_image(_png(cases["RGBA"])), rgb)
    np.testing.assert_array_equal(decode_image(_png(cases["L"]))[..., 1], rgb[..., 0])
    # 16-bit: the full range maps onto 0..255
    np.testing.assert_array_equal(decode_image(_png(cases["I;16"]))[..., 0], rgb[..., 0])
    np.testing.assert_array_equal(decode_image(_png(cases["P"])), np.asarray(cases["P"].convert("RGB")))


def test_bad_images_raise_clear_errors():
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(DecodeError, match="not a readable image"):
        decode_image(b"this is not an image at all")
    good = _png(Image.fromarray(np.zeros((64, 64, 3), np.uint8)))
    with pytest.raises(DecodeError, match="corrupt|not a readable"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(DecodeError, match="over the limit"):
        decode_image(good, max_pixels=64 * 64 - 1)
    with pytest.raises(DecodeError, match="single-channel"):
        decode_label(good)


def test_label_modes():
    lab = np.array([[0, 1], [2, 255]], np.uint8)
    np.testing.assert_array_equal(decode_label(_png(Image.fromarray(lab))), lab)
    p = Image.fromarray(lab, mode="L").convert("P")
    p.putpalette([0] * 768)
    np.testing.assert_array_equal(decode_label(_png(Image.fromarray(lab).convert("P"))), np.asarray(Image.fromarray(lab).convert("P")))
    big = np.array([[0, 300], [1000, 2]], np.uint16)
    np.testing.assert_array_equal(decode_label(_png(Image.fromarray(big))), big)


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


def test_exif_orientation_after_the_pixel_data_of_a_png():
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


def test_mask_png_round_trip_8_and_16_bit():
    lab = np.random.default_rng(1).integers(0, 200, (9, 11))
    [chunk] = encode_chunks(lab, None, None, 200)
    assert Image.open(io.BytesIO(chunk.mask)).mode == "L"
    np.testing.assert_array_equal(decode_png(chunk.mask), lab)
    lab16 = np.random.default_rng(1).integers(0, 300, (9, 11))
    np.testing.assert_array_equal(decode_png(encode_chunks(lab16, None, None, 300)[0].mask), lab16)


def _reference_metrics(preds, labels, num_classes, ignore):
    """mmseg's definition written out directly: dataset-wide sums, then ratios."""
    inter = np.zeros(num_classes); union = np.zeros(num_classes); parea = np.zeros(num_classes); larea = np.zeros(num_classes)
    for p, t in zip(preds, labels):
        for c in range(num_classes):
            valid = t != ignore
            pc, tc = (p == c) & valid, (t == c) & valid
            inter[c] += (pc & tc).sum(); union[c] += (pc | tc).sum(); parea[c] += pc.sum(); larea[c] += tc.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc, dice = inter / union, inter / larea, 2 * inter / (parea + larea)
    return inter.sum() / larea.sum(), iou, acc, dice


def test_metrics_match_the_definition():
    rng = np.random.default_rng(3)
    C, ignore = 5, 255
    preds = [rng.integers(0, 4, (13, 17)) for _ in range(4)]  # class 4 never predicted
    labels = [np.where(rng.random((13, 17)) < 0.1, ignore, rng.integers(0, 3, (13, 17))) for _ in range(4)]  # classes 3, 4 never labeled
    total = ClassAreas.zeros(C)
    for p, t in zip(preds, labels):
        total += class_areas(p, t, C, ignore)
    s = summarize(total)
    aacc, iou, acc, dice = _reference_metrics(preds, labels, C, ignore)
    assert s["aAcc"] == pytest.approx(aacc)
    np.testing.assert_allclose(s["IoU"], iou, equal_nan=True)
    np.testing.assert_allclose(s["Acc"], acc, equal_nan=True)
    np.testing.assert_allclose(s["Dice"], dice, equal_nan=True)
    assert np.isnan(s["IoU"][4]) and not np.isnan(s["IoU"][3])  # 3 predicted but never labeled: IoU 0
    assert s["IoU"][3] == 0.0 and np.isnan(s["Acc"][3])
    assert s["mIoU"] == pytest.approx(np.nanmean(iou))
    assert s["mAcc"] == pytest.approx(np.nanmean(acc))
    assert s["mDice"] == pytest.approx(np.nanmean(dice))
