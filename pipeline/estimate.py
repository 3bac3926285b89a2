"""A dry run: what a job would do and cost, from the listing and the image headers alone.

`segpipe run CONFIG --dry-run` prepares the job as a real run does (listing, model, run identity,
what earlier attempts or runs of the job hold), then reads each remaining image's header in the read
tasks (no pixels are decoded), counts pixels and sliding windows, times the model on one batch of
windows in an actor sized like the job's, and writes `plan.json` in the run directory. It writes
no masks, metrics or errors. The estimate is the run's fixed cost (listing, Ray's start, the actors'
start and model load, the plan's start and end: each measured here) plus the batches' time.

A clip model (VisTR) runs one forward per clip, not per window: its dry run counts the clips left to
run (a clip whose owned frames are all committed is not run again; one partly committed runs whole)
from the video headers, times one forward of a clip of `clip_length` frames at the first clip's
frame size (the model scales frames to a shorter side of 300, so frames of one aspect ratio cost
alike), and estimates clips x that forward / actors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.config import JobConfig
from pipeline.io.decode import DecodeError, image_size
from pipeline.io.source import reader_for
from pipeline.io.storage import StoreStats, open_fs, with_retries
from pipeline.plan import ActorPlan, await_gpus, format_seconds, init_ray, prepare_job, ray_lines_to, size_actors
from pipeline.predict.tiling import TilingSettings, model_inputs
from pipeline.redaction import scrub
from pipeline.rows import SourceUnit

HEADER_BYTES = 64 * 1024  # enough for the header of a PNG, a JPEG with its EXIF, a TIFF's first IFD


def read_headers(row: dict[str, Any], *, cfg: JobConfig) -> Iterator[dict[str, Any]]:
    """A read task of the dry run: (image_id, height, width, error, clip_frames, seconds) per image of
    a unit, from headers; `seconds`: the time its header took to read (what the plan's own overhead is
    not); `clip_frames`: a clip unit's frames on its first row (one forward), else 0."""
    last = time.perf_counter()
    for header in _unit_headers(row, cfg):
        now = time.perf_counter()
        yield {"clip_frames": 0, **header, "seconds": now - last}
        last = now


def _unit_headers(row: dict[str, Any], cfg: JobConfig) -> Iterator[dict[str, Any]]:
    """(image_id, height, width, error) per image of a unit. Image files are read by their first
    bytes (the whole file only when the header lies further in); tar and Parquet images come with
    their shard's bytes, and only their headers are parsed."""
    unit = SourceUnit.from_record(row)
    inp = cfg.input
    if unit.format in ("video", "clip"):  # every frame of a video has its header's size: no frame decoded
        from pipeline.io.video import probe_video

        try:
            info, error = probe_video(unit.uris[0], inp.storage_options), ""
        except Exception as exc:  # not a video: the real run's errors row
            info, error = None, scrub(f"{type(exc).__name__}: {exc}", inp.storage_options)
        # a clip unit: the frames it writes (owns and has not committed), one forward of all its frames
        owned = unit.owned if unit.format == "clip" else (True,) * len(unit.image_ids)
        forward = len(unit.image_ids) if unit.format == "clip" and info is not None else 0
        for image_id in (i for i, own in zip(unit.image_ids, owned) if own):
            header = {"image_id": image_id, "height": info.height if info else 0, "width": info.width if info else 0, "error": error}
            yield {**header, "clip_frames": forward} if forward else header
            forward = 0
        return
    if unit.format != "images":
        for sample in reader_for(inp).read_unit(unit, StoreStats()):
            if sample.stream is not None:
                yield {"image_id": sample.image_id, "height": sample.stream.height, "width": sample.stream.width, "error": ""}
                continue
            yield _header_row(sample.image_id, lambda s=sample: s.image_bytes or b"", sample.error, cfg)
        return
    from pipeline.io.tiff import probe_stream

    fs, _ = open_fs(inp.uri, inp.storage_options)
    for uri, image_id, label_uri in zip(unit.uris, unit.image_ids, unit.label_uris or [None] * len(unit.uris)):
        try:
            stream = probe_stream(uri, label_uri, inp)
        except Exception as exc:  # a bomb or a damaged TIFF header: the real run's error row
            yield {"image_id": image_id, "height": 0, "width": 0, "error": scrub(str(exc), inp.storage_options)}
            continue
        if stream is not None:
            yield {"image_id": image_id, "height": stream.height, "width": stream.width, "error": ""}
            continue

        def prefix(uri: str = uri) -> bytes:
            return with_retries(lambda: fs.cat_file(uri, start=0, end=HEADER_BYTES), what="read", uri=uri)

        def whole(uri: str = uri) -> bytes:
            return with_retries(lambda: fs.cat_file(uri), what="read", uri=uri)

        yield _header_row(image_id, prefix, None, cfg, whole)


def _header_row(image_id: str, first_bytes, error: str | None, cfg: JobConfig, all_bytes=None) -> dict[str, Any]:
    if error:
        return {"image_id": image_id, "height": 0, "width": 0, "error": error}
    inp = cfg.input
    try:
        try:
            height, width = image_size(first_bytes(), inp.max_pixels, exif_transpose=inp.exif_transpose)
        except DecodeError:
            if all_bytes is None:
                raise
            height, width = image_size(all_bytes(), inp.max_pixels, exif_transpose=inp.exif_transpose)
    except Exception as exc:  # unreadable: the real run makes it an error row
        return {"image_id": image_id, "height": 0, "width": 0, "error": scrub(f"{type(exc).__name__}: {exc}", inp.storage_options)}
    return {"image_id": image_id, "height": height, "width": width, "error": ""}


def windows_of(height: int, width: int, cfg: JobConfig) -> int:
    """Model inputs one image takes: its sliding windows (slide mode) or one pass (whole mode), times
    the test-time augmentation views."""
    inference = cfg.inference
    return model_inputs(height, width, TilingSettings.from_config(inference), views=inference.tta.views)


def time_forward(cfg: JobConfig, threads: int, repeats: int = 3, clip_frame: tuple[int, int] | None = None) -> dict[str, Any]:
    """In the process it runs in: seconds for one forward pass, the median of `repeats` after a
    warm-up, of `inference.batch_size` windows, or with `clip_frame` (a clip model: the frames' height
    and width) of one clip of `inference.clip_length` such frames, scaled as the run scales them."""
    loading = time.perf_counter()
    import torch

    from pipeline.predict.clip_frames import clip_inputs
    from pipeline.predict.job_model import load_job_model
    from pipeline.predict.predictor import DTYPES, ModelScorer

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_job_model(cfg.model).to(device)
    loaded = time.perf_counter()
    if clip_frame is not None:
        frames, (height, width) = cfg.inference.clip_length, clip_frame
        pixels = np.random.default_rng(0).integers(0, 256, (frames * height, width, 3), dtype=np.uint8)
        inputs = clip_inputs(model, pixels, frames, height, width)

        precision = cfg.inference.precision

        def forward() -> None:  # as the actors' clip forward (pipeline.predict.predictor)
            with torch.inference_mode(), torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
                model(model.normalize(inputs.to(device)))
    else:
        scorer = ModelScorer(model, device, cfg.inference.precision)
        h, w = cfg.inference.window
        windows = torch.randint(0, 256, (cfg.inference.batch_size, 3, h, w), dtype=torch.uint8).float()

        def forward() -> None:
            scorer(windows)

    forward()  # warm-up: allocations, kernel selection
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {
        "seconds": float(np.median(seconds)),
        "device": str(device),
        "threads": threads,
        "load_seconds": loaded - loading,  # imports and the model's load, as an actor's start does
        "task_seconds": time.perf_counter() - loading,
    }


def time_one_batch(cfg: JobConfig, actors: ActorPlan, repeats: int = 3, clip_frame: tuple[int, int] | None = None) -> dict[str, Any]:
    """`time_forward` in an actor with the job's actors' resources (its GPU where they get one), and
    how long that actor took to start and load the model (`actor_start_seconds`)."""
    import ray

    @ray.remote(num_cpus=actors.num_cpus, num_gpus=actors.num_gpus)
    class TimedBatch:  # an actor, as the job's: a process of its own, started for it
        def run(self, cfg: JobConfig, threads: int) -> dict[str, Any]:
            return time_forward(cfg, threads, repeats, clip_frame)

    submitted = time.perf_counter()
    timer = TimedBatch.remote()
    try:
        timing = ray.get(timer.run.remote(cfg, actors.threads))
    finally:
        ray.kill(timer)
    # the actor process's start (what its own clock misses) plus the imports and the model's load
    timing["actor_start_seconds"] = time.perf_counter() - submitted - timing["task_seconds"] + timing["load_seconds"]
    return timing


def model_inputs_of(rows: list[dict[str, Any]], cfg: JobConfig, clip_model: bool) -> tuple[list[int], int]:
    """What the model runs on for the readable `rows` (read_headers'): per image its windows, and the
    forward passes: ceil(windows / batch_size) batches; a clip model's run: no windows, one forward per
    clip to run (the rows that carry `clip_frames`)."""
    ok = [r for r in rows if not r["error"]]
    if clip_model:
        return [], sum(1 for r in ok if r.get("clip_frames"))
    windows = [windows_of(r["height"], r["width"], cfg) for r in ok]
    return windows, math.ceil(int(sum(windows)) / cfg.inference.batch_size)


def dry_run(cfg: JobConfig, *, incremental: bool = False, verbose: bool = False) -> dict[str, Any]:
    """plan.json of the job: what it would segment, and an estimate of how long it would take."""
    import ray

    started = time.time()
    job = prepare_job(cfg, incremental=incremental)
    listing_seconds = time.time() - started
    cfg = job.cfg
    with ray_lines_to(job.log_path, echo=verbose):
        ray_start = time.time()
        init_ray(verbose)
        ray_seconds = time.time() - ray_start
        await_gpus(cfg, lambda line: None)
        actors = size_actors(cfg)
        header_start = time.time()
        rows: list[dict] = []
        if job.units:
            ds = ray.data.from_items([u.to_record() for u in job.units], override_num_blocks=len(job.units))
            rows = ds.flat_map(read_headers, fn_kwargs={"cfg": cfg}).take_all()
        header_seconds = time.time() - header_start
        clip_model = job.model_info.get("input_kind") == "clip"
        ok = [r for r in rows if not r["error"]]
        # a clip model is timed on a clip of the first clip's frame size
        clip_frame = next(((r["height"], r["width"]) for r in ok if r.get("clip_frames")), None) if clip_model else None
        timing = time_one_batch(cfg, actors, clip_frame=clip_frame)
    windows, batches = model_inputs_of(rows, cfg, clip_model)
    total_windows = int(sum(windows))
    segmenting = batches * timing["seconds"] / max(actors.actors, 1)
    # what a run costs whatever its size, each part measured by this dry run but the plan's own
    fixed = {
        "listing": round(listing_seconds, 1),
        "ray_start": round(ray_seconds, 1),  # 0 where Ray was running already (RAY_ADDRESS, a Ray job)
        "actor_start": round(timing["actor_start_seconds"], 1),  # the actors start side by side
        # a Ray Data plan's start and end: this dry run's header plan less the reading itself
        "plan": round(max(0.0, header_seconds - sum(r["seconds"] for r in rows) / max(actors.read_tasks, 1)), 1),
    }
    estimate = sum(fixed.values()) + segmenting
    plan = {
        "run_id": cfg.run_id,
        "job": cfg.job,
        "images_listed": job.listed,
        # an archive larger than input.listing_batch: the estimate covers the first batch only
        "listing_complete": job.listing.exhausted,
        "images_done_earlier": job.done,
        "images": len(rows),
        "images_unreadable": len(rows) - len(ok),
        "unreadable": [{"image_id": r["image_id"], "error": r["error"]} for r in rows if r["error"]][:20],
        "pixels": int(sum(r["height"] * r["width"] for r in ok)),
        "windows": total_windows,
        "windows_per_image": {
            "min": int(min(windows)) if windows else 0,
            "median": float(np.median(windows)) if windows else 0.0,
            "max": int(max(windows)) if windows else 0,
        },
        "window": list(cfg.inference.window) if cfg.inference.mode == "slide" and not clip_model else None,
        "batch_size": cfg.inference.batch_size,
        # a clip model's run: the clips to run, one forward each (batch_seconds: one clip's), no windows
        "clips": batches if clip_model else None,
        "clip_length": cfg.inference.clip_length if clip_model else None,
        "listing_seconds": round(listing_seconds, 3),
        "header_seconds": round(header_seconds, 3),
        "batch_seconds": round(timing["seconds"], 4),
        "timed_on": timing["device"],
        "actors": vars(actors),
        "estimated_seconds": round(estimate, 1),
        "segmenting_seconds": round(segmenting, 1),
        "fixed_seconds": fixed,
        "estimate_basis": "fixed_seconds, each measured by this dry run (the listing, Ray's start, an actor's start and "
        "model load, a Ray Data plan's start and end) + "
        + (
            "clips x one clip's timed forward (clip_length frames at the first clip's frame size) / actors"
            if clip_model
            else "ceil(windows / batch_size) batches x the timed batch / actors"
        )
        + "; decoding, reading and writing run beside the model, and the imports, summary and Ray's shutdown (a few "
        "seconds) are not counted",
        "dry_run_seconds": round(time.time() - started, 1),
        "incremental": job.record.incremental,
    }
    job.store.write_json("plan.json", plan)
    job.store.save_log("dry-run", job.log_path, cfg.input.storage_options, cfg.output.storage_options)
    plan["path"] = f"{job.store.uri}/plan.json"
    return plan


def _fixed_words(plan: dict) -> str:
    f = plan["fixed_seconds"]
    return (
        f"start-up {format_seconds(sum(f.values()))} (listing {f['listing']:.1f} s, Ray {f['ray_start']:.1f} s, "
        f"actors and model load {f['actor_start']:.1f} s, plan {f['plan']:.1f} s)"
    )


def format_plan(plan: dict) -> str:
    if plan.get("clips") is not None:  # a clip model: one forward per clip
        work = f"  pixels {plan['pixels']:,}   clips {plan['clips']:,} of {plan['clip_length']} frames   unreadable {plan['images_unreadable']}"
        forwards = f"{plan['clips']} clips at {plan['batch_seconds']:.3f} s each"
    else:
        work = (
            f"  pixels {plan['pixels']:,}   windows {plan['windows']:,} (per image {plan['windows_per_image']['min']}"
            f"..{plan['windows_per_image']['max']})   unreadable {plan['images_unreadable']}"
        )
        forwards = (
            f"{math.ceil(plan['windows'] / plan['batch_size'])} batches of {plan['batch_size']} windows at {plan['batch_seconds']:.3f} s"
        )
    lines = [
        f"dry run {plan['run_id']}: {plan['images']} of {plan['images_listed']} images to segment"
        + (f" ({plan['images_done_earlier']} done earlier)" if plan["images_done_earlier"] else ""),
        work,
        f"  estimate: about {format_seconds(plan['estimated_seconds'])} = {_fixed_words(plan)} + segmenting "
        f"{format_seconds(plan['segmenting_seconds'])} ({forwards} on {plan['timed_on']}, {plan['actors']['actors']} actors)",
        f"  this dry run took {format_seconds(plan['dry_run_seconds'])}: listing {plan['listing_seconds']:.1f} s, "
        f"headers {plan['header_seconds']:.1f} s",
        f"plan: {plan['path']}",
    ]
    return "\n".join(lines)
