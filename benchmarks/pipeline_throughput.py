"""Pipeline overhead on real images: `segpipe run` next to a plain single-process loop.

    python benchmarks/pipeline_throughput.py --data ../shared/data/camvid --split train --limit 300
    python benchmarks/pipeline_throughput.py --device cuda --precisions fp32 bf16 --synthetic 400 --markdown out.md

Both segment the same images with the same SegFormer (random weights: the speed does not depend on
the weights), the same sliding window and the same backend (`--backend`: inference.backend). The plain loop reads, decodes, runs `segment_images` and
PNG-encodes in one process, with all of this machine's threads (or on the GPU); the pipeline is a
local Ray job (read/decode tasks, one model actor: on the GPU with --device cuda, a writer actor)
that also writes Parquet and computes metrics. Images: CamVid's (`--data`, `--split`), or with
`--synthetic N` (or where `--data` has no such split, as on a machine without the dataset) N
synthetic 360 x 480 street-like scenes with labels, written as PNGs first.

Figures, per precision: the pipeline's wall time (Ray start-up, two model loads and the actors'
start included), its steady rate (run_job's own figure: from the plan's start, Ray's start not
included), and the fixed cost of a run measured apart: `segpipe run` over one image. Then where
the time went, stage by stage (run.json's stage seconds, summed over tasks and actors) next to the
plain loop's. `--markdown PATH` appends one row to the Markdown table in PATH (benchmarks/gpu.sh's
table: a column per precision).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import ray
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # --synthetic: the tests' synthetic scene

from models import build_model, save_native
from models.onnx_backend import run_with_onnxruntime
from pipeline.config import load_config
from pipeline.io.decode import decode_image
from pipeline.plan import run_job
from pipeline.predict.predictor import ModelScorer
from pipeline.predict.tiling import TilingSettings, segment_images
from pipeline.results.masks import encode_chunks
from pipeline.telemetry import StageClock

NUM_CLASSES = 11  # CamVid's


@dataclass
class Measured:
    precision: str
    plain_seconds: float
    plain_stages: dict[str, float]
    pipe_seconds: float
    steady_images_per_second: float
    attempt_seconds: float
    stages: dict[str, float] = field(default_factory=dict)


def prepare_images(args: argparse.Namespace, work: Path) -> tuple[Path, Path, list[Path], str]:
    """(images folder, labels folder, the images, what they are): CamVid's linked, or synthetic ones written."""
    images_dir, labels_dir = work / "images", work / "labels"
    images_dir.mkdir()
    labels_dir.mkdir()
    source = Path(args.data) / args.split
    if not args.synthetic and source.is_dir():
        chosen = sorted(source.glob("*.png"))[: args.limit]
        for p in chosen:
            (images_dir / p.name).symlink_to(p.resolve())
            (labels_dir / p.name).symlink_to((Path(args.data) / f"{args.split}annot" / p.name).resolve())
        return images_dir, labels_dir, sorted(images_dir.glob("*.png")), f"CamVid {args.split} 360x480"
    from helpers import scene_pixels

    count = args.synthetic or args.limit
    for i in range(count):
        pixels = scene_pixels(37 * i, 53 * i, 360, 480)  # a different crop of the scene each
        Image.fromarray(pixels).save(images_dir / f"scene-{i:05d}.png")
        Image.fromarray((pixels[..., 0] // 24).astype(np.uint8)).save(labels_dir / f"scene-{i:05d}.png")
    return images_dir, labels_dir, sorted(images_dir.glob("*.png")), "synthetic 360x480"


def plain_loop(model: torch.nn.Module, images: list[Path], settings: TilingSettings, device: torch.device, precision: str):
    """Seconds of the plain loop over `images`, and its stage seconds."""
    segment_images(ModelScorer(model, device, precision), [decode_image(images[0].read_bytes())], settings)  # warm-up (CUDA, kernels)
    clock = StageClock()  # the plain loop's own stages, for the comparison with the pipeline's
    scorer = ModelScorer(model, device, precision, clock)
    started_loop = time.perf_counter()
    for p in images:
        started = time.perf_counter()
        image = decode_image(p.read_bytes())
        clock.add("decode", time.perf_counter() - started)
        started, model_seconds = time.perf_counter(), clock.model_seconds()
        seg = segment_images(scorer, [image], settings)[0]
        clock.add("stitch", time.perf_counter() - started - (clock.model_seconds() - model_seconds))
        started = time.perf_counter()
        encode_chunks(seg.labels, None, 4096, NUM_CLASSES)
        clock.add("encode", time.perf_counter() - started)
    return time.perf_counter() - started_loop, dict(clock.seconds)


def job_config(
    args: argparse.Namespace, images_dir: Path, labels_dir: Path, checkpoint: Path, out: Path, precision: str, run_id: str
) -> dict:
    """The job's config as YAML would give it (load_config validates it)."""
    return {
        "run_id": run_id,
        "input": {"uri": str(images_dir), "pattern": "*.png", "labels": {"uri": str(labels_dir)}},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {
            "mode": "slide",
            "window": [args.window] * 2,
            "stride": [args.stride] * 2,
            "batch_size": args.batch,
            "precision": precision,
            "backend": args.backend,
        },
        "resources": {"actors": 1, "gpus_per_actor": 1 if args.device == "cuda" else 0},
        "output": {"uri": str(out)},
        "metrics": {"ignore_index": NUM_CLASSES},
    }


def fixed_cost(args: argparse.Namespace, images: list[Path], checkpoint: Path, work: Path) -> float:
    """Wall seconds of `segpipe run` over one image in a process of its own (imports, Ray's start,
    the actors' start, the model loads, the run's files): what every run pays whatever its size."""
    one, one_labels = work / "one", work / "one-labels"
    one.mkdir()
    one_labels.mkdir()
    (one / images[0].name).symlink_to(images[0].resolve())
    (one_labels / images[0].name).symlink_to((work / "labels" / images[0].name).resolve())
    config = work / "one.yaml"
    config.write_text(yaml.safe_dump(job_config(args, one, one_labels, checkpoint, work / "runs-one", "fp32", "one")))
    # `python -m jobs.cli`: the `segpipe` command, whether or not the package is installed where this runs
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(config)], check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/camvid")
    parser.add_argument("--split", default="val", help="val (101 images) or train (367)")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--synthetic", type=int, default=0, help="N synthetic images instead of CamVid's")
    parser.add_argument("--model", default="segformer-b0")
    parser.add_argument("--window", type=int, default=360)
    parser.add_argument("--stride", type=int, default=240)
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32"])
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch", help="inference.backend (the plain loop's too)")
    parser.add_argument("--no-fixed-cost", action="store_true", help="skip the one-image run")
    parser.add_argument("--markdown", help="append a row to the Markdown table in this file (gpu.sh's)")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)

    work = Path(tempfile.mkdtemp(prefix="segpipe-bench-"))
    images_dir, labels_dir, images, what = prepare_images(args, work)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=NUM_CLASSES).eval()
    checkpoint = work / "model.safetensors"
    save_native(model, checkpoint)
    model.to(device)
    if args.backend == "onnxruntime":
        run_with_onnxruntime(model)
    settings = TilingSettings(mode="slide", window=(args.window,) * 2, stride=(args.stride,) * 2, batch_size=args.batch)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    results = []
    for precision in args.precisions:
        plain, plain_stages = plain_loop(model, images, settings, device, precision)
        cfg = load_config(job_config(args, images_dir, labels_dir, checkpoint, work / "runs", precision, f"bench-{precision}"))
        started = time.perf_counter()
        result = run_job(cfg, progress=lambda _: None)
        pipe = time.perf_counter() - started
        attempt = json.loads((Path(result.run_dir) / "run.json").read_text())["attempts"][-1]
        steady = result.summary["throughput"]["images_per_second"]
        results.append(Measured(precision, plain, plain_stages, pipe, steady, attempt["seconds"], attempt["stages"]))
        ray.shutdown()  # each run starts its own Ray, as `segpipe run` does
    fixed = None if args.no_fixed_cost else fixed_cost(args, images, checkpoint, work)

    n = len(images)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"{n} images ({what}), {args.model} ({args.backend}), window {args.window} stride {args.stride}, batch {args.batch}, {gpu}")
    print(f"| {'path':<44} | {'precision':>9} | {'seconds':>8} | {'images/s':>8} | {'ratio to plain':>14} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 16}|")
    for m in results:
        print(
            f"| {'plain loop (one process)':<44} | {m.precision:>9} | {m.plain_seconds:8.1f} | {n / m.plain_seconds:8.2f} | {1.0:14.2f} |"
        )
        print(
            f"| {'segpipe run, wall (Ray start included)':<44} | {m.precision:>9} | {m.pipe_seconds:8.1f} | {n / m.pipe_seconds:8.2f} | {m.plain_seconds / m.pipe_seconds:14.2f} |"
        )
        ratio = m.steady_images_per_second * m.plain_seconds / n
        print(
            f"| {'segpipe run, steady (run_job: from the plan)':<44} | {m.precision:>9} | {m.attempt_seconds:8.1f} | {m.steady_images_per_second:8.2f} | {ratio:14.2f} |"
        )
    if fixed is not None:
        print(f"fixed cost of a run (`segpipe run` over 1 image in a process of its own, fp32): {fixed:.1f} s")
    for m in results:
        # where the time went: run.json's stage seconds, summed over the tasks and actors of the attempt
        wall = m.attempt_seconds
        actor = m.stages["transfer"] + m.stages["forward"] + m.stages["stitch"] + m.stages["encode"]
        print()
        print(
            f"| stage ({m.precision}) | pipeline seconds (attempt wall {wall:.1f} s) | share of wall | plain loop seconds (wall {m.plain_seconds:.1f} s) |"
        )
        print("|---|---:|---:|---:|")
        for stage, seconds in m.stages.items():
            print(f"| {stage} | {seconds:.1f} | {seconds / wall:.0%} | {m.plain_stages.get(stage, 0.0):.1f} |")
        print(f"| actor idle (wall - transfer - forward - stitch - encode) | {wall - actor:.1f} | {(wall - actor) / wall:.0%} |")
    if args.markdown:
        write_markdown_row(args, results, n, what, fixed)


def write_markdown_row(args: argparse.Namespace, results: list[Measured], n: int, what: str, fixed: float | None) -> None:
    """One row of gpu.sh's table (family | model | input | batch | measure | fp32 | bf16 | fp16)."""
    cells = {}
    for m in results:
        steady = m.steady_images_per_second * m.plain_seconds / n
        cells[m.precision] = (
            f"plain {n / m.plain_seconds:.1f} img/s, run {n / m.pipe_seconds:.1f} img/s wall = {m.plain_seconds / m.pipe_seconds:.2f}x, "
            f"steady {m.steady_images_per_second:.1f} img/s = {steady:.2f}x"
        )
    measure = f"segpipe run / bare loop ({args.device}{f', fixed cost {fixed:.1f} s' if fixed is not None else ''})"
    row = [
        "pipeline",
        args.model,
        f"{n} {what}",
        str(args.batch),
        measure,
        *(cells.get(p, "not run") for p in ("fp32", "bf16", "fp16")),
    ]
    with open(args.markdown, "a") as out:
        out.write("| " + " | ".join(row) + " |\n")


if __name__ == "__main__":
    main()
