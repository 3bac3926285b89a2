"""What travels between the stages: typed once, here (a leaf module: it imports no other pipeline module).

    SourceUnit    driver -> read task      one block of image files, a tar shard or a Parquet file
    RawSample     inside the read task     one image's bytes as read, before decoding
    DecodedImage  read task -> predictor   the pixels (or where to stream them from), the label
    Prediction    predictor -> writer      the mask as PNG chunks, the class areas, or the error
    ClassAreas    inside a Prediction      a labeled image's pixel counts per class (metrics.semantic counts them)

Ray Data moves rows as dicts of plain values (Arrow has no dataclasses): each row type converts
`to_record()` and back `from_batch(batch, i)`. A unit's end travels as a row of its own (`unit_rows`
>= 0: how many image rows the read task sent), so that the writer knows when a unit is complete.
An error row is made in one place: `.failed(stage, error)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NOT_AN_END = -1


@dataclass
class ClassAreas:
    """One image's pixel counts per class (pipeline.metrics.semantic counts them and sums them over images)."""

    FIELDS: ClassVar[tuple[str, ...]] = ("intersection", "union", "pred_area", "label_area")

    intersection: np.ndarray  # int64, one per class
    union: np.ndarray
    pred_area: np.ndarray
    label_area: np.ndarray
    # labeled pixels whose value is no class (and not ignore_index): in no label area, counted here
    outside: int = 0
    # how the label was read (pipeline.metrics.semantic's `LabelReading`): "class_index", "mask", or "empty" (a binary label of
    # background only, which both readings read alike)
    reading: str = "class_index"

    @classmethod
    def zeros(cls, num_classes: int) -> ClassAreas:
        z = lambda: np.zeros(num_classes, dtype=np.int64)
        return cls(z(), z(), z(), z())

    def __iadd__(self, other: ClassAreas) -> ClassAreas:
        self.intersection += other.intersection
        self.union += other.union
        self.pred_area += other.pred_area
        self.label_area += other.label_area
        self.outside += other.outside
        return self


class IdSet:
    """Image ids as one Arrow string array of unique values: membership is tested vectorised
    (`pc.is_in`), so a run or a job that holds millions of ids never becomes a Python set of them."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray | None = None) -> None:
        if ids is None:
            ids = pa.array([], pa.string())
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())
        self.ids: pa.Array = pc.unique(ids.cast(pa.string()))
        self._sorted: pa.Array | None = None  # for one-id lookups (`in`), made on first use

    @classmethod
    def union(cls, *sets: IdSet) -> IdSet:
        return cls(pa.chunked_array([s.ids for s in sets], pa.string())) if sets else cls()

    def __len__(self) -> int:
        return len(self.ids)

    def contains(self, ids: list[str] | pa.Array) -> np.ndarray:
        """A boolean per id of `ids`: is it in this set."""
        if not len(ids):
            return np.zeros(0, bool)
        return pc.is_in(pa.array(ids, pa.string()), value_set=self.ids).to_numpy(zero_copy_only=False)

    def __contains__(self, image_id: str) -> bool:
        """One id at a time (a read task's check per sample): a binary search of the ids sorted once,
        so that no task ever builds a Python set (or an Arrow hash table per call) of millions of ids."""
        if not len(self.ids):
            return False
        ids = self.sorted_for_lookup()._sorted
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if ids[mid].as_py() < image_id:
                lo = mid + 1
            else:
                hi = mid
        return lo < len(ids) and ids[lo].as_py() == image_id

    def sorted_for_lookup(self) -> IdSet:
        """This set, its lookup order made now (before it is shipped to every read task)."""
        if self._sorted is None:
            self._sorted = self.ids.take(pc.sort_indices(self.ids))
        return self

    def minus(self, other: IdSet) -> IdSet:
        return IdSet(self.ids.filter(pc.invert(pc.is_in(self.ids, value_set=other.ids))))

    def to_pylist(self) -> list[str]:
        return self.ids.to_pylist()


@dataclass(frozen=True)
class SourceUnit:
    """One read task's worth of input. `index` is its position in this attempt's listing."""

    index: int
    format: str  # "images" | "tar" | "parquet" | "raster" | "slide" | "video" (uris: the video's, once per frame)
    uris: tuple[str, ...]
    label_uris: tuple[str | None, ...] = ()
    image_ids: tuple[str, ...] = ()  # images: each uri's id; tar/parquet: the file's path relative to input.uri
    # format "clip" (a clip model's unit, pipeline.io.source.VideoReader): one clip of a video, its frames
    # in image_ids; clip = (clip index in the video, first and stop position in the video's sampled
    # frames, the video's sampled frames); owned: per frame, whether this clip writes its mask
    clip: tuple[int, ...] = ()
    owned: tuple[bool, ...] = ()
    # format "video" / "clip" of a variable-rate video (a frame's index cannot be told from its timestamp
    # times the rate): (index, presentation timestamp) of the unit's first frame, which its read seeks by
    seek_to: tuple[int, ...] = ()

    @property
    def images(self) -> int:
        """The image rows this unit writes: its frames, a clip unit's owned frames only."""
        return sum(bool(o) for o in self.owned) if self.format == "clip" else len(self.uris)

    def to_record(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> SourceUnit:
        tuples = ("uris", "label_uris", "image_ids", "clip", "owned", "seek_to")
        return cls(
            index=int(data["index"]),
            format=str(data["format"]),
            **{k: tuple(data.get(k) if data.get(k) is not None else ()) for k in tuples},
        )


@dataclass(frozen=True)
class StreamSource:
    """A TIFF too large to decode whole, a raster (pipeline.io.raster) or a slide (pipeline.io.slide),
    as `kind` says: where it is and how large (a slide's target grid); the predictor reads it by windows."""

    uri: str
    label_uri: str | None
    height: int
    width: int
    kind: str = "tiff"  # "tiff" (pipeline.io.tiff) | "raster" (pipeline.io.raster) | "slide" (pipeline.io.slide)


@dataclass
class RawSample:
    """One image's bytes as read, before decoding."""

    unit: int
    index_in_unit: int
    image_id: str
    image_bytes: bytes | None
    label_bytes: bytes | None
    error: str | None = None  # a read failure: becomes an errors row, the job goes on
    has_label: bool = False  # a label was expected for this image (it may still have failed to read)
    stream: StreamSource | None = None  # read by windows later, not decoded
    pixels: np.ndarray | None = None  # decoded already (a video's frame, pipeline.io.video): H x W x 3 uint8 RGB
    timestamp_s: float | None = None  # a video frame's presentation timestamp
    warning: str | None = None  # said, not failed: the run goes on (run.json's attempt `warnings`, the terminal)


@dataclass
class _StageRow:
    """What every row between stages carries besides its payload: an error, or a unit's end."""

    error: str = field(default="", kw_only=True)
    stage: str = field(default="", kw_only=True)  # where it failed: read, decode, predict, encode
    unit_rows: int = field(default=NOT_AN_END, kw_only=True)  # >= 0 in a unit's end: its image rows

    @property
    def is_unit_end(self) -> bool:
        return self.unit_rows >= 0

    def failed(self, stage: str, error: str):
        """This row as an error row: the one place an error row is made."""
        return replace(self, error=error, stage=stage)


@dataclass
class DecodedImage(_StageRow):
    """What the read stage hands the predictor for one image (or a unit's end, `unit_rows` >= 0)."""

    unit: int
    image_id: str
    image: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3), np.uint8))  # H x W x 3 uint8
    label: np.ndarray | None = None  # H x W class map, its integer type as decoded (pipeline.io.decode)
    height: int = 0
    width: int = 0
    stream: StreamSource | None = None
    timestamp_s: float | None = None  # a video frame's presentation timestamp (pipeline.io.video)
    # a clip model's row (pipeline.io.source.read_clip): a whole clip of T frames as one row, `image` its
    # frames stacked as (T * height) x width x 3 (one 3-D array, as every other row's), height x width a
    # frame's; clip: {"video", "index", "start", "stop", "video_frames", "ids", "timestamps", "owned"}
    clip: dict[str, Any] | None = None

    @property
    def has_label(self) -> bool:
        return self.label is not None or bool(self.stream and self.stream.label_uri)

    def to_record(self) -> dict[str, Any]:
        s = self.stream
        return {
            "unit": self.unit,
            "image_id": self.image_id,
            "image": self.image,
            "label": self.label if self.label is not None else np.zeros((0, 0), np.int64),
            "has_label": self.label is not None,
            "height": self.height,
            "width": self.width,
            "stream_uri": s.uri if s else "",
            "stream_label_uri": (s.label_uri or "") if s else "",
            "stream_kind": s.kind if s else "",
            "timestamp_s": self.timestamp_s if self.timestamp_s is not None else float("nan"),
            "clip": json.dumps(self.clip) if self.clip is not None else "",
            "error": self.error,
            "stage": self.stage,
            "unit_rows": self.unit_rows,
        }

    @classmethod
    def from_batch(cls, batch: dict[str, Any], i: int) -> DecodedImage:
        height, width = int(batch["height"][i]), int(batch["width"][i])
        stream_uri = str(batch["stream_uri"][i])
        kind = str(batch["stream_kind"][i]) if "stream_kind" in batch else ""
        stream = StreamSource(stream_uri, str(batch["stream_label_uri"][i]) or None, height, width, kind or "tiff") if stream_uri else None
        return cls(
            unit=int(batch["unit"][i]),
            image_id=str(batch["image_id"][i]),
            image=batch["image"][i],
            label=batch["label"][i] if bool(batch["has_label"][i]) else None,
            height=height,
            width=width,
            stream=stream,
            timestamp_s=_number(batch, "timestamp_s", i),
            clip=json.loads(batch["clip"][i]) if "clip" in batch and batch["clip"][i] else None,
            error=str(batch["error"][i]),
            stage=str(batch["stage"][i]),
            unit_rows=int(batch["unit_rows"][i]),
        )

    @classmethod
    def unit_end(cls, unit: int, image_rows: int) -> DecodedImage:
        return cls(unit=unit, image_id="", unit_rows=image_rows)


@dataclass
class MaskChunk:
    """One chunk of an image's mask (the whole mask for most images): where it sits and its PNGs."""

    y: int
    x: int
    height: int
    width: int
    mask: bytes  # PNG of the chunk's labels
    probability: bytes | None  # PNG of round(255 p): binary tasks' foreground probability, output.confidence's confidence; else None


# one list per image: its chunks' [y, x, height, width], their mask PNGs, their probability PNGs
LIST_COLUMNS = ("chunks", "mask", "probability", "cod")


@dataclass
class Prediction(_StageRow):
    """What the predictor hands the writer for one image (or a unit's end, passed on)."""

    unit: int
    image_id: str
    height: int = 0
    width: int = 0
    chunks: list[MaskChunk] = field(default_factory=list)
    areas: ClassAreas | None = None  # set when the image had a label
    cod: list[float] | None = None  # a binary task's camouflaged-object stats (pipeline.metrics.cod, flat)
    # instance / panoptic tasks: the image's instances or segments table rows, image_id left out
    objects: list[dict[str, Any]] | None = None
    # the panoptic task against a panoptic label: per category of its JSON, [summed IoU, TP, FP, FN]
    panoptic: list[list[float]] | None = None
    # a raster's facts (pipeline.io.raster): crs, transform, resolution, band_scale, nodata_windows
    raster: dict[str, Any] | None = None
    # slides: the mask's microns per pixel (None: not stated) and level-0 pixels per mask pixel (None: not a slide)
    mpp: float | None = None
    level0_scale: float | None = None
    timestamp_s: float | None = None  # a video frame's presentation timestamp (pipeline.io.video)
    # rasters and slides: per-class areas in a physical unit (pipeline.metrics.areas), {"unit": "m2" | "um2",
    # "pred": [...] (the image's), "chunks": [[...], ...] (each chunk's, in the order of `chunks`), "label": [...]
    # or None}; None where the pixel's size is not known
    physical: dict[str, Any] | None = None
    # a clip model's run: the clips table's rows of the clip this frame came from (on one owned frame
    # of each clip: pipeline.results.run_tables.CLIPS_SCHEMA's columns)
    clip_rows: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, image: DecodedImage) -> Prediction:
        """An empty prediction for `image`, carrying its error if it failed before the predictor."""
        return cls(
            image.unit,
            image.image_id,
            image.height,
            image.width,
            timestamp_s=image.timestamp_s,
            error=image.error,
            stage=image.stage,
            unit_rows=image.unit_rows,
        )

    def failed(self, stage: str, error: str) -> Prediction:
        return replace(
            super().failed(stage, error),
            chunks=[],
            areas=None,
            cod=None,
            objects=None,
            panoptic=None,
            raster=None,
            physical=None,
            clip_rows=None,
        )

    def to_record(self) -> dict[str, Any]:
        a = self.areas
        return {
            "unit": self.unit,
            "image_id": self.image_id,
            "height": self.height,
            "width": self.width,
            "chunks": [[c.y, c.x, c.height, c.width] for c in self.chunks],
            "mask": [c.mask for c in self.chunks],
            "probability": [c.probability for c in self.chunks if c.probability is not None],
            "labeled": a is not None,
            **{k: (getattr(a, k).tolist() if a is not None else []) for k in ClassAreas.FIELDS},
            "outside": a.outside if a is not None else 0,
            "reading": a.reading if a is not None else "",
            "cod": list(self.cod) if self.cod is not None else [],
            "objects": json.dumps(self.objects) if self.objects is not None else "",  # one cell, whatever Ray makes of nested lists
            "panoptic": json.dumps(self.panoptic) if self.panoptic is not None else "",
            "raster": json.dumps(self.raster) if self.raster is not None else "",
            "mpp": self.mpp if self.mpp is not None else float("nan"),  # NaN: None (a float column either way)
            "level0_scale": self.level0_scale if self.level0_scale is not None else float("nan"),
            "timestamp_s": self.timestamp_s if self.timestamp_s is not None else float("nan"),
            "physical": json.dumps(self.physical) if self.physical is not None else "",
            "clip_rows": json.dumps(self.clip_rows) if self.clip_rows is not None else "",
            "error": self.error,
            "stage": self.stage,
            "unit_rows": self.unit_rows,
        }

    @classmethod
    def from_batch(cls, batch: dict[str, Any], i: int) -> Prediction:
        probabilities = list(batch["probability"][i])
        chunks = [
            MaskChunk(*map(int, box), bytes(mask), bytes(probabilities[k]) if probabilities else None)
            for k, (box, mask) in enumerate(zip(batch["chunks"][i], batch["mask"][i]))
        ]
        areas = None
        if bool(batch["labeled"][i]):
            areas = ClassAreas(
                *(np.asarray(batch[k][i], dtype=np.int64) for k in ClassAreas.FIELDS),
                outside=int(batch["outside"][i]),
                reading=str(batch["reading"][i]),
            )
        return cls(
            unit=int(batch["unit"][i]),
            image_id=str(batch["image_id"][i]),
            height=int(batch["height"][i]),
            width=int(batch["width"][i]),
            chunks=chunks,
            areas=areas,
            cod=[float(v) for v in batch["cod"][i]] if len(batch["cod"][i]) else None,
            objects=json.loads(batch["objects"][i]) if "objects" in batch and batch["objects"][i] else None,
            panoptic=json.loads(batch["panoptic"][i]) if "panoptic" in batch and batch["panoptic"][i] else None,
            raster=json.loads(batch["raster"][i]) if "raster" in batch and batch["raster"][i] else None,
            mpp=_number(batch, "mpp", i),
            level0_scale=_number(batch, "level0_scale", i),
            timestamp_s=_number(batch, "timestamp_s", i),
            physical=json.loads(batch["physical"][i]) if "physical" in batch and batch["physical"][i] else None,
            clip_rows=json.loads(batch["clip_rows"][i]) if "clip_rows" in batch and batch["clip_rows"][i] else None,
            error=str(batch["error"][i]),
            stage=str(batch["stage"][i]),
            unit_rows=int(batch["unit_rows"][i]),
        )


def _number(batch: dict[str, Any], key: str, i: int) -> float | None:
    """A float cell that NaN (or its absence) leaves unset."""
    if key not in batch:
        return None
    value = float(batch[key][i])
    return None if value != value else value


def to_columns(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows as one batch of columns for Ray Data. List-valued cells go in object arrays, so that lists
    of equal length never become one 2-D fixed-width array."""
    out: dict[str, Any] = {}
    for k in records[0] if records else ():
        if k in LIST_COLUMNS:
            column = np.empty(len(records), dtype=object)
            for i, r in enumerate(records):
                column[i] = r[k]
            out[k] = column
        else:
            out[k] = [r[k] for r in records]
    return out


def batch_length(batch: dict[str, Any]) -> int:
    return len(batch["image_id"])
