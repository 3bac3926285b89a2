"""Train the demo's bundled checkpoint: a reduced-width SegFormer on the synthetic archive.

    python -m jobs.train_demo_model --out jobs/assets/demo-segformer.safetensors

Seeds are fixed (torch, the archive's own per-image seeds), so a rerun on the same torch build
gives the same weights. Training images come from the archive's "train" split, which never
overlaps the held-out split that `segpipe demo` segments. The run time and the held-out mIoU of
the last training run are written to jobs/assets/demo-segformer.json beside the checkpoint.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from jobs.demo_archive import CLASS_NAMES, WINDOW, heldout_sizes, make_sample
from jobs.training import fit, random_crops, save_with_record, segment_heldout
from models import build_model
from pipeline.metrics.semantic import ClassAreas, class_areas, summarize

# a reduced-width MiT-B0: the same four stages, narrower, so the checkpoint stays small
DEMO_ARCH = dict(hidden_sizes=[16, 32, 64, 128], num_heads=[1, 1, 2, 4], decoder_dim=64)
CROP = 80  # the smallest training image side


def evaluate(model, count: int = 16) -> dict:
    """Held-out metrics with the demo's own sliding-window settings."""
    total = ClassAreas.zeros(len(CLASS_NAMES))
    samples = [make_sample("heldout", i, size) for i, size in enumerate(heldout_sizes(count))]
    for (_image, label), seg in zip(samples, segment_heldout(model, samples, WINDOW)):
        total += class_areas(seg.labels, label, len(CLASS_NAMES), 255)
    return summarize(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "demo-segformer.safetensors"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--images", type=int, default=192, help="training images drawn from the train split")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    started = time.time()
    pool = [make_sample("train", i) for i in range(args.images)]
    model = build_model("segformer-b0", num_classes=len(CLASS_NAMES), **DEMO_ARCH)
    model.class_names = list(CLASS_NAMES)
    fit(model, lambda: random_crops(rng, args.batch, pool, CROP), steps=args.steps, lr=2e-3, started=started)
    train_seconds = time.time() - started
    metrics = evaluate(model)
    print(f"held-out mIoU {metrics['mIoU']:.4f}  aAcc {metrics['aAcc']:.4f}  IoU {[round(v, 4) for v in metrics['IoU']]}")
    save_with_record(
        model,
        args.out,
        "jobs/train_demo_model.py",
        {
            "arch": DEMO_ARCH,
            "steps": args.steps,
            "batch": args.batch,
            "crop": CROP,
            "train_images": args.images,
            "threads": args.threads,
            "train_seconds": round(train_seconds, 1),
            "heldout_mIoU": metrics["mIoU"],
            "heldout_IoU": metrics["IoU"],
        },
    )


if __name__ == "__main__":
    main()
