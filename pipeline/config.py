"""The job's config: the YAML of the README's "The config" section, validated by pydantic.

Unknown keys and bad values are errors that name the field. `--set key.sub=value` overrides go
through `apply_overrides` before validation, so they are checked like the file itself.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.redaction import redact

# Numbers and switches are taken as written: YAML's `true` is no batch size, "8" no window side.
# (Lists still become tuples, and an int is a valid float.)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class _Strict(BaseModel):
    # frozen: the validated config crosses into Ray once and is never changed or validated again
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelsConfig(_Strict):
    uri: str | None = None  # for image folders; tar shards and Parquet tables carry their labels inside
    # for image folders: label files share the image's relative key; their extension may differ
    extensions: list[str] = Field(default_factory=lambda: [".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg"])
    suffix: str = ".label.png"  # for tar shards: the label member's suffix
    required: Bool = False  # a missing label is an errors row when true, an unlabeled image when false


class PercentileScale(_Strict):
    """Per band, the raster's `low` and `high` percentiles (of its valid pixels, from its overviews or a
    decimated read) become 0 and 255; values between are stretched linearly, values outside clipped."""

    mode: Literal["percentile"]
    low: Float = Field(2.0, ge=0, le=100)
    high: Float = Field(98.0, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> PercentileScale:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        return self


class _PerBandScale(_Strict):
    """A scale given as two lists (`per_band` names them) of one entry each per band."""

    per_band: ClassVar[tuple[str, str]]

    @property
    def bands(self) -> int:
        """How many bands it gives values for."""
        return len(getattr(self, self.per_band[0]))

    @model_validator(mode="after")
    def _one_of_each_per_band(self) -> _PerBandScale:
        first, second = self.per_band
        if len(getattr(self, first)) != len(getattr(self, second)):
            raise ValueError(
                f"{first} has {len(getattr(self, first))} entries, {second} {len(getattr(self, second))}: one of each per band"
            )
        return self


class RangeScale(_PerBandScale):
    """Per band, `min` becomes 0 and `max` 255 (values clipped to [min, max] first): one entry per band."""

    per_band = ("min", "max")
    mode: Literal["range"]
    min: list[Float] = Field(min_length=1)
    max: list[Float] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> RangeScale:
        if any(not lo < hi for lo, hi in zip(self.min, self.max)):
            raise ValueError("each band's min must be below its max")
        return self


class StandardScale(_PerBandScale):
    """Per band, (value - mean) / std is what the model's normalization would give: one entry per band."""

    per_band = ("mean", "std")
    mode: Literal["standard"]
    mean: list[Float] = Field(min_length=1)
    std: list[Float] = Field(min_length=1)

    @model_validator(mode="after")
    def _positive(self) -> StandardScale:
        if any(not s > 0 for s in self.std):
            raise ValueError("std must be positive")
        return self


ScaleConfig = Annotated[PercentileScale | RangeScale | StandardScale, Field(discriminator="mode")]


class SlideConfig(_Strict):
    """Whole-slide images (input.format: slide; pipeline.io.slide): the resolution they are segmented
    at, and which windows run."""

    # microns per pixel of the grid the model sees (the slide's pyramid level at or finer, resampled);
    # or `level`: a pyramid level as stored (giving level alone sets mpp to null)
    mpp: Float | None = Field(0.5, gt=0)
    level: Int | None = Field(None, ge=0)
    # windows whose share of tissue (pipeline.io.slide.tissue_mask) is under this are not run
    min_tissue: Float = Field(0.1, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _level_or_mpp(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("level") is not None:
            if data.get("mpp") is not None:
                raise ValueError("give mpp or level, not both")
            data = {**data, "mpp": None}
        return data


class VideoConfig(_Strict):
    """Video files (input.format: video; pipeline.io.video): which frames are segmented. every_n: the
    frames whose index is a multiple of it; fps: the frames nearest to k / fps seconds (k = 0, 1, ...)."""

    every_n: Int = Field(1, ge=1)
    fps: Float | None = Field(None, gt=0)
    # frames turned upright by the stream's display matrix (a phone's portrait video is stored sideways),
    # as players and FFmpeg's autorotate show them; false: as stored
    autorotate: Bool = True

    @model_validator(mode="after")
    def _every_n_or_fps(self) -> VideoConfig:
        if self.fps is not None and self.every_n != 1:
            raise ValueError("give every_n or fps, not both")
        return self


class InputConfig(_Strict):
    uri: str
    # raster: geospatial rasters read through rasterio (the `geo` extra), window by window (pipeline.io.raster);
    # slide: whole-slide images through tiffslide or OpenSlide (the `slides` extra), window by window (pipeline.io.slide)
    # video: video files through PyAV (the `video` extra), frames decoded in the read tasks (pipeline.io.video)
    format: Literal["auto", "images", "tar", "parquet", "raster", "slide", "video"] = "auto"
    # raster: the bands that feed the model, 1-based as GDAL counts, in the model's channel order;
    # null: every band of the raster
    bands: list[Annotated[int, Strict(), Field(ge=1)]] | None = Field(None, min_length=1)
    # raster: how band values become the model's 0..255 input; null: 8-bit rasters as they are
    scale: ScaleConfig | None = None
    slide: SlideConfig = Field(default_factory=SlideConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    pattern: str = "**/*"
    labels: LabelsConfig | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)
    images_per_unit: Int = Field(64, ge=1, description="image files per read task (and per output part)")
    # an archive larger than this runs as consecutive batches of it, each listed while the one
    # before runs: the driver holds a batch or two of keys (about 200 bytes a key), never them all
    listing_batch: Int = Field(250_000, ge=1, description="images listed into one batch of the plan")
    max_pixels: Int = Field(178_956_970, ge=1, description="decompression-bomb guard: larger images are errors")
    # tiled or striped TIFF image files above this many pixels are never decoded whole: the predictor
    # reads them window by window (pipeline.io.tiff); null turns streaming off.
    stream_above_pixels: Int | None = Field(67_108_864, ge=1, description="stream TIFFs larger than this (8192 x 8192)")
    # the bomb guard of streamed images: a TIFF over max_pixels is admitted only when it is streamed
    # and within this many pixels, checked on its header before any pixel is read
    max_stream_pixels: Int = Field(10_000_000_000, ge=1, description="largest streamed TIFF (10 gigapixels)")
    exif_transpose: Bool = Field(True, description="turn images and labels upright by their EXIF orientation")
    # a list of the archive's keys (a Parquet or CSV file, such as an S3 Inventory report) read
    # instead of listing input.uri: keys relative to input.uri, or to its bucket (Inventory's keys)
    manifest: str | None = None
    manifest_column: str = "key"
    # a local path on a cluster of several nodes is refused unless it is a mount every node shares
    shared_filesystem: Bool = Field(False, description="a local input.uri is the same mount on every node")
    image_column: str = "image"
    id_column: str = "image_id"
    label_column: str | None = None

    @property
    def lists_files(self) -> bool:
        """Image folders, rasters and videos: images (a video's frames) listed one by one, not shards that hold images."""
        return self.format in ("images", "raster", "video")

    @model_validator(mode="before")
    @classmethod
    def _resolve_format(cls, data: Any) -> Any:
        """`auto` is resolved here, once: every stage sees images, tar or parquet."""
        if isinstance(data, dict) and data.get("format", "auto") == "auto" and isinstance(data.get("uri"), str):
            data = {**data, "format": resolve_format(data["uri"])}
        return data

    @model_validator(mode="after")
    def _labels_need_a_place(self) -> InputConfig:
        if self.format in ("images", "raster", "video") and self.labels is not None and not self.labels.uri:
            what = {"raster": "rasters", "video": "videos"}.get(self.format, "image folders")
            raise ValueError(f"labels.uri is needed for {what}")
        if self.format != "raster" and (self.bands is not None or self.scale is not None):
            raise ValueError("bands and scale are for input.format: raster")
        if self.bands is not None and isinstance(self.scale, _PerBandScale) and self.scale.bands != len(self.bands):
            raise ValueError(f"scale has {self.scale.bands} entries per band but bands lists {len(self.bands)}")
        if self.format == "slide" and self.labels is not None:
            raise ValueError("input.format slide takes no labels (slides are segmented, not scored)")
        if self.format != "slide" and self.slide != SlideConfig():  # its defaults pass: a dumped config loads again
            raise ValueError("slide: these settings need format: slide")
        if self.format != "video" and self.video != VideoConfig():  # its defaults pass, as slide's
            raise ValueError("video: these settings need format: video")
        return self


def resolve_format(uri: str) -> str:
    """input.format auto: tar or parquet when the uri names one such file, else a prefix of image files
    (a prefix of shards needs `format: tar` or `format: parquet`)."""
    uri = uri.rstrip("/").lower()
    if uri.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if uri.endswith((".parquet", ".pq")):
        return "parquet"
    return "images"


class ModelConfig(_Strict):
    name: str | None = None
    checkpoint: str | None = None
    num_classes: Int | None = Field(None, ge=1)
    class_names: list[str] | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _needs_something(self) -> ModelConfig:
        if not self.name and not self.checkpoint:
            raise ValueError("give model.name or model.checkpoint")
        if self.class_names and self.num_classes and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}")
        return self


class TTAConfig(_Strict):
    """Test-time augmentation: every window (or whole image) is scored once per scale and, with
    flip, once more mirrored left-right; the views' class scores are averaged (see
    pipeline.predict.tiling.TTAScoreFn). The defaults are one view: no augmentation."""

    flip: Bool = False
    scales: list[Float] = Field(default_factory=lambda: [1.0], min_length=1)

    @property
    def views(self) -> int:
        """Model inputs per window: one per scale, twice that with flip."""
        return len(self.scales) * (2 if self.flip else 1)

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, v: list[float]) -> list[float]:
        if any(not s > 0 for s in v):
            raise ValueError("scales must be positive")
        return v


class ObjectsConfig(_Strict):
    """The instance and panoptic tasks' post-processing (pipeline.predict.objects, pipeline.predict.object_windows)."""

    threshold: Float | None = Field(None, ge=0, le=1, description="instance: 0.5 on the score; panoptic: 0.8 on the class probability")
    mask_threshold: Float = Field(0.5, gt=0, lt=1)
    overlap_threshold: Float = Field(0.8, ge=0, le=1, description="panoptic: the share of its mask a segment must keep")
    top_k: Int = Field(100, ge=1, description="instance: (query, class) candidates per window")
    stuff_classes: list[Int] = Field(default_factory=list, description="panoptic: one segment per class (not things)")
    merge_iou: Float = Field(0.5, gt=0, le=1, description="an object seen by two windows: mask IoU over their overlap")


class InferenceConfig(_Strict):
    # semantic: a label map per image; instance / panoptic (query models): objects, see pipeline.predict.object_windows
    task: Literal["semantic", "instance", "panoptic"] = "semantic"
    objects: ObjectsConfig = Field(default_factory=ObjectsConfig)
    mode: Literal["whole", "slide"] = "slide"
    window: tuple[Int, Int] = (512, 512)
    stride: tuple[Int, Int] = (341, 341)
    blend: Literal["mean", "gaussian"] = "mean"
    batch_size: Int = Field(8, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # torch.compile the model's forward in each actor (models.base.compile_for_inference): the first
    # batch of each window size compiles; where it cannot, one warning and the eager model
    compile: Bool = False
    # what runs the semantic forward: torch, or the model exported to ONNX (at the first batch of each
    # window size) and run by ONNX Runtime's CPU provider (models.onnx_backend; the `onnx` extra):
    # faster on a CPU for most families (benchmarks/model_speed.py --onnx); fp32, CPU actors, no compile
    backend: Literal["torch", "onnxruntime"] = "torch"
    tta: TTAConfig = Field(default_factory=TTAConfig)
    # clip models (VisTR, input.format video): frames per clip and the step between clips, in sampled
    # frames (pipeline.io.clip_plan); other models ignore them
    clip_length: Int = Field(36, ge=1)
    clip_stride: Int = Field(18, ge=1)

    @field_validator("window", "stride")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _stride_fits(self) -> InferenceConfig:
        if any(s > w for s, w in zip(self.stride, self.window)):
            raise ValueError(f"stride {list(self.stride)} is larger than window {list(self.window)}: pixels would be skipped")
        if self.clip_stride > self.clip_length:
            raise ValueError(f"clip_stride {self.clip_stride} is larger than clip_length {self.clip_length}: frames would be skipped")
        if self.task != "semantic" and self.mode == "slide" and any(s >= w for s, w in zip(self.stride, self.window)):
            # an object is joined across windows where their pieces overlap: windows that only touch
            # would cut every object crossing their edge into pieces, each an instance of its own
            raise ValueError(
                f"the {self.task} task joins objects where windows overlap: stride {list(self.stride)} must be below "
                f"window {list(self.window)}"
            )
        if self.task != "semantic" and self.tta.views > 1:
            raise ValueError(f"tta: test-time augmentation averages class scores; the {self.task} task's objects take one view")
        if self.backend == "onnxruntime" and (self.compile or self.precision != "fp32"):
            raise ValueError("backend onnxruntime runs the exported fp32 graph: it takes neither compile nor precision bf16 / fp16")
        return self


class ActorBounds(_Strict):
    """An elastic pool: Ray Data starts `min` actors, adds actors up to `max` while work waits for
    one (on an autoscaling cluster, nodes come with them) and lets idle ones go down to `min`."""

    min: Int = Field(ge=1)
    max: Int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ActorBounds:
        if self.max < self.min:
            raise ValueError(f"max {self.max} is below min {self.min}")
        return self


def _actors_kind(value: Any) -> str:
    # one branch's errors only: a bad number is not also reported as "not a mapping". Tags in
    # parentheses are no field's name: format_validation_error leaves them out of the field's path
    return "(bounds)" if isinstance(value, dict | ActorBounds) else "(number)"


class ResourcesConfig(_Strict):
    # a number: a pool of that many actors; {min, max}: an elastic pool between the bounds
    actors: Annotated[
        Annotated[Int, Field(ge=1), Tag("(number)")] | Annotated[ActorBounds, Tag("(bounds)")], Discriminator(_actors_kind)
    ] = 1
    gpus_per_actor: Float = Field(0, ge=0)
    cpus_per_actor: Float | None = Field(None, gt=0, description="None: sized from the cluster")
    # with gpus_per_actor > 0 on a cluster without the GPUs (an autoscaling GPU group at zero):
    # wait this long for them, then exit 2; never a silent CPU run (gpus_per_actor 0 asks for one)
    wait_for_gpus_s: Float = Field(600, ge=0)

    @property
    def min_actors(self) -> int:
        return self.actors.min if isinstance(self.actors, ActorBounds) else self.actors

    @property
    def max_actors(self) -> int:
        return self.actors.max if isinstance(self.actors, ActorBounds) else self.actors


class OutputConfig(_Strict):
    uri: str = "./runs"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # masks of images larger than this on either side are written as chunk_size x chunk_size chunk
    # rows (pipeline.results.masks); null writes every mask as one row
    chunk_size: Int | None = Field(4096, ge=16)
    shared_filesystem: Bool = Field(False, description="a local output.uri is the same mount on every node")
    # multi-class semantic runs: each pixel's largest class probability, 8-bit round(255 p), in the masks
    # table's `confidence` column, chunked like the mask (pipeline.results.runstore.read_confidence)
    confidence: Bool = False


# a mask label's foreground: values above it (PySODMetrics' `gt > 128`); pipeline.metrics.semantic reads
# mask labels by it, and ignore_index is checked against it here
MASK_THRESHOLD = 128


class MetricsConfig(_Strict):
    # binary: one foreground class against the rest (camouflaged objects): the probability map is
    # written, and summary.json gains the camouflaged-object measures (pipeline.metrics.cod)
    task: Literal["semantic", "binary"] = "semantic"
    positive_class: Int = Field(1, ge=0, description="the foreground class of a binary task")
    # a binary task's labels: class-index maps (foreground = positive_class), 8-bit masks
    # (foreground > 128, as PySODMetrics reads them), or auto: decided per image from its values
    # (pipeline.metrics.semantic.LabelReading.decide)
    binary_labels: Literal["auto", "mask", "class_index"] = "auto"
    # null: 255 for class-index labels; masks (and binary auto) have no ignored value
    ignore_index: Int | None = None
    # mmsegmentation's reduce_zero_label (ADE20K's labels): label value 0 counts nowhere and every other
    # value v is class v - 1; null: as the checkpoint's image processor says (transformers'
    # do_reduce_labels in preprocessor_config.json), else false. Decided once, before the run starts
    reduce_zero_label: bool | None = None

    @field_validator("reduce_zero_label")
    @classmethod
    def _semantic_only(cls, v: bool | None, info: ValidationInfo) -> bool | None:
        if v and info.data.get("task") == "binary":
            raise ValueError("is for the semantic task's class-index labels, not metrics.task binary")
        return v

    @field_validator("ignore_index")
    @classmethod
    def _not_the_foreground(cls, v: int | None, info: ValidationInfo) -> int | None:
        """A binary task's ignore_index must not be a foreground value: every foreground pixel would
        count nowhere (the metrics of nothing, without a word)."""
        if v is None or info.data.get("task") != "binary":
            return v
        reading, positive = info.data.get("binary_labels"), info.data.get("positive_class")
        if reading == "class_index" and v == positive:
            raise ValueError(f"{v} is metrics.positive_class, the foreground: every foreground pixel would be ignored")
        if reading in ("mask", "auto") and (v > MASK_THRESHOLD or v == 0):
            part = "a foreground value of mask labels (foreground > 128)" if v else "the background of mask labels"
            raise ValueError(
                f"{v} is {part}, which metrics.binary_labels {reading} reads: leave ignore_index out (masks have no "
                "ignored value), or set metrics.binary_labels: class_index to read labels as class indices"
            )
        return v

    # the object tasks' ground truth (pipeline.metrics.coco_labels): a COCO panoptic JSON, its PNGs under
    # input.labels.uri (PQ, SQ, RQ); a COCO instances JSON (mask AP)
    panoptic_labels: str | None = None
    instance_labels: str | None = None


class JobConfig(_Strict):
    run_id: str | None = None
    # the scheduled job this run belongs to: `--incremental` skips what the job's runs hold;
    # default: the config file's name without its extension
    job: str | None = None
    input: InputConfig
    model: ModelConfig
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    max_error_fraction: Float = Field(0.01, ge=0, le=1)

    @field_validator("run_id", "job")
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only")
        return v

    @model_validator(mode="after")
    def _objects_are_not_binary(self) -> JobConfig:
        task = self.inference.task
        if task != "semantic" and self.metrics.task == "binary":
            raise ValueError(f"inference.task {task} writes objects; metrics.task binary needs the semantic task")
        if self.metrics.panoptic_labels and (task != "panoptic" or self.input.labels is None):
            raise ValueError("metrics.panoptic_labels needs inference.task panoptic and input.labels (the folder of its PNGs)")
        if self.metrics.instance_labels and task != "instance":
            raise ValueError("metrics.instance_labels needs inference.task instance")
        if self.output.confidence and (task != "semantic" or self.metrics.task == "binary"):
            what = f"inference.task {task} writes objects" if task != "semantic" else "a binary task writes its foreground probability"
            raise ValueError(f"output.confidence is for multi-class semantic runs: {what}")
        if self.input.format == "slide" and (task == "panoptic" or self.inference.mode != "slide"):
            raise ValueError(
                "input.format slide is segmented window by window: it needs inference.task semantic or instance, and mode slide"
            )
        if self.inference.backend == "onnxruntime" and self.resources.gpus_per_actor > 0:
            raise ValueError("inference.backend onnxruntime runs on CPU actors: resources.gpus_per_actor must be 0")
        return self

    def with_run_id(self, prefix: str = "run") -> JobConfig:
        """This config with a run_id: `<prefix>-<UTC time>` when absent."""
        if self.run_id:
            return self
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        return self.model_copy(update={"run_id": f"{prefix}-{stamp}"})


class ConfigError(ValueError):
    """An invalid config: the message names the field and the problem."""


def check_metrics_against_model(metrics: MetricsConfig, num_classes: int, model: str) -> None:
    """ConfigError (exit 2, before anything runs) where the metrics section does not fit the model's
    `num_classes` (1: a one-logit head): a binary task needs two classes or one logit, and its
    positive_class must be one of them (a 2-class model's probability uses it, semantic task too)."""
    if metrics.task == "binary" and num_classes > 2:
        raise ConfigError(
            f"metrics.task: binary needs a model of 2 classes (background, foreground) or one logit; {model} has {num_classes}"
        )
    if num_classes == 1 and metrics.task == "binary" and metrics.positive_class != 1:
        raise ConfigError(f"metrics.positive_class: {metrics.positive_class}, but {model} has one logit: its foreground is class 1")
    if num_classes == 2 and metrics.positive_class > 1:
        raise ConfigError(f"metrics.positive_class: {metrics.positive_class} is no class of {model}, which has 2 (0 and 1)")


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"] if not str(p).startswith("(")) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{field}: {msg}")
    return "invalid config: " + "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'inference.window=[256,256]' -> (['inference', 'window'], [256, 256]); values parse as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


# the fields that name a file or a folder: a relative local path there is relative to the cwd of
# `segpipe`, whereas Ray's workers have the cwd of whoever started Ray (`ray start`, a test session)
PATH_FIELDS = (
    ("input", "uri"), ("input", "labels", "uri"), ("input", "manifest"), ("model", "checkpoint"), ("output", "uri"),
    ("metrics", "panoptic_labels"), ("metrics", "instance_labels"),
)  # fmt: skip


def absolute_local_paths(data: dict) -> dict:
    """`data` with each relative local path of PATH_FIELDS made absolute here, in the driver (URIs
    with a scheme stay as they are): the workers then read and write where the driver means."""
    data = copy.deepcopy(data)
    for *parents, leaf in PATH_FIELDS:
        node = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
            node[leaf] = os.path.abspath(value)
    return data


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> JobConfig:
    """Read and validate a job config (a YAML path or a dict), with `--set` overrides applied."""
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping")
    data = apply_overrides(data, overrides or [])
    data = absolute_local_paths(data)
    if not isinstance(source, dict) and not data.get("job"):
        data["job"] = re.sub(r"[^A-Za-z0-9._-]", "-", Path(source).stem) or None
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def public_config(cfg: JobConfig) -> dict:
    """The config as it may be written to run.json and logs: storage options never appear, and no
    URL anywhere in it (input.uri, a checkpoint's, a label file's) keeps a password or a secret query
    value (`https://user:pass@host/...`, a pre-signed URL's signature)."""
    return redact(cfg.model_dump(mode="json"))
