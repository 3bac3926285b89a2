"""Whole-slide images (`input.format: slide`, the `slides` extra): pyramids read at a resolution in
microns per pixel, window by window, and the tissue that decides which windows run.

A slide is a pyramid: level 0 at the scanner's resolution (e.g. 0.25 mpp, "40x"), each further
level a downsampled copy. The reader is chosen per file (`slide_backend`):
- tiffslide (on tifffile) opens SVS, NDPI, SCN, BIF and generic pyramidal TIFFs
  (`TIFFSLIDE_SUFFIXES`), from a local path or through the same fsspec file objects
  (`RetryingFile`, retries, store stats) as huge TIFFs. Only the tiles a window touches are
  decoded, tile by tile, and kept in a small LRU (`TileCache`, a window's height of level rows, the
  resampling's reach and two tile rows, times the level's width): windows overlap, and without it a
  tile was decoded once per window that touched it (4x for 512-pixel windows at stride 341 over
  256-pixel tiles, 12x for 128 at 96; tests/test_slide.py counts them).
- OpenSlide (openslide-python on the openslide-bin library) opens the formats tiffslide cannot:
  MRXS, DICOM WSI, Hamamatsu VMS/VMU, Sakura SVSLIDE, Zeiss CZI (`OPENSLIDE_SUFFIXES`). It reads local
  paths only (a C library that opens the slide's companion files itself, e.g. MRXS's folder of .dat
  files): a remote one is its errors row saying so. It keeps its own cache of decoded tiles. Its
  transparent pixels (outside the scanned area) are laid on the slide's background colour (white
  where it states none). A DICOM WSI is a folder of .dcm files (one per level): the listing keeps
  the first .dcm of each folder, and OpenSlide finds the others.

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
the TIFF resolution tags, ...; OpenSlide's `openslide.mpp-x` / `-y`). A slide without one, when
`mpp` is asked, cannot be placed on the grid: its errors row says so. A slide bomb (level 0, or the target grid, over
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
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.io.storage import RetryingFile, StoreStats, is_local, open_fs
from pipeline.io.tiff import PROBE_BLOCK_BYTES, READ_BLOCK_BYTES, StreamError
from pipeline.rows import StreamSource

TIFFSLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".tif", ".tiff")  # what tiffslide reads (Philips TIFF too)
OPENSLIDE_SUFFIXES = (".mrxs", ".dcm", ".vms", ".vmu", ".svslide", ".czi")  # what only OpenSlide reads
SLIDE_SUFFIXES = TIFFSLIDE_SUFFIXES + OPENSLIDE_SUFFIXES
DICOM_SUFFIX = ".dcm"  # a DICOM WSI is a folder of them: one slide per folder
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


def slide_backend(uri: str) -> str:
    """The reader a slide is opened with, by its suffix: "openslide" for the formats only OpenSlide
    reads, else "tiffslide"."""
    return "openslide" if uri.lower().endswith(OPENSLIDE_SUFFIXES) else "tiffslide"


def _tiffslide():
    try:
        import tiffslide
    except ImportError:
        raise StreamError("slides need tiffslide: pip install 'segpipe[slides]'") from None
    return tiffslide


def _openslide(uri: str):
    try:
        import openslide
    except ImportError:
        raise StreamError(
            f"{uri}: this slide format is read by OpenSlide: pip install 'segpipe[slides]' (openslide-python, openslide-bin)"
        ) from None
    return openslide


class TileCache:
    """Decoded tiles of one open slide, least recently used dropped first beyond `max_bytes`.
    For tests and benchmarks: `decoded` counts the tiles decoded (misses), `requested` the tiles
    the reads asked for (what was decoded before there was a cache)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.decoded = 0
        self.requested = 0
        self._tiles: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[int, int, int], decode) -> np.ndarray:
        self.requested += 1
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
            return tile
        tile = decode()
        self.decoded += 1
        if tile.nbytes <= self.max_bytes:
            self._tiles[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._tiles.popitem(last=False)
                self._bytes -= old.nbytes
        return tile

    def clear(self) -> None:
        self._tiles.clear()
        self._bytes = 0


def _as_rgb(region: np.ndarray) -> np.ndarray:
    if region.ndim == 2:
        region = region[..., None]
    if region.shape[2] < 3:
        region = np.repeat(region[..., :1], 3, axis=2)
    return np.ascontiguousarray(region[..., :3])


class TiffslideLevels:
    """A slide's levels through tiffslide: regions decoded tile by tile (the level's zarr chunks),
    the tiles kept in a TileCache."""

    backend = "tiffslide"

    def __init__(self, file: Any, uri: str) -> None:
        tiffslide = _tiffslide()
        self.uri, self._file = uri, file
        try:
            self._slide = tiffslide.TiffSlide(file)
            props = self._slide.properties
            self.level_sizes = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
        except Exception as exc:
            raise StreamError(f"{uri}: not a readable slide: {type(exc).__name__}: {exc}") from None
        self.mpp_x, self.mpp_y = props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")
        self.objective_power = props.get("tiffslide.objective-power")
        self.cache_rows = 0  # level rows of tiles to keep beyond two tile rows (`keep`, SlideWindows.keep_rows)
        self.tiles = TileCache(0)
        self._arrays: dict[int, Any] = {}

    def close(self) -> None:
        self.tiles.clear()
        self._slide.close()
        self._file.close()

    def _array(self, level: int) -> Any:
        array = self._arrays.get(level)
        if array is not None:
            return array
        group = self._slide.zarr_group
        array = group[str(level)] if hasattr(group, "keys") else group
        dtype = np.dtype(array.dtype)
        if dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise StreamError(f"{self.uri}: level {level} holds {dtype} samples of shape {array.shape} (slides are read as 8-bit RGB)")
        self._arrays[level] = array
        self.keep(self.cache_rows)
        return array

    def keep(self, rows: int) -> None:
        """Keep `rows` level rows of tiles and two tile rows more, of the widest level opened."""
        self.cache_rows = rows
        bounds = [(rows + 2 * int(a.chunks[0])) * int(a.shape[1]) * (a.shape[2] if a.ndim == 3 else 1) for a in self._arrays.values()]
        self.tiles.max_bytes = max(bounds, default=0)

    def read(self, level: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """Rows y0.. and columns x0.. of a level as stored (height x width x samples), from whole tiles."""
        array = self._array(level)
        th, tw = int(array.chunks[0]), int(array.chunks[1])
        lh, lw = int(array.shape[0]), int(array.shape[1])
        out = np.empty((height, width, *array.shape[2:]), np.uint8)
        for ty in range(y0 // th, (y0 + height - 1) // th + 1):
            for tx in range(x0 // tw, (x0 + width - 1) // tw + 1):
                top, left = ty * th, tx * tw
                tile = self.tiles.get(
                    (level, ty, tx), lambda top=top, left=left: np.asarray(array[top : min(top + th, lh), left : min(left + tw, lw)])
                )
                y_from, y_to = max(y0, top), min(y0 + height, top + tile.shape[0])
                x_from, x_to = max(x0, left), min(x0 + width, left + tile.shape[1])
                out[y_from - y0 : y_to - y0, x_from - x0 : x_to - x0] = tile[y_from - top : y_to - top, x_from - left : x_to - left]
        return _as_rgb(out)


class OpenslideLevels:
    """A slide's levels through OpenSlide (local paths only): regions by `read_region`, RGBA laid on
    the slide's background colour. read_region takes a level's region at integer level-0 coordinates
    (x downsample): exact for the integral downsamples of most pyramids; where a level's downsample is
    not an integer (4.0002), OpenSlide places the region at a fraction of a level pixel."""

    backend = "openslide"

    def __init__(self, path: str, uri: str) -> None:
        openslide = _openslide(uri)
        self.uri = uri
        try:
            self._slide = openslide.OpenSlide(path)
            props = self._slide.properties
            self.level_sizes = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
            self._downsamples = [float(d) for d in self._slide.level_downsamples]
        except Exception as exc:
            raise StreamError(f"{uri}: not a slide OpenSlide reads: {type(exc).__name__}: {exc}") from None
        self.mpp_x, self.mpp_y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        self.objective_power = props.get("openslide.objective-power")
        colour = props.get("openslide.background-color") or "FFFFFF"
        self._background = np.array([int(colour[i : i + 2], 16) for i in (0, 2, 4)], np.float32)
        self.tiles = None  # OpenSlide caches decoded tiles itself

    def close(self) -> None:
        self._slide.close()

    def read(self, level: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        ds = self._downsamples[level]
        try:
            rgba = np.asarray(self._slide.read_region((round(x0 * ds), round(y0 * ds)), level, (width, height)))
        except Exception as exc:
            raise StreamError(f"{self.uri}: OpenSlide could not read level {level}: {type(exc).__name__}: {exc}") from None
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        a = alpha.astype(np.float32) / 255.0
        return np.rint(rgba[..., :3] * a + self._background * (1.0 - a)).astype(np.uint8)


def open_levels(uri: str, storage_options: dict | None, *, backend: str | None, block_size: int, stats: StoreStats | None):
    """A slide's levels with the backend `slide_backend` picks (or the one named); StreamError where
    it cannot be read, naming why."""
    backend = backend or slide_backend(uri)
    if backend == "openslide":
        if not is_local(uri):
            raise StreamError(
                f"{uri}: {uri.rsplit('.', 1)[-1].upper()} slides are read by OpenSlide, which reads local files only "
                "(it opens the slide's companion files by path): copy the slide to a local disk"
            )
        return OpenslideLevels(uri.removeprefix("file://"), uri)
    fs, path = open_fs(uri, storage_options)
    file = RetryingFile(fs, path, uri=uri, stats=stats, block_size=block_size)
    try:
        return TiffslideLevels(file, uri)
    except BaseException:
        file.close()
        raise


class SlideWindows:
    """One slide, opened on its target grid: `rgb(y0, x0, h, w)` reads a window of it (target
    coordinates) as h x w x 3 uint8, a `pipeline.predict.tiling.ReadWindow`. `levels`: the backend
    (TiffslideLevels or OpenslideLevels)."""

    def __init__(self, levels: Any, uri: str, *, mpp: float | None, level: int | None) -> None:
        self.uri, self.levels = uri, levels
        sizes = levels.level_sizes
        mpp_x, mpp_y = levels.mpp_x, levels.mpp_y
        mpp0 = (float(mpp_y or mpp_x), float(mpp_x)) if mpp_x and float(mpp_x) > 0 else None
        self.level_sizes = sizes
        self.objective_power = levels.objective_power
        self.grid = choose_grid(sizes, mpp0, mpp=mpp, level=level, what=uri)
        self.height, self.width = self.grid.height, self.grid.width

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
        backend: str | None = None,
    ) -> SlideWindows:
        """`backend`: "tiffslide" or "openslide" to force one (None: `slide_backend`'s choice)."""
        levels = open_levels(uri, storage_options, backend=backend, block_size=block_size, stats=stats)
        try:
            return cls(levels, uri, mpp=mpp, level=level)
        except BaseException:
            levels.close()
            raise

    def close(self) -> None:
        self.levels.close()

    def __enter__(self) -> SlideWindows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keep_rows(self, rows: int) -> None:
        """Keep the decoded tiles of `rows` target rows (the windows' height): windows read left to
        right, top to bottom then decode each tile once. What is held is about
        (rows + the resampling's reach + two tile rows) x the level's width x 3 bytes."""
        if self.levels.tiles is None:
            return  # OpenSlide caches its tiles itself
        grid = self.grid
        reach = math.ceil(max(grid.level_height / grid.height, 1.0)) + RESAMPLE_MARGIN
        self.levels.keep(math.ceil(rows * grid.level_height / grid.height) + 2 * reach)

    @property
    def tiles_decoded(self) -> int | None:
        """Tiles decoded so far (tiffslide; None for OpenSlide, which does not say)."""
        return self.levels.tiles.decoded if self.levels.tiles is not None else None

    def read_level(self, level: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """Rows y0.. and columns x0.. of a level, as stored, as height x width x 3 uint8."""
        return self.levels.read(level, y0, x0, height, width)

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
