"""Train the demo's bundled checkpoint: a reduced-width SegFormer on the synthetic archive.

    python -m jobs.train_demo_model --out jobs/assets/demo-segformer.safetensors

Seeds are fixed (torch, the archive's own per-image seeds), so a rerun on the same torch build
gives the same weights. Training images come from the archive's "train" split, which never
overlaps the held-out split that `segpipe demo` segments. The run time and the held-out mIoU of
the last training run are written to jobs/assets/demo-segformer.json beside the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jobs.demo_archive import CLASS_NAMES, WINDOW, heldout_sizes, make_sample
from models import build_model, save_native
from pipeline.metrics import ClassAreas, class_areas, summarize
from pipeline.tiling import TilingSettings, segment_images

# a reduced-width MiT-B0: the same four stages, narrower, so the checkpoint stays small
DEMO_ARCH = dict(hidden_sizes=[16, 32, 64, 128], num_heads=[1, 1, 2, 4], decoder_dim=64)
CROP = 80  # the smallest training image side


def training_batch(rng: np.random.Generator, batch: int, pool: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for _ in range(batch):
        image, label = pool[int(rng.integers(len(pool)))]
        h, w = label.shape
        y, x = int(rng.integers(0, h - CROP + 1)), int(rng.integers(0, w - CROP + 1))
        image, label = image[y : y + CROP, x : x + CROP], label[y : y + CROP, x : x + CROP]
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        images.append(np.ascontiguousarray(image))
        labels.append(np.ascontiguousarray(label))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.from_numpy(np.stack(labels)).long()


def evaluate(model, count: int = 16) -> dict:
    """Held-out metrics with the demo's own sliding-window settings."""
    settings = TilingSettings(mode="slide", window=(WINDOW, WINDOW), stride=(WINDOW * 2 // 3,) * 2, batch_size=8)

    def score_fn(windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(model.normalize(windows)).float()

    total = ClassAreas.zeros(len(CLASS_NAMES))
    samples = [make_sample("heldout", i, size) for i, size in enumerate(heldout_sizes(count))]
    for (_image, label), seg in zip(samples, segment_images(score_fn, [s[0] for s in samples], settings)):
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    model.train()
    for step in range(1, args.steps + 1):
        images, labels = training_batch(rng, args.batch, pool)
        logits = model(model.normalize(images))
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - started:.0f} s", flush=True)
    model.eval()
    train_seconds = time.time() - started
    metrics = evaluate(model)
    print(f"held-out mIoU {metrics['mIoU']:.4f}  aAcc {metrics['aAcc']:.4f}  IoU {[round(v, 4) for v in metrics['IoU']]}")
    save_native(model, args.out, source="jobs/train_demo_model.py")
    info = {
        "arch": DEMO_ARCH,
        "steps": args.steps,
        "batch": args.batch,
        "crop": CROP,
        "train_images": args.images,
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "heldout_mIoU": metrics["mIoU"],
        "heldout_IoU": metrics["IoU"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": Path(args.out).stat().st_size,
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
