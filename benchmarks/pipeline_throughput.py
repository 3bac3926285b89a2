"""Pipeline overhead on real images: `segpipe run` next to a plain single-process loop.

    python benchmarks/pipeline_throughput.py --data ../shared/data/camvid --split train --limit 300
    python benchmarks/pipeline_throughput.py --device cuda --precisions fp32 bf16 --synthetic 400 --markdown out.md
    python benchmarks/pipeline_throughput.py --null-model --synthetic 8 --size 1024x2048 --classes 19

Both segment the same images with the same SegFormer (random weights: the speed does not depend on
the weights), the same sliding window and the same backend (`--backend`: inference.backend). The plain loop reads, decodes, runs `segment_images` and
PNG-encodes in one process, with all of this machine's threads (or on the GPU); the pipeline is a
local Ray job (read/decode tasks, one model actor: on the GPU with --device cuda, a writer actor)
that also writes Parquet and computes metrics. Images: CamVid's (`--data`, `--split`), or with
`--synthetic N` (or where `--data` has no such split, as on a machine without the dataset) N
synthetic street-like scenes with labels, `--size` (360x480; Cityscapes' 1024x2048), written as PNGs first.

`--null-model`: the model is one whose forward costs nothing (`NullModel`, registered here as
"null" in this process and, through a worker setup hook, in every Ray worker: a fixed smooth
score field of the right shape, so that the masks are as varied as a real model's and PNG encoding
is not flattered by all-zero masks). What is left is the rest of the pipeline: read, decode, windows
in and out, stitching, encoding, class areas, writing. Its rate per CPU core is the ceiling that
the pipeline puts on images/s at that size, whatever the accelerator.

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

import models.registry
from models import build_model, save_native
from models.base import SegmentationModel
from models.onnx_backend import run_with_onnxruntime
from pipeline.config import load_config
from pipeline.io.decode import decode_image, decode_label
from pipeline.local_ray import init_local, ray_init_kwargs, starts_local_ray
from pipeline.plan import IMAGES_PER_PREDICT_BATCH, run_job
from pipeline.predict.predictor import ModelScorer
from pipeline.predict.tiling import TilingSettings, segment_images
from pipeline.results.masks import encode_chunks
from pipeline.telemetry import StageClock

NUM_CLASSES = 11  # CamVid's (--classes: Cityscapes has 19)
NULL_STRIDE = 4  # the null model's output stride: SegFormer's, so that the stitcher resizes as it would


class NullModel(SegmentationModel):
    """A model whose forward costs nothing: for N x 3 x H x W it returns a fixed smooth field of
    class scores N x C x H/4 x W/4 (made once per shape, copied), no weights."""

    family = "null"

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(arch={"num_classes": num_classes}, num_classes=num_classes)
        self.fields: dict[tuple, torch.Tensor] = {}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = pixels.shape
        key = (h, w, pixels.device)
        if key not in self.fields:
            generator = torch.Generator().manual_seed(0)
            coarse = torch.randn(1, self.num_classes, max(1, h // 64), max(1, w // 64), generator=generator)
            size = (max(1, h // NULL_STRIDE), max(1, w // NULL_STRIDE))
            self.fields[key] = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False).to(pixels.device)
        return self.fields[key].expand(n, -1, -1, -1).clone()


def register_null_model() -> None:
    """Register NullModel as "null" in this process's model registry (also Ray's worker setup hook: every worker's)."""
    models.registry.MODELS["null"] = NullModel


@dataclass
class Measured:
    precision: str
    plain_seconds: float
    plain_stages: dict[str, float]
    pipe_seconds: float
    steady_images_per_second: float
    attempt_seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    forward_busy_share: float | None = None  # run.json's attempts[].actors.forward_busy_share (None: not recorded)

    @property
    def busy(self) -> str:
        return "n/a" if self.forward_busy_share is None else f"{self.forward_busy_share:.0%}"


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
    height, width = args.size
    for i in range(count):
        pixels = scene_pixels(37 * i, 53 * i, height, width)  # a different crop of the scene each
        Image.fromarray(pixels).save(images_dir / f"scene-{i:05d}.png")
        Image.fromarray((pixels[..., 0] // 24 % args.classes).astype(np.uint8)).save(labels_dir / f"scene-{i:05d}.png")
    return images_dir, labels_dir, sorted(images_dir.glob("*.png")), f"synthetic {height}x{width}"


def plain_loop(model: torch.nn.Module, images: list[Path], settings: TilingSettings, device: torch.device, precision: str, classes: int):
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
        encode_chunks(seg.labels, None, 4096, classes)
        clock.add("encode", time.perf_counter() - started)
    return time.perf_counter() - started_loop, dict(clock.seconds)


def actor_rates(cfg, images: list[Path], labels_dir: Path, threads: int) -> dict[str, float]:
    """Images/s of the model actor (pipeline.predict.predictor.Predictor, a plain class in this
    process, on `threads` torch threads) over the decoded images in its batches: serial and, where
    the actor has it, pipelined (the next windows gathered and finished images encoded on threads of
    its own). Nothing else: no read, no decode, no write."""
    from pipeline.predict.predictor import Predictor
    from pipeline.rows import DecodedImage, to_columns

    rows = []
    for i, p in enumerate(images):
        image = decode_image(p.read_bytes())
        label = decode_label((labels_dir / p.name).read_bytes())
        rows.append(DecodedImage(unit=i, image_id=p.name, image=image, label=label, height=image.shape[0], width=image.shape[1]))
    batches = [
        to_columns([r.to_record() for r in rows[k : k + IMAGES_PER_PREDICT_BATCH]]) for k in range(0, len(rows), IMAGES_PER_PREDICT_BATCH)
    ]
    rates = {}
    for mode, kwargs in (("serial", {"pipelined": False}), ("pipelined", {"pipelined": True})):
        try:
            actor = Predictor(cfg, num_threads=threads, **kwargs)
        except TypeError:  # an actor of before the pipelined one: serial only
            if mode == "pipelined":
                continue
            actor = Predictor(cfg, num_threads=threads)
        actor(batches[0])  # warm-up
        started = time.perf_counter()
        for batch in batches:
            actor(batch)
        rates[mode] = len(rows) / (time.perf_counter() - started)
    return rates


def job_config(
    args: argparse.Namespace, images_dir: Path, labels_dir: Path, checkpoint: Path, out: Path, precision: str, run_id: str
) -> dict:
    """The job's config as YAML would give it (load_config validates it)."""
    return {
        "run_id": run_id,
        "input": {"uri": str(images_dir), "pattern": "*.png", "labels": {"uri": str(labels_dir)}},
        "model": {"name": "null", "num_classes": args.classes} if args.null_model else {"checkpoint": str(checkpoint)},
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
        "metrics": {"ignore_index": args.classes},
    }


def start_ray(**extra) -> None:
    """A local Ray as the `segpipe` program starts one (pipeline.local_ray's lean node: no autoscaler
    monitor, log monitor or API server), so that the run's wall time is the program's; a cluster
    (RAY_ADDRESS) is joined as the program joins it."""
    if starts_local_ray():
        init_local(**extra)
    else:
        ray.init(**{**ray_init_kwargs(False), **extra})


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
    parser.add_argument("--null-model", action="store_true", help="a model whose forward costs nothing: the rest of the pipeline's ceiling")
    parser.add_argument("--size", type=size_arg, default=(360, 480), help="HxW of the synthetic images (Cityscapes: 1024x2048)")
    parser.add_argument("--classes", type=int, default=NUM_CLASSES, help="the model's classes (Cityscapes: 19)")
    parser.add_argument("--window", type=int, default=360)
    parser.add_argument("--stride", type=int, default=240)
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32"])
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch", help="inference.backend (the plain loop's too)")
    parser.add_argument("--no-fixed-cost", action="store_true", help="skip the one-image run")
    parser.add_argument("--markdown", help="append a row to the Markdown table in this file (gpu.sh's)")
    args = parser.parse_args()
    if args.null_model:
        args.model, args.no_fixed_cost = "null", True  # the one-image run is a process of its own: no null model there
        register_null_model()
        start_ray(runtime_env={"worker_process_setup_hook": register_null_model})
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)

    work = Path(tempfile.mkdtemp(prefix="segpipe-bench-"))
    images_dir, labels_dir, images, what = prepare_images(args, work)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.classes).eval()
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
        plain, plain_stages = plain_loop(model, images, settings, device, precision, args.classes)
        cfg = load_config(job_config(args, images_dir, labels_dir, checkpoint, work / "runs", precision, f"bench-{precision}"))
        started = time.perf_counter()
        if not ray.is_initialized():
            start_ray()  # in the timed span: a run pays for its Ray's start
        result = run_job(cfg, progress=lambda _: None)
        pipe = time.perf_counter() - started
        attempt = json.loads((Path(result.run_dir) / "run.json").read_text())["attempts"][-1]
        steady = result.summary["throughput"]["images_per_second"]
        busy = (attempt.get("actors") or {}).get("forward_busy_share")
        results.append(Measured(precision, plain, plain_stages, pipe, steady, attempt["seconds"], attempt["stages"], busy))
        if not args.null_model:  # each run starts its own Ray, as `segpipe run` does (the null model's Ray, with its hook, stays)
            ray.shutdown()
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
        print(f"forward busy share of the model actor's calls ({m.precision}): {m.busy}")
    if args.null_model:
        ray.shutdown()
        m = results[0]
        # every stage's seconds of the run, summed over its processes: what an image costs the CPUs
        # beside the model (one thread a stage), whose inverse is the most a core can do
        per_image = sum(v for k, v in m.stages.items() if k != "forward") / n
        rates = actor_rates(
            load_config(job_config(args, images_dir, labels_dir, checkpoint, work / "runs", "fp32", "actor")), images, labels_dir, 1
        )
        print(
            f"null-model ceiling at {what} ({args.classes} classes, window {args.window} stride {args.stride}, batch {args.batch}): "
            f"{per_image:.3f} CPU seconds an image beside the model (run.json's stages) = "
            f"{1 / per_image:.2f} images/s per CPU core"
        )
        print(
            "  the model actor alone on one thread (decoded images in, masks and areas out): "
            + ", ".join(f"{mode} {rate:.2f} images/s" for mode, rate in rates.items())
            + f"; segpipe run steady {m.steady_images_per_second:.2f} images/s with start-up (fixed cost) included"
        )
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
            f"steady {m.steady_images_per_second:.1f} img/s = {steady:.2f}x, forward busy {m.busy}"
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


def size_arg(text: str) -> tuple[int, int]:
    """HxW (1024x2048) -> (1024, 2048)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HxW, e.g. 1024x2048, not {text!r}") from None
    return height, width


if __name__ == "__main__":
    main()
