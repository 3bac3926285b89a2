"""Loading and saving checkpoints without running pickled code.

Three layouts come in:
- a Hugging Face checkpoint directory: config.json with model.safetensors or pytorch_model.bin;
  config.json's `model_type` picks the family that declares it (its CONTRACT's hf_model_types)
  and that family's `from_hf(config, state_dict)`;
- a native segpipe .safetensors file: its metadata (key "segpipe", JSON) names the family, the
  architecture, the classes and the normalization;
- an mmsegmentation .pth file (`state_dict` and `meta`): the registry name passed as `name`
  picks the family that registers it, and that family's `from_mmseg(name, num_classes, state_dict)`;
- a research repository's .pth (its state dict under `model`, as VisTR's training writes it): when
  the `name` is of a family with `from_repository`, that family's `from_repository(name, state_dict)`.
Which family loads what is read from the families' contracts (models/registry.py); this file keeps
no table of its own. Pickles load with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from models.base import (
    CheckpointError,
    SegmentationModel,
    UnknownModelError,
    brief,
    building_from,
    checkpoint_fault,
    describe_misfit,
    load_weights,
)
from models.registry import (
    FAMILY_OF,
    HF_MODEL_TYPES,
    MODELS,
    build_from_arch,
    check_name,
)

NATIVE_KEY = "segpipe"


class NativeMeta(BaseModel):
    """What a native checkpoint says about itself (the metadata key "segpipe")."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = 1
    family: str
    name: str = ""
    arch: dict[str, Any]
    num_classes: int
    class_names: list[str] | None = None
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    source: str = ""  # where the weights came from (a converted checkpoint's origin)
    # an HF checkpoint's image processor's do_reduce_labels (SegmentationModel.reduce_labels), kept
    # through a conversion; absent where nothing stated it
    reduce_labels: bool | None = None


def load_model(
    source: str | os.PathLike,
    name: str | None = None,
    num_classes: int | None = None,
) -> SegmentationModel:
    """Load a model from a local HF directory, native .safetensors file or mmseg .pth file.

    Local paths only: a checkpoint in an object store is fetched by the pipeline
    (pipeline.io.storage.local_copy: retries, credentials kept out of messages), as `segpipe run` and
    `segpipe convert` do.

    `name` (a registered model name) picks the architecture of an mmseg checkpoint; a native or HF
    checkpoint states its own, which must then be that model's. `num_classes`, when given, must be
    the checkpoint's. Every problem is one line: UnknownModelError for a name the registry does
    not know, CheckpointError naming `source` for anything about the checkpoint.
    """
    source = str(source)
    if name:
        check_name(name)
    path = Path(source)
    try:
        if "://" in source and not source.startswith("file://"):
            raise CheckpointError(f"{source}: load_model reads local paths; fetch it first (pipeline.io.storage.local_copy)")
        path = Path(source.removeprefix("file://"))
        if not path.exists():
            raise CheckpointError(f"{source}: no such checkpoint")
        if path.is_dir():
            model = _load_hf_directory(path, source)
        elif path.suffix == ".safetensors":
            model = _load_native(path, source)
        elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            model = _load_mmseg(path, source, name, num_classes)
        else:
            raise CheckpointError(f"{source}: not a checkpoint directory, .safetensors or .pth file")
    except CheckpointError as exc:
        # loaders deeper down (Swin's, ViT's config readers) do not know the file: name it here
        if str(exc).startswith(source):
            raise
        raise CheckpointError(f"{source}: {exc}") from exc
    if num_classes is not None and num_classes != model.num_classes:
        raise CheckpointError(f"model.num_classes is {num_classes} but {source} has {model.num_classes} classes")
    if name:
        _check_is(model, name, source)
        model.name = name
    return model.eval()


def save_native(model: SegmentationModel, path: str | os.PathLike, source: str = "") -> None:
    """Write `model` as a native .safetensors file whose metadata rebuilds it."""
    meta = NativeMeta(
        family=model.family,
        name=model.name,
        arch=model.arch,
        num_classes=model.num_classes,
        class_names=model.class_names,
        pixel_mean=model.pixel_mean,
        pixel_std=model.pixel_std,
        source=source,
        reduce_labels=model.reduce_labels,
    )
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    unstated = {"reduce_labels"} if model.reduce_labels is None else set()  # metadata as before it existed
    save_file(tensors, str(path), metadata={NATIVE_KEY: meta.model_dump_json(exclude=unstated)})
    # safetensors writes a private temporary file (mode 0600) and renames it into place: give the
    # file the mode any new file gets here (0666 minus the umask), so others can read the model
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_state_dict(path: str | os.PathLike, origin: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a weights-only torch pickle; `origin` names the file in
    errors (default: `path`)."""
    path = Path(path)
    origin = origin or str(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, origin)[1]
    _refuse_empty(path, origin)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, not a pickle at all, a truncated zip: any parser error
        raise CheckpointError(
            f"{origin}: cannot be read as a weights-only checkpoint: {brief(exc, line=_weights_only_reason(exc))}"
        ) from exc


def _weights_only_reason(exc: Exception) -> str | None:
    """The telling sentence of torch's weights-only refusal, which wraps it in paragraphs of advice:
    "Unsupported global: GLOBAL print was not an allowed global by default.", "Unsupported operand
    103", "Trying to load unsupported GLOBAL posix.mkdir whose module posix is blocked."."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
        elif not line.startswith(("Trying to load unsupported", "Unsupported")):
            continue
        return re.split(r"(?<=\.)\s", line, maxsplit=1)[0] or None
    return None


def _read_safetensors(path: Path, origin: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a .safetensors file; a truncated or corrupt one is a CheckpointError."""
    _refuse_empty(path, origin)
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), no __iter__
    except Exception as exc:  # SafetensorError (truncated, bad header), OSError: the file's fault, not ours
        raise CheckpointError(f"{origin}: cannot be read as safetensors: {brief(exc)}") from exc


def _refuse_empty(path: Path, origin: str) -> None:
    # an empty file makes the parsers fail with an empty EOFError or a "header too small"
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{origin}: empty file")


def _inside(source: str, name: str) -> str:
    """How errors name a file of a checkpoint directory."""
    return f"{source.rstrip('/')}/{name}"


def _load_hf_directory(path: Path, source: str) -> SegmentationModel:
    config_file = path / "config.json"
    config_origin = _inside(source, "config.json")
    if not config_file.exists():
        raise CheckpointError(f"{source}: a checkpoint directory needs config.json")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError, unreadable
        raise CheckpointError(f"{config_origin}: not a JSON file: {brief(exc)}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_origin}: holds a JSON {type(config).__name__}, not an object")
    model_type = config.get("model_type", "")
    family = HF_MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise CheckpointError(f"{config_origin}: model_type {model_type!r} is not supported; known: {', '.join(sorted(HF_MODEL_TYPES))}")
    for weights in ("model.safetensors", "pytorch_model.bin"):
        if (path / weights).exists():
            state_dict = read_state_dict(path / weights, _inside(source, weights))
            break
    else:
        sharded = [f"{w}.index.json" for w in ("model.safetensors", "pytorch_model.bin") if (path / f"{w}.index.json").exists()]
        if sharded:
            raise CheckpointError(f"{source}: sharded weights ({sharded[0]}) are not supported: merge them into model.safetensors")
        raise CheckpointError(f"{source}: neither model.safetensors nor pytorch_model.bin is there")
    if not _is_tensor_dict(state_dict):
        raise CheckpointError(f"{_inside(source, weights)}: does not hold a flat dict of named tensors")
    with _weights_fault(source, f"a {model_type} model"):
        model = family.from_hf(config, state_dict, origin=source)
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label and len(id2label) == model.num_classes:
        model.class_names = [str(id2label[str(i)]) if str(i) in id2label else str(i) for i in range(model.num_classes)]
    preprocessor = _read_preprocessor(path, source)
    if preprocessor is not None:
        _apply_preprocessor(model, preprocessor, _inside(source, PREPROCESSOR_FILE))
    return model


PREPROCESSOR_FILE = "preprocessor_config.json"  # what a transformers image processor's save_pretrained writes


def _read_preprocessor(path: Path, source: str) -> dict | None:
    file = path / PREPROCESSOR_FILE
    if not file.exists():
        return None
    origin = _inside(source, PREPROCESSOR_FILE)
    try:
        preprocessor = json.loads(file.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{origin}: not a JSON file: {brief(exc)}") from exc
    if not isinstance(preprocessor, dict):
        raise CheckpointError(f"{origin}: holds a JSON {type(preprocessor).__name__}, not an object")
    return preprocessor


def _apply_preprocessor(model: SegmentationModel, preprocessor: dict, origin: str) -> None:
    """The pixel normalization the checkpoint was trained with, where its image processor states it
    (transformers: x * rescale_factor, then (x - image_mean) / image_std, each step where its do_ flag
    is on), as mean and std on the 0-255 scale: a fine-tune's own statistics, not the family's
    default, without a word. And `do_reduce_labels` (its classes are the labels' values minus one):
    kept as `model.reduce_labels` for the run to compare with metrics.reduce_zero_label."""

    def number(key: str, default: float) -> float:
        value = preprocessor.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise CheckpointError(f"{origin}: {key} must be a positive number, got {value!r}")
        return float(value)

    def per_channel(key: str, default: tuple[float, ...]) -> tuple[float, float, float]:
        value = preprocessor.get(key, default)
        values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
            raise CheckpointError(f"{origin}: {key} must be a number or three numbers (RGB), got {value!r}")
        return tuple(float(v) for v in values)  # type: ignore[return-value]

    scale = number("rescale_factor", 1 / 255) if preprocessor.get("do_rescale", True) else 1.0
    if preprocessor.get("do_normalize", True):
        mean, std = per_channel("image_mean", (0.0, 0.0, 0.0)), per_channel("image_std", (1.0, 1.0, 1.0))
        if min(std) <= 0:
            raise CheckpointError(f"{origin}: image_std must be positive, got {list(std)}")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    model.pixel_mean = tuple(m / scale for m in mean)
    model.pixel_std = tuple(d / scale for d in std)
    model.arch.update(pixel_mean=list(model.pixel_mean), pixel_std=list(model.pixel_std))
    reduce = preprocessor.get("do_reduce_labels", preprocessor.get("reduce_labels"))
    model.reduce_labels = reduce if isinstance(reduce, bool) else None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _load_native(path: Path, source: str) -> SegmentationModel:
    metadata, state_dict = _read_safetensors(path, source)
    raw = metadata.get(NATIVE_KEY)
    if raw is None:
        raise CheckpointError(f"{source}: a .safetensors file without segpipe metadata (convert it with `segpipe convert`)")
    try:
        meta = NativeMeta.model_validate_json(raw)
    except ValidationError as exc:  # its text is a multi-line report: keep the first problem
        first, count = exc.errors()[0], exc.error_count()
        where = ".".join(str(part) for part in first["loc"]) or "metadata"
        problems = f"{count} problem{'s' if count != 1 else ''}"
        raise CheckpointError(f"{source}: its segpipe metadata is not valid ({problems}): {where}: {first['msg']}"[:400]) from exc
    try:
        with building_from(source, "its segpipe metadata"):
            model = build_from_arch(meta.family, meta.arch)
    except UnknownModelError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    load_weights(model, state_dict, source)
    model.name = meta.name
    model.class_names = meta.class_names
    model.reduce_labels = meta.reduce_labels
    return model


def _load_mmseg(path: Path, source: str, name: str | None, num_classes: int | None) -> SegmentationModel:
    obj = read_state_dict(path, source)
    family = FAMILY_OF.get(name or "")
    if family is not None and family.from_repository is not None and isinstance(obj, dict) and "model" in obj and "state_dict" not in obj:
        return _load_repository(obj, source, name)
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: no state_dict in this checkpoint")
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    meta = meta if isinstance(meta, dict) else {}
    dataset_meta = meta.get("dataset_meta")
    classes = meta.get("CLASSES") or (dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None)
    classes = [str(c) for c in classes] if isinstance(classes, (list, tuple)) and classes else None  # mmseg 0.x and 1.x
    if num_classes is None:
        num_classes = len(classes) if classes else None
    if not name:
        raise CheckpointError(
            f"{source}: a .pth checkpoint (mmsegmentation's or a model repository's) needs the model name (model.name / --name)"
        )
    if num_classes is None:
        raise CheckpointError(f"{source}: the checkpoint does not say its classes: give num_classes")
    family = FAMILY_OF.get(name)
    if family is None or family.from_mmseg is None:
        raise CheckpointError(f"{source}: no mmsegmentation layout is known for {name!r}")
    with _weights_fault(source, name):
        model = family.from_mmseg(name, num_classes, state_dict, origin=source)
    model.name = name
    if classes and len(classes) == model.num_classes:  # the names its meta states (kept by segpipe convert)
        model.class_names = classes
    return model


def _load_repository(obj: Any, source: str, name: str) -> SegmentationModel:
    """A .pth whose "model" is the state dict (the layout of a research repository's training),
    under the name of a family that reads that layout (FamilyContract.from_repository)."""
    state_dict = obj.get("model") if isinstance(obj, dict) else None
    if not _is_tensor_dict(state_dict):
        raise CheckpointError(f'{source}: {name} loads a .pth whose "model" is a flat dict of named tensors (its repository\'s layout)')
    with _weights_fault(source, name):
        model = FAMILY_OF[name].from_repository(name, state_dict, origin=source)
    model.name = name
    return model


def _weights_fault(source: str, what: str):
    """The loaders check what they read; tensors stranger still (a q/k/v of unequal rows, a number
    where a tensor goes) fail inside torch or a rename: still the checkpoint's fault, still one line."""
    return checkpoint_fault(f"{source}: these weights do not make {what}")


def _check_is(model: SegmentationModel, name: str, source: str) -> None:
    """A native or HF checkpoint loaded under a registered name must hold that model: its family,
    its keys and shapes (B0 weights are not segformer-b1). A native checkpoint that carries the
    name itself passes as it is, so that reduced-width models saved under their variant's name load."""
    if model.name == name:
        return
    with torch.device("meta"):  # shapes only: no memory, no time for a large variant
        expected = MODELS[name](num_classes=model.num_classes)
    held = model.name or f"a {type(model).__name__}"
    if expected.family != model.family:
        raise CheckpointError(f"{source}: not a {name} checkpoint: it holds {held}")
    misfit = describe_misfit(expected.state_dict(), model.state_dict())
    if misfit:
        raise CheckpointError(f"{source}: not a {name} checkpoint (it holds {held}): {misfit}")
