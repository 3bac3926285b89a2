"""Bytes to arrays: images to RGB uint8, labels to integer class maps.

Every failure raises DecodeError with a reason a person can act on; the caller turns it into an
errors row. Pillow's own decompression-bomb check is replaced by `max_pixels`, checked on the
header before any pixel is decoded.

EXIF orientation: a camera stores a portrait photo as landscape pixels with an Orientation tag
that viewers apply; a label drawn on the photo as shown is upright. With `exif_transpose` on (the
default) images and labels are turned upright as Pillow's `ImageOps.exif_transpose` does (EXIF,
or XMP where EXIF has no orientation), before any mode conversion; a transpose moves pixels and
keeps their values, so palette indices and 16-bit class ids stay what they were. Off, pixels are
taken as stored, TIFFs included (Pillow turns those upright by their tag as it decodes them: that
turn is undone).
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import ExifTags, Image

from pipeline.io.coco_codec import rgb_to_id
from pipeline.rows import DecodedImage, RawSample

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

Image.MAX_IMAGE_PIXELS = None  # our max_pixels check runs first, on the header alone

# EXIF Orientation -> the transpose that shows the stored pixels upright (as ImageOps.exif_transpose),
# and the one that takes upright pixels back to stored
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
STORED = {**UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
SWAPS_SIDES = {5, 6, 7, 8}


class DecodeError(ValueError):
    pass


def _open(data: bytes, max_pixels: int, what: str) -> Image.Image:
    if not data:
        raise DecodeError(f"empty {what} file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise DecodeError(f"not a readable {what}: {type(exc).__name__}: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError(f"{what} of {w} x {h} = {w * h} pixels is over the limit of {max_pixels} (input.max_pixels)")
    return img


def _load(img: Image.Image, what: str) -> None:
    try:
        img.load()
    except Exception as exc:  # truncated or corrupt data
        raise DecodeError(f"corrupt {what}: {type(exc).__name__}: {exc}") from None


def _png_exif_chunk(data: bytes) -> bytes | None:
    """The eXIf chunk of a PNG wherever it is, found by walking the chunk headers (no pixel decoded)."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"eXIf":
            return b"Exif\x00\x00" + data[pos + 8 : pos + 8 + length]  # as Pillow's PNG reader stores it
        if kind == b"IEND":
            break
        pos += 12 + length
    return None


def _orientation(img: Image.Image, data: bytes) -> int:
    """The EXIF Orientation (1 to 8) that ImageOps.exif_transpose would apply, from the header alone."""
    if img.format == "PNG" and "exif" not in img.info:
        # an eXIf chunk after the pixel data is one Pillow finds only by decoding them
        found = _png_exif_chunk(data)
        if found is not None:
            img.info["exif"] = found
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
        return value if value in UPRIGHT else 1
    except Exception:  # unreadable EXIF: viewers show such a file as stored
        return 1


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the pixels are stored: Pillow reports a TIFF's size upright already."""
    if img.format == "TIFF":
        return int(img.tag_v2[256]), int(img.tag_v2[257])  # ImageWidth, ImageLength
    return img.size


def _load_oriented(img: Image.Image, data: bytes, what: str, exif_transpose: bool) -> Image.Image:
    """Decode the pixels, upright when `exif_transpose`, as stored otherwise."""
    orientation = _orientation(img, data)  # before loading: Pillow may apply and drop it as it loads
    _load(img, what)
    # Pillow turns a TIFF upright by its Orientation tag as it loads it (and then drops the tag):
    # what it did is seen as the orientation gone from the EXIF it reports
    applied = orientation if _orientation(img, data) != orientation else 1
    if exif_transpose:
        method = UPRIGHT.get(orientation) if applied == 1 else None
    else:
        method = STORED.get(applied)
    if method is None:
        return img
    try:
        return img.transpose(method)  # moves pixels, keeps their values (and a P image's palette)
    except Exception as exc:
        raise DecodeError(f"cannot apply the EXIF orientation {orientation} to the {what}: {type(exc).__name__}: {exc}") from None


def decode_image(data: bytes, max_pixels: int = 178_956_970, *, exif_transpose: bool = True) -> np.ndarray:
    """Any common mode (RGB, RGBA, L, LA, I;16, I, F, P, CMYK, 1) -> H x W x 3 uint8 RGB, upright by
    its EXIF orientation when `exif_transpose`."""
    img = _load_oriented(_open(data, max_pixels, "image"), data, "image", exif_transpose)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # high bit depth: scale the full range of the type to 0..255 (not clip), as viewers do
        arr = np.asarray(img)
        if mode == "F" and not np.isfinite(arr).all():  # NaN has no grey: a black pixel would be segmented as one
            raise DecodeError(
                f"a floating-point image holding NaN or inf ({int((~np.isfinite(arr)).sum())} of {arr.size} pixels): "
                "input.format raster reads such images, their NaN as no data"
            )
        top = 65535.0 if mode.startswith("I;16") else float(max(arr.max(), 1))
        if mode.startswith("I;16") and img.format == "TIFF" and img.tag_v2.get(262) == 0:
            arr = 65535 - arr.astype(np.int64)  # min-is-white: Pillow inverts 8-bit gray, not 16-bit (as TiffWindows does)
        gray = np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode != "RGB":
        # RGBA / LA drop alpha; P maps through its palette; CMYK and 1 convert as Pillow does
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def decode_label(data: bytes, max_pixels: int = 178_956_970, *, exif_transpose: bool = True) -> np.ndarray:
    """A single-channel label image -> H x W class map in its own integer type (uint8 for L and P,
    where the palette index is the class; uint16 or int32 for 16- and 32-bit labels: not widened, as
    it travels to the predictor beside the image), upright by its EXIF orientation when `exif_transpose`."""
    img = _load_oriented(_open(data, max_pixels, "label"), data, "label", exif_transpose)
    if img.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I;16N", "I", "1"):
        raise DecodeError(f"label must be a single-channel image (L, P or 16-bit), not mode {img.mode}")
    label = np.asarray(img)
    return label.astype(np.uint8) if label.dtype == bool else label


def decode_panoptic_label(data: bytes, max_pixels: int = 178_956_970, *, exif_transpose: bool = True) -> np.ndarray:
    """A COCO panoptic label PNG -> H x W int32 segment ids (R + 256 G + 256^2 B, under 2^24)."""
    img = _load_oriented(_open(data, max_pixels, "label"), data, "label", exif_transpose)
    if img.mode != "RGB":
        raise DecodeError(f"a panoptic label must be an RGB PNG (COCO panoptic), not mode {img.mode}")
    return rgb_to_id(np.asarray(img)).astype(np.int32)


def image_size(data: bytes, max_pixels: int = 178_956_970, *, exif_transpose: bool = True) -> tuple[int, int]:
    """(height, width) from the header alone: the upright size when `exif_transpose`, as decode_image
    returns it."""
    img = _open(data, max_pixels, "image")
    w, h = _stored_size(img)
    if exif_transpose and _orientation(img, data) in SWAPS_SIDES:
        return w, h
    return h, w


def decode_sample(sample: RawSample, max_pixels: int, *, exif_transpose: bool = True, panoptic: bool = False) -> DecodedImage:
    """The read stage's sample as the predictor's input: pixels and label decoded, or the error. A
    sample the read stage marked for streaming (a TIFF too large to decode whole) keeps its stream:
    the predictor reads it window by window. `panoptic`: labels are COCO panoptic PNGs (segment ids)."""
    out = DecodedImage(unit=sample.unit, image_id=sample.image_id, timestamp_s=sample.timestamp_s)
    if sample.error:
        return out.failed("read", sample.error)
    if sample.stream is not None:
        out.stream, out.height, out.width = sample.stream, sample.stream.height, sample.stream.width
        return out
    try:  # a video's frame comes decoded (pipeline.io.video)
        image = sample.pixels if sample.pixels is not None else decode_image(sample.image_bytes, max_pixels, exif_transpose=exif_transpose)
    except DecodeError as exc:
        return out.failed("decode", str(exc))
    out.image, out.height, out.width = image, image.shape[0], image.shape[1]
    if sample.label_bytes is not None:
        try:
            read_label = decode_panoptic_label if panoptic else decode_label
            label = read_label(sample.label_bytes, max_pixels, exif_transpose=exif_transpose)
        except DecodeError as exc:
            return out.failed("decode", f"label: {exc}")
        if label.shape != image.shape[:2]:
            return out.failed(
                "decode", f"label is {label.shape[1]} x {label.shape[0]} but the image is {image.shape[1]} x {image.shape[0]}"
            )
        out.label = label
    return out
