"""The predict stage: a Ray actor that holds one model and turns decoded images into masks.

One batch of decoded rows in, one batch of result rows out: for each image its PNG mask (and
probability for binary tasks) and, where it has a label, its per-class areas. A failure on one
image becomes that image's error row; the actor goes on with the rest.
"""
from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models import build_model, load_model
from models.base import SegmentationModel
from pipeline.config import InferenceConfig, ModelConfig
from pipeline.encode import encode_mask, encode_probability
from pipeline.metrics import class_areas
from pipeline.tiling import TilingSettings, segment_images

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_job_model(cfg: ModelConfig) -> SegmentationModel:
    """The model a job config names: a checkpoint, or a registered name with random weights."""
    if cfg.checkpoint:
        model = load_model(cfg.checkpoint, name=cfg.name, num_classes=cfg.num_classes, storage_options=cfg.storage_options)
        if cfg.num_classes and cfg.num_classes != model.num_classes:
            raise ValueError(f"model.num_classes is {cfg.num_classes} but the checkpoint has {model.num_classes} classes")
    else:
        model = build_model(cfg.name, num_classes=cfg.num_classes or 150)
    if cfg.class_names:
        model.class_names = list(cfg.class_names)
    return model.eval()


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
    """Ray actor: constructed once per actor, called once per batch of decoded images."""

    def __init__(self, model_cfg: dict, inference_cfg: dict, ignore_index: int, num_threads: int = 1) -> None:
        torch.set_num_threads(max(1, num_threads))
        model_cfg = ModelConfig.model_validate(model_cfg)
        inference = InferenceConfig.model_validate(inference_cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_job_model(model_cfg).to(self.device)
        self.num_classes = model.num_classes
        self.ignore_index = ignore_index
        self.score_fn = ModelScorer(model, self.device, inference.precision)
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
        todo = [i for i in range(n) if not batch["error"][i]]
        for i in range(n):
            if batch["error"][i]:
                rows[i]["error"], rows[i]["stage"] = batch["error"][i], batch["stage"][i]
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
                row["mask"] = encode_mask(seg.labels, self.num_classes)
                if seg.probability is not None:
                    row["probability"] = encode_probability(seg.probability)
                label = batch["label"][i]
                if batch["has_label"][i]:
                    row["labeled"] = True
                    areas = class_areas(seg.labels, label, self.num_classes, self.ignore_index)
                    row.update(
                        intersection=areas.intersection.tolist(),
                        union=areas.union.tolist(),
                        pred_area=areas.pred_area.tolist(),
                        label_area=areas.label_area.tolist(),
                    )
            except Exception as exc:
                row["error"], row["stage"] = f"{type(exc).__name__}: {exc}", "encode"
                log.debug(traceback.format_exc())
        return {k: [r[k] for r in rows] for k in RESULT_COLUMNS}


RESULT_COLUMNS = (
    "unit", "index_in_unit", "image_id", "height", "width", "mask", "probability",
    "labeled", "intersection", "union", "pred_area", "label_area", "error", "stage",
)


def _empty_result(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {
        "unit": int(batch["unit"][i]),
        "index_in_unit": int(batch["index_in_unit"][i]),
        "image_id": str(batch["image_id"][i]),
        "height": int(batch["height"][i]),
        "width": int(batch["width"][i]),
        "mask": None,
        "probability": None,
        "labeled": False,  # areas below are empty lists unless the image had a label
        "intersection": [],
        "union": [],
        "pred_area": [],
        "label_area": [],
        "error": "",
        "stage": "",
    }
