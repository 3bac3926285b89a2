"""Train the camouflage demo's bundled checkpoint: a reduced-width binary SegFormer.

    python -m jobs.train_camouflage_model --out jobs/assets/camouflage-segformer.safetensors

Seeds are fixed (torch, the archive's own per-image seeds), so a rerun on the same torch build
gives the same weights. Training images come from the camouflage archive's "train" split, which
never overlaps the held-out split that `segpipe demo --task camouflage` segments. The loss is
cross-entropy plus a soft Dice term on the object class (objects cover a small share of the
pixels, and some images have none). The run time and the held-out camouflaged-object measures
(pipeline.metrics.cod, over the 8-bit probability maps as a binary run stores them) of the last
training run are written to jobs/assets/camouflage-segformer.json beside the checkpoint.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jobs.camouflage_archive import CLASS_NAMES, WINDOW, heldout_sizes, make_sample
from jobs.training import fit, random_crops, save_with_record, segment_heldout
from models import build_model
from pipeline.metrics.cod import CodAccumulator, cod_image_stats
from pipeline.metrics.semantic import ClassAreas, class_areas, summarize
from pipeline.results.masks import quantize_probability

# a reduced-width MiT-B0, as the semantic demo's: the same four stages, narrower
CAMOUFLAGE_ARCH = dict(hidden_sizes=[16, 32, 64, 128], num_heads=[1, 1, 2, 4], decoder_dim=64)
CROP = 96  # training crops; images are 128 to 200 pixels a side
DICE_WEIGHT = 0.5
HELDOUT_IMAGES = 16  # as many as `segpipe demo --task camouflage` segments


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + DICE_WEIGHT * (1 - soft Dice of the object class over the batch)."""
    probability = torch.softmax(logits, dim=1)[:, 1]
    target = (labels == 1).float()
    dice = (2 * (probability * target).sum() + 1) / (probability.sum() + target.sum() + 1)
    return F.cross_entropy(logits, labels) + DICE_WEIGHT * (1 - dice)


def evaluate(model, count: int = HELDOUT_IMAGES) -> dict:
    """Held-out measures with the demo's own sliding-window settings: the camouflaged-object
    measures from the 8-bit probability maps (as a binary run computes them), and IoU."""
    total = ClassAreas.zeros(len(CLASS_NAMES))
    cod = CodAccumulator()
    samples = [make_sample("heldout", i, size) for i, size in enumerate(heldout_sizes(count))]
    for (_image, label), seg in zip(samples, segment_heldout(model, samples, WINDOW, binary=True)):
        total += class_areas(seg.labels, label, len(CLASS_NAMES), 255)
        cod.add(cod_image_stats(quantize_probability(seg.probability), (label == 1).astype(np.uint8) * 255))
    return {**cod.result(), **summarize(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "camouflage-segformer.safetensors"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=256, help="training images drawn from the train split")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="1: steadier than 2 on a loaded 2-core machine")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    started = time.time()
    pool = [make_sample("train", i) for i in range(args.images)]
    model = build_model("segformer-b0", num_classes=len(CLASS_NAMES), **CAMOUFLAGE_ARCH)
    model.class_names = list(CLASS_NAMES)
    # random crops flipped and turned by quarter turns: the object's cue is its texture relative to
    # the background's, which none of these changes
    fit(
        model,
        lambda: random_crops(rng, args.batch, pool, CROP, quarter_turns=True),
        steps=args.steps,
        lr=args.lr,
        started=started,
        loss_fn=loss_fn,
        log_every=25,
    )
    train_seconds = time.time() - started
    metrics = evaluate(model)
    print(
        f"held-out Sm {metrics['Sm']:.4f}  Em_mean {metrics['Em_mean']:.4f}  wFm {metrics['wFm']:.4f}  MAE {metrics['MAE']:.4f}"
        f"  IoU {[round(v, 4) for v in metrics['IoU']]}"
    )
    save_with_record(
        model,
        args.out,
        "jobs/train_camouflage_model.py",
        {
            "arch": CAMOUFLAGE_ARCH,
            "steps": args.steps,
            "batch": args.batch,
            "crop": CROP,
            "lr": args.lr,
            "loss": f"cross-entropy + {DICE_WEIGHT} * (1 - soft Dice of the object class)",
            "train_images": args.images,
            "threads": args.threads,
            "train_seconds": round(train_seconds, 1),
            "heldout_images": HELDOUT_IMAGES,
            "heldout": {key: metrics[key] for key in ("Sm", "Em_mean", "Em_max", "Em_adp", "wFm", "Fm_mean", "Fm_max", "Fm_adp", "MAE")},
            "heldout_mIoU": metrics["mIoU"],
            "heldout_IoU": metrics["IoU"],
        },
    )


if __name__ == "__main__":
    main()
