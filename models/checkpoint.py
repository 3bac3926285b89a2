"""Loading and saving checkpoints without running pickled code.

Three layouts come in:
- a Hugging Face checkpoint directory: config.json with model.safetensors or pytorch_model.bin;
  config.json's `model_type` picks the family's `from_hf(config, state_dict)`;
- a native segpipe .safetensors file: its metadata (key "segpipe", JSON) names the family, the
  architecture, the classes and the normalization;
- an mmsegmentation .pth file (`state_dict` and `meta`): the registry name passed as `name`
  (or found in `meta`) picks the family's `from_mmseg(name, num_classes, state_dict)`.
Pickles load with `torch.load(weights_only=True)` only.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import fsspec
import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import save_file

from models import mask2former, maskformer, segformer, segmenter, setr
from models.base import CheckpointError, SegmentationModel, load_weights
from models.registry import MODELS, build_from_arch

NATIVE_KEY = "segpipe"

# config.json model_type -> loader(config dict, state dict) -> model
HF_LOADERS: dict[str, Callable[[dict, dict[str, torch.Tensor]], SegmentationModel]] = {
    "segformer": segformer.from_hf,
    "maskformer": maskformer.from_hf,
    "mask2former": mask2former.from_hf,
}

# registry-name prefix -> loader(name, num_classes, state dict) -> model
MMSEG_LOADERS: dict[str, Callable[[str, int, dict[str, torch.Tensor]], SegmentationModel]] = {
    "segformer-": segformer.from_mmseg,
    "setr-": setr.from_mmseg,
    "segmenter-": segmenter.from_mmseg,  # also the original Segmenter checkpoint.pth (encoder.*, decoder.*)
}


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


def load_model(
    source: str | os.PathLike,
    name: str | None = None,
    num_classes: int | None = None,
    storage_options: dict | None = None,
) -> SegmentationModel:
    """Load a model from an HF directory, a native .safetensors file or an mmseg .pth file."""
    source = str(source)
    with _local_copy(source, storage_options or {}) as path:
        if path.is_dir():
            model = _load_hf_directory(path)
        elif path.suffix == ".safetensors":
            model = _load_native(path)
        elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            model = _load_mmseg(path, name, num_classes)
        else:
            raise CheckpointError(f"{source}: not a checkpoint directory, .safetensors or .pth file")
    if name and not model.name:
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
    )
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={NATIVE_KEY: meta.model_dump_json()})


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a weights-only torch pickle."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, or not a pickle at all
        raise CheckpointError(f"{path}: cannot be read as a weights-only checkpoint: {exc}") from exc
    return obj


def _load_hf_directory(path: Path) -> SegmentationModel:
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: a checkpoint directory needs config.json")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type", "")
    if model_type not in HF_LOADERS:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; known: {sorted(HF_LOADERS)}")
    for weights in ("model.safetensors", "pytorch_model.bin"):
        if (path / weights).exists():
            state_dict = read_state_dict(path / weights)
            break
    else:
        raise CheckpointError(f"{path}: neither model.safetensors nor pytorch_model.bin is there")
    model = HF_LOADERS[model_type](config, state_dict)
    id2label = config.get("id2label")
    if id2label and len(id2label) == model.num_classes:
        model.class_names = [str(id2label[str(i)]) if str(i) in id2label else str(i) for i in range(model.num_classes)]
    return model


def _load_native(path: Path) -> SegmentationModel:
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(NATIVE_KEY)
        if raw is None:
            raise CheckpointError(f"{path}: a .safetensors file without segpipe metadata (convert it with `segpipe convert`)")
        meta = NativeMeta.model_validate_json(raw)
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    model = build_from_arch(meta.family, meta.arch)
    load_weights(model, state_dict, str(path))
    model.name = meta.name
    model.class_names = meta.class_names
    return model


def _load_mmseg(path: Path, name: str | None, num_classes: int | None) -> SegmentationModel:
    obj = read_state_dict(path)
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: no state_dict in this checkpoint")
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    if num_classes is None:
        classes = (meta or {}).get("CLASSES") or (meta or {}).get("dataset_meta", {}).get("classes")
        num_classes = len(classes) if classes else None
    if not name:
        raise CheckpointError(f"{path}: an mmsegmentation checkpoint needs the model name (model.name / --name)")
    if name not in MODELS:
        raise CheckpointError(f"{path}: unknown model name {name!r}")
    if num_classes is None:
        raise CheckpointError(f"{path}: the checkpoint does not say its classes: give num_classes")
    for prefix, loader in MMSEG_LOADERS.items():
        if name.startswith(prefix):
            model = loader(name, num_classes, state_dict)
            model.name = name
            return model
    raise CheckpointError(f"{path}: no mmsegmentation layout is known for {name!r}")


class _local_copy:
    """A local path for `source`: itself when local, else a temporary copy (file or directory)."""

    def __init__(self, source: str, storage_options: dict) -> None:
        self.source = source
        self.storage_options = storage_options
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Path:
        fs, root = fsspec.core.url_to_fs(self.source, **copy.deepcopy(self.storage_options))  # botocore edits options in place
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            path = Path(root)
            if not path.exists():
                raise CheckpointError(f"{self.source}: no such checkpoint")
            return path
        if not fs.exists(root):
            raise CheckpointError(f"{self.source}: no such checkpoint")
        self._tmp = tempfile.TemporaryDirectory(prefix="segpipe-ckpt-")
        dest = Path(self._tmp.name) / Path(root.rstrip("/")).name
        fs.get(root, str(dest), recursive=fs.isdir(root))
        return dest

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
