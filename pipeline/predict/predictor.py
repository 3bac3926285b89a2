"""The predict stage: a Ray actor that holds one model and turns decoded images into masks.

One batch of DecodedImages in, one batch of Predictions out: for each image its mask as PNG chunks
(and probability for binary tasks) and, where it has a label, its per-class areas. Every image
takes the same path: bands of finished rows (pipeline.predict.tiling: the whole image at once when it is
in memory, the streaming stitcher's bands when a TIFF is read window by window) -> the chunked mask
writer (pipeline.results.masks) -> class areas against the same rows of its label (`finish_image`). A
failure on one image becomes that image's error; the actor goes on with the rest. Test-time
augmentation (inference.tta) wraps the model's score_fn, so every image gets it alike.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from models.base import SegmentationModel, compile_for_inference
from models.onnx_backend import run_with_onnxruntime
from pipeline.config import JobConfig
from pipeline.io.coco_codec import encode_rle
from pipeline.io.raster import NODATA_LABEL, RASTER_STREAM, RasterWindows
from pipeline.io.tiff import StreamError, TiffWindows
from pipeline.metrics.areas import PhysicalAreas, PixelAreas
from pipeline.metrics.coco_labels import PanopticLabels, image_key
from pipeline.metrics.cod import cod_image_stats
from pipeline.metrics.panoptic import PanopticQuality, Segment
from pipeline.metrics.semantic import ClassAreas, LabelAreas, LabelReading
from pipeline.predict.clip_frames import clip_inputs, clip_predictions, failed_frames
from pipeline.predict.job_model import check_task, is_clip_model, load_job_model
from pipeline.predict.object_windows import TASK_THRESHOLDS, ObjectSettings, find_objects, find_segments, stream_bands
from pipeline.predict.objects import ImageObject, PanopticSegments
from pipeline.predict.slides import segment_slide
from pipeline.predict.tiling import (
    BatchSizes,
    Segmentation,
    TilingSettings,
    label_dtype,
    model_inputs,
    segment_images,
    segmentations,
    with_tta,
)
from pipeline.redaction import scrub
from pipeline.results.masks import ChunkedMaskWriter, quantize_probability
from pipeline.rows import DecodedImage, MaskChunk, Prediction, StreamSource, batch_length, to_columns
from pipeline.telemetry import RunMetrics, StageClock, current_actor_id

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteScores(ValueError):
    """The model's outputs hold NaN or inf: an argmax over them would be a mask with nothing behind
    it, so the images of those windows are errors rows instead (fp16's range overflowed, NaN in the
    checkpoint's weights or in the input)."""

    def __init__(self, windows: int, bad: int, precision: str) -> None:
        why = (
            f"precision {precision} overflowed? bf16 or fp32 may not"
            if precision != "fp32"
            else "NaN or inf in the checkpoint's weights or in the input?"
        )
        super().__init__(f"the model's outputs hold NaN or inf for {bad} of the {windows} inputs of a forward pass ({why})")


def check_finite(outputs: tuple[torch.Tensor, ...], precision: str) -> None:
    """Raise NonFiniteScores where any output (N x ...) holds NaN or inf, naming how many of the N
    inputs do. Each output's sum is looked at first (NaN and inf carry through a sum, some 20 times
    cheaper than testing every value: 0.4 ms for 8 windows' scores of 19 classes at 128 x 128 on one
    thread); the values only where a sum is not finite (or overflowed)."""
    if all(bool(torch.isfinite(out.sum())) for out in outputs):
        return
    finite = [torch.isfinite(out).flatten(1).all(1) if out.ndim > 1 else torch.isfinite(out) for out in outputs]
    if all(bool(f.all()) for f in finite):
        return
    n = outputs[0].shape[0]
    per_input = [f for f in finite if f.shape == (n,)]
    bad = int((~torch.stack(per_input).all(0)).sum()) if per_input else n
    raise NonFiniteScores(n, bad, precision)


def scored_on_device(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    windows: torch.Tensor,
    device: torch.device,
    clock: StageClock | None,
    keep_on_device: bool = False,
    precision: str = "fp32",
) -> tuple[torch.Tensor, ...]:
    """forward(windows on `device`), its outputs back on the CPU in float32 (`keep_on_device`: left
    where they are, for a stitcher on the device); outputs holding NaN or inf raise NonFiniteScores
    (`precision`: named in its message). With a clock, the time goes to two stages: transfer (the
    copies to and from the device) and forward (the model: on a GPU its kernels are waited for
    before the copy back, so that the copy's time is the copy's)."""
    started = time.perf_counter()
    x = windows.to(device, non_blocking=True)
    moved = time.perf_counter()
    outputs = tuple(out.float() for out in forward(x))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    computed = time.perf_counter()
    check_finite(outputs, precision)
    if not keep_on_device:
        outputs = tuple(out.cpu() for out in outputs)
    if clock is not None:
        clock.add("transfer", (moved - started) + (time.perf_counter() - computed))
        clock.add("forward", computed - moved)
    return outputs


@dataclass
class ModelScorer:
    """score_fn for the tiler: raw 0-255 windows in, float32 CPU scores out (`keep_on_device`: on the
    model's device, for the stitcher there); `clock`: where the transfer and forward seconds are
    counted (the actor's, the benchmark's)."""

    model: SegmentationModel
    device: torch.device
    precision: str = "fp32"
    clock: StageClock | None = None
    keep_on_device: bool = False

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        def forward(x: torch.Tensor) -> tuple[torch.Tensor]:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32"):
                return (self.model(self.model.normalize(x)),)

        return scored_on_device(forward, windows, self.device, self.clock, self.keep_on_device, self.precision)[0]


@dataclass
class QueryScorer:
    """query_fn for the object tasks: raw 0-255 windows in, a query model's float32 CPU class and
    mask logits out (pipeline.predict.object_windows)."""

    model: SegmentationModel
    device: torch.device
    precision: str = "fp32"
    clock: StageClock | None = None

    def __call__(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32"):
                return self.model.forward_queries(self.model.normalize(x))

        class_logits, mask_logits = scored_on_device(forward, windows, self.device, self.clock, precision=self.precision)
        return class_logits, mask_logits


def object_settings(cfg: JobConfig) -> ObjectSettings | None:
    task, objects = cfg.inference.task, cfg.inference.objects
    if task == "semantic":
        return None
    return ObjectSettings(
        task=task,
        threshold=objects.threshold if objects.threshold is not None else TASK_THRESHOLDS[task],
        mask_threshold=objects.mask_threshold,
        overlap_threshold=objects.overlap_threshold,
        top_k=objects.top_k,
        stuff_classes=tuple(objects.stuff_classes),
        merge_iou=objects.merge_iou,
    )


def instance_records(found: list[ImageObject], height: int, width: int) -> list[dict]:
    """The instances table's rows of one image (its id left out), ids 1.. by score."""
    return [
        {
            "instance_id": k,
            "class_id": obj.class_id,
            "score": obj.score,
            "bbox": [float(v) for v in obj.bbox],
            "area": obj.area,
            "height": height,
            "width": width,
            "rle": encode_rle(obj.mask, size=(height, width), offset=(obj.bbox[1], obj.bbox[0]))["counts"],
        }
        for k, obj in enumerate(found, 1)
    ]


def segment_records(segments: PanopticSegments) -> list[dict]:
    """The segments table's rows of one image (its id left out)."""
    return [
        {
            "segment_id": int(segments.segment_id[k]),
            "class_id": int(segments.class_id[k]),
            "is_thing": bool(segments.is_thing[k]),
            "score": float(segments.score[k]),
            "area": int(segments.area[k]),
            "bbox": [float(v) for v in segments.bbox[k]],
        }
        for k in range(len(segments))
    ]


AREA_ROWS = 64  # class areas of a band are counted this many rows at a time (int64: 8 bytes a pixel)
Band = tuple[int, np.ndarray, "np.ndarray | None"]  # (first row, label rows, probability rows)
LabelRows = Callable[[int, int], np.ndarray]  # (first row, rows) -> those rows of the label


def finish_image(
    bands: Iterator[Band],
    height: int,
    width: int,
    label_rows: LabelRows | None,
    *,
    num_classes: int,
    chunk_size: int | None,
    binary: bool,
    ignore_index: int | None = 255,
    reading: LabelReading | None = None,
    on_rows: Callable[[int, int], None] | None = None,
    valid_rows: LabelRows | None = None,
    pixel_counts: np.ndarray | None = None,
    physical: PhysicalAreas | None = None,
) -> tuple[list[MaskChunk], ClassAreas | None]:
    """The one loop every image takes: bands of finished rows, top to bottom, into PNG chunks and,
    where the image has a label, class areas against the same rows of it, read as `reading` says
    (default: class indices, `ignore_index` ignored). A label that reading refuses is the image's
    error (pipeline.metrics.semantic.LabelReadingError). `binary`: the bands carry probability rows
    (a binary task's foreground probability, or the confidence of output.confidence), encoded too.
    `valid_rows(y0, n)`: a raster's valid-data mask of those rows; pixels outside it are
    NODATA_LABEL in the mask (probability 0) and count in no class area. `pixel_counts`: the mask's
    pixels per value are added to it (its length: the values counted). `physical`: the per-class areas
    in square metres or microns (pipeline.metrics.areas) of the mask's pixels (per chunk too) and the label's are added to it."""
    writer = ChunkedMaskWriter(height, width, chunk_size, num_classes, binary)
    if physical is not None:
        physical.chunk_grid(writer.ys, writer.xs)  # each masks row gets its chunk's areas
    areas = LabelAreas(reading or LabelReading(num_classes, ignore_index), physical) if label_rows is not None else None
    finished = 0
    for y0, labels, probability in bands:
        valid = valid_rows(y0, labels.shape[0]) if valid_rows is not None else None
        if valid is not None and not valid.all():
            labels = np.where(valid, labels, np.asarray(NODATA_LABEL, labels.dtype))
            probability = np.where(valid, probability, np.float32(0)) if probability is not None else None
        writer.add(y0, labels, probability)
        if pixel_counts is not None:
            pixel_counts += np.bincount(labels.ravel(), minlength=len(pixel_counts))[: len(pixel_counts)]
        if physical is not None:
            physical.add_pred(y0, labels)
        if areas is not None:
            for top in range(0, labels.shape[0], AREA_ROWS):
                rows = labels[top : top + AREA_ROWS]
                areas.add(rows, label_rows(y0 + top, rows.shape[0]), valid[top : top + AREA_ROWS] if valid is not None else None, y0 + top)
        finished += labels.shape[0]  # bands come top to bottom and cover each row once
        if on_rows is not None:
            on_rows(finished, height)
    return writer.finish(), areas.finish() if areas is not None else None


class Predictor:
    """Ray actor: constructed once per actor, called once per batch of decoded images.

    Decoded images are segmented together (`segmentations` batches windows across them); an image
    to stream (a TIFF too large to decode, see pipeline.io.tiff) is read window by window from its store
    and segmented alone. Every image's mask leaves as a list of chunks (one for images up to
    `chunk_size` on both sides), all in its one Prediction, so that the writer commits an image whole.

    Pipelined (`pipelined`, the default) for images held in memory: while a forward runs, the next
    batch of windows is gathered on a thread of the actor's (into pinned memory for a CUDA device),
    and each image, once stitched, is encoded (PNG chunks, class areas) on another, so that the
    model does not wait on either; the same batches, in the same order, as the serial path, hence
    the same masks and areas. The seconds the forward ran over the seconds of the actor's calls are
    run.json's actors.forward_busy_share.
    """

    def __init__(self, cfg: JobConfig, num_threads: int = 1, monitor=None, pipelined: bool = True) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.heap_limited = False  # see limit_heap_growth: set at the first streamed image
        inference = cfg.inference
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_job_model(cfg.model).to(self.device)
        self.clip_model = model if is_clip_model(model) else None  # VisTR: clips in (pipeline.predict.clip_frames)
        self.input_config = cfg.input
        self.max_pixels = cfg.input.max_pixels
        self.channel_stats = model.channel_stats()  # a raster's standard scale: what the model's normalization undoes
        if inference.compile:  # the semantic forward; the object tasks' forward_queries stay eager
            model = compile_for_inference(model)
        if inference.backend == "onnxruntime":  # the semantic forward too (exported at its first batch)
            model = run_with_onnxruntime(model)
        binary = cfg.metrics.task == "binary" or model.num_classes == 2
        # a one-logit head of a binary task writes masks of two classes: background and foreground
        self.num_classes = 2 if binary and model.num_classes == 1 else model.num_classes
        self.positive_class = cfg.metrics.positive_class if model.num_classes > 1 else 1
        self.cod = cfg.metrics.task == "binary"  # camouflaged-object stats per labeled image
        metrics = cfg.metrics
        # how labels become class maps (a binary task's masks or class indices): pipeline.metrics.semantic
        self.label_reading = LabelReading.of(
            metrics.task, metrics.binary_labels, metrics.ignore_index, self.positive_class, self.num_classes, metrics.reduce_zero_label
        )
        self.ignore_index = self.label_reading.ignore
        self.chunk_size = cfg.output.chunk_size
        self.input_storage_options = cfg.input.storage_options
        self.slide_settings = cfg.input.slide  # slides (pipeline.predict.slides): their grid and tissue
        self.run_store = None  # where slides' tissue PNGs go (the run directory), opened at the first slide
        self.cfg = cfg
        self.monitor = monitor  # pipeline.plan's RunMonitor: rows done inside a streamed image
        self.metrics = RunMetrics(cfg.run_id or "")
        self.views = inference.tta.views
        self.clock = StageClock()  # seconds per stage, sent to the run monitor after each batch
        # images held in memory are stitched where the model runs (a GPU): only label rows cross back.
        # Streamed images keep the CPU's stitcher (its band of a gigapixel-wide image may not fit a GPU)
        self.stitch_device = self.device if self.device.type != "cpu" else None
        scorer = ModelScorer(model, self.device, inference.precision, self.clock, keep_on_device=self.stitch_device is not None)
        self.score_fn = with_tta(scorer, inference.tta.flip, inference.tta.scales)
        check_task(inference.task, model)
        self.objects = object_settings(cfg)  # None: the semantic task
        self.query_fn = QueryScorer(model, self.device, inference.precision, self.clock) if self.objects else None
        self.panoptic_labels = None  # the panoptic task's ground truth: segments by image (pipeline.metrics.coco_labels)
        if cfg.metrics.panoptic_labels:
            self.panoptic_labels = PanopticLabels.load(cfg.metrics.panoptic_labels, cfg.input.storage_options)
        self.settings = TilingSettings.from_config(
            inference,
            binary=binary,
            positive_class=self.positive_class,
            score_kind=model.score_kind,
            confidence=cfg.output.confidence and not binary,
        )
        # windows per forward by window size: halved where a batch runs out of device memory, for the
        # actor's life; what it came down to goes to the run monitor (run.json's actors.lowered_batch_sizes)
        self.batch_sizes = BatchSizes(inference.batch_size)
        self.reported_sizes: dict[str, int] = {}
        # one thread gathers the next batch of windows, one encodes finished images (PNG, class areas);
        # None: both in the actor's thread, one after the other (the serial path)
        self.gatherer = ThreadPoolExecutor(1, thread_name_prefix="segpipe-gather") if pipelined else None
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="segpipe-encode") if pipelined else None
        self.pin_memory = self.device.type == "cuda" and torch.cuda.is_available()
        self.encoded_apart = 0.0  # encode seconds spent on the encoder's thread during this call
        log.info("predictor on %s (pid %d), %d classes", self.device, os.getpid(), self.num_classes)
        # the pool as it ran: this actor is up (its model loaded), its calls say when it served, and
        # __del__ says when Ray Data let it go (run.json's actors.started, most_serving, timeline)
        self.actor_id = current_actor_id() if monitor is not None else None
        if self.actor_id is not None:
            monitor.actor_started.remote(self.actor_id)  # fire and forget

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        started = time.perf_counter()
        before = dict(self.clock.seconds)
        self.encoded_apart = 0.0
        try:
            return self._predict_batch(batch, started)
        finally:
            # what is neither the model nor the encoding in this thread: windows in and out, blending,
            # post-processing (encoding on the encoder's thread overlaps the rest: not subtracted)
            inside = sum(self.clock.seconds[k] - before[k] for k in ("transfer", "forward", "encode")) - self.encoded_apart
            wall = time.perf_counter() - started
            self.clock.add("stitch", max(wall - inside, 0.0))
            self.clock.add_call(wall)
            self.clock.send(self.monitor, self.actor_id)
            self._report_batch_sizes()

    def __del__(self) -> None:
        """Ray Data drops an actor it scales down or is done with (its __ray_shutdown__ deletes the
        UDF): the monitor hears it, waited on briefly since the process exits next. Not called for
        an actor killed outright (a crash, ray.kill at a forced shutdown)."""
        actor_id, monitor = getattr(self, "actor_id", None), getattr(self, "monitor", None)
        if actor_id is None or monitor is None:
            return
        try:
            import ray

            ray.get(monitor.actor_stopped.remote(actor_id), timeout=2)
        except Exception:  # the monitor is gone (the plan's end): nothing to tell
            pass

    def _report_batch_sizes(self) -> None:
        """Batch sizes lowered since the last report (and where the device stitcher gave way to the CPU),
        to the run monitor (fire and forget)."""
        sizes = self.batch_sizes.report()
        if self.monitor is not None and sizes != self.reported_sizes:
            self.monitor.lower_batch_sizes.remote(sizes)
        self.reported_sizes = sizes

    def _predict_batch(self, batch: dict[str, np.ndarray], started: float) -> dict[str, list]:
        images = [DecodedImage.from_batch(batch, i) for i in range(batch_length(batch))]
        die_once_on([image.image_id for image in images])
        if self.clip_model is not None:
            return to_columns([p.to_record() for p in self._predict_clips(images, started)])
        out = [Prediction.of(image) for image in images]
        in_memory = [i for i, image in enumerate(images) if not image.error and not image.is_unit_end and image.stream is None]
        for i, image in enumerate(images):
            if image.stream is not None and not image.error:
                out[i] = self._guard(out[i], "predict", self._predict_streamed, image, out[i])
        if self.objects is not None:  # objects: image by image, through pipeline.predict.object_windows
            for i in in_memory:
                out[i] = self._guard(out[i], "predict", self._predict_objects, images[i], out[i])
        else:
            self._segment_in_memory(images, out, in_memory)
        self._record_metrics(images, out, time.perf_counter() - started)
        return to_columns([p.to_record() for p in out])

    def _predict_clips(self, images: list[DecodedImage], started: float) -> list[Prediction]:
        """A clip model's rows: each clip row becomes one Prediction per frame it owns; error rows and
        units' ends pass on."""
        out: list[Prediction] = []
        for image in images:
            if image.error or image.is_unit_end:
                out.append(Prediction.of(image))
            elif image.clip is None:
                out.append(Prediction.of(image).failed("predict", "a clip model takes clips: this row is a single frame"))
            else:
                try:
                    out += self._predict_clip(image)
                except Exception as exc:
                    log.debug("clip of %s failed", image.image_id, exc_info=True)
                    out += failed_frames(image, "predict", f"{type(exc).__name__}: {scrub(str(exc), self.input_storage_options)}")
        seconds = (time.perf_counter() - started) / max(sum(1 for p in out if not p.is_unit_end), 1)
        for p in out:
            if not p.is_unit_end:
                self.metrics.image(not p.error, seconds, 1)
        return out

    def _predict_clip(self, image: DecodedImage) -> list[Prediction]:
        """One clip: one forward, its frames' masks, instances and track pieces (pipeline.predict.clip_frames)."""
        model, precision = self.clip_model, self.cfg.inference.precision
        frames = clip_inputs(model, image.image, len(image.clip["ids"]), image.height, image.width)

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
                class_logits, _, mask_logits = model(model.normalize(x))
                return class_logits, mask_logits

        class_logits, mask_logits = scored_on_device(forward, frames, self.device, self.clock, precision=precision)
        started = time.perf_counter()

        def encode_mask(id_map: np.ndarray, values: int) -> list[MaskChunk]:
            chunks, _ = finish_image(
                iter([(0, id_map, None)]), image.height, image.width, None, num_classes=values, chunk_size=self.chunk_size, binary=False
            )
            return chunks

        out = clip_predictions(image, class_logits, mask_logits, model.num_instances, encode_mask)
        self.clock.add("encode", time.perf_counter() - started)
        return out

    def _segment_in_memory(self, images: list[DecodedImage], out: list[Prediction], in_memory: list[int]) -> None:
        """The semantic task for the images at `in_memory` (held in memory), batched together, into
        `out`: each image encoded as soon as it is stitched (on the encoder's thread, pipelined)."""
        encoding: dict[int, Future | tuple[Prediction, float]] = {}

        def encode(i: int, seg: Segmentation) -> None:
            if self.encoder is not None:
                encoding[i] = self.encoder.submit(self._encode_held, images[i], out[i], seg)
            else:
                encoding[i] = self._encode_held(images[i], out[i], seg)

        try:
            held = [images[i].image for i in in_memory]
            for k, seg in segmentations(
                self.score_fn, held, self.settings, self.batch_sizes, self.stitch_device, self.gatherer, self.pin_memory
            ):
                encode(in_memory[k], seg)
        except Exception:
            # one image may break the batch (out of memory at one window a batch, a bad pixel array):
            # the images not segmented yet, one at a time, to isolate it
            for i in in_memory:
                if i in encoding:
                    continue
                try:
                    [seg] = segment_images(self.score_fn, [images[i].image], self.settings, self.batch_sizes, self.stitch_device)
                except Exception as exc:
                    out[i] = out[i].failed("predict", f"{type(exc).__name__}: {exc}")
                    continue
                encode(i, seg)
        waited = time.perf_counter()
        for i, done in encoding.items():
            try:
                out[i], seconds = done.result() if isinstance(done, Future) else done
            except Exception as exc:  # _encode_held guards its work: this is the thread itself failing
                out[i], seconds = out[i].failed("encode", f"{type(exc).__name__}: {exc}"), 0.0
            self.clock.add("encode", seconds)
            if isinstance(done, Future):
                self.encoded_apart += seconds
        if self.encoder is not None:  # the wait for the encoder's last images is this thread's encoding
            self.encoded_apart -= time.perf_counter() - waited

    def _encode_held(self, image: DecodedImage, row: Prediction, seg: Segmentation) -> tuple[Prediction, float]:
        """One image held in memory, stitched: its PNG chunks, class areas and camouflaged-object
        stats (any failure: its errors row), and the seconds they took. Runs on the encoder's thread
        (pipelined): it touches nothing of the actor's but the row it returns."""
        started = time.perf_counter()
        label = image.label
        label_rows = (lambda y, n: label[y : y + n]) if label is not None else None
        row = self._guard(row, "encode", self._encode, row, iter([(0, seg.labels, seg.probability)]), label_rows)
        if self.cod and label is not None and not row.error:
            row = self._guard(row, "metrics", self._cod_stats, row, seg.probability, label)
        return row, time.perf_counter() - started

    def _record_metrics(self, images: list[DecodedImage], out: list[Prediction], seconds: float) -> None:
        real = [(image, p) for image, p in zip(images, out) if not image.is_unit_end]
        for image, p in real:
            windows = model_inputs(image.height, image.width, self.settings, self.views) if image.height and image.width else 0
            self.metrics.image(not p.error, seconds / max(len(real), 1), windows)

    def _finish(
        self, row: Prediction, bands: Iterator[Band], label_rows: LabelRows | None, on_rows: Callable[[int, int], None] | None = None
    ) -> Prediction:
        """`_encode` in the actor's thread, its seconds counted as encode."""
        started, model = time.perf_counter(), self.clock.model_seconds()
        row = self._encode(row, bands, label_rows, on_rows)
        # bands may come from a generator that runs the model (streamed images, the instance task)
        self.clock.add("encode", time.perf_counter() - started - (self.clock.model_seconds() - model))
        return row

    def _encode(
        self, row: Prediction, bands: Iterator[Band], label_rows: LabelRows | None, on_rows: Callable[[int, int], None] | None = None
    ) -> Prediction:
        """The bands of one image into its PNG chunks and class areas (`finish_image`)."""
        chunks, areas = finish_image(
            bands,
            row.height,
            row.width,
            label_rows,
            num_classes=self.num_classes,
            chunk_size=self.chunk_size,
            binary=self.settings.beside is not None,
            reading=self.label_reading,
            on_rows=on_rows,
        )
        row.chunks, row.areas = chunks, areas
        return row

    def _cod_stats(self, row: Prediction, probability: np.ndarray, label: np.ndarray) -> Prediction:
        """The camouflaged-object stats of one image from its stored 8-bit probability map, as the
        dataset values are defined on it (labels: the foreground, as the label was read, is 255,
        every other pixel 0, ignored ones included)."""
        reading = "class_index" if row.areas.reading == "empty" else row.areas.reading
        foreground = self.label_reading.foreground(label, reading).astype(np.uint8) * 255
        row.cod = cod_image_stats(quantize_probability(probability), foreground).to_flat()
        return row

    def _guard(self, row: Prediction, stage: str, work: Callable[..., Prediction], *args) -> Prediction:
        """work(*args), or `row` as that image's error at `stage`."""
        try:
            return work(*args)
        except Exception as exc:
            log.debug("%s failed at %s", row.image_id, stage, exc_info=True)
            return row.failed(stage, f"{type(exc).__name__}: {scrub(str(exc), self.input_storage_options)}")

    def _predict_objects(self, image: DecodedImage, row: Prediction) -> Prediction:
        """The instance task: its objects, and the label map of the same passes as the mask; the
        panoptic task: the segment-id map as the mask, its segments beside it."""
        pixels, label = image.image, image.label
        if self.objects.task == "panoptic":
            segments = find_segments(self.query_fn, pixels, self.settings, self.objects, self.batch_sizes)
            ids = segments.segment_map
            row.chunks, _ = finish_image(
                iter([(0, ids.astype(label_dtype(int(ids.max(initial=0)) + 1)), None)]),
                row.height,
                row.width,
                None,
                num_classes=int(ids.max(initial=0)) + 1,
                chunk_size=self.chunk_size,
                binary=False,
                ignore_index=self.ignore_index,
            )
            row.objects = segment_records(segments)
            if label is not None and self.panoptic_labels is not None:
                row.panoptic, row.areas = self._panoptic_counts(image.image_id, segments, label), ClassAreas.zeros(self.num_classes)
            return row
        found: list[ImageObject] = []
        read = lambda y, x, h, w: pixels[y : y + h, x : x + w]
        bands = find_objects(self.query_fn, read, row.height, row.width, self.settings, self.objects, found, self.batch_sizes)
        label_rows = (lambda y, n: label[y : y + n]) if label is not None else None
        row = self._finish(row, bands, label_rows)
        row.objects = instance_records(found, row.height, row.width)
        return row

    def _panoptic_counts(self, image_id: str, segments: PanopticSegments, label: np.ndarray) -> list[list[float]]:
        """panopticapi's counts of one image against its label, per category of the labels' JSON."""
        categories = self.panoptic_labels.categories
        truth = self.panoptic_labels.segments.get(image_key(image_id))
        if truth is None:
            raise ValueError(f"no annotation for {image_key(image_id)} in metrics.panoptic_labels")
        quality = PanopticQuality(dict(zip(categories.ids, categories.is_thing)))
        predicted = [Segment(int(i), categories.ids[int(c)]) for i, c in zip(segments.segment_id, segments.class_id)]
        quality.update(segments.segment_map, predicted, label, truth)
        return [[c.iou, c.tp, c.fp, c.fn] for c in quality.counts.values()]

    def _predict_streamed(self, image: DecodedImage, row: Prediction) -> Prediction:
        """An image read window by window (a raster, a slide, a TIFF too large to decode whole): its
        chunks and areas, and its instances when the task has them; rows reported to the monitor."""

        def on_rows(done: int, total: int, note: str = "") -> None:
            if self.monitor is not None:
                self.monitor.stream_rows.remote(image.image_id, done, total, note)  # fire and forget

        if self.objects is not None and self.objects.task == "panoptic":
            raise StreamError(f"a {image.width} x {image.height} image is read window by window: the panoptic task needs it whole")
        if not self.heap_limited:  # band-sized temporaries, band after band, for the actor's life
            self.heap_limited = limit_heap_growth()
        started, kind = time.time(), image.stream.kind
        found: list[ImageObject] = []
        shared = {  # what every kind's segmenting takes alike
            "num_classes": self.num_classes,
            "chunk_size": self.chunk_size,
            "on_rows": on_rows,
            "batch_sizes": self.batch_sizes,
            "objects": (self.query_fn, self.objects, found) if self.objects is not None else None,
        }
        if kind == "slide":
            self._predict_slide(image, row, shared)
        elif kind == RASTER_STREAM:
            row.chunks, row.areas, row.raster = segment_raster(
                self.score_fn,
                image.stream,
                self.settings,
                self.input_config,
                reading=self.label_reading,
                model_stats=self.channel_stats,
                max_pixels=self.max_pixels,
                **shared,
            )
            row.physical = row.raster.pop("physical")
        else:
            row.chunks, row.areas = segment_tiff(
                self.score_fn, image.stream, self.settings, reading=self.label_reading, storage_options=self.input_storage_options, **shared
            )
        if self.objects is not None:
            row.objects = instance_records(found, row.height, row.width)
        if kind != "slide":  # a slide's line says more (see _predict_slide)
            what = "raster" if kind == RASTER_STREAM else "streamed"
            log.info("%s %s (%d x %d) in %.1f s", what, image.image_id, image.width, image.height, time.time() - started)
        return row

    def _predict_slide(self, image: DecodedImage, row: Prediction, shared: dict) -> None:
        """A slide on its target grid, windows without tissue skipped (`shared`: see _predict_streamed);
        its tissue mask saved as tissue/<image id>.png in the run directory, its windows counted for
        run.json and the progress line."""
        started, settings = time.time(), self.slide_settings
        result = segment_slide(
            self.score_fn,
            image.stream,
            self.settings,
            mpp=settings.mpp,
            level=settings.level,
            min_tissue=settings.min_tissue,
            storage_options=self.input_storage_options,
            finish=finish_image,
            **shared,
        )
        row.chunks, row.mpp, row.level0_scale = result.chunks, result.grid.mpp, result.grid.level0_scale
        row.physical = result.physical
        if self.run_store is None:
            from pipeline.results.runstore import RunStore

            self.run_store = RunStore.of_job(self.cfg)
        self.run_store.write_bytes(f"tissue/{image.image_id}.png", result.tissue_png)
        if self.monitor is not None:
            grid = result.grid
            self.monitor.add_slide.remote(result.windows_run, result.windows_skipped, grid.mpp, grid.level0_mpp, result.objective_power)
        log.info(
            "slide %s (%d x %d at level %d) in %.1f s: %d windows run, %d skipped",
            image.image_id, image.width, image.height, result.grid.level, time.time() - started,
            result.windows_run, result.windows_skipped,
        )  # fmt: skip


def segment_tiff(
    score_fn,
    source: StreamSource,
    settings: TilingSettings,
    *,
    num_classes: int,
    chunk_size: int | None,
    ignore_index: int | None = 255,
    reading: LabelReading | None = None,
    storage_options: dict | None = None,
    on_rows: Callable[[int, int], None] | None = None,
    objects: tuple[Callable, ObjectSettings, list[ImageObject]] | None = None,
    batch_sizes: BatchSizes | None = None,
) -> tuple[list[MaskChunk], ClassAreas | None]:
    """A TIFF read window by window (pipeline.io.tiff): the stitcher's bands through `finish_image`, the
    label's rows read the same way. on_rows(rows finished, total) reports progress inside the image.
    `objects` (query_fn, settings, found): the instance task, its objects found band by band into `found`."""
    if settings.mode != "slide":
        raise StreamError(
            f"a {source.width} x {source.height} image is segmented window by window: inference.mode must be 'slide', not {settings.mode!r}"
        )
    with TiffWindows.open(source.uri, storage_options, cache_rows=settings.window[0]) as tiff:
        if tiff.problem:
            raise StreamError(f"{source.uri} cannot be read window by window: {tiff.problem}")
        if (tiff.height, tiff.width) != (source.height, source.width):
            raise StreamError(f"{source.uri} is {tiff.width} x {tiff.height} now, {source.width} x {source.height} when it was listed")
        label = TiffWindows.open(source.label_uri, storage_options, role="label") if source.label_uri else None
        try:
            if label is not None and (label.height, label.width) != (source.height, source.width):  # replaced since listed
                raise StreamError(
                    f"label {source.label_uri} is {label.width} x {label.height} but the image is {source.width} x {source.height}"
                )
            bands = stream_bands(score_fn, objects, tiff.rgb, source.height, source.width, settings, batch_sizes)
            return finish_image(
                bands,
                source.height,
                source.width,
                label.labels if label is not None else None,
                num_classes=num_classes,
                chunk_size=chunk_size,
                binary=settings.beside is not None,
                ignore_index=ignore_index,
                reading=reading,
                on_rows=on_rows,
            )
        finally:
            if label is not None:
                label.close()


def segment_raster(
    score_fn,
    source: StreamSource,
    settings: TilingSettings,
    input_config,
    *,
    num_classes: int,
    chunk_size: int | None,
    reading: LabelReading | None = None,
    model_stats: tuple[list[float], list[float]] | None = None,
    max_pixels: int | None = None,
    on_rows: Callable[[int, int], None] | None = None,
    batch_sizes: BatchSizes | None = None,
    objects: tuple[Callable, ObjectSettings, list[ImageObject]] | None = None,
) -> tuple[list[MaskChunk], ClassAreas | None, dict]:
    """A raster read window by window (pipeline.io.raster): its selected bands scaled, windows without
    valid data skipped, no-data pixels NODATA_LABEL in the mask and in no metric; the label raster's
    rows read alongside. Returns the chunks, the class areas and the raster's facts (georeferencing,
    the scale applied, the windows skipped, the per-class areas in square metres). `objects` (query_fn,
    settings, found): the instance task, its objects merged across windows into `found` as a TIFF's."""
    if settings.mode != "slide" and max_pixels is not None and source.height * source.width > max_pixels:
        raise StreamError(
            f"a {source.width} x {source.height} raster over input.max_pixels ({max_pixels}) is segmented window by window: "
            f"inference.mode must be 'slide', not {settings.mode!r}"
        )
    options = input_config.storage_options
    with RasterWindows.open(source.uri, options, input_config, model_stats) as raster:
        if (raster.height, raster.width) != (source.height, source.width):
            raise StreamError(f"{source.uri} is {raster.width} x {raster.height} now, {source.width} x {source.height} when it was listed")
        label = RasterWindows.open_label(source.label_uri, options) if source.label_uri else None
        try:
            if label is not None and (label.height, label.width) != (source.height, source.width):
                raise StreamError(
                    f"label {source.label_uri} is {label.width} x {label.height} but the raster is {source.width} x {source.height}"
                )
            counts = np.zeros(NODATA_LABEL + 1, np.int64)
            ignore = (reading or LabelReading(num_classes)).ignore  # a label raster's nodata pixels hold it
            pixel_areas = PixelAreas.of_raster(raster.georef(), source.height, source.width)
            physical = PhysicalAreas(pixel_areas, num_classes) if pixel_areas is not None else None
            bands = stream_bands(
                score_fn, objects, raster.read, source.height, source.width, settings, batch_sizes, raster.empty, channels=None
            )
            chunks, areas = finish_image(
                bands,
                source.height,
                source.width,
                (lambda y, n: label.labels(y, n, ignore)) if label is not None else None,
                num_classes=num_classes,
                chunk_size=chunk_size,
                binary=settings.beside is not None,
                reading=reading,
                on_rows=on_rows,
                valid_rows=raster.valid_rows,
                pixel_counts=counts,
                physical=physical,
            )
        finally:
            if label is not None:
                label.close()
        facts = {
            **raster.georef(),
            "band_scale": raster.scale.record(),
            "nodata_windows": raster.skipped,
            "class_pixels": counts[:num_classes].tolist(),  # valid pixels per class (no-data ones are NODATA_LABEL)
            "nodata_pixels": int(counts[NODATA_LABEL]),
            # per class the mask's and the label's square metres (None: no CRS); the predictor moves it to Prediction.physical
            "physical": physical.record(areas.reading if areas is not None else None) if physical is not None else None,
        }
    return chunks, areas, facts


DIE_ON = "SEGPIPE_TEST_DIE_ON"  # a test hook, off by default: see die_once_on


def die_once_on(image_ids: list[str]) -> None:
    """Test hook for dead actors: with SEGPIPE_TEST_DIE_ON=<image id>:<marker file>, the actor process
    that gets that image dies (os._exit) the first time, leaving the marker so that the replacement
    actor goes on. Off unless the variable is set."""
    hook = os.environ.get(DIE_ON)
    if not hook:
        return
    image_id, _, marker = hook.rpartition(":")
    if image_id in image_ids and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"{os.getpid()}\n")
        os._exit(1)


MMAP_THRESHOLD_BYTES = 16 * 2**20


def limit_heap_growth() -> bool:
    """Keep a long-lived process's RSS from creeping up with the number of bands it has stitched.

    glibc serves allocations above its mmap threshold with mmap and returns them to the system
    when freed, but after such a free it raises the threshold to that size (up to 32 MB), so that
    the band-sized temporaries of the next bands (argmax, softmax, quantized probabilities: 6 to
    50 MB) come from the heap, which fragments and is not given back. Measured on a 12000-wide
    TIFF: the peak grew by 470 MB over 3000 rows where a band needs 260 MB; with the threshold
    fixed at 16 MB it stays flat (and a threshold of 128 KB costs 40% more time in page faults).
    Setting the threshold switches the adjustment off. Returns False where there is no glibc.
    The cost: every allocation above 16 MB is a fresh mmap, zeroed page by page; a SegFormer-B0
    forward of 4 windows of 360 x 360 took 15-40% longer with it, so the predictor sets it only once
    it streams an image (images held in memory fit the heap as they come).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD_BYTES))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
