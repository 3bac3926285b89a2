"""The demo's synthetic labeled archive: textured shapes on textured backgrounds.

Deterministic: image i of a split is drawn from a generator seeded by (split seed, i), so the same
files come out on every machine. Classes: 0 background, 1 disc, 2 box, 3 triangle; each shape class
has its own colour family and texture (stripes, checks, diagonals), jittered per image, so that a
small model must use colour and texture, not a single pixel value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jobs.training import write_split

CLASS_NAMES = ["background", "disc", "box", "triangle"]
SPLIT_SEEDS = {"train": 1000, "heldout": 2000}
WINDOW = 128  # the demo's sliding window: one held-out image is larger than it on both sides


def _texture(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    """A zero-mean texture in [-1, 1] of one of the class-specific kinds."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(5, 9)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        t = np.sin(2 * np.pi * y / period + phase)
    elif kind == "checks":
        t = np.sign(np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period + phase))
    elif kind == "diagonal":
        t = np.sin(2 * np.pi * (x + y) / period + phase)
    else:  # background: smooth blotches
        small = rng.normal(size=(max(2, h // 16), max(2, w // 16))).astype(np.float32)
        t = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
        t = t / (np.abs(t).max() + 1e-6)
    return t


BASE_COLOURS = {1: (200, 60, 50), 2: (60, 170, 70), 3: (60, 90, 200)}
TEXTURES = {1: "stripes", 2: "checks", 3: "diagonal"}


def _shape_mask(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    size = rng.uniform(0.15, 0.35) * min(h, w)
    cy, cx = rng.uniform(size, h - size), rng.uniform(size, w - size)
    if cls == 1:
        return (y - cy) ** 2 + (x - cx) ** 2 <= size**2
    if cls == 2:
        ry, rx = size * rng.uniform(0.6, 1.0), size * rng.uniform(0.6, 1.0)
        return (np.abs(y - cy) <= ry) & (np.abs(x - cx) <= rx)
    # triangle: apex up, base down
    top, bottom = cy - size, cy + size
    half = (y - top) / (2 * size) * size
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half)


def make_sample(split: str, index: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image H x W x 3 uint8, label H x W uint8) for image `index` of `split`."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    h, w = size or (int(rng.integers(80, 161)), int(rng.integers(80, 161)))
    grey = rng.uniform(90, 160)
    bg_tint = rng.uniform(-15, 15, size=3)
    image = np.empty((h, w, 3), np.float32)
    image[:] = grey + bg_tint
    image += 35 * _texture(rng, h, w, "background")[..., None]
    label = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, 4))
        mask = _shape_mask(rng, cls, h, w)
        colour = np.array(BASE_COLOURS[cls], np.float32) + rng.uniform(-25, 25, size=3)
        tex = _texture(rng, h, w, TEXTURES[cls])[..., None]
        image[mask] = (colour + 30 * tex)[mask]
        label[mask] = cls
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def heldout_sizes(count: int) -> list[tuple[int, int] | None]:
    """Held-out images: varied sizes, the first one larger than the window on both sides."""
    return [(WINDOW * 2 + 37, WINDOW + 71)] + [None] * (count - 1)


def write_archive(root: str | Path, split: str = "heldout", count: int = 16) -> Path:
    """Write `count` images of a split as PNGs: <root>/images/NNNN.png and <root>/labels/NNNN.png."""
    return write_split(root, make_sample, split, heldout_sizes(count) if split == "heldout" else [None] * count)
