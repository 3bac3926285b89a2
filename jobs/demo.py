"""`segpipe demo`: a synthetic archive (generated on first use) through a bundled model.

Tasks: "semantic" (jobs.demo_archive: shapes of four classes, the demo SegFormer, mIoU) and
"camouflage" (jobs.camouflage_archive: objects whose texture matches the background's, a binary
SegFormer, the camouflaged-object measures Sm, E, wF, F and MAE).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from jobs import camouflage_archive
from jobs.demo_archive import CLASS_NAMES, WINDOW, write_archive
from pipeline.config import ConfigError, JobConfig, load_config

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo-segformer.safetensors"
CAMOUFLAGE_CHECKPOINT = Path(__file__).parent / "assets" / "camouflage-segformer.safetensors"
HELDOUT_IMAGES = 16
TASKS = ("semantic", "camouflage")


def _ensure_archive(archive: Path, write) -> None:
    if not (archive / "images").exists() or len(list((archive / "images").glob("*.png"))) < HELDOUT_IMAGES:
        write(archive, "heldout", HELDOUT_IMAGES)


def demo_config(out: Path, task: str = "semantic") -> JobConfig:
    """The demo's job config for `task`; a previous demo run of that task in `out` is removed so the
    demo always runs."""
    if task not in TASKS:
        raise ConfigError(f"task: unknown demo task {task!r}; known: {', '.join(TASKS)}")
    if task == "camouflage":
        return _camouflage_config(out)
    archive = out / "archive"
    shutil.rmtree(out / "runs" / "demo", ignore_errors=True)
    _ensure_archive(archive, write_archive)
    return load_config(
        {
            "run_id": "demo",
            "input": {"uri": str(archive / "images"), "pattern": "*.png", "labels": {"uri": str(archive / "labels")}},
            "model": {"checkpoint": str(DEMO_CHECKPOINT), "class_names": CLASS_NAMES},
            "inference": {"mode": "slide", "window": [WINDOW, WINDOW], "stride": [WINDOW * 2 // 3, WINDOW * 2 // 3], "batch_size": 8},
            "resources": {"actors": 1},
            "output": {"uri": str(out / "runs")},
            "metrics": {"ignore_index": 255},
        }
    )


def _camouflage_config(out: Path) -> JobConfig:
    archive = out / "camouflage-archive"
    shutil.rmtree(out / "runs" / "camouflage", ignore_errors=True)
    _ensure_archive(archive, camouflage_archive.write_archive)
    window = camouflage_archive.WINDOW
    return load_config(
        {
            "run_id": "camouflage",
            "input": {"uri": str(archive / "images"), "pattern": "*.png", "labels": {"uri": str(archive / "labels")}},
            "model": {"checkpoint": str(CAMOUFLAGE_CHECKPOINT), "class_names": camouflage_archive.CLASS_NAMES},
            "inference": {"mode": "slide", "window": [window, window], "stride": [window * 2 // 3, window * 2 // 3], "batch_size": 8},
            "resources": {"actors": 1},
            "output": {"uri": str(out / "runs")},
            "metrics": {"task": "binary"},
        }
    )
