"""Pipeline overhead on real images: `segpipe run` next to a plain single-process loop.

    python benchmarks/pipeline_throughput.py --data ../shared/data/camvid --limit 40

Both segment the same CamVid val images with the same SegFormer (random weights: the speed does not
depend on the weights) and the same sliding window. The plain loop reads, decodes, runs
`segment_images` and PNG-encodes in one process, with all of this machine's threads; the pipeline
is a local Ray job (read/decode tasks, one CPU actor, write tasks) that also writes Parquet and
computes metrics. Pipeline time includes Ray start-up and model load, reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import torch

from models import build_model, save_native
from pipeline.config import load_config
from pipeline.decode import decode_image
from pipeline.masks import encode_chunks
from pipeline.plan import run_job
from pipeline.predictor import ModelScorer
from pipeline.telemetry import StageClock
from pipeline.tiling import TilingSettings, segment_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/camvid")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--model", default="segformer-b0")
    parser.add_argument("--window", type=int, default=360)
    parser.add_argument("--stride", type=int, default=240)
    parser.add_argument("--split", default="val", help="val (101 images) or train (367)")
    args = parser.parse_args()

    images = sorted((Path(args.data) / args.split).glob("*.png"))[: args.limit]
    work = Path(tempfile.mkdtemp(prefix="segpipe-bench-"))
    subset = work / "val"
    labels = work / "valannot"
    subset.mkdir()
    labels.mkdir()
    for p in images:
        (subset / p.name).symlink_to(p.resolve())
        (labels / p.name).symlink_to((Path(args.data) / f"{args.split}annot" / p.name).resolve())
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=11).eval()
    ckpt = work / "model.safetensors"
    save_native(model, ckpt)
    settings = TilingSettings(mode="slide", window=(args.window,) * 2, stride=(args.stride,) * 2, batch_size=4)

    # plain loop
    torch.set_num_threads(os.cpu_count() or 1)
    clock = StageClock()  # the plain loop's own stages, for the comparison with the pipeline's
    scorer = clock.timed("forward", ModelScorer(model, torch.device("cpu")))
    t0 = time.perf_counter()
    for p in images:
        started = time.perf_counter()
        image = decode_image(p.read_bytes())
        clock.add("decode", time.perf_counter() - started)
        started, forward = time.perf_counter(), clock.seconds["forward"]
        seg = segment_images(scorer, [image], settings)[0]
        clock.add("stitch", time.perf_counter() - started - (clock.seconds["forward"] - forward))
        started = time.perf_counter()
        encode_chunks(seg.labels, None, 4096, 11)
        clock.add("encode", time.perf_counter() - started)
    plain = time.perf_counter() - t0
    plain_stages = dict(clock.seconds)

    cfg = load_config(
        {
            "run_id": "bench",
            "input": {"uri": str(subset), "pattern": "*.png", "labels": {"uri": str(labels)}},
            "model": {"checkpoint": str(ckpt)},
            "inference": {"mode": "slide", "window": [args.window] * 2, "stride": [args.stride] * 2, "batch_size": 4},
            "output": {"uri": str(work / "runs")},
            "metrics": {"ignore_index": 11},
        }
    )
    t0 = time.perf_counter()
    result = run_job(cfg, progress=lambda _: None)
    pipe = time.perf_counter() - t0
    steady = result.summary["throughput"]

    n = len(images)
    print(f"{n} CamVid val images ({images[0].name} ...), {args.model}, window {args.window} stride {args.stride}, {os.cpu_count()} cores")
    print(f"| {'path':<34} | {'seconds':>8} | {'images/s':>8} | {'ratio to plain':>14} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 16}|")
    print(f"| {'plain loop (one process)':<34} | {plain:8.1f} | {n / plain:8.2f} | {1.0:14.2f} |")
    print(f"| {'segpipe run (Ray, 1 CPU actor)':<34} | {pipe:8.1f} | {n / pipe:8.2f} | {plain / pipe:14.2f} |")
    print(
        f"(pipeline wall time includes Ray start-up and two model loads; run_job's own figure: {steady['images_per_second']:.2f} images/s)"
    )
    # where the time went: run.json's stage seconds, summed over the tasks and actors of the attempt
    attempt = json.loads((Path(result.run_dir) / "run.json").read_text())["attempts"][-1]
    stages, wall = attempt["stages"], attempt["seconds"]
    actor = stages["forward"] + stages["stitch"] + stages["encode"]
    print()
    print(f"| stage | pipeline seconds (attempt wall {wall:.1f} s) | share of wall | plain loop seconds (wall {plain:.1f} s) |")
    print("|---|---:|---:|---:|")
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds:.1f} | {seconds / wall:.0%} | {plain_stages.get(stage, 0.0):.1f} |")
    print(f"| actor idle (wall - forward - stitch - encode) | {wall - actor:.1f} | {(wall - actor) / wall:.0%} |")


if __name__ == "__main__":
    main()
