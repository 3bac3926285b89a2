"""Bytes to arrays: images to RGB uint8, labels to integer class maps.

Every failure raises DecodeError with a reason a person can act on; the caller turns it into an
errors row. Pillow's own decompression-bomb check is replaced by `max_pixels`, checked on the
header before any pixel is decoded.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # our max_pixels check runs first, on the header alone


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


def decode_image(data: bytes, max_pixels: int = 178_956_970) -> np.ndarray:
    """Any common mode (RGB, RGBA, L, LA, I;16, I, F, P, CMYK, 1) -> H x W x 3 uint8 RGB."""
    img = _open(data, max_pixels, "image")
    _load(img, "image")
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # high bit depth: scale the full range of the type to 0..255 (not clip), as viewers do
        arr = np.asarray(img)
        top = 65535.0 if mode.startswith("I;16") else float(max(arr.max(), 1))
        gray = np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode != "RGB":
        # RGBA / LA drop alpha; P maps through its palette; CMYK and 1 convert as Pillow does
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def decode_label(data: bytes, max_pixels: int = 178_956_970) -> np.ndarray:
    """A single-channel label image -> H x W int64 class map (P: the palette index is the class)."""
    img = _open(data, max_pixels, "label")
    _load(img, "label")
    if img.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I;16N", "I", "1"):
        raise DecodeError(f"label must be a single-channel image (L, P or 16-bit), not mode {img.mode}")
    return np.asarray(img).astype(np.int64)


def image_size(data: bytes, max_pixels: int = 178_956_970) -> tuple[int, int]:
    """(height, width) from the header alone."""
    w, h = _open(data, max_pixels, "image").size
    return h, w
