"""Whole-slide images (`input.format: slide`, the `slides` extra): pyramids read at a resolution in
microns per pixel, window by window, and the tissue that decides which windows run.

A slide is a pyramid: level 0 at the scanner's resolution (e.g. 0.25 mpp, "40x"), each further
level a downsampled copy. tiffslide (on tifffile) opens SVS, NDPI, SCN, BIF and generic pyramidal
TIFFs, from a local path or through the same fsspec file objects (`RetryingFile`, retries, store
stats) as huge TIFFs; only the tiles a window touches are decoded.

The target grid. `input.slide.mpp: m` segments the slide at m microns per pixel: the target image
is round(level-0 size x level-0 mpp / m) pixels on each side (`SlideGrid`). It is read from the
coarsest level whose mpp is at or finer than m (within 1%, `MPP_TOLERANCE`; level 0 when even
level 0 is coarser, which is then upsampled). Where that level has the target's size it is read as
stored, pixel for pixel; else each window is resampled from it with Pillow's `resize(box=...)`:
target pixel (y, x) is the level's area [y r_y, (y + 1) r_y) x [x r_x, (x + 1) r_x) (r: level
pixels per target pixel), averaged (BOX) when the level is finer, bilinear when it is coarser. The
box is the same for a pixel whatever window reads it (the window is read with a margin of level
pixels, so that the filter never meets a window's edge inside the slide): the windows' grid is
exactly the target's, and a window's pixels are those of the whole target image. `level: N` takes
level N as stored (mpp: level 0's times its downsample, where the slide states one).

The slide's mpp comes from its metadata (tiffslide's `tiffslide.mpp-x` / `-y`: Aperio's `MPP`,
the TIFF resolution tags, ...). A slide without one, when `mpp` is asked, cannot be placed on the
grid: its errors row says so. A slide bomb (level 0, or the target grid, over
`input.max_stream_pixels`) is refused on its header, no pixel read.

Tissue. `tissue_mask` takes the slide's coarsest level (reduced by block means to at most
`TISSUE_SIDE` pixels a side, strip by strip), its HSV saturation ((max - min) / max of R, G, B,
0..255), and keeps pixels above Otsu's threshold of it, or above `MIN_SATURATION` where Otsu's is
lower (a slide that is nearly all glass has no tissue mode for Otsu to find), then a 3 x 3 opening
and closing (specks of dust out, holes of one pixel filled). `TissueMap` gives each window the
fraction of its pixels (inside the slide) that the mask, scaled to the target grid, calls tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.io.storage import RetryingFile, StoreStats, open_fs
from pipeline.io.tiff import PROBE_BLOCK_BYTES, READ_BLOCK_BYTES, StreamError
from pipeline.rows import StreamSource

SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".tif", ".tiff")
MPP_TOLERANCE = 0.01  # a level up to 1% coarser than the target counts as at the target
TISSUE_SIDE = 2048  # the tissue mask's longer side at most (pixels of the coarsest level, block-averaged)
MIN_SATURATION = 20  # Otsu's threshold on saturation (0..255) never below this: glass is 0-10
RESAMPLE_MARGIN = 2  # level pixels read around a window's box, beyond its filter's support


def is_slide_name(uri: str) -> bool:
    return uri.lower().endswith(SLIDE_SUFFIXES)


@dataclass(frozen=True)
class SlideGrid:
    """Where a slide is read and the target grid it is segmented on."""

    level: int  # the pyramid level read
    level_height: int
    level_width: int
    height: int  # the target grid (the mask's size)
    width: int
    mpp: float | None  # the target's microns per pixel (None: level N of a slide that states no mpp)
    level0_mpp: float | None
    level0_scale: float  # level-0 pixels per target pixel (QuPath's coordinates are level 0's)

    @property
    def resampled(self) -> bool:
        return (self.level_height, self.level_width) != (self.height, self.width)


def choose_grid(
    level_sizes: list[tuple[int, int]],
    mpp0: tuple[float, float] | None,
    *,
    mpp: float | None,
    level: int | None,
    what: str = "the slide",
) -> SlideGrid:
    """The level to read and the target grid. level_sizes: (height, width) per level, level 0 first;
    mpp0: level 0's (y, x) microns per pixel, None when the slide states none. StreamError when the
    slide cannot give what is asked (no mpp, no such level)."""
    h0, w0 = level_sizes[0]
    mpp0_mean = (mpp0[0] + mpp0[1]) / 2 if mpp0 else None
    if mpp is None:
        index = level or 0
        if index >= len(level_sizes):
            raise StreamError(f"{what} has {len(level_sizes)} levels: input.slide.level {index} is none of them")
        lh, lw = level_sizes[index]
        scale = w0 / lw
        return SlideGrid(index, lh, lw, lh, lw, mpp0_mean * scale if mpp0_mean else None, mpp0_mean, scale)
    if not mpp0:
        raise StreamError(
            f"{what} states no microns per pixel in its metadata: input.slide.mpp {mpp} cannot be placed (use input.slide.level)"
        )
    height, width = max(1, round(h0 * mpp0[0] / mpp)), max(1, round(w0 * mpp0[1] / mpp))
    index = 0
    for i, (_, lw) in enumerate(level_sizes):
        level_mpp = mpp0[1] * w0 / lw  # the level's own size says its downsample
        if level_mpp <= mpp * (1 + MPP_TOLERANCE):
            index = i  # levels go from fine to coarse: the last that qualifies is the coarsest
    lh, lw = level_sizes[index]
    return SlideGrid(index, lh, lw, height, width, float(mpp), mpp0_mean, mpp / mpp0[1])


def _tiffslide():
    try:
        import tiffslide
    except ImportError:
        raise StreamError("slides need tiffslide: pip install 'segpipe[slides]'") from None
    return tiffslide


class SlideWindows:
    """One slide, opened on its target grid: `rgb(y0, x0, h, w)` reads a window of it (target
    coordinates) as h x w x 3 uint8, a `pipeline.predict.tiling.ReadWindow`."""

    def __init__(self, file: Any, uri: str, *, mpp: float | None, level: int | None) -> None:
        tiffslide = _tiffslide()
        self.uri, self._file = uri, file
        try:
            self._slide = tiffslide.TiffSlide(file)
            props = self._slide.properties
            sizes = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
        except Exception as exc:
            raise StreamError(f"{uri}: not a readable slide: {type(exc).__name__}: {exc}") from None
        mpp_x, mpp_y = props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")
        mpp0 = (float(mpp_y or mpp_x), float(mpp_x)) if mpp_x and float(mpp_x) > 0 else None
        self.level_sizes = sizes
        self.objective_power = props.get("tiffslide.objective-power")
        self.grid = choose_grid(sizes, mpp0, mpp=mpp, level=level, what=uri)
        self.height, self.width = self.grid.height, self.grid.width
        self._array: Any = None  # the level's zarr array, opened at the first read

    @classmethod
    def open(
        cls,
        uri: str,
        storage_options: dict | None = None,
        *,
        mpp: float | None,
        level: int | None,
        block_size: int = READ_BLOCK_BYTES,
        stats: StoreStats | None = None,
    ) -> SlideWindows:
        fs, path = open_fs(uri, storage_options)
        file = RetryingFile(fs, path, uri=uri, stats=stats, block_size=block_size)
        try:
            return cls(file, uri, mpp=mpp, level=level)
        except BaseException:
            file.close()
            raise

    def close(self) -> None:
        self._slide.close()
        self._file.close()

    def __enter__(self) -> SlideWindows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _level_array(self, level: int) -> Any:
        group = self._slide.zarr_group
        array = group[str(level)] if hasattr(group, "keys") else group
        dtype = np.dtype(array.dtype)
        if dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise StreamError(f"{self.uri}: level {level} holds {dtype} samples of shape {array.shape} (slides are read as 8-bit RGB)")
        return array

    def read_level(self, level: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """Rows y0.. and columns x0.. of a level, as stored, as height x width x 3 uint8."""
        array = self._array if level == self.grid.level and self._array is not None else self._level_array(level)
        if level == self.grid.level:
            self._array = array
        region = np.asarray(array[y0 : y0 + height, x0 : x0 + width])
        if region.ndim == 2:
            region = region[..., None]
        if region.shape[2] < 3:
            region = np.repeat(region[..., :1], 3, axis=2)
        return np.ascontiguousarray(region[..., :3])

    def rgb(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """Target rows y0..y0+height-1, columns x0..x0+width-1, as height x width x 3 uint8."""
        grid = self.grid
        if y0 < 0 or x0 < 0 or height < 1 or width < 1 or y0 + height > grid.height or x0 + width > grid.width:
            raise ValueError(f"region ({y0}, {x0}) + ({height}, {width}) is not inside the {grid.height} x {grid.width} target grid")
        if not grid.resampled:
            return self.read_level(grid.level, y0, x0, height, width)
        from PIL import Image

        ry, rx = grid.level_height / grid.height, grid.level_width / grid.width
        box = (x0 * rx, y0 * ry, (x0 + width) * rx, (y0 + height) * ry)  # in level pixels
        # the filter reaches half a target pixel (BOX) or one level pixel (bilinear) past the box
        reach_y, reach_x = math.ceil(max(ry, 1.0)) + RESAMPLE_MARGIN, math.ceil(max(rx, 1.0)) + RESAMPLE_MARGIN
        top, left = max(0, math.floor(box[1]) - reach_y), max(0, math.floor(box[0]) - reach_x)
        bottom = min(grid.level_height, math.ceil(box[3]) + reach_y)
        right = min(grid.level_width, math.ceil(box[2]) + reach_x)
        region = self.read_level(grid.level, top, left, bottom - top, right - left)
        method = Image.Resampling.BOX if rx >= 1 and ry >= 1 else Image.Resampling.BILINEAR
        shifted = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
        return np.asarray(Image.fromarray(region, "RGB").resize((width, height), method, box=shifted), dtype=np.uint8)

    def overview(self, max_side: int = TISSUE_SIDE) -> np.ndarray:
        """The coarsest level, reduced by block means to at most max_side a side (read in strips of rows)."""
        level = len(self.level_sizes) - 1
        h, w = self.level_sizes[level]
        factor = max(1, math.ceil(max(h, w) / max_side))
        out_h, out_w = h // factor or 1, w // factor or 1
        out = np.empty((out_h, out_w, 3), np.uint8)
        strip = max(factor, (256 // factor) * factor)  # rows read at a time, a multiple of the factor
        for y in range(0, out_h * factor, strip):
            rows = min(strip, out_h * factor - y, h - y)
            region = self.read_level(level, y, 0, rows, min(w, out_w * factor))
            if factor == 1:
                out[y : y + rows] = region[:, :out_w]
                continue
            n = rows // factor
            blocks = region[: n * factor, : out_w * factor].reshape(n, factor, out_w, factor, 3)
            out[y // factor : y // factor + n] = blocks.mean(axis=(1, 3)).round().astype(np.uint8)
        return out


# --------------------------------------------------------------------------- tissue


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB uint8 image, 0..255 (uint8): 255 (max - min) / max, 0 where max is 0."""
    top = rgb.max(axis=2).astype(np.float32)
    low = rgb.min(axis=2).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(top > 0, (top - low) * 255.0 / top, 0.0)
    return np.clip(s.round(), 0, 255).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: t maximising the between-class variance of <= t and > t."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    sum0 = np.cumsum(hist * levels)
    mean0 = np.divide(sum0, weight0, out=np.zeros(256), where=weight0 > 0)
    mean1 = np.divide(sum0[-1] - sum0, weight1, out=np.zeros(256), where=weight1 > 0)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return int(np.argmax(between))


def _shifted(mask: np.ndarray, combine) -> np.ndarray:
    """combine (np.logical_and: erosion, np.logical_or: dilation) of a mask over its 3 x 3 neighbours;
    outside the image counts as the pixel itself (edges neither grow nor shrink for it)."""
    padded = np.pad(mask, 1, mode="edge")
    out = mask.copy()
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            out = combine(out, padded[dy : dy + h, dx : dx + w])
    return out


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue (True) of an RGB overview: saturation over max(Otsu, MIN_SATURATION), opened and closed 3 x 3."""
    s = saturation(rgb)
    mask = s > max(otsu_threshold(s), MIN_SATURATION)
    mask = _shifted(_shifted(mask, np.logical_and), np.logical_or)  # opening: specks out
    return _shifted(_shifted(mask, np.logical_or), np.logical_and)  # closing: pinholes filled


class TissueMap:
    """A tissue mask laid over a target grid: the tissue fraction of any window of it."""

    def __init__(self, mask: np.ndarray, height: int, width: int) -> None:
        self.mask, self.height, self.width = mask, height, width
        self._sums = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # integral image

    def fraction(self, y0: int, x0: int, height: int, width: int) -> float:
        """The tissue share of target rows y0..y0+height-1, columns x0..: of the mask pixels it overlaps (at least one)."""
        mh, mw = self.mask.shape
        top = min(mh - 1, y0 * mh // self.height)
        left = min(mw - 1, x0 * mw // self.width)
        bottom = max(top + 1, min(mh, math.ceil((y0 + height) * mh / self.height)))
        right = max(left + 1, min(mw, math.ceil((x0 + width) * mw / self.width)))
        s = self._sums
        tissue = s[bottom, right] - s[top, right] - s[bottom, left] + s[top, left]
        return float(tissue) / ((bottom - top) * (right - left))


# --------------------------------------------------------------------------- the read stage


def probe_slide(uri: str, cfg: Any, stats: StoreStats | None = None) -> StreamSource:
    """The read stage's look at a slide: its header only (levels, mpp), bounded before any pixel is
    read. cfg: the job's InputConfig. StreamError names the slide's problem: no mpp when one is
    asked, no such level, level 0 or the target grid over input.max_stream_pixels."""
    settings = cfg.slide
    with SlideWindows.open(
        uri, cfg.storage_options, mpp=settings.mpp, level=settings.level, block_size=PROBE_BLOCK_BYTES, stats=stats
    ) as slide:
        (h0, w0), grid = slide.level_sizes[0], slide.grid
    for what, h, w in (("level 0", h0, w0), ("the target grid", grid.height, grid.width)):
        if h * w > cfg.max_stream_pixels:
            raise StreamError(
                f"slide of {w0} x {h0} pixels at level 0: {what} ({w} x {h} = {h * w} pixels) is over the limit of "
                f"{cfg.max_stream_pixels} (input.max_stream_pixels)"
            )
    return StreamSource(uri, None, grid.height, grid.width, kind="slide")
