"""What several test files need: small images, tiny checkpoints, job configs, run-directory readers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image

from models import build_model, save_native

# a SegFormer small enough to push hundreds of windows through on one CPU thread in seconds
TINY_SEGFORMER = dict(hidden_sizes=[8, 16, 32, 64], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], decoder_dim=16,
                      strides=[8, 2, 2, 2], patch_sizes=[8, 3, 3, 3])


def rel_error(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """max |a - b| / max |b|: one number for "equal up to float noise"."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def labeled_folder(root: Path, sizes: list[tuple[int, int]], num_classes: int, seed: int = 0, names: list[str] | None = None) -> Path:
    """root/images/<name>.png and root/labels/<name>.png: random pixels and labels."""
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        name = names[i] if names else f"img{i:03d}"
        write_png(root / "images" / f"{name}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        write_png(root / "labels" / f"{name}.png", rng.integers(0, num_classes, (h, w)).astype(np.uint8))
    return root


def tiny_checkpoint(path: Path, num_classes: int, seed: int = 0, class_names: list[str] | None = None) -> Path:
    """A native .safetensors of a tiny random SegFormer; another seed gives other weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("segformer-b0", num_classes=num_classes, **TINY_SEGFORMER)
    model.class_names = class_names
    path.parent.mkdir(parents=True, exist_ok=True)
    save_native(model, path)
    return path


def job_config(tmp_path: Path, images: Path, checkpoint: Path, *, labels: Path | None = None, run_id: str = "t1", **sections) -> dict:
    """A small job: slide windows of 32, one actor, output under tmp_path/runs. Sections given as
    dicts update the defaults (input={"images_per_unit": 2}); other values replace them."""
    cfg = {
        "run_id": run_id,
        "input": {"uri": str(images), "pattern": "**/*", "images_per_unit": 64},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"mode": "slide", "window": [32, 32], "stride": [24, 24], "batch_size": 8},
        "resources": {"actors": 1},
        "output": {"uri": str(tmp_path / "runs")},
    }
    if labels is not None:
        cfg["input"]["labels"] = {"uri": str(labels)}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_run_table(run: Path, kind: str):
    """All parquet files of one table of a run directory (masks, metrics, errors), or None."""
    files = sorted((run / kind).glob("*.parquet"))
    return pq.read_table([str(f) for f in files]) if files else None


def strict_json_load(path: Path):
    """json.loads that refuses NaN and Infinity, as JavaScript's JSON.parse and jq do."""
    def refuse(constant: str):
        raise ValueError(f"{path.name}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path: to compare a directory byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))
