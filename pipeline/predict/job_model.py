"""The job's model: the model a config names, loaded (checkpoint or seeded random weights), the hash
of its weights (part of a run's identity) and the checks of it against the job's task.

Used alike by the actors (pipeline.predict.predictor), the driver before a run starts (pipeline.plan: fails
fast on a bad checkpoint, names the classes, hashes the weights), the estimate, compare's receptive
fields and the CLI's `convert`; none of them needs the actor's module for it.
"""

from __future__ import annotations

import hashlib

import torch

from models import build_model, load_model
from models.base import CheckpointError, ModelError, SegmentationModel
from pipeline.config import ConfigError, JobConfig, ModelConfig
from pipeline.io.storage import local_copy
from pipeline.redaction import scrub

RANDOM_WEIGHTS_SEED = 0


def load_job_model(cfg: ModelConfig) -> SegmentationModel:
    """The model a job config names: a checkpoint, or a registered name with random weights (seeded,
    so that every actor and every attempt of a run holds the same ones)."""
    if cfg.checkpoint:
        # a checkpoint in a store is copied here through pipeline.io.storage (retries, scrubbed errors)
        try:
            with local_copy(cfg.checkpoint, cfg.storage_options) as path:
                try:
                    model = load_model(path, name=cfg.name, num_classes=cfg.num_classes)
                except CheckpointError as exc:  # name the checkpoint as the config does, not its copy
                    raise CheckpointError(str(exc).replace(path, cfg.checkpoint)) from None
        except OSError as exc:
            raise CheckpointError(f"model.checkpoint: {scrub(str(exc), cfg.storage_options)}") from None
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = build_model(cfg.name, num_classes=cfg.num_classes or 150)
    if cfg.class_names:
        # names cut short or too many: every table would misname classes (a one-logit head's masks are background/foreground)
        if len(cfg.class_names) != model.num_classes and model.num_classes != 1:
            raise ConfigError(
                f"model.class_names: {len(cfg.class_names)} names, but {model.name or model.family} has {model.num_classes} classes"
            )
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


def is_clip_model(model: SegmentationModel) -> bool:
    """A model whose forward takes a clip of frames (VisTR), not a batch of images."""
    return getattr(model, "input_kind", "image") == "clip"


def check_task(task: str, model: SegmentationModel) -> None:
    """ModelError (one line, exit 2) when the instance or panoptic task meets a model without queries,
    or a clip model (VisTR) any task but instance (video instance segmentation: tracks)."""
    name = model.name or model.family
    if is_clip_model(model):
        if task != "instance":
            raise ModelError(f"{name} is a clip model (video instance segmentation): inference.task must be instance, not {task}")
        return
    if task != "semantic" and not hasattr(model, "forward_queries"):
        raise ModelError(
            f"inference.task {task} needs a query-based model (maskformer, mask2former, detr); {name} predicts class maps only"
        )


def check_clip_job(cfg: JobConfig, model: SegmentationModel) -> None:
    """A clip model's job (ModelError, one line, exit 2): its task (`check_task`), videos for input,
    clips no longer than the frames it was trained on; its labels (input.labels.uri) one YouTube-VIS
    JSON, read by pipeline.plan (a video it does not list is counted, not an error: `required` does not
    apply). Nothing for other models (they ignore clip_length)."""
    check_task(cfg.inference.task, model)
    if not is_clip_model(model):
        return
    name = model.name or model.family
    if cfg.input.format != "video":
        raise ModelError(f"{name} is a clip model: it segments videos (input.format: video), not input.format {cfg.input.format}")
    if cfg.inference.clip_length > model.num_frames:
        raise ModelError(
            f"inference.clip_length {cfg.inference.clip_length} is more than the {model.num_frames} frames {name} takes (its num_frames)"
        )
    if cfg.input.labels is not None and cfg.input.labels.required:
        raise ModelError(
            f"{name} is a clip model: its labels are one YouTube-VIS JSON (input.labels.uri) and a video it does not "
            "list is counted, not failed: remove input.labels.required"
        )
