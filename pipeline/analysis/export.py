"""`segpipe export RUN --to DIR --format png|tiff|coco|geotiff|cog|geoparquet|gpkg|geojson|qupath|ytvis`: other tools' formats.

RUN is a run directory (`<output.uri>/<run_id>`) and DIR any location, local or an fsspec URI
(s3://...); both are opened with the same storage options. What is read is what the run committed
(pipeline.results.runstore: a part counts once its masks file exists), and an image that several committed
parts hold (a rerun's later attempt) is taken from the latest of them, as `latest_metrics` does.

Formats, one function each, read top to bottom:
  png    `export_png`: one PNG label map per image, `<DIR>/<image id with .png for its extension>`
         (a video run's frames: `<DIR>/<video stem>/<frame index>.png`, as every per-image format names them),
         8-bit (16-bit for masks of more than 256 classes: the masks table's own bit depth).
         Chunked masks are assembled in memory, so only images of at most `max_pixels`
         (50 megapixels) are exported; a larger one is skipped with a line saying to use tiff.
  tiff   `export_tiff`: one tiled TIFF per image (512 x 512 tiles, deflate), same names with .tif.
         Any size: the mask is never held whole. Tiles are cut from one band of chunks at a time
         (a row of chunk_size x chunk_size chunks, see `mask_bands`) and handed to tifffile as a
         generator, so memory is one band of chunks and one row of tiles, whatever the height.
         A slide's (`write_slide_tiff`): a pyramid (SubIFDs, nearest-neighbour levels) with the
         target mpp in its resolution tags, as slide readers (tiffslide) open it.
  geotiff, cog  `export_geotiff` (the `geo` extra; runs of input.format raster): one GeoTIFF per raster
         with the input's CRS and transform, nodata 255 (pixels outside the raster's valid data),
         512 x 512 deflate tiles and the classes as a colour table; cog: a Cloud Optimized GeoTIFF
         (GDAL's COG driver) with overviews by mode resampling. Rasters without a CRS are skipped,
         each with a line why. Memory: one band of chunks, as tiff.
  geoparquet, gpkg, geojson  `export_polygons` (the `geo` extra; raster runs): per raster one file of
         polygons, one per 4-connected region of a class (pieces cut by chunk edges joined), with
         image_id, class_id, class_name, area; in the raster's CRS (GeoJSON: EPSG:4326, RFC 7946).
  coco   `export_coco`, by the run's task (run.json: config.inference.task; semantic by default):
         semantic   `<DIR>/coco.json`: images, categories (model.class_names) and one annotation
                    per image and class present: the class's pixels as COCO RLE, bbox, area.
         instance   `<DIR>/coco.json` (images, categories, no annotations) and
                    `<DIR>/coco_results.json`: the `instances/` table as COCO results, as
                    pycocotools' `COCO(coco.json).loadRes(coco_results.json)` reads them.
         panoptic   `<DIR>/panoptic.json` and `<DIR>/panoptic/<name>.png`: COCO panoptic, the
                    segment-id map as RGB (id = R + 256 G + 256^2 B, ids as the run wrote them) and
                    the `segments/` table as each annotation's segments_info.
         COCO ids: images are numbered 1..N in image_id order (file_name is the run's image_id);
         a category's id is its class index, the value the label maps hold.
  qupath `export_qupath`: one GeoJSON FeatureCollection per image (`output_name(image_id,
         ".geojson")`) that QuPath imports as annotations: a feature per connected region of a
         class, in level-0 pixel coordinates of a slide (pipeline.analysis.qupath). Traced one band
         of chunks at a time; the regions cut by chunk edges are joined.
  ytvis  `export_ytvis` (runs of a clip model, VisTR): `<DIR>/results.json`, YouTube-VIS results (a list
         of {video_id, category_id, score, segmentations}: one per track of the `tracks` table, one
         COCO RLE or null per segmented frame of its video, in frame order), `<DIR>/videos.json` (the
         videos as YouTube-VIS numbers them here: id 1..N in key order, file_name its key, length, the
         frames' numbers in the file, height, width) and the frames' instance-id maps as PNGs, named as
         png names a video's frames (`<video stem>/<frame index>.png`).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.extras import require
from pipeline.io.coco_codec import decode_rle_box, encode_rle, id_to_rgb
from pipeline.io.storage import open_fs, with_retries
from pipeline.io.video import split_frame_id, video_stem
from pipeline.results.masks import PngRows, decode_png
from pipeline.results.run_tables import CHUNK_FIELDS, MASKS, TRACKS
from pipeline.results.runstore import RunStore, strict_json

FORMATS = ("png", "tiff", "coco", "geotiff", "cog", "geoparquet", "gpkg", "geojson", "qupath", "ytvis")
GEO_FORMATS = ("geotiff", "cog")
POLYGON_FORMATS = {"geoparquet": ".parquet", "gpkg": ".gpkg", "geojson": ".geojson"}
PNG_MAX_PIXELS = 50_000_000  # an image assembled whole (png, coco): at most 50 MB as uint8
TIFF_TILE = 512
INSTANCES, SEGMENTS = "instances", "segments"  # the part tables of instance and panoptic runs


class ExportError(Exception):
    """Something wrong with what was asked (not a run directory, an unknown format): one line."""


@dataclass
class ExportResult:
    format: str
    out: str
    written: list[str] = field(default_factory=list)  # paths relative to the destination
    skipped: list[str] = field(default_factory=list)  # one line per image left out, saying why
    names: set[str] = field(default_factory=set, repr=False)  # the per-image file names taken
    video: bool = False  # a video run: frame ids `<key>#<index>` are written as `<video stem>/<index><suffix>`


def export_run(
    run_uri: str,
    out_uri: str,
    fmt: str,
    storage_options: dict | None = None,
    max_pixels: int = PNG_MAX_PIXELS,
    simplify: float | None = None,
) -> ExportResult:
    """Export run `run_uri` to `out_uri` as `fmt` (see the module's docstring). `simplify`: the
    polygon formats' tolerance in map units (Douglas-Peucker, each polygon valid on its own; None: the pixels' edges)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    if simplify is not None and (fmt not in POLYGON_FORMATS or not simplify >= 0):
        raise ExportError(f"--simplify is a tolerance of 0 or more in map units, for {' | '.join(POLYGON_FORMATS)} only")
    if fmt == "tiff":  # before anything is written: a missing package is one line, no empty folder
        require("tifffile", "tiff", "--format tiff")
    if fmt in GEO_FORMATS or fmt in POLYGON_FORMATS:
        for module in ("rasterio", "shapely", "pyproj", *(["pyogrio"] if fmt == "gpkg" else [])):
            require(module, "geo", f"--format {fmt}")
    run = open_run(run_uri, storage_options or {})
    dest = Destination(out_uri, storage_options or {})
    result = ExportResult(fmt, out_uri, video=run.input_format == "video")
    if fmt == "png":
        export_png(run, dest, result, max_pixels)
    elif fmt == "tiff":
        export_tiff(run, dest, result)
    elif fmt in GEO_FORMATS:
        export_geotiff(run, dest, result, cog=fmt == "cog")
    elif fmt in POLYGON_FORMATS:
        export_polygons(run, dest, result, fmt, simplify)
    elif fmt == "qupath":
        export_qupath(run, dest, result)
    elif fmt == "ytvis":
        export_ytvis(run, dest, result, max_pixels)
    else:
        export_coco(run, dest, result, max_pixels)
    return result


# --------------------------------------------------------------------------- the run, as committed


@dataclass
class Run:
    uri: str
    store: RunStore
    info: dict  # run.json
    task: str  # semantic | instance | panoptic
    class_names: list[str]
    input_format: str = "images"  # the run's input.format


def open_run(uri: str, storage_options: dict) -> Run:
    """The run directory at `uri`; ExportError when it is none (no run.json)."""
    store = RunStore.at(uri, storage_options)
    info = store.read_json("run.json")
    if not isinstance(info, dict):
        raise ExportError(f"{uri}: not a run directory (no run.json)")
    model = info.get("model") or {}
    task = ((info.get("config") or {}).get("inference") or {}).get("task") or "semantic"
    num_classes = int(model.get("mask_classes") or model.get("num_classes") or len(model.get("class_names") or []))
    names = [str(n) for n in model.get("class_names") or []]
    if len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    input_format = ((info.get("config") or {}).get("input") or {}).get("format") or "images"
    return Run(uri.rstrip("/"), store, info, str(task), names, str(input_format))


@dataclass
class ImageMask:
    """One image's masks rows (PNG bytes, chunked or not), not decoded yet."""

    image_id: str
    height: int
    width: int
    rows: list[dict]  # image_id, height, width, chunk_y, chunk_x, chunk_height, chunk_width, mask

    @property
    def pixels(self) -> int:
        return self.height * self.width


def image_masks(store: RunStore) -> Iterator[ImageMask]:
    """Every committed image's mask rows, one image at a time, reading one masks part at a time
    (each image from the latest part that holds it)."""
    parts = store.parts_of(MASKS)
    index = {part: i for i, part in enumerate(parts)}
    wanted: dict[int, list[str]] = {}
    for image_id, part in store.mask_parts().items():
        wanted.setdefault(index[part], []).append(image_id)
    for i, part in enumerate(parts):
        if i not in wanted:
            continue
        table = store.read_part(MASKS, part, ["image_id", "height", "width", *CHUNK_FIELDS, "mask"])
        rows_of: dict[str, list[int]] = {}
        for row, image_id in enumerate(table.column("image_id").to_pylist()):
            rows_of.setdefault(image_id, []).append(row)
        for image_id in sorted(wanted[i]):
            rows = table.take(pa.array(rows_of[image_id], pa.int64())).to_pylist()
            yield ImageMask(image_id, int(rows[0]["height"]), int(rows[0]["width"]), rows)


def assemble(image: ImageMask) -> np.ndarray:
    """The whole mask of an image (for images of at most `max_pixels`): its bands stacked."""
    out = np.empty((image.height, image.width), mask_dtype(image))
    y = 0
    for band in mask_bands(image):
        rows = band[0][1].shape[0]
        for x, chunk in band:
            out[y : y + rows, x : x + chunk.shape[1]] = chunk
        y += rows
    return out


def mask_dtype(image: ImageMask) -> np.dtype:
    """uint8 or uint16: the bit depth of the image's PNGs (byte 24, in the IHDR chunk), as the run
    wrote them (16-bit for more than 256 classes)."""
    return np.dtype(np.uint16 if image.rows[0]["mask"][24] == 16 else np.uint8)


def mask_bands(image: ImageMask) -> Iterator[list[tuple[int, np.ndarray]]]:
    """The image's mask one band of chunks at a time, top to bottom: a band is one row of chunks,
    [(x, decoded chunk), ...] left to right, all of the band's height. Only one band is decoded at a
    time; a gap or an overlap among the chunks is a ValueError naming the image."""
    bands: dict[int, list[dict]] = {}
    for row in image.rows:
        bands.setdefault(int(row["chunk_y"]), []).append(row)
    y = 0
    for band_y in sorted(bands):
        chunks = sorted(bands[band_y], key=lambda r: int(r["chunk_x"]))
        height = int(chunks[0]["chunk_height"])
        x, decoded = 0, []
        for chunk in chunks:
            box = (int(chunk["chunk_y"]), int(chunk["chunk_x"]), int(chunk["chunk_height"]), int(chunk["chunk_width"]))
            if band_y != y or box[1] != x or box[2] != height:
                raise ValueError(f"{image.image_id}: chunk {box} does not continue the chunks before it")
            array = decode_png(chunk["mask"])
            if array.shape != (box[2], box[3]):
                raise ValueError(f"{image.image_id}: chunk {box} holds a {array.shape} PNG")
            decoded.append((x, array))
            x += box[3]
        if x != image.width:
            raise ValueError(f"{image.image_id}: the chunks at row {band_y} cover {x} of {image.width} columns")
        yield decoded
        del decoded
        y += height
    if y != image.height:
        raise ValueError(f"{image.image_id}: the chunks cover {y} of {image.height} rows")


# --------------------------------------------------------------------------- the destination


class Destination:
    """Where files go: a local directory or any fsspec location."""

    def __init__(self, uri: str, storage_options: dict) -> None:
        self.fs, self.root = open_fs(uri, storage_options)
        self.uri = uri.rstrip("/")
        self.local = "file" in ((self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.path(name)

        def write() -> None:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(path, data)

        with_retries(write, what="write", uri=f"{self.uri}/{name}")

    def write_with(self, name: str, write: Callable[[str], None]) -> None:
        """`write(local_path)` writes the file (tifffile seeks back to fill in its offsets, which a
        store's file object cannot do): straight into a local destination, else into a temporary
        file that is uploaded."""
        if self.local:
            path = self.path(name)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            write(path)
            return
        with tempfile.TemporaryDirectory(prefix="segpipe-export-") as tmp:
            local = os.path.join(tmp, "file")
            write(local)
            with_retries(lambda: self.fs.put_file(local, self.path(name)), what="write", uri=f"{self.uri}/{name}")


def output_name(image_id: str, suffix: str) -> str:
    """The file an image's export goes to: its id with `suffix` for its extension ("a/b.jpg" ->
    "a/b.png"; a key without extension gets the suffix added)."""
    path = PurePosixPath(image_id.lstrip("/"))
    if ".." in path.parts:
        raise ExportError(f"image id {image_id!r} would leave the destination")
    return str(path.with_suffix(suffix)) if path.suffix else str(path) + suffix


def _unique_name(image_id: str, suffix: str, result: ExportResult) -> str:
    """`output_name`, or the whole id plus `suffix` where another image took that name ("a.jpg"
    beside "a.png": "a.png" and "a.jpg.png"), so no export overwrites another. A video run's frame
    `<key>#<index>`: `<video stem>/<index><suffix>` (no `#` in a file name), or `<key>/<index><suffix>`
    where another video of the same stem took it ("a.mp4" beside "a.mkv"). Where that is taken too
    (an image named "a.jpg.png" exported before "a.jpg"), a number goes before the suffix: "a.jpg-2.png"."""
    frame = split_frame_id(image_id) if result.video else None
    if frame is not None:
        key, index = frame
        first, second = f"{video_stem(key)}/{index}", f"{key}/{index}"
    else:
        first, second = image_id, image_id + suffix
    name = output_name(first, suffix)
    if name in result.names:
        name = output_name(second, suffix)
    n, stem = 2, name[: -len(suffix)] if suffix and name.endswith(suffix) else name
    while name in result.names:  # every name another image of this export holds is refused
        name, n = f"{stem}-{n}{suffix}", n + 1
    result.names.add(name)
    return name


def _too_large(image: ImageMask, max_pixels: int, what: str) -> str | None:
    if image.pixels <= max_pixels:
        return None
    return (
        f"{image.image_id}: {image.height} x {image.width} = {image.pixels / 1e6:.1f} megapixels, over the "
        f"{max_pixels / 1e6:g} that {what} assembles in memory: use --format tiff"
    )


def _png(array: np.ndarray) -> bytes:
    """A grayscale PNG of an 8- or 16-bit label map (the masks codec's encoder)."""
    writer = PngRows(array.shape[0], array.shape[1], 16 if array.dtype == np.uint16 else 8)
    writer.add(array)
    return writer.finish()


# --------------------------------------------------------------------------- png


def export_png(run: Run, dest: Destination, result: ExportResult, max_pixels: int) -> None:
    """One PNG label map per image (`output_name(image_id, ".png")`); images over `max_pixels` are skipped."""
    for image in image_masks(run.store):
        skip = _too_large(image, max_pixels, "--format png")
        if skip:
            result.skipped.append(skip)
            continue
        name = _unique_name(image.image_id, ".png", result)
        dest.write_bytes(name, _png(assemble(image)))
        result.written.append(name)


# --------------------------------------------------------------------------- ytvis


def export_ytvis(run: Run, dest: Destination, result: ExportResult, max_pixels: int) -> None:
    """YouTube-VIS results and videos JSON from the tracks table, and the frames' PNGs (module docstring)."""
    if not run.store.has(TRACKS, f"{TRACKS}.parquet"):
        raise ExportError(f"{run.uri}: no tracks table: --format ytvis exports runs of a clip model (vistr-r50)")
    tracks = run.store.read_part(TRACKS, TRACKS).to_pylist()
    frames: dict[str, list[int]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for image in _mask_sizes(run.store):
        found = split_frame_id(image.image_id)
        if found is not None:
            frames.setdefault(found[0], []).append(found[1])
            sizes.setdefault(found[0], (image.height, image.width))
    videos = sorted(frames)
    numbers = {key: i + 1 for i, key in enumerate(videos)}
    positions = {key: {frame: i for i, frame in enumerate(sorted(frames[key]))} for key in videos}
    results: dict[tuple[str, int], dict] = {}
    for r in tracks:
        key = r["video_id"]
        if key not in positions or r["frame"] not in positions[key]:
            continue  # a frame whose mask is not committed (a run in progress)
        entry = results.setdefault(
            (key, r["track_id"]),
            {
                "video_id": numbers[key],
                "category_id": int(r["class_id"]),
                "score": float(r["score"]),
                "segmentations": [None] * len(frames[key]),
            },
        )
        entry["segmentations"][positions[key][r["frame"]]] = {"size": [int(r["height"]), int(r["width"])], "counts": r["rle"]}
    _write_json(dest, "results.json", [results[k] for k in sorted(results)], result)
    described = [
        {
            "id": numbers[k],
            "file_name": k,
            "length": len(frames[k]),
            "frames": sorted(frames[k]),
            "height": sizes[k][0],
            "width": sizes[k][1],
        }
        for k in videos
    ]
    _write_json(dest, "videos.json", described, result)
    export_png(run, dest, result, max_pixels)


# --------------------------------------------------------------------------- qupath


def export_qupath(run: Run, dest: Destination, result: ExportResult) -> None:
    """One GeoJSON per image: its class regions as QuPath annotations, scaled to the slide's level 0
    by the masks table's `level0_scale` (1 for images that are no slide, and for runs before it);
    an instance run's: its instances as QuPath detections (pipeline.analysis.qupath.detection)."""
    from pipeline.analysis.qupath import SKIPPED_LABEL, RegionTracer, detection, features, qupath_classes

    scales: dict[str, float] = {}
    for part in run.store.parts_of(MASKS):
        if "level0_scale" in run.store.part_schema(MASKS, part).names:
            table = run.store.read_part(MASKS, part, ["image_id", "level0_scale"])
            scales.update(zip(table.column("image_id").to_pylist(), table.column("level0_scale").to_pylist()))
    classes = qupath_classes(run.class_names)
    if run.task == "instance":
        instances = instance_rows(run.store)
        for image_id in sorted(image.image_id for image in _mask_sizes(run.store)):  # every image, with or without instances
            rows, scale = instances.get(image_id, []), scales.get(image_id) or 1.0
            found = [f for f in (detection(r, classes, scale) for r in rows) if f is not None]
            _write_json(dest, _unique_name(image_id, ".geojson", result), {"type": "FeatureCollection", "features": found}, result)
        return
    # 255 is no class only where it marks what was not segmented (a slide's glass, a raster's no data);
    # elsewhere it is a class (models of 256 classes or more) or a segment id
    skipped = SKIPPED_LABEL if run.input_format in ("slide", "raster") else None
    for image in image_masks(run.store):
        tracer = RegionTracer(image.height, image.width, skipped)
        y = 0
        for band in mask_bands(image):
            for x, chunk in band:
                tracer.add(y, x, chunk)
            y += band[0][1].shape[0]
        scale = scales.get(image.image_id) or 1.0
        name = _unique_name(image.image_id, ".geojson", result)
        _write_json(dest, name, {"type": "FeatureCollection", "features": features(tracer, classes, scale)}, result)


# --------------------------------------------------------------------------- tiff


def export_tiff(run: Run, dest: Destination, result: ExportResult) -> None:
    """One tiled, deflate-compressed TIFF per image (`output_name(image_id, ".tif")`), any size; a
    slide's (the masks table's `mpp` column) as a pyramid with its resolution (`write_slide_tiff`)."""
    slide_mpp: dict[str, float | None] = {}
    for part in run.store.parts_of(MASKS):
        if "mpp" in run.store.part_schema(MASKS, part).names:
            table = run.store.read_part(MASKS, part, ["image_id", "mpp"])
            slide_mpp.update(zip(table.column("image_id").to_pylist(), table.column("mpp").to_pylist()))
    for image in image_masks(run.store):
        name = _unique_name(image.image_id, ".tif", result)
        if image.image_id in slide_mpp:
            mpp = slide_mpp[image.image_id]
            dest.write_with(name, lambda path, image=image, mpp=mpp: write_slide_tiff(image, path, mpp))
        else:
            dest.write_with(name, lambda path, image=image: write_tiff(image, path))
        result.written.append(name)


def write_tiff(image: ImageMask, path: str, tile: int = TIFF_TILE) -> None:
    """The image's mask as a tiled TIFF at local `path`, tile by tile from `mask_tiles`: tifffile
    compresses each tile as it comes, holding at most one row of tiles for its threads."""
    import tifffile  # the `tiff` extra, required by export_run

    dtype = mask_dtype(image)
    tifffile.imwrite(
        path,
        mask_tiles(image, tile),
        shape=(image.height, image.width),
        dtype=dtype,
        tile=(tile, tile),
        photometric="minisblack",
        compression="zlib",
        compressionargs={"level": 6},
        buffersize=tile * image.width * dtype.itemsize,  # tiles queued for compression: one row of them
        bigtiff=image.pixels * dtype.itemsize > 2**32 - 2**25,  # classic TIFF offsets end at 4 GB
        metadata=None,
    )


def pyramid_factors(height: int, width: int, tile: int = TIFF_TILE) -> list[int]:
    """The downsampling of each level of a pyramid: 1, 2, 4, ... until a level fits in one tile."""
    factors = [1]
    while -(-max(height, width) // factors[-1]) > tile:
        factors.append(factors[-1] * 2)
    return factors


def write_slide_tiff(image: ImageMask, path: str, mpp: float | None, tile: int = TIFF_TILE) -> None:
    """A slide's mask as a tiled pyramidal TIFF as slide readers open it (tiffslide: its levels and mpp): level 0
    the mask at the run's target resolution, its resolution tags the mpp as pixels per centimetre
    (ResolutionUnit centimetre; none where the slide stated no mpp), then SubIFDs downsampled by 2, 4, ...
    (`pyramid_factors`) by nearest neighbour: every pixel of a level is a pixel of the mask, never a
    blend of classes. Each level is cut from the chunks as `write_tiff`'s (one band at a time: the
    chunks are decoded once per level)."""
    import tifffile  # the `tiff` extra, required by export_run

    dtype = mask_dtype(image)
    factors = pyramid_factors(image.height, image.width, tile)
    bigtiff = image.pixels * dtype.itemsize * 4 // 3 > 2**32 - 2**25  # the levels add a third at most; offsets end at 4 GB
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for level, factor in enumerate(factors):
            width = -(-image.width // factor)
            resolution = {"resolution": (1e4 / (mpp * factor),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
            tif.write(
                mask_tiles(image, tile, factor),
                shape=(-(-image.height // factor), width),
                dtype=dtype,
                tile=(tile, tile),
                photometric="minisblack",
                compression="zlib",
                compressionargs={"level": 6},
                buffersize=tile * width * dtype.itemsize,
                subifds=len(factors) - 1 if level == 0 else None,
                subfiletype=1 if level else 0,  # a reduced-resolution image of level 0
                metadata=None,
                **resolution,
            )


def mask_tiles(image: ImageMask, tile: int = TIFF_TILE, factor: int = 1) -> Iterator[np.ndarray]:
    """tile x tile arrays in TIFF order (row-major, zeros past the image's edges), cut from one band
    of chunks at a time (`mask_bands`) through a strip of `tile` rows of the image's width (tile
    rows need not line up with the chunks). `factor`: every factor-th row and column (rows and
    columns 0, factor, 2 factor, ... of the image, wherever the chunks are cut), a pyramid's level."""
    strip = np.zeros((tile, -(-image.width // factor)), mask_dtype(image))
    filled, y = 0, 0
    for band in mask_bands(image):
        height = band[0][1].shape[0]
        # the band's rows and each chunk's columns that fall on the level's grid, and where they go
        first_row = -y % factor
        picked = [((x + (-x % factor)) // factor, chunk[first_row::factor, -x % factor :: factor]) for x, chunk in band]
        y += height
        rows, start = picked[0][1].shape[0], 0
        while start < rows:
            take = min(tile - filled, rows - start)
            for x, chunk in picked:
                strip[filled : filled + take, x : x + chunk.shape[1]] = chunk[start : start + take]
            filled, start = filled + take, start + take
            if filled == tile:
                yield from _cut_strip(strip, tile)
                filled = 0
        del band, picked  # before the next band is decoded: one band at a time
    if filled:
        strip[filled:] = 0
        yield from _cut_strip(strip, tile)


def _cut_strip(strip: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    for x in range(0, strip.shape[1], tile):
        out = np.zeros((tile, tile), strip.dtype)  # a copy: the strip is refilled while tiles wait
        piece = strip[:, x : x + tile]
        out[:, : piece.shape[1]] = piece
        yield out


# --------------------------------------------------------------------------- geotiff, cog


GEO_NODATA = 255  # a raster run's no-data value in its masks (pipeline.io.raster.NODATA_LABEL)
BASE_COLOURS = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def class_colours(n: int) -> dict[int, tuple[int, int, int, int]]:
    """A colour table for classes 0..n-1 (8 distinct colours, then golden-ratio hues) and no data
    (GEO_NODATA: transparent)."""
    import colorsys

    table: dict[int, tuple[int, int, int, int]] = {}
    for k in range(min(n, GEO_NODATA)):
        if k < len(BASE_COLOURS):
            rgb = BASE_COLOURS[k]
        else:
            r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65, 0.95)
            rgb = (int(255 * r), int(255 * g), int(255 * b))
        table[k] = (*rgb, 255)
    table[GEO_NODATA] = (0, 0, 0, 0)
    return table


def image_georefs(store: RunStore) -> dict[str, tuple[str | None, list[float] | None]]:
    """image_id -> (CRS, transform) from a raster run's masks table; ExportError for a run that has
    no such columns (not input.format: raster, or written before them)."""
    parts = store.parts_of(MASKS)
    if parts and "crs" not in store.part_schema(MASKS, parts[-1]).names:
        raise ExportError(f"{store.uri}: not a raster run (its masks carry no CRS): geotiff and cog need input.format: raster")
    table = store.latest_rows(MASKS, ["image_id", "crs", "transform"])
    if table is None:
        return {}
    return {r["image_id"]: (r["crs"], r["transform"]) for r in table.to_pylist()}


def export_geotiff(run: Run, dest: Destination, result: ExportResult, cog: bool = False) -> None:
    """One GeoTIFF per raster (`output_name(image_id, ".tif")`): its input's CRS and transform, nodata
    255, tiled 512 x 512, deflate, the classes as a colour table; `cog`: a Cloud Optimized GeoTIFF with
    overviews made by mode resampling (a label's overview keeps labels). A raster without a CRS is
    skipped with a line why. Written chunk band by chunk band: memory is one band of chunks."""
    georefs = image_georefs(run.store)
    colours = class_colours(len(run.class_names))
    for image in image_masks(run.store):
        crs, transform = georefs.get(image.image_id, (None, None))
        if crs is None or transform is None:
            result.skipped.append(f"{image.image_id}: its raster has no CRS, so its mask has no place on a map (use --format tiff)")
            continue
        name = _unique_name(image.image_id, ".tif", result)
        dest.write_with(name, lambda path, image=image, crs=crs, t=transform: write_geotiff(image, path, crs, t, colours, cog))
        result.written.append(name)


def write_geotiff(
    image: ImageMask, path: str, crs: str, transform: list[float], colours: dict, cog: bool = False, tile: int = TIFF_TILE
) -> None:
    """The image's mask as a tiled GeoTIFF (or COG) at local `path`."""
    import rasterio
    import rasterio.shutil
    from affine import Affine
    from rasterio.windows import Window

    dtype = mask_dtype(image)
    profile = {
        "driver": "GTiff",
        "width": image.width,
        "height": image.height,
        "count": 1,
        "dtype": dtype.name,
        "crs": rasterio.crs.CRS.from_user_input(crs),
        "transform": Affine(*transform[:6]),
        "nodata": GEO_NODATA,
        "tiled": True,
        "blockxsize": tile,
        "blockysize": tile,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    target = path + ".tmp.tif" if cog else path
    try:
        with rasterio.open(target, "w", **profile) as dst:
            y = 0
            for band in mask_bands(image):
                rows = band[0][1].shape[0]
                for x, chunk in band:
                    dst.write(chunk, 1, window=Window(x, y, chunk.shape[1], rows))
                y += rows
                del band
            if dtype == np.uint8:  # GDAL's colour tables are for 8-bit (and 16-bit) bands
                dst.write_colormap(1, colours)
        if cog:
            # GDAL's COG driver: tiles, then overviews (mode: each overview pixel is a label of the pixels
            # it covers, never an average) down to one tile, in the layout COG readers expect
            rasterio.shutil.copy(
                target, path, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=str(tile), OVERVIEW_RESAMPLING="MODE", BIGTIFF="IF_SAFER"
            )
    finally:
        if cog and os.path.exists(target):
            os.remove(target)


# --------------------------------------------------------------------------- polygons: geoparquet, gpkg, geojson


def mask_polygons(image: ImageMask, transform: list[float]) -> Iterator[tuple[int, Any]]:
    """(class id, shapely Polygon in the raster's CRS): one per 4-connected region of a class, no data
    (255) in none. Each band of chunks is traced apart (rasterio.features.shapes), in pixel coordinates
    so that pieces of a region cut by chunk edges share exact edges; each class's pieces are joined
    (shapely's union) and the regions mapped through the raster's transform at the end. Memory: one
    band of chunks and the polygons."""
    import shapely
    import shapely.affinity
    from rasterio.features import shapes
    from shapely.geometry import shape

    pieces: dict[int, list] = {}
    y = 0
    for band in mask_bands(image):
        strip = np.concatenate([chunk for _, chunk in band], axis=1)
        strip = strip.astype(np.int32) if strip.dtype != np.uint8 else strip  # shapes takes no uint16
        for geometry, value in shapes(strip, mask=strip != GEO_NODATA, connectivity=4):
            pieces.setdefault(int(value), []).append(shapely.affinity.translate(shape(geometry), 0, y))
        y += strip.shape[0]
        del band, strip
    a, b, c, d, e, f = transform[:6]
    for class_id in sorted(pieces):
        merged = shapely.union_all(pieces[class_id])
        for polygon in getattr(merged, "geoms", [merged]):
            yield class_id, shapely.affinity.affine_transform(polygon, [a, b, d, e, c, f])


def export_polygons(run: Run, dest: Destination, result: ExportResult, fmt: str, simplify: float | None = None) -> None:
    """Per raster, one file (`output_name(image_id, suffix)`) of polygons (`mask_polygons`) with
    `image_id`, `class_id`, `class_name`, `area` (`polygon_areas`: the CRS's units squared for a
    projected CRS, square metres on its ellipsoid for a geographic one; of the pixels, before any
    simplification): geoparquet (GeoParquet 1.1, WKB, its `geo` metadata with the CRS as PROJJSON:
    geopandas and DuckDB read it as geometry), gpkg (GeoPackage through pyogrio), geojson (RFC 7946:
    lon/lat in EPSG:4326). `simplify`: each polygon simplified with that tolerance in map units, on
    its own (valid, its holes kept; neighbours' shared edges are not: they may overlap or part by up
    to the tolerance). Rasters without a CRS are skipped."""
    georefs = image_georefs(run.store)
    instances = instance_rows(run.store) if run.task == "instance" else None
    for image in image_masks(run.store):
        crs, transform = georefs.get(image.image_id, (None, None))
        if crs is None or transform is None:
            result.skipped.append(f"{image.image_id}: its raster has no CRS, so its polygons have no place on a map")
            continue
        extra = None
        if instances is None:
            found = list(mask_polygons(image, transform))
        else:  # an instance run: one (multi)polygon per instance, merged across windows by the run already
            rows = instances.get(image.image_id, [])
            found = [(int(r["class_id"]), instance_polygon(r, transform)) for r in rows]
            extra = {"instance_id": [int(r["instance_id"]) for r in rows], "score": [float(r["score"]) for r in rows]}
        name = _unique_name(image.image_id, POLYGON_FORMATS[fmt], result)
        dest.write_with(
            name,
            lambda path, image=image, crs=crs, found=found, extra=extra: write_polygons(
                path, fmt, image.image_id, found, crs, run.class_names, simplify, extra
            ),
        )
        result.written.append(name)


def instance_rows(store: RunStore) -> dict[str, list[dict]]:
    """An instance run's `instances/` rows (the latest of each image), by image, in instance_id order."""
    table = store.latest_rows(INSTANCES)
    by_image: dict[str, list[dict]] = {}
    for r in sorted(table.to_pylist() if table is not None else [], key=lambda r: (r["image_id"], r["instance_id"])):
        by_image.setdefault(r["image_id"], []).append(r)
    return by_image


def instance_mask_rings(row: dict):
    """An `instances/` row's mask as a shapely (Multi)Polygon in the image's pixel coordinates: its box
    decoded from the RLE (never the whole image) and traced (rasterio.features.shapes, 4-connected)."""
    import shapely
    import shapely.affinity
    from rasterio.features import shapes
    from shapely.geometry import shape

    x, y, w, h = (int(v) for v in row["bbox"])
    crop = decode_rle_box({"size": [int(row["height"]), int(row["width"])], "counts": row["rle"]}, (x, y, w, h))
    pieces = [shape(g) for g, _ in shapes(crop.astype(np.uint8), mask=crop, connectivity=4)]
    return shapely.affinity.translate(shapely.union_all(pieces), x, y)


def instance_polygon(row: dict, transform: list[float]):
    """An instance's (Multi)Polygon in the raster's CRS (a mask in pieces is one MultiPolygon)."""
    import shapely.affinity

    a, b, c, d, e, f = transform[:6]
    return shapely.affinity.affine_transform(instance_mask_rings(row), [a, b, d, e, c, f])


def polygon_areas(geometries: list, crs) -> list[float]:
    """Each polygon's area: in the CRS's units squared where it is projected, in square metres on the
    CRS's ellipsoid (pyproj.Geod) where it is geographic (degrees squared would mean nothing)."""
    if not crs.is_geographic:
        return [float(polygon.area) for polygon in geometries]
    import pyproj

    ellipsoid = crs.ellipsoid
    geod = pyproj.Geod(a=ellipsoid.semi_major_metre, rf=ellipsoid.inverse_flattening) if ellipsoid else pyproj.Geod(ellps="WGS84")
    return [abs(geod.geometry_area_perimeter(polygon)[0]) for polygon in geometries]


def write_polygons(
    path: str,
    fmt: str,
    image_id: str,
    found: list[tuple[int, Any]],
    crs: str,
    class_names: list[str],
    simplify: float | None = None,
    extra: dict[str, list] | None = None,
) -> None:
    """One file of `found` (class id, polygon) in `fmt`; `extra`: more columns, one value per polygon
    (an instance run's instance_id and score)."""
    import pyproj
    import shapely
    import shapely.geometry

    extra = extra or {}
    source = pyproj.CRS.from_user_input(crs)
    geometries = [polygon for _, polygon in found]
    class_ids = [class_id for class_id, _ in found]
    names = [class_names[k] if k < len(class_names) else str(k) for k in class_ids]
    areas = polygon_areas(geometries, source)  # of the pixels: simplifying changes the outline, not the area
    if simplify:
        geometries = [polygon.simplify(simplify, preserve_topology=True) for polygon in geometries]
    if fmt == "geojson":
        to_lonlat = pyproj.Transformer.from_crs(source, "EPSG:4326", always_xy=True)
        features = [
            {
                "type": "Feature",
                "properties": {
                    "image_id": image_id,
                    "class_id": k,
                    "class_name": n,
                    "area": a,
                    **{column: values[i] for column, values in extra.items()},
                },
                "geometry": shapely.geometry.mapping(
                    shapely.transform(polygon, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))
                ),
            }
            for i, (k, n, a, polygon) in enumerate(zip(class_ids, names, areas, geometries))
        ]
        with open(path, "w") as f:
            json.dump({"type": "FeatureCollection", "features": features}, f)
        return
    wkb = shapely.to_wkb(np.asarray(geometries, dtype=object)) if geometries else np.array([], dtype=object)
    kinds = sorted({g.geom_type for g in geometries}) or ["Polygon"]  # an instance in pieces: MultiPolygon
    if fmt == "gpkg":
        from pyogrio.raw import write

        fields = [
            np.array([image_id] * len(found), dtype=object),
            np.array(class_ids, np.int32),
            np.array(names, dtype=object),
            np.array(areas),
            *(np.array(values, np.int32 if column == "instance_id" else np.float64) for column, values in extra.items()),
        ]
        write(
            path,
            wkb,
            fields,
            ["image_id", "class_id", "class_name", "area", *extra],
            layer="polygons",
            driver="GPKG",
            geometry_type=kinds[0] if len(kinds) == 1 else "Unknown",
            crs=source.to_wkt(),
        )
        return
    import pyarrow.parquet as pq

    minx, miny, maxx, maxy = shapely.total_bounds(geometries) if geometries else (0.0, 0.0, 0.0, 0.0)
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {"encoding": "WKB", "geometry_types": kinds, "crs": source.to_json_dict(), "bbox": [minx, miny, maxx, maxy]}
        },
    }
    table = pa.table(
        {
            "image_id": pa.array([image_id] * len(found), pa.string()),
            "class_id": pa.array(class_ids, pa.int32()),
            "class_name": pa.array(names, pa.string()),
            "area": pa.array(areas, pa.float64()),
            **{column: pa.array(values, pa.int32() if column == "instance_id" else pa.float64()) for column, values in extra.items()},
            "geometry": pa.array(list(wkb), pa.binary()),
        }
    ).replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    pq.write_table(table, path)


# --------------------------------------------------------------------------- coco


def export_coco(run: Run, dest: Destination, result: ExportResult, max_pixels: int) -> None:
    if run.task == "instance":
        _coco_instances(run, dest, result)
    elif run.task == "panoptic":
        _coco_panoptic(run, dest, result, max_pixels)
    else:
        _coco_semantic(run, dest, result, max_pixels)


def _coco_images(image_sizes: dict[str, tuple[int, int]]) -> tuple[list[dict], dict[str, int]]:
    """COCO `images` (ids 1..N in image_id order) and image_id -> COCO id."""
    ids = {image_id: i + 1 for i, image_id in enumerate(sorted(image_sizes))}
    images = [{"id": ids[k], "file_name": k, "height": h, "width": w} for k, (h, w) in sorted(image_sizes.items())]
    return images, ids


def _categories(run: Run, is_thing: dict[int, bool] | None = None) -> list[dict]:
    out = []
    for i, name in enumerate(run.class_names):
        category: dict[str, Any] = {"id": i, "name": name, "supercategory": name}
        if is_thing is not None:
            category["isthing"] = int(is_thing.get(i, False))
        out.append(category)
    return out


def _write_json(dest: Destination, name: str, obj: Any, result: ExportResult) -> None:
    dest.write_bytes(name, json.dumps(strict_json(obj), allow_nan=False).encode())
    result.written.append(name)


def _coco_semantic(run: Run, dest: Destination, result: ExportResult, max_pixels: int) -> None:
    """coco.json: per image and class present, the class's pixels as one annotation (COCO RLE)."""
    sizes: dict[str, tuple[int, int]] = {}
    annotations = []
    for image in image_masks(run.store):
        sizes[image.image_id] = (image.height, image.width)
        skip = _too_large(image, max_pixels, "--format coco")
        if skip:  # the image is listed, without annotations
            result.skipped.append(skip)
            continue
        mask = assemble(image)
        areas = np.bincount(mask.ravel(), minlength=len(run.class_names))
        for class_id in np.flatnonzero(areas[: len(run.class_names)]):
            pixels = mask == class_id
            rows, cols = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
            bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
            annotations.append(
                {
                    "image_id": image.image_id,
                    "category_id": int(class_id),
                    "segmentation": encode_rle(pixels),
                    "area": int(areas[class_id]),
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
    images, ids = _coco_images(sizes)
    for n, ann in enumerate(annotations):
        ann["id"] = n + 1
        ann["image_id"] = ids[ann["image_id"]]
    _write_json(dest, "coco.json", {"images": images, "categories": _categories(run), "annotations": annotations}, result)


def _coco_instances(run: Run, dest: Destination, result: ExportResult) -> None:
    """coco.json (images, categories) and coco_results.json: one result per row of `instances/`."""
    sizes = {image.image_id: (image.height, image.width) for image in _mask_sizes(run.store)}
    table = run.store.latest_rows(INSTANCES)
    rows = table.to_pylist() if table is not None else []
    for r in rows:
        sizes.setdefault(r["image_id"], (int(r["height"]), int(r["width"])))
    images, ids = _coco_images(sizes)
    results = [
        {
            "image_id": ids[r["image_id"]],
            "category_id": int(r["class_id"]),
            "segmentation": {"size": [int(r["height"]), int(r["width"])], "counts": r["rle"]},
            "score": float(r["score"]),
            "bbox": [float(v) for v in r["bbox"]],
            "area": int(r["area"]),
        }
        for r in rows
    ]
    _write_json(dest, "coco.json", {"images": images, "categories": _categories(run), "annotations": []}, result)
    _write_json(dest, "coco_results.json", results, result)


def _mask_sizes(store: RunStore) -> list[ImageMask]:
    """Every committed image with its size, without its mask bytes."""
    table = store.latest_rows(MASKS, ["image_id", "height", "width"])
    if table is None:
        return []
    table = table.group_by("image_id").aggregate([("height", "max"), ("width", "max")])
    return [ImageMask(k, int(h), int(w), []) for k, h, w in zip(*(table.column(c).to_pylist() for c in table.column_names))]


def _coco_panoptic(run: Run, dest: Destination, result: ExportResult, max_pixels: int) -> None:
    """panoptic.json and panoptic/<name>.png: the segment-id maps as RGB, `segments/` as segments_info."""
    from PIL import Image

    table = run.store.latest_rows(SEGMENTS)
    segments: dict[str, list[dict]] = {}
    for r in table.to_pylist() if table is not None else []:
        segments.setdefault(r["image_id"], []).append(r)
    is_thing = {int(r["class_id"]): bool(r["is_thing"]) for rows in segments.values() for r in rows if r["is_thing"]}
    sizes: dict[str, tuple[int, int]] = {}
    annotations = []
    for image in image_masks(run.store):
        sizes[image.image_id] = (image.height, image.width)
        skip = _too_large(image, max_pixels, "--format coco")
        if skip:
            result.skipped.append(skip)
            continue
        rgb = id_to_rgb(assemble(image))
        name = _unique_name(image.image_id, ".png", result)
        buffer = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
        dest.write_bytes(f"panoptic/{name}", buffer.getvalue())
        result.written.append(f"panoptic/{name}")
        info = [
            {
                "id": int(s["segment_id"]),
                "category_id": int(s["class_id"]),
                "area": int(s["area"]),
                "bbox": [float(v) for v in s["bbox"]],
                "iscrowd": 0,
            }
            for s in sorted(segments.get(image.image_id, []), key=lambda s: s["segment_id"])
        ]
        annotations.append({"image_id": image.image_id, "file_name": name, "segments_info": info})
    images, coco_ids = _coco_images(sizes)
    for ann in annotations:
        ann["image_id"] = coco_ids[ann["image_id"]]
    _write_json(dest, "panoptic.json", {"images": images, "annotations": annotations, "categories": _categories(run, is_thing)}, result)
