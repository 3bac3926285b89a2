"""What the demos' archives and training scripts share: writing a split, random crops, the training
loop, and segmenting the held-out split with the demo's sliding windows."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.predict.tiling import Segmentation, TilingSettings, segment_images

Sample = tuple[np.ndarray, np.ndarray]  # (H x W x 3 uint8 image, H x W uint8 label)


def write_split(
    root: str | Path, make_sample: Callable[[str, int, tuple[int, int] | None], Sample], split: str, sizes: list[tuple[int, int] | None]
) -> Path:
    """Write one image per entry of `sizes` (None: the sample's own size) as PNGs:
    <root>/images/NNNN.png and <root>/labels/NNNN.png."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        image, label = make_sample(split, i, size)
        Image.fromarray(image).save(root / "images" / f"{i:04d}.png")
        Image.fromarray(label).save(root / "labels" / f"{i:04d}.png")
    return root


def random_crops(
    rng: np.random.Generator, batch: int, pool: list[Sample], crop: int, quarter_turns: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random crops of the pool, each flipped left-right with probability 1/2 and, with
    `quarter_turns`, turned by 0 to 3 quarter turns: (N x 3 x crop x crop uint8, N x crop x crop int64)."""
    images, labels = [], []
    for _ in range(batch):
        image, label = pool[int(rng.integers(len(pool)))]
        h, w = label.shape
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        image, label = image[y : y + crop, x : x + crop], label[y : y + crop, x : x + crop]
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if quarter_turns:
            turns = int(rng.integers(4))
            image, label = np.rot90(image, turns), np.rot90(label, turns)
        images.append(np.ascontiguousarray(image))
        labels.append(np.ascontiguousarray(label))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.from_numpy(np.stack(labels)).long()


def fit(
    model,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    started: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    log_every: int = 100,
) -> None:
    """AdamW (weight decay 0.01) with a one-cycle schedule; logits resized to the labels' size."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(1, steps + 1):
        images, labels = next_batch()
        logits = model(model.normalize(images))
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - started:.0f} s", flush=True)
    model.eval()


def segment_heldout(model, samples: list[Sample], window: int, binary: bool = False) -> list[Segmentation]:
    """The held-out images segmented with the demo's own sliding windows (stride 2/3 of the window)."""
    settings = TilingSettings(mode="slide", window=(window, window), stride=(window * 2 // 3,) * 2, batch_size=8, binary=binary)

    def score_fn(windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(model.normalize(windows)).float()

    return segment_images(score_fn, [s[0] for s in samples], settings)


def save_with_record(model, out: str | Path, source: str, record: dict) -> dict:
    """The checkpoint (native .safetensors) and, beside it, its training record as JSON (what was
    trained how, how long it took, how it does on the held-out split), also printed."""
    import json

    import models

    models.save_native(model, out, source=source)
    record = {
        **record,
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": Path(out).stat().st_size,
    }
    Path(out).with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return record
