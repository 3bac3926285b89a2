"""The predict stage: a Ray actor that holds one model and turns decoded images into masks.

One batch of decoded rows in, one batch of result rows out: for each image its mask as PNG chunks
(and probability for binary tasks) and, where it has a label, its per-class areas. A failure on one
image becomes that image's error row; the actor goes on with the rest. Test-time augmentation
(inference.tta) wraps the model's score_fn (pipeline.tiling.TTAScoreFn), so whole, slide and
streamed images get it alike.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models import build_model, load_model
from models.base import SegmentationModel
from pipeline.config import InferenceConfig, ModelConfig, OutputConfig
from pipeline.huge import StreamSource, limit_heap_growth, segment_tiff
from pipeline.metrics import ClassAreas, class_areas
from pipeline.sink import MaskChunk, encode_chunks
from pipeline.storage import scrub
from pipeline.tiling import TilingSettings, segment_images, with_tta

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


RANDOM_WEIGHTS_SEED = 0


def load_job_model(cfg: ModelConfig) -> SegmentationModel:
    """The model a job config names: a checkpoint, or a registered name with random weights (seeded,
    so that every actor and every attempt of a run holds the same ones)."""
    if cfg.checkpoint:
        model = load_model(cfg.checkpoint, name=cfg.name, num_classes=cfg.num_classes, storage_options=cfg.storage_options)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = build_model(cfg.name, num_classes=cfg.num_classes or 150)
    if cfg.class_names:
        model.class_names = list(cfg.class_names)
    return model.eval()


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of the weights as loaded (names, dtypes, shapes, values): the same for a checkpoint in
    any of its layouts (HF, mmseg, native), different for any other weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class ModelScorer:
    """score_fn for the tiler: raw 0-255 windows in, float32 CPU scores out."""

    model: SegmentationModel
    device: torch.device
    precision: str = "fp32"

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        x = self.model.normalize(windows.to(self.device, non_blocking=True))
        with torch.inference_mode():
            if self.precision == "fp32":
                scores = self.model(x)
            else:
                with torch.autocast(self.device.type, dtype=DTYPES[self.precision]):
                    scores = self.model(x)
        return scores.float().cpu()


class Predictor:
    """Ray actor: constructed once per actor, called once per batch of decoded images.

    Decoded images are segmented together (`segment_images` batches windows across them); a row
    that says "stream this one" (`stream_uri`: a TIFF too large to decode, see pipeline.huge) is
    read window by window from its store and segmented alone. Every image's mask leaves as a list
    of chunks (one for images up to `chunk_size` on both sides; see pipeline.sink), all in this one
    result row, so that the sink writes an image's chunks to one part.
    """

    def __init__(
        self,
        model_cfg: dict,
        inference_cfg: dict,
        ignore_index: int,
        num_threads: int = 1,
        chunk_size: int | None = OutputConfig().chunk_size,
        input_storage_options: dict | None = None,
        monitor=None,
    ) -> None:
        torch.set_num_threads(max(1, num_threads))
        limit_heap_growth()  # band-sized temporaries, image after image: see pipeline.huge
        model_cfg = ModelConfig.model_validate(model_cfg)
        inference = InferenceConfig.model_validate(inference_cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_job_model(model_cfg).to(self.device)
        self.num_classes = model.num_classes
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.input_storage_options = input_storage_options or {}
        self.monitor = monitor  # pipeline.plan's RunMonitor: rows done inside a streamed image
        self.score_fn = with_tta(ModelScorer(model, self.device, inference.precision), inference.tta.flip, inference.tta.scales)
        self.settings = TilingSettings(
            mode=inference.mode,
            window=tuple(inference.window),
            stride=tuple(inference.stride),
            blend=inference.blend,
            batch_size=inference.batch_size,
            binary=self.num_classes == 2,
        )
        log.info("predictor on %s (pid %d), %d classes", self.device, os.getpid(), self.num_classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["image_id"])
        rows = [_empty_result(batch, i) for i in range(n)]
        streams = batch.get("stream_uri")
        todo = []
        for i in range(n):
            if int(batch["unit_rows"][i]) >= 0:
                continue  # a unit's end marker: passed on to the writer as it is
            if batch["error"][i]:
                rows[i]["error"], rows[i]["stage"] = batch["error"][i], batch["stage"][i]
            elif streams is not None and streams[i]:
                self._predict_streamed(batch, i, rows[i])
            else:
                todo.append(i)
        try:
            segs = segment_images(self.score_fn, [batch["image"][i] for i in todo], self.settings)
        except Exception:
            # one image may break the batch (e.g. out of memory): retry one at a time to isolate it
            segs = []
            for i in todo:
                try:
                    segs.extend(segment_images(self.score_fn, [batch["image"][i]], self.settings))
                except Exception as exc:
                    segs.append(exc)
        for i, seg in zip(todo, segs):
            row = rows[i]
            if isinstance(seg, Exception):
                row["error"], row["stage"] = f"{type(seg).__name__}: {seg}", "predict"
                continue
            try:
                _set_chunks(row, encode_chunks(seg.labels, seg.probability, self.chunk_size, self.num_classes))
                if batch["has_label"][i]:
                    _set_areas(row, class_areas(seg.labels, batch["label"][i], self.num_classes, self.ignore_index))
            except Exception as exc:
                row["error"], row["stage"] = f"{type(exc).__name__}: {exc}", "encode"
                log.debug(traceback.format_exc())
        return _columns(rows)

    def _predict_streamed(self, batch: dict[str, np.ndarray], i: int, row: dict[str, Any]) -> None:
        source = StreamSource(
            uri=str(batch["stream_uri"][i]),
            label_uri=str(batch["stream_label_uri"][i]) or None,
            height=int(batch["height"][i]),
            width=int(batch["width"][i]),
        )
        started = time.time()
        image_id = str(batch["image_id"][i])

        def on_rows(done: int, total: int) -> None:
            if self.monitor is not None:
                self.monitor.stream_rows.remote(image_id, done, total)  # fire and forget

        try:
            result = segment_tiff(
                self.score_fn, source, self.settings, num_classes=self.num_classes, chunk_size=self.chunk_size,
                ignore_index=self.ignore_index, storage_options=self.input_storage_options, on_rows=on_rows,
            )
        except Exception as exc:
            row["error"], row["stage"] = f"{type(exc).__name__}: {scrub(str(exc), self.input_storage_options)}", "predict"
            log.debug(traceback.format_exc())
            return
        _set_chunks(row, result.chunks)
        if result.areas is not None:
            _set_areas(row, result.areas)
        log.info("streamed %s (%d x %d) in %.1f s", source.uri, source.width, source.height, time.time() - started)


RESULT_COLUMNS = (
    "unit", "index_in_unit", "unit_rows", "image_id", "height", "width", "chunks", "mask", "probability",
    "labeled", "intersection", "union", "pred_area", "label_area", "error", "stage",
)
# one list per image: its chunks' [y, x, height, width], their mask PNGs, their probability PNGs
LIST_COLUMNS = ("chunks", "mask", "probability")


def _set_chunks(row: dict[str, Any], chunks: list[MaskChunk]) -> None:
    row["chunks"] = [[c.y, c.x, c.height, c.width] for c in chunks]
    row["mask"] = [c.mask for c in chunks]
    row["probability"] = [c.probability for c in chunks if c.probability is not None]


def _set_areas(row: dict[str, Any], areas: ClassAreas) -> None:
    row["labeled"] = True
    row.update(
        intersection=areas.intersection.tolist(),
        union=areas.union.tolist(),
        pred_area=areas.pred_area.tolist(),
        label_area=areas.label_area.tolist(),
    )


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: [r[k] for r in rows] for k in RESULT_COLUMNS}
    for k in LIST_COLUMNS:
        # object arrays, so that lists of equal length never become a 2-D fixed-width bytes array
        column = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            column[i] = r[k]
        out[k] = column
    return out


def _empty_result(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {
        "unit": int(batch["unit"][i]),
        "index_in_unit": int(batch["index_in_unit"][i]),
        "unit_rows": int(batch["unit_rows"][i]),
        "image_id": str(batch["image_id"][i]),
        "height": int(batch["height"][i]),
        "width": int(batch["width"][i]),
        "chunks": [],
        "mask": [],
        "probability": [],
        "labeled": False,  # areas below are empty lists unless the image had a label
        "intersection": [],
        "union": [],
        "pred_area": [],
        "label_area": [],
        "error": "",
        "stage": "",
    }
