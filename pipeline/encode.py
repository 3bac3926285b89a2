"""Arrays to bytes for the masks table: label maps and probabilities as PNG."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_mask(labels: np.ndarray, num_classes: int) -> bytes:
    """H x W class map -> PNG: 8-bit up to 256 classes, 16-bit above."""
    if num_classes <= 256:
        img = Image.fromarray(labels.astype(np.uint8))  # mode L
    else:
        img = Image.fromarray(labels.astype(np.uint16))  # mode I;16
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # masks compress well already; level 1 is fast
    return buf.getvalue()


def encode_probability(probability: np.ndarray) -> bytes:
    """H x W float in [0, 1] -> 8-bit PNG (round(p * 255))."""
    q = np.clip(np.rint(probability * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """A mask cell back to an H x W integer array (for readers and tests)."""
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)
