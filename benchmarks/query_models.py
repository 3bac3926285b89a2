"""Params and CPU forward time of the tiny query-based models, ours next to transformers'.

For maskformer-swin-tiny and mask2former-swin-tiny (ADE20K settings: 150 classes, 100 queries):
build the transformers model with random weights, save it with `save_pretrained`, load it through
`models.load_model` (so both run the same weights), and time one forward at 512x512 on CPU for each,
alternating ours and theirs so that load on a shared machine hits both alike. The ratio column is
ours / theirs (below 1: ours is faster). `max rel diff` checks that the two semantic maps agree.

    .venv/bin/python benchmarks/query_models.py [--size 512] [--runs 5] [--threads N]

transformers (and scipy, which its MaskFormer constructors need) are test dependencies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import load_model


def hf_maskformer_tiny():
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig

    backbone = SwinConfig(
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = MaskFormerConfig(backbone_config=backbone, decoder_config=dict(model_type="detr"), num_labels=150)
    return MaskFormerForInstanceSegmentation(config)


def hf_mask2former_tiny():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=backbone, num_labels=150))


def hf_semantic(model, pixels: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=pixels)
    probs = out.class_queries_logits.softmax(-1)[..., :-1]
    return torch.einsum("nqc,nqhw->nchw", probs, out.masks_queries_logits.sigmoid())


def time_pair(ours, theirs, pixels: torch.Tensor, runs: int) -> tuple[list[float], list[float], float]:
    ours_s, theirs_s = [], []
    with torch.inference_mode():
        a, b = ours(pixels), hf_semantic(theirs, pixels)  # warm-up, and the agreement check
        diff = ((a - b).abs().max() / b.abs().max()).item()
        for _ in range(runs):
            t = time.perf_counter()
            ours(pixels)
            ours_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            hf_semantic(theirs, pixels)
            theirs_s.append(time.perf_counter() - t)
    return ours_s, theirs_s, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, args.size, args.size)

    rows = []
    for name, build in (("maskformer-swin-tiny", hf_maskformer_tiny), ("mask2former-swin-tiny", hf_mask2former_tiny)):
        theirs = build().eval()
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save_pretrained(tmp)
            ours = load_model(tmp)
        ours_s, theirs_s, diff = time_pair(ours, theirs, pixels, args.runs)
        ours_ms, theirs_ms = 1000 * statistics.median(ours_s), 1000 * statistics.median(theirs_s)
        rows.append(
            (
                name,
                sum(p.numel() for p in ours.parameters()) / 1e6,
                sum(p.numel() for p in theirs.parameters()) / 1e6,
                ours_ms,
                theirs_ms,
                ours_ms / theirs_ms,
                diff,
            )
        )
        del ours, theirs

    print(
        f"CPU forward, 1 x 3 x {args.size} x {args.size}, {torch.get_num_threads()} threads, "
        f"median of {args.runs} runs (torch {torch.__version__})"
    )
    header = ("model", "params ours (M)", "params HF (M)", "ours (ms)", "HF (ms)", "ours/HF", "max rel diff")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, p_ours, p_hf, t_ours, t_hf, ratio, diff in rows:
        print(f"| {name} | {p_ours:.2f} | {p_hf:.2f} | {t_ours:.0f} | {t_hf:.0f} | {ratio:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
