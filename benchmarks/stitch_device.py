"""The stitcher where the model runs against the stitcher on the CPU: `segment_images` with
`stitch_device` the device (the windows' scores stay there; resized, blended and reduced to labels
there, only label rows cross back) against `stitch_device` None (the scores copied to the CPU, the
CPU stitcher), as the predictor actor runs them.

    python benchmarks/stitch_device.py --device cuda --size 1024x2048 --classes 19 --markdown out.md
    python benchmarks/stitch_device.py --device cpu --size 256x512    # the same code, both on the CPU

The scores are pipeline_throughput's null model's: a fixed smooth random field per window at output
stride 4 (SegFormer's), made once on the device: no model runs, so what is timed is the stitch (and, for the CPU stitcher, the copy
of the scores back). Prints milliseconds an image for each (median of --repeats), their ratio and
the pixels whose labels differ (on a GPU: classes tied within float error; on the CPU: none, the
device path is bit-exact there). `--markdown PATH` appends one row to gpu.sh's table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline_throughput import NullModel, size_arg  # its null model's scores: no model runs here either

from pipeline.predict.tiling import TilingSettings, segment_images


def timed(run, device: torch.device, repeats: int) -> tuple[float, list]:
    """Median seconds of run() over `repeats` (after one warm-up), and its last result."""
    result = run()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--size", type=size_arg, default=(1024, 2048), help="HxW of the images (Cityscapes: 1024x2048)")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=768)
    parser.add_argument("--batch", type=int, default=2, help="windows per score_fn call")
    parser.add_argument("--images", type=int, default=2, help="images per segment_images call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--markdown", help="append a row to the Markdown table in this file (gpu.sh's)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    height, width = args.size
    window = (min(args.window, height), min(args.window, width))
    stride = (min(args.stride, window[0]), min(args.stride, window[1]))
    settings = TilingSettings(mode="slide", window=window, stride=stride, batch_size=args.batch)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(args.images)]
    field = NullModel(args.classes)(torch.zeros(1, 3, *window, device=device))  # 1 x C x h/4 x w/4, made on the device

    def on_device(pixels: torch.Tensor) -> torch.Tensor:  # ModelScorer(keep_on_device=True): scores stay
        return field.expand(len(pixels), -1, -1, -1).clone()

    def to_cpu(pixels: torch.Tensor) -> torch.Tensor:  # ModelScorer: scores copied back for the CPU stitcher
        return field.expand(len(pixels), -1, -1, -1).clone().cpu()

    cpu_seconds, cpu_result = timed(lambda: segment_images(to_cpu, images, settings), device, args.repeats)
    device_seconds, device_result = timed(lambda: segment_images(on_device, images, settings, stitch_device=device), device, args.repeats)
    differ = sum(int((a.labels != b.labels).sum()) for a, b in zip(cpu_result, device_result))
    cpu_ms, device_ms = 1000 * cpu_seconds / len(images), 1000 * device_seconds / len(images)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{len(images)} images {height}x{width}, {args.classes} classes, window {window} stride {stride}, batch {args.batch}, {machine}")
    print(f"stitcher on the CPU: {cpu_ms:.1f} ms an image (scores copied back included)")
    print(f"stitcher on {device.type}: {device_ms:.1f} ms an image = {cpu_ms / device_ms:.2f}x; labels that differ: {differ} pixels")
    if args.markdown:
        cell = f"cpu {cpu_ms:.0f} ms, {device.type} {device_ms:.0f} ms an image = {cpu_ms / device_ms:.2f}x, labels differ {differ} px"
        row = [
            "stitch",
            "- (fixed scores)",
            f"{len(images)} synthetic {height}x{width}, {args.classes} classes",
            str(args.batch),
            f"stitcher on {device.type} / on cpu (segment_images, window {window[0]} stride {stride[0]})",
            cell,
            "float32 stitch",
            "float32 stitch",
        ]
        with open(args.markdown, "a") as out:
            out.write("| " + " | ".join(row) + " |\n")
    return {"cpu_ms": cpu_ms, "device_ms": device_ms, "differ": differ}


if __name__ == "__main__":
    main()
