"""Geospatial rasters (`input.format: raster`, the `geo` extra): any raster GDAL reads, window by window.

A raster (GeoTIFF, COG, JPEG2000, ERDAS .img, VRT, ...) takes the path of huge TIFFs
(pipeline.io.tiff), whatever its size: the read stage lists it like an image file and probes its
header (`probe_raster`: size, bands, the bomb guard `input.max_stream_pixels`), the decode stage
passes its `StreamSource` (kind "raster") on, and the predictor opens it with `RasterWindows` and hands
`RasterWindows.read` to `pipeline.predict.tiling.segment_streaming` as its window reader. Memory is
bounded as for TIFFs: GDAL reads the blocks a window touches (its block cache is bounded by
GDAL_CACHEMAX), never the raster whole.

Where it is read from: a local path through GDAL itself; any other URI (s3://, gs://, memory://, ...)
through fsspec with input.storage_options, handed to rasterio as its `opener` (`RangeOpener`): GDAL
seeks and reads the header, then only the tiles (or overview tiles) a read touches, each read a
range request of what GDAL asks plus at most RANGE_READ_AHEAD bytes. So a COG on S3 is read window
by window, never downloaded whole (tests/test_raster.py measures it on an S3 endpoint: three windows
of a 16 MB COG fetch 2.1 MB, header included). fsspec's own file object would not do: s3fs reads ahead 50 MB
by default, which is a whole COG of that size at the first header read. The files are the storage
layer's `RetryingFile`s, so a transient error mid-read is retried as for every other input.
Credentials stay in the storage options; errors are scrubbed of them where they are reported.

Bands (`input.bands`, 1-based as GDAL counts; null: all) feed the model in that order; their number
must be the model's input channels (`SegmentationModel.in_channels`), checked before anything runs.
How values become model input (`input.scale`, `BandScale`), per band:
  range       min -> 0, max -> 255, clipped: uint8 = rint(clip((v - min) / (max - min), 0, 1) * 255)
  percentile  as range, min and max being the `low` and `high` percentiles of the band's valid
              pixels, from a read of at most PERCENTILE_PIXELS pixels (GDAL serves a decimated
              read from the raster's overviews where it has them; a raster that small is read whole,
              exactly); the values used are in the masks table and run.json
  standard    (v - mean) / std is what the model sees: the window holds model_mean + model_std * z
              (float32), which the model's normalization turns back into z
  null        8-bit rasters as they are (other types need a scale: exit 2)

Valid data: a pixel is valid where GDAL's mask of every selected band says so (the nodata value,
an alpha band or an internal mask) and, in a floating-point raster, every selected band's value is
finite: NaN and inf are no data whether or not the raster declares a nodata value (GDAL's mask
counts them as data where it declares none, and one NaN would make a band's percentiles NaN).
Invalid pixels are 0 in the model's input, 255 in the masks, and count in no metric; a window with no valid pixel is neither read into the model nor scored
(`RasterWindows.empty`, counted per image).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import ConfigError, InputConfig, PercentileScale, RangeScale, StandardScale
from pipeline.extras import require
from pipeline.io.storage import RetryingFile, StoreStats, is_local, open_fs
from pipeline.redaction import scrub
from pipeline.rows import StreamSource

# what `input.format: raster` lists (GDAL reads many more: `input.pattern` cannot add suffixes, this can)
RASTER_EXTENSIONS = (".tif", ".tiff", ".gtiff", ".jp2", ".j2k", ".img", ".vrt", ".ntf", ".nitf", ".nc", ".hdf", ".h5", ".asc", ".dem")
PERCENTILE_PIXELS = 2**22  # percentiles from at most this many pixels of each band (4 megapixels)
RANGE_READ_AHEAD = 256 * 1024  # bytes read past each of GDAL's reads of a remote raster (headers, a row's next tile)
CACHE_BYTES = 64 * 2**20  # windows read by `RasterWindows.empty` kept for `read` (a batch's worth)
NODATA_LABEL = 255  # the masks' value for pixels outside the raster's valid data
RASTER_STREAM = "raster"  # StreamSource.kind of a raster


class RasterError(ValueError):
    """A raster that cannot be segmented as configured; the message says why (one line)."""


def require_geo(what: str = "input.format: raster") -> None:
    require("rasterio", "geo", what)


class RangeOpener:
    """A store as rasterio's `opener` wants it (the fsspec filesystem methods GDAL's virtual file
    system calls: size, ls, isfile, ...), whose files are `RetryingFile`s that read ahead at most
    RANGE_READ_AHEAD bytes: each of GDAL's reads is one small range request, retried when transient.

    GDAL lists the raster's folder once to find its side files (`.msk`, `.ovr`, `.aux.xml`, world
    files: all named after the raster's stem). In an archive that folder holds thousands of rasters,
    so its listing here is of the names that start with the stem (one prefixed ListObjectsV2 on S3,
    not the folder's pages); other folders are listed whole."""

    def __init__(self, fs: Any, path: str, stats: StoreStats | None = None) -> None:
        self._fs = fs
        self._folder, _, name = path.rstrip("/").rpartition("/")
        self._stem = name.split(".", 1)[0]
        self.stats = stats if stats is not None else StoreStats()

    def ls(self, path: str, detail: bool = False, **kwargs: Any) -> list:
        if detail or path.rstrip("/") != self._folder or not self._stem:
            return self._fs.ls(path, detail=detail, **kwargs)
        # s3fs and gcsfs list by prefix; a store whose find ignores `prefix` lists the folder
        found = self._fs.find(path, withdirs=True, prefix=self._stem)
        return [p for p in found if p.rstrip("/").rpartition("/")[0] == self._folder and p.rpartition("/")[2].startswith(self._stem)]

    def open(self, path: str, mode: str = "rb", **_: Any) -> RetryingFile:
        if "r" not in mode or "+" in mode:
            raise OSError(f"{path}: rasters are read-only here (mode {mode!r})")
        return RetryingFile(self._fs, path, stats=self.stats, block_size=RANGE_READ_AHEAD)

    def __getattr__(self, name: str) -> Any:  # size, ls, isfile, isdir, modified, ...: the store's own
        return getattr(self._fs, name)


def open_dataset(uri: str, storage_options: dict | None = None):
    """The raster at `uri` opened with rasterio: GDAL reads a local path itself; a remote one is read
    through fsspec (`storage_options`) in range requests (`RangeOpener`)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():  # a raster without a CRS is said once for the run (pipeline.plan), not per open
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if is_local(uri):
            return rasterio.open(uri.removeprefix("file://"))
        fs, path = open_fs(uri, storage_options)
        return rasterio.open(path, opener=RangeOpener(fs, path))


def georef_of(ds) -> dict[str, Any]:
    """The raster's CRS (its EPSG code as "EPSG:n" where it has one, else WKT), its transform (rasterio's
    affine order a, b, c, d, e, f: x = a col + b row + c, y = d col + e row + f) and resolution
    (x, y), and a pixel's area in square metres where the CRS is projected (|a e - b d| in its linear
    unit, squared to metres; None for a geographic CRS); all None for a raster without a CRS, or
    with a CRS but no geotransform (GDAL then gives the identity, 1-unit pixels at the origin, which
    rasterio warns of and open_dataset silences: georeferenced by it, the masks would sit there and
    every pixel would be 1 m^2; GCPs and RPCs are not warped either)."""
    if ds.crs is None or ds.transform.is_identity:
        return {"crs": None, "transform": None, "resolution": None, "pixel_area_m2": None}
    t = ds.transform
    area = None
    if ds.crs.is_projected:
        metres = float(ds.crs.linear_units_factor[1])
        area = abs(t.a * t.e - t.b * t.d) * metres * metres
    return {
        "crs": ds.crs.to_string(),
        "transform": [float(v) for v in tuple(t)[:6]],
        "resolution": [float(v) for v in ds.res],
        "pixel_area_m2": area,
    }


# --------------------------------------------------------------------------- scale


@dataclass(frozen=True)
class BandScale:
    """How one raster's selected bands become model input (see the module's docstring).

    mode "range": `low` and `high` per band (the config's, or the percentiles found); "standard": `low`
    and `high` are the config's mean and std, `model_mean` / `model_std` the model's normalization;
    "none": 8-bit values as they are."""

    mode: str
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()
    model_mean: tuple[float, ...] = ()
    model_std: tuple[float, ...] = ()
    source: str = ""  # percentile: where the values came from (a full or a decimated read)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """C x h x w band values -> h x w x C model input (uint8; float32 for mode standard)."""
        values = np.moveaxis(values, 0, -1)
        if self.mode == "none":
            return np.ascontiguousarray(values, dtype=np.uint8)
        low, high = np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)
        if self.mode == "standard":
            z = (values.astype(np.float64) - low) / high
            return (np.asarray(self.model_mean) + np.asarray(self.model_std) * z).astype(np.float32)
        return np.rint(np.clip((values.astype(np.float64) - low) / (high - low), 0, 1) * 255).astype(np.uint8)

    def record(self) -> list[list[float]]:
        """Per band what was applied: [min, max] (range, percentile) or [mean, std] (standard)."""
        return [[lo, hi] for lo, hi in zip(self.low, self.high)]


def band_scale(ds, bands: list[int], cfg: InputConfig, model_stats: tuple[list[float], list[float]] | None = None) -> BandScale:
    """The BandScale of raster `ds` for `bands` under input.scale (percentiles computed here)."""
    scale = cfg.scale
    if scale is None:
        return BandScale("none")
    if isinstance(scale, RangeScale):
        return BandScale("range", tuple(scale.min), tuple(scale.max))
    if isinstance(scale, StandardScale):
        mean, std = model_stats or ([0.0] * len(bands), [1.0] * len(bands))
        return BandScale("standard", tuple(scale.mean), tuple(scale.std), tuple(mean), tuple(std))
    return percentile_scale(ds, bands, scale)


def percentile_scale(ds, bands: list[int], scale: PercentileScale, max_pixels: int = PERCENTILE_PIXELS) -> BandScale:
    """Per band the `low` and `high` percentiles (numpy's linear interpolation) of the valid pixels of
    a read of at most `max_pixels` pixels: the raster whole where it is that small, else decimated
    (nearest neighbour; GDAL reads its overviews for it where the raster has them)."""
    from rasterio.enums import Resampling

    factor = max(1, math.ceil(math.sqrt(ds.height * ds.width / max_pixels)))
    shape = (len(bands), math.ceil(ds.height / factor), math.ceil(ds.width / factor))
    if factor == 1:
        values, masks = ds.read(bands), ds.read_masks(bands)
        source = "full read"
    else:
        values = ds.read(bands, out_shape=shape, resampling=Resampling.nearest)
        masks = ds.read_masks(bands, out_shape=shape, resampling=Resampling.nearest)
        source = f"decimated read, 1 pixel in {factor} x {factor}"
    valid = finite_valid(values, masks.min(axis=0) > 0)
    low, high = [], []
    for band in values:
        picked = band[valid]
        if not picked.size:  # no valid pixel: every window is skipped, the values matter not
            lo, hi = 0.0, 1.0
        else:
            lo, hi = (float(v) for v in np.percentile(picked, [scale.low, scale.high]))
        if not hi > lo:  # a constant band: everything at or above it is 255
            hi = lo + 1.0
        low.append(lo)
        high.append(hi)
    return BandScale("range", tuple(low), tuple(high), source=source)


def finite_valid(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """`valid` (h x w) where every band of `values` (C x h x w) is finite too: a floating-point
    raster's NaN and inf are no data, declared or not."""
    if not np.issubdtype(values.dtype, np.floating):
        return valid
    return valid & np.isfinite(values).all(axis=0)


# --------------------------------------------------------------------------- reading windows


@dataclass
class RasterWindows:
    """Windows of one raster's selected bands, scaled, with their valid-data mask.

    `empty(top, left, h, w)` reads the window (data and masks) and says whether it holds no valid
    pixel; `read` of the same window then takes what `empty` read (one read per window: the windows
    of a batch are checked before any is read, so up to CACHE_BYTES of them are kept). Both
    return/hold h x w x C; invalid pixels are 0. `valid_rows(y0, n)` is the valid mask of whole rows,
    `labels(y0, n)` the rows of band 1 (for a label raster)."""

    ds: Any
    uri: str
    bands: list[int]
    scale: BandScale
    skipped: int = 0  # windows with no valid pixel
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)  # box -> (pixels, valid), latest last
    _cached_bytes: int = 0

    @classmethod
    def open(
        cls,
        uri: str,
        storage_options: dict | None,
        cfg: InputConfig,
        model_stats: tuple[list[float], list[float]] | None = None,
    ) -> RasterWindows:
        ds = open_dataset(uri, storage_options)
        try:
            bands = selected_bands(ds, cfg.bands, uri)
            check_scale(ds, bands, cfg, uri)
            return cls(ds, uri, bands, band_scale(ds, bands, cfg, model_stats))
        except BaseException:
            ds.close()
            raise

    @classmethod
    def open_label(cls, uri: str, storage_options: dict | None) -> RasterWindows:
        ds = open_dataset(uri, storage_options)
        return cls(ds, uri, [1], BandScale("none"))

    @property
    def height(self) -> int:
        return int(self.ds.height)

    @property
    def width(self) -> int:
        return int(self.ds.width)

    def close(self) -> None:
        self._cache.clear()
        self.ds.close()

    def __enter__(self) -> RasterWindows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _window(self, top: int, left: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.windows import Window

        box = (top, left, height, width)
        if box in self._cache:
            return self._cache[box]
        window = Window(left, top, width, height)
        values = self.ds.read(self.bands, window=window)
        valid = finite_valid(values, self.ds.read_masks(self.bands, window=window).min(axis=0) > 0)
        pixels = self.scale.apply(np.where(valid, values, 0))  # no NaN into the scale's cast to uint8
        pixels[~valid] = 0
        self._cache[box] = (pixels, valid)
        self._cached_bytes += pixels.nbytes + valid.nbytes
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, (old_pixels, old_valid) = self._cache.popitem(last=False)
            self._cached_bytes -= old_pixels.nbytes + old_valid.nbytes
        return pixels, valid

    def empty(self, top: int, left: int, height: int, width: int) -> bool:
        """True (and counted) where the window holds no valid pixel."""
        _, valid = self._window(top, left, height, width)
        if valid.any():
            return False
        self.skipped += 1
        return True

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self._window(top, left, height, width)[0]

    def valid_rows(self, y0: int, rows: int) -> np.ndarray:
        from rasterio.windows import Window

        window = Window(0, y0, self.width, rows)
        valid = self.ds.read_masks(self.bands, window=window).min(axis=0) > 0
        if not self.floating:
            return valid
        # GDAL's mask calls inf data even where NaN is the nodata value, and each band has its own
        return finite_valid(self.ds.read(self.bands, window=window), valid)

    @property
    def floating(self) -> bool:
        """Whether a selected band is floating-point: its NaN and inf are no data, whatever its nodata value."""
        return any(np.issubdtype(np.dtype(self.ds.dtypes[b - 1]), np.floating) for b in self.bands)

    def labels(self, y0: int, rows: int, ignore: int | None = None) -> np.ndarray:
        """Rows of band 1 (a label raster); with `ignore` (the metrics' ignore_index), the pixels its
        nodata value marks hold `ignore`: no class of the model may be given them (a label raster's
        nodata 0 is no class 0)."""
        from rasterio.windows import Window

        values = self.ds.read(1, window=Window(0, y0, self.width, rows))
        nodata = self.ds.nodata
        if ignore is None or nodata is None:
            return values
        missing = np.isnan(values) if math.isnan(nodata) else values == nodata
        if not missing.any():
            return values
        out = values.astype(np.result_type(values.dtype, np.min_scalar_type(ignore)))
        out[missing] = ignore
        return out

    def georef(self) -> dict[str, Any]:
        return georef_of(self.ds)


def selected_bands(ds, bands: list[int] | None, uri: str) -> list[int]:
    """input.bands checked against the raster (all its bands where null); RasterError for a band it lacks."""
    if bands is None:
        return list(range(1, ds.count + 1))
    missing = [b for b in bands if b > ds.count]
    if missing:
        raise RasterError(f"input.bands: {uri} has {ds.count} bands, no band {', '.join(map(str, missing))}")
    return list(bands)


def check_scale(ds, bands: list[int], cfg: InputConfig, uri: str) -> None:
    """RasterError where input.scale does not fit the raster: no scale for data other than 8-bit, or
    a range outside what its data type holds."""
    dtypes = {ds.dtypes[b - 1] for b in bands}
    if cfg.scale is None and dtypes != {"uint8"}:
        raise RasterError(
            f"input.scale: {uri} holds {'/'.join(sorted(dtypes))} data, which needs a scale to become model input, "
            "e.g. {mode: percentile, low: 2, high: 98} or {mode: range, min: [...], max: [...]}"
        )
    if isinstance(cfg.scale, RangeScale | StandardScale):
        entries = len(cfg.scale.min) if isinstance(cfg.scale, RangeScale) else len(cfg.scale.mean)
        if entries != len(bands):
            raise RasterError(f"input.scale: {entries} entries per band, but {uri} feeds {len(bands)} bands")
    if isinstance(cfg.scale, RangeScale):
        for b, lo, hi in zip(bands, cfg.scale.min, cfg.scale.max):
            info = np.iinfo(ds.dtypes[b - 1]) if np.dtype(ds.dtypes[b - 1]).kind in "ui" else None
            if info is not None and (hi <= info.min or lo >= info.max):
                raise RasterError(f"input.scale: the range [{lo:g}, {hi:g}] of band {b} is outside its {ds.dtypes[b - 1]} values")


# --------------------------------------------------------------------------- the read stage


def probe_raster(uri: str, label_uri: str | None, cfg: InputConfig) -> StreamSource:
    """The read stage's look at a raster: its header only (size, bands), bounded by
    input.max_stream_pixels; its label (one band, the same size). RasterError says what is wrong."""
    with open_dataset(uri, cfg.storage_options) as ds:
        height, width = int(ds.height), int(ds.width)
        if height * width > cfg.max_stream_pixels:
            raise RasterError(
                f"raster of {width} x {height} = {width * height} pixels is over the limit of {cfg.max_stream_pixels} (input.max_stream_pixels)"
            )
        check_scale(ds, selected_bands(ds, cfg.bands, uri), cfg, uri)
    if label_uri is not None:
        with open_dataset(label_uri, cfg.storage_options) as label:
            if (label.height, label.width) != (height, width):
                raise RasterError(f"label is {label.width} x {label.height} but the raster is {width} x {height}")
            if np.dtype(label.dtypes[0]).kind not in "ui":
                raise RasterError(f"label {label_uri} holds {label.dtypes[0]} values, not class indices")
    return StreamSource(uri, label_uri, height, width, kind=RASTER_STREAM)


def check_raster_job(cfg: InputConfig, first_uri: str, in_channels: int, num_classes: int) -> dict[str, Any]:
    """Before anything runs (ConfigError, exit 2): the first listed raster has the bands asked for, in
    the number the model takes, and a scale that fits its data; the masks' nodata value 255 is no
    class of the model. Returns the raster's facts for the run's first line (its CRS or the lack)."""
    if num_classes > NODATA_LABEL:
        raise ConfigError(
            f"input.format raster marks no-data pixels {NODATA_LABEL} in the masks: the model's {num_classes} classes include it"
        )
    try:
        with open_dataset(first_uri, cfg.storage_options) as ds:
            bands = selected_bands(ds, cfg.bands, first_uri)
            if len(bands) != in_channels:
                which = "input.bands" if cfg.bands is not None else f"input.bands (null: all {ds.count} bands)"
                raise RasterError(f"{which} feeds {len(bands)} bands, but the model takes {in_channels} input channels")
            check_scale(ds, bands, cfg, first_uri)
            return {"crs": ds.crs.to_string() if ds.crs else None, "bands": bands, "count": int(ds.count)}
    except RasterError as exc:
        raise ConfigError(scrub(str(exc), cfg.storage_options)) from None
    except OSError as exc:  # rasterio's RasterioIOError is one: not a raster GDAL reads
        raise ConfigError(scrub(f"input: {first_uri} is not a raster GDAL reads: {exc}", cfg.storage_options)) from None
