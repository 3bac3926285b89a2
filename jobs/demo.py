"""`segpipe demo`: the synthetic archive (generated on first use) through the bundled model."""

from __future__ import annotations

import shutil
from pathlib import Path

from jobs.demo_archive import CLASS_NAMES, WINDOW, write_archive
from pipeline.config import JobConfig, load_config

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo-segformer.safetensors"
HELDOUT_IMAGES = 16


def demo_config(out: Path, task: str = "semantic") -> JobConfig:
    """The demo's job config; a previous demo run in `out` is removed so the demo always runs."""
    archive = out / "archive"
    shutil.rmtree(out / "runs" / "demo", ignore_errors=True)
    if not (archive / "images").exists() or len(list((archive / "images").glob("*.png"))) < HELDOUT_IMAGES:
        write_archive(archive, "heldout", HELDOUT_IMAGES)
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
