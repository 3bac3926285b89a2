"""The run directory's tables: their names, their Parquet schemas and the names of their parts.

A leaf that every writer and reader of a run directory shares (pipeline.results.masks' codec, pipeline.results.sink,
pipeline.results.runstore, export, compare): the format is stated once, here, and none of them needs
another's module to know it. The commit protocol (which parts count) is pipeline.results.runstore's.
"""

from __future__ import annotations

import re

import pyarrow as pa

from pipeline.metrics.cod import CodImageStats
from pipeline.metrics.semantic import ClassAreas

MASKS, METRICS, ERRORS = "masks", "metrics", "errors"
INSTANCES, SEGMENTS = "instances", "segments"  # the instance and panoptic tasks' object tables
OBJECT_TABLES = {"instance": INSTANCES, "panoptic": SEGMENTS}  # inference.task -> its object table
CLIPS = "clips"  # a clip model's run: each clip's instance sequences (the pieces of tracks), committed with its unit
TRACKS, TRACK_IDS = "tracks", "track_ids"  # derived at the end of each attempt from the clips table (not parts)
TABLES = (MASKS, METRICS, ERRORS, INSTANCES, SEGMENTS, CLIPS)
AREAS = ClassAreas.FIELDS
CHUNK_FIELDS = ("chunk_y", "chunk_x", "chunk_height", "chunk_width")
TMP_PREFIX = ".tmp-"
INDEX = "ids.parquet"
INDEX_PARTS_KEY = b"segpipe_parts"


# a raster run's masks rows (input.format raster, pipeline.io.raster), repeated on each chunk row of an
# image: its CRS ("EPSG:n" or WKT), transform (a, b, c, d, e, f: rasterio's affine order) and resolution
# (x, y), all null for a raster without a CRS; per band the scale applied ([min, max] or [mean, std]);
# its windows without valid data (never run); the area of a pixel, the pixels of each class and of no
# data (pipeline.results.runstore.raster_summary sums them). Runs of other inputs, and older runs, lack the columns.
RASTER_FIELDS = [
    pa.field("crs", pa.string()),
    pa.field("transform", pa.list_(pa.float64())),
    pa.field("resolution", pa.list_(pa.float64())),
    pa.field("band_scale", pa.list_(pa.list_(pa.float64()))),
    pa.field("nodata_windows", pa.int32()),
    pa.field("pixel_area_m2", pa.float64()),  # projected CRS only: |a e - b d| in square metres
    pa.field("class_pixels", pa.list_(pa.int64())),  # the mask's valid pixels per class
    pa.field("nodata_pixels", pa.int64()),
]
RASTER_COLUMNS = [f.name for f in RASTER_FIELDS]


# a slide run's masks rows (input.format slide, pipeline.io.slide): the mask's microns per pixel (null:
# not stated) and level-0 pixels per mask pixel. Runs of other inputs, and older runs, lack the columns.
SLIDE_FIELDS = (pa.field("mpp", pa.float64()), pa.field("level0_scale", pa.float64()))

# a video run's masks rows (input.format video, pipeline.io.video): the frame's presentation timestamp in
# seconds (null where the stream gave none). Runs of other inputs, and older runs, lack the column.
VIDEO_FIELDS = (pa.field("timestamp_s", pa.float64()),)

# raster and slide runs: per-class areas in square metres (rasters: `*_m2`) or square microns (slides: `*_um2`),
# see pipeline.metrics.areas. The masks table has every image's predicted areas, each row those of ITS chunk's
# pixels (`class_area_m2` / `class_area_um2`: an image's rows summed give the image's); the metrics table, one
# row per labeled image, has the image's `pred_area_*` and `label_area_*`. Null where the pixel's size is not
# known (a raster without a CRS, a slide without mpp). Runs of other inputs, and older runs, lack the columns.
AREA_UNITS = {"raster": "m2", "slide": "um2"}  # input.format -> the unit of its physical areas


def class_area_field(unit: str) -> pa.Field:
    return pa.field(f"class_area_{unit}", pa.list_(pa.float64()))


def physical_fields(unit: str) -> list[pa.Field]:
    return [pa.field(f"pred_area_{unit}", pa.list_(pa.float64())), pa.field(f"label_area_{unit}", pa.list_(pa.float64()))]


def masks_schema(binary: bool, confidence: bool = False, raster: bool = False, slide: bool = False, video: bool = False) -> pa.Schema:
    """binary: the foreground probability's column; confidence (output.confidence, multi-class):
    each pixel's largest class probability's, in the same 8-bit PNG chunks; raster: RASTER_FIELDS;
    slide: SLIDE_FIELDS; video: VIDEO_FIELDS; raster and slide: their class_area_m2 / class_area_um2 (AREA_UNITS)."""
    fields = [
        pa.field("image_id", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        *(pa.field(name, pa.int32()) for name in CHUNK_FIELDS),
        pa.field("mask", pa.binary()),
    ]
    if binary:
        fields.append(pa.field("probability", pa.binary()))
    if confidence:
        fields.append(pa.field("confidence", pa.binary()))
    if raster:
        fields.extend([*RASTER_FIELDS, class_area_field(AREA_UNITS["raster"])])
    if slide:
        fields.extend([*SLIDE_FIELDS, class_area_field(AREA_UNITS["slide"])])
    if video:
        fields.extend(VIDEO_FIELDS)
    return pa.schema(fields)


METRICS_SCHEMA = pa.schema([pa.field("image_id", pa.string())] + [pa.field(a, pa.list_(pa.int64())) for a in AREAS])
# a binary task's metrics rows also hold what its camouflaged-object measures need (pipeline.metrics.cod)
COD_FIELDS = [pa.field(name, pa.float64()) for name in CodImageStats.SCALARS] + [
    pa.field(name, pa.list_(pa.float64())) for name in CodImageStats.CURVES
]


# the panoptic task's metrics rows: per category of the labels' JSON, panopticapi's counts
PANOPTIC_COUNTS = ("pq_iou", "pq_tp", "pq_fp", "pq_fn")  # in the order of Prediction.panoptic's entries
PANOPTIC_FIELDS = [pa.field(PANOPTIC_COUNTS[0], pa.list_(pa.float64()))] + [pa.field(n, pa.list_(pa.int64())) for n in PANOPTIC_COUNTS[1:]]


# labeled pixels whose value is no class of the model (and not ignore_index): in no class's label
# area. Metrics parts written before it lack the column: unknown, never 0.
OUTSIDE_FIELD = pa.field("label_outside_pixels", pa.int64())
# a binary task: how each image's label was read (pipeline.metrics.semantic.LabelReading: mask, class_index, empty)
READING_FIELD = pa.field("label_reading", pa.string())


def metrics_schema(cod: bool, panoptic: bool = False, area_unit: str | None = None) -> pa.Schema:
    return pa.schema(
        [
            *METRICS_SCHEMA,
            OUTSIDE_FIELD,
            *([READING_FIELD, *COD_FIELDS] if cod else []),
            *(PANOPTIC_FIELDS if panoptic else []),
            *(physical_fields(area_unit) if area_unit else []),
        ]
    )


ERRORS_SCHEMA = pa.schema(
    [pa.field("image_id", pa.string()), pa.field("stage", pa.string()), pa.field("error", pa.string()), pa.field("attempt", pa.int32())]
)


# one row per object: its mask as COCO run-length encoding (compressed counts) at the image's size
INSTANCES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("instance_id", pa.int32()),
        pa.field("class_id", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("bbox", pa.list_(pa.float64())),  # COCO: x, y, width, height
        pa.field("area", pa.int64()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("rle", pa.string()),
    ]
)
# one row per panoptic segment; the masks table holds the image's segment-id map (0: void)
SEGMENTS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("segment_id", pa.int32()),
        pa.field("class_id", pa.int32()),
        pa.field("is_thing", pa.bool_()),
        pa.field("score", pa.float32()),
        pa.field("area", pa.int64()),
        pa.field("bbox", pa.list_(pa.float64())),
    ]
)
OBJECT_SCHEMAS = {INSTANCES: INSTANCES_SCHEMA, SEGMENTS: SEGMENTS_SCHEMA}

# a clip model's run (VisTR): one row per clip, instance and frame of the clip (every frame of the clip,
# owned or not: the frames it shares with its neighbours join the tracks). clip_start / clip_stop: the
# clip's positions in the video's sampled frames (stop excluded), video_frames: how many frames were
# sampled (the clip plan follows from them); frame: the file's frame number; instance: the clip-local
# instance id of the masks table's instance-id maps (the model's slot + 1); rle: COCO compressed
# counts at height x width (empty where the instance has no mask in that frame).
CLIPS_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string()),
        pa.field("clip", pa.int32()),
        pa.field("clip_start", pa.int32()),
        pa.field("clip_stop", pa.int32()),
        pa.field("video_frames", pa.int32()),
        pa.field("instance", pa.int32()),
        pa.field("class_id", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("frame", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("rle", pa.string()),
    ]
)
# tracks/tracks.parquet: the clips joined into tracks (pipeline.predict.tracks), one row per track and
# frame where it has a mask; track ids run 1.. per video; first_frame / last_frame: file frame numbers
TRACKS_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string()),
        pa.field("track_id", pa.int32()),
        pa.field("class_id", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("first_frame", pa.int32()),
        pa.field("last_frame", pa.int32()),
        pa.field("frame", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("rle", pa.string()),
    ]
)
# track_ids/track_ids.parquet: the masks table's instance-id maps read as tracks: in video_id's frame
# `frame` (its owning clip `clip`), the pixels of value `instance` are track `track_id`
TRACK_IDS_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string()),
        pa.field("frame", pa.int32()),
        pa.field("clip", pa.int32()),
        pa.field("instance", pa.int32()),
        pa.field("track_id", pa.int32()),
    ]
)


def part_name(attempt: int, unit: int, seq: int) -> str:
    return f"part-a{attempt:04d}-u{unit:06d}-{seq:04d}"


PART_ATTEMPT = re.compile(r"^part-a(\d+)-")


def part_attempt(part: str) -> int | None:
    """The attempt that wrote a part (None for parts named before names carried it)."""
    match = PART_ATTEMPT.match(part)
    return int(match.group(1)) if match else None
