"""Params and CPU forward time of the ViT-based models: SETR (Naive, PUP, MLA) and Segmenter
(linear, mask transformer), tiny and base, at 512x512 with 150 classes (ADE20K settings).

Each model is built with random weights (timing does not depend on them), warmed up with one
forward, then timed over `--runs` forwards of one 512x512 image under torch.inference_mode; the
table gives the median and the fastest run, and the output's shape (its stride tells the decoder).

    .venv/bin/python benchmarks/model_zoo_patch.py [--size 512] [--runs 3] [--threads N] [--names ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model

DEFAULT_NAMES = [
    f"{family}-{decoder}-vit-{size}"
    for size in ("tiny", "base")
    for family, decoders in (("setr", ("naive", "pup", "mla")), ("segmenter", ("linear", "mask")))
    for decoder in decoders
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--names", nargs="*", default=DEFAULT_NAMES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, args.size, args.size)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())  # other work on the machine skews the times
    print(
        f"torch {torch.__version__}, {args.threads} threads, input 1x3x{args.size}x{args.size}, {args.classes} classes, load average {load}"
    )
    header = f"| {'model':<26} | {'params (M)':>10} | {'median (s)':>10} | {'best (s)':>8} | {'output':<16} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name in args.names:
        model = build_model(name, num_classes=args.classes).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        times = []
        with torch.inference_mode():
            out = model(pixels)  # warm-up
            for _ in range(args.runs):
                start = time.perf_counter()
                model(pixels)
                times.append(time.perf_counter() - start)
        shape = "x".join(str(v) for v in out.shape[1:])
        print(f"| {name:<26} | {params:>10.1f} | {statistics.median(times):>10.3f} | {min(times):>8.3f} | {shape:<16} |", flush=True)
        del model, out


if __name__ == "__main__":
    main()
