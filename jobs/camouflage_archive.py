"""The camouflage demo's synthetic labeled archive: blobs whose texture matches the background's.

Deterministic: image i of a split is drawn from a generator seeded by (split seed, i), so the same
files come out on every machine. Classes: 0 background, 1 object; some images hold no object (an
all-background label).

How an object hides: background and object are painted by the same texture generator (a grating
whose phase is warped by smooth noise, over smooth blotches) in the same colour family, with the
same contrast and the same pixel noise, so that their pixel statistics match. What gives the
object away is subtle, as on a camouflaged animal: its grating is slightly finer (0.66-0.8 of the
background's period) and turned a little (20-45 degrees either way), its colour is a few levels
off (up to 5 per channel), and a faint dark rim (5-9 grey levels, 2 pixels either side, under
pixel noise of sigma 6) follows its irregular outline (an ellipse whose radius wanders with the
angle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jobs.training import write_split

CLASS_NAMES = ["background", "object"]
SPLIT_SEEDS = {"train": 3000, "heldout": 4000}
WINDOW = 128  # the camouflage demo's sliding window: no image is smaller, most are larger
SIZE_RANGE = (128, 200)  # image sides, inclusive
EMPTY_FRACTION = 0.2  # images without an object

# colour families (RGB): bark, sand, moss, slate; jittered per image
FAMILIES = [(110, 85, 60), (170, 150, 110), (95, 115, 70), (105, 110, 120)]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean noise in [-1, 1], smooth over about `cell` pixels (a coarse grid, bilinear)."""
    small = rng.normal(size=(max(2, int(h / cell) + 2), max(2, int(w / cell) + 2))).astype(np.float32)
    t = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    return t / (np.abs(t).max() + 1e-6)


def _texture(rng: np.random.Generator, h: int, w: int, period: float, angle: float) -> np.ndarray:
    """The one texture generator of background and object: a grating of `period` pixels at `angle`
    (radians) whose phase wanders with smooth noise, mixed with smooth blotches; about [-1, 1]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = 2.5 * _smooth_noise(rng, h, w, 24)
    phase = rng.uniform(0, 2 * np.pi)
    grating = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + warp + phase)
    blotches = _smooth_noise(rng, h, w, 14)
    return 0.6 * grating + 0.4 * blotches


def _blob_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An irregular blob: an ellipse whose radius wanders with the angle (harmonics 2 to 6)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    size = rng.uniform(0.16, 0.3) * min(h, w)
    cy, cx = rng.uniform(size, h - size), rng.uniform(size, w - size)
    aspect, turn = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    dy, dx = y - cy, x - cx
    u = dx * np.cos(turn) + dy * np.sin(turn)
    v = (-dx * np.sin(turn) + dy * np.cos(turn)) / aspect
    phi = np.arctan2(v, u)
    radius = np.ones_like(phi)
    for k in range(2, 7):
        radius += rng.uniform(0, 0.3 / k) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= size * radius


def _rim(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The pixels within `width` (4-neighbour steps) of the outline, on both sides."""

    def step(m: np.ndarray, reduce) -> np.ndarray:
        p = np.pad(m, 1, mode="edge")
        return reduce.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])

    grown, shrunk = mask, mask
    for _ in range(width):
        grown, shrunk = step(grown, np.logical_or), step(shrunk, np.logical_and)
    return grown & ~shrunk


def make_sample(split: str, index: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image H x W x 3 uint8, label H x W uint8: 0 background, 1 object) for image `index` of `split`."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    lo, hi = SIZE_RANGE
    h, w = size or (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
    base = np.array(FAMILIES[int(rng.integers(len(FAMILIES)))], np.float32) + rng.uniform(-15, 15, size=3)
    tone = base / base.mean()  # the texture darkens and lightens along the family's own hue
    contrast = rng.uniform(28, 40)
    period, angle = rng.uniform(7, 11), rng.uniform(0, np.pi)

    image = base + contrast * _texture(rng, h, w, period, angle)[..., None] * tone
    label = np.zeros((h, w), np.uint8)
    if rng.random() >= EMPTY_FRACTION:
        mask = _blob_mask(rng, h, w)
        finer = rng.uniform(0.66, 0.8)
        turned = angle + rng.choice([-1, 1]) * rng.uniform(np.radians(20), np.radians(45))
        shade = base + rng.uniform(-5, 5, size=3)
        obj = shade + contrast * _texture(rng, h, w, period * finer, turned)[..., None] * tone
        image[mask] = obj[mask]
        image[_rim(mask)] -= rng.uniform(5, 9)
        label[mask] = 1
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def heldout_sizes(count: int) -> list[tuple[int, int] | None]:
    """Held-out images: the first one at the largest size (larger than the window on both sides), the
    others drawn from SIZE_RANGE."""
    return [(SIZE_RANGE[1], SIZE_RANGE[1] - 13)] + [None] * (count - 1)


def write_archive(root: str | Path, split: str = "heldout", count: int = 16) -> Path:
    """Write `count` images of a split as PNGs: <root>/images/NNNN.png and <root>/labels/NNNN.png."""
    return write_split(root, make_sample, split, heldout_sizes(count) if split == "heldout" else [None] * count)
