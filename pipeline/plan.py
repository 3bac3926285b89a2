"""The Ray Data plan: the one place that wires the stages of a job.

    list units (driver: keys only)
      -> read + decode   (CPU tasks)       pipeline.source, pipeline.decode
      -> predict         (actor pool)      pipeline.predictor (tiling, model, stitching, encode, areas)
      -> write parts     (CPU tasks)       pipeline.sink
    driver: progress from the small rows the sink returns; summary.json from the written metrics.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.compute as pc

from pipeline.config import JobConfig, public_config
from pipeline.decode import DecodeError, decode_image, decode_label
from pipeline.metrics import ClassAreas, summarize
from pipeline.sink import AREAS, ERRORS, MASKS, METRICS, RunStore, write_results
from pipeline.source import RawSample, SourceUnit, list_units, read_unit
from pipeline.storage import StoreStats

log = logging.getLogger(__name__)

IMAGES_PER_PREDICT_BATCH = 4  # rows per actor call; windows are batched inside by inference.batch_size
ROWS_PER_PART = 64  # rows per written part (a part is one Parquet file per table)


@dataclass
class RunResult:
    run_id: str
    run_dir: str
    status: str  # "succeeded" | "failed"
    summary: dict
    message: str = ""


# ---- stage 1: read and decode (a Ray task per unit) -------------------------------------------

def read_and_decode(row: dict[str, Any], *, input_cfg: dict, stats_collector=None) -> Iterator[dict[str, Any]]:
    """One unit in, one decoded row per image out; a failure is a row with `error` set.
    What the store did (retries, failures) goes to the run's stats collector when the unit ends."""
    import ray

    from pipeline.config import InputConfig

    cfg = InputConfig.model_validate(input_cfg)
    unit = unit_from_row(row["unit"])
    skip = set(row.get("skip") or ())
    stats = StoreStats()
    try:
        for sample in read_unit(unit, cfg, stats):
            if sample.image_id in skip:  # committed by an earlier attempt of this run
                continue
            yield decode_sample(sample, cfg.max_pixels, unit.positions)
    finally:
        if stats_collector is not None:
            ray.get(stats_collector.add.remote(stats.as_dict()))  # before the task ends, so the driver sees it


def unit_from_row(data: dict[str, Any]) -> SourceUnit:
    """A SourceUnit back from the plain dict that travels in a Ray block (Arrow has no dataclasses)."""
    return SourceUnit(
        index=int(data["index"]),
        format=str(data["format"]),
        **{k: tuple(data.get(k) if data.get(k) is not None else ()) for k in ("uris", "label_uris", "image_ids", "positions")},
    )


def decode_sample(sample: RawSample, max_pixels: int, positions: tuple[int, ...] = ()) -> dict[str, Any]:
    """One decoded row per sample. A sample the read stage marked for streaming (`sample.stream`, a
    pipeline.huge.StreamSource: a TIFF too large to decode whole) is not decoded: its row says where
    it is (`stream_uri`, `stream_label_uri`) and how large, and the predictor reads it window by window."""
    index = positions[sample.index_in_unit] if positions else sample.index_in_unit
    stream = getattr(sample, "stream", None)
    out = {
        "unit": sample.unit,
        "index_in_unit": index,
        "image_id": sample.image_id,
        "image": np.zeros((0, 0, 3), np.uint8),
        "label": np.zeros((0, 0), np.int64),
        "has_label": False,
        "height": 0,
        "width": 0,
        "error": sample.error or "",
        "stage": "read" if sample.error else "",
        "stream_uri": "",  # set for an image to stream: the predictor reads it window by window
        "stream_label_uri": "",
    }
    if sample.error:
        return out
    if stream is not None:
        out.update(
            stream_uri=stream.uri, stream_label_uri=stream.label_uri or "", has_label=bool(stream.label_uri),
            height=stream.height, width=stream.width,
        )
        return out
    try:
        image = decode_image(sample.image_bytes, max_pixels)
        out.update(image=image, height=image.shape[0], width=image.shape[1])
    except DecodeError as exc:
        out.update(error=str(exc), stage="decode")
        return out
    if sample.label_bytes is not None:
        try:
            label = decode_label(sample.label_bytes, max_pixels)
        except DecodeError as exc:
            out.update(error=f"label: {exc}", stage="decode")
            return out
        if label.shape != image.shape[:2]:
            out.update(error=f"label is {label.shape[1]} x {label.shape[0]} but the image is {image.shape[1]} x {image.shape[0]}", stage="decode")
            return out
        out.update(label=label, has_label=True)
    return out


def _stats_collector_class():
    import ray

    @ray.remote(num_cpus=0)
    class StoreStatsCollector:
        """Sums the StoreStats that read tasks send (fire and forget) for run.json."""

        def __init__(self) -> None:
            self.total = StoreStats()

        def add(self, stats: dict) -> None:
            self.total.add(StoreStats(**stats))

        def get(self) -> dict:
            return self.total.as_dict()

    return StoreStatsCollector


# ---- actor sizing -------------------------------------------------------------------------------

@dataclass
class ActorPlan:
    actors: int
    num_cpus: float
    num_gpus: float
    threads: int
    note: str = ""


def plan_actors(cfg: JobConfig, cluster: dict[str, float]) -> ActorPlan:
    """Size the actor pool from what the cluster has.

    Read and write tasks need CPUs too: actors that hold every CPU starve them and the job hangs
    (seen with Ray 2.60 on 2 cores), so CPU actors together leave at least one CPU free.
    """
    cpus = float(cluster.get("CPU", 1))
    gpus = float(cluster.get("GPU", 0))
    want = cfg.resources
    notes = []
    num_gpus = want.gpus_per_actor
    if num_gpus > 0 and gpus < num_gpus:
        notes.append(f"the cluster has {gpus:g} GPUs: actors run on CPU")
        num_gpus = 0.0
    actors = want.actors
    if num_gpus > 0 and actors * num_gpus > gpus:
        actors = max(1, int(gpus // num_gpus))
        notes.append(f"{actors} actors fit on {gpus:g} GPUs")
    free = max(cpus - 1.0, 0.5)  # one CPU stays with the read and write tasks
    if num_gpus > 0:
        num_cpus = want.cpus_per_actor or 1.0
    else:
        share = free / actors
        if share < 0.25:
            actors = max(1, int(free / 0.25))
            share = free / actors
            notes.append(f"{actors} CPU actors fit on {cpus:g} CPUs")
        num_cpus = min(want.cpus_per_actor, share) if want.cpus_per_actor else share
        if want.cpus_per_actor and want.cpus_per_actor > share:
            notes.append(f"cpus_per_actor {want.cpus_per_actor:g} lowered to {share:g} so that read and write tasks can run")
    num_cpus = round(num_cpus, 3)
    # torch threads: the actors' share of the whole machine, not of their reservation. The CPU kept
    # for read and write tasks is mostly idle (decoding is cheap next to the model), and a 1-thread
    # actor on 2 cores ran at 0.38x a plain 2-thread loop (benchmarks/pipeline_throughput.py).
    threads = max(1, math.ceil(num_cpus)) if num_gpus > 0 else max(1, int(cpus // actors))
    return ActorPlan(actors, num_cpus, num_gpus, threads=threads, note="; ".join(notes))


# ---- the job --------------------------------------------------------------------------------------

def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local one starts
        ray.init(
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=os.environ.get("SEGPIPE_RAY_LOGS", "0") == "1",
            configure_logging=False,
        )


def run_job(cfg: JobConfig, progress: Callable[[str], None] = print) -> RunResult:
    import ray

    from pipeline.predictor import Predictor, load_job_model

    cfg = cfg.with_run_id()
    started = time.time()
    store = RunStore(cfg.output.uri, cfg.output.storage_options, cfg.run_id)
    store.discard_uncommitted()
    previous = store.read_json("run.json") or {}
    done = store.committed_image_ids()

    list_stats = StoreStats()
    units = list_units(cfg.input, list_stats)
    total_images = sum(len(u.uris) for u in units)
    units = [u for u in (drop_done(u, done) for u in units) if u.uris]
    todo = sum(len(u.uris) for u in units)

    model = load_job_model(cfg.model)  # on the driver too: fails fast on a bad checkpoint, names the classes
    num_classes = model.num_classes
    class_names = model.class_names or [str(i) for i in range(num_classes)]
    model_info = {"name": model.name, "family": model.family, "num_classes": num_classes, "class_names": class_names,
                  "checkpoint": cfg.model.checkpoint, "parameters": sum(p.numel() for p in model.parameters())}
    del model

    init_ray()
    collector = _stats_collector_class().remote()
    actor_plan = plan_actors(cfg, ray.cluster_resources())
    if actor_plan.note:
        progress(f"resources: {actor_plan.note}")
    run_info = {
        "run_id": cfg.run_id,
        "status": "running",
        "config": public_config(cfg),
        "model": model_info,
        "versions": package_versions(),
        "started": _iso(started),
        "resumed": bool(done),
        "attempts": previous.get("attempts", 0) + 1,
        "actors": vars(actor_plan),
        "counts": {"listed": total_images, "already_done": total_images - todo, "to_do": todo},
    }
    store.write_json("run.json", run_info)
    progress(f"run {cfg.run_id}: {todo} of {total_images} images to segment -> {store.uri}")

    processed = failed = 0
    if units:
        ds = build_dataset(cfg, units, actor_plan, binary=num_classes == 2, predictor_cls=Predictor,
                           skips=shard_skips(units, done), stats_collector=collector)
        last = time.time()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            processed += len(batch["image_id"])
            failed += int((~batch["ok"].astype(bool)).sum())
            if time.time() - last > 5 or processed == todo:
                rate = processed / max(time.time() - started, 1e-9)
                progress(f"  {processed}/{todo} images, {failed} errors, {rate:.2f} images/s")
                last = time.time()
    elapsed = time.time() - started

    summary = summarize_run(store, num_classes, class_names)
    summary["throughput"] = {"images": processed, "seconds": round(elapsed, 3), "images_per_second": processed / elapsed if elapsed > 0 else 0.0}
    store.write_json("summary.json", summary)

    total = summary["images"] + summary["errors"]
    error_fraction = summary["errors"] / total if total else 0.0
    status, message = "succeeded", ""
    if total_images == 0:
        status, message = "failed", f"no images found under {cfg.input.uri} matching {cfg.input.pattern!r}"
    elif error_fraction > cfg.max_error_fraction:
        status = "failed"
        message = f"{summary['errors']} of {total} images failed ({error_fraction:.1%} > max_error_fraction {cfg.max_error_fraction:.1%})"
    store_stats = list_stats.add(StoreStats(**ray.get(collector.get.remote())))
    ray.kill(collector)
    run_info.update(status=status, message=message, ended=_iso(time.time()), store=store_stats.as_dict(), counts={**run_info["counts"], "segmented": summary["images"], "errors": summary["errors"], "processed_this_attempt": processed})
    store.write_json("run.json", run_info)
    return RunResult(cfg.run_id, store.uri, status, summary, message)


def build_dataset(cfg: JobConfig, units: list[SourceUnit], actors: ActorPlan, binary: bool, predictor_cls: type,
                  skips: dict[int, set[str]] | None = None, stats_collector=None):
    """skips: per unit index, image ids an earlier attempt committed (shards: only known once read)."""
    import ray

    skips = skips or {}
    ctx = ray.data.DataContext.get_current()
    # segpipe prints its own progress line; Ray's bars only when asked for
    ctx.enable_progress_bars = os.environ.get("SEGPIPE_RAY_PROGRESS", "0") == "1"
    ds = ray.data.from_items([{"unit": dataclasses.asdict(u), "skip": sorted(skips.get(u.index, ()))} for u in units], override_num_blocks=len(units))
    ds = ds.flat_map(read_and_decode, fn_kwargs={"input_cfg": cfg.input.model_dump(mode="json"), "stats_collector": stats_collector})
    ds = ds.map_batches(
        predictor_cls,
        fn_constructor_kwargs={
            "model_cfg": cfg.model.model_dump(mode="json"),
            "inference_cfg": cfg.inference.model_dump(mode="json"),
            "ignore_index": cfg.metrics.ignore_index,
            "num_threads": actors.threads,
            "chunk_size": cfg.output.chunk_size,
            "input_storage_options": cfg.input.storage_options,
        },
        batch_size=IMAGES_PER_PREDICT_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors.actors),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
    )
    ds = ds.map_batches(
        write_results,
        fn_kwargs={"output_uri": cfg.output.uri, "storage_options": cfg.output.storage_options, "run_id": cfg.run_id, "binary": binary},
        batch_size=ROWS_PER_PART,
        batch_format="numpy",
    )
    return ds


def drop_done(unit: SourceUnit, done: set[str]) -> SourceUnit:
    """The unit without the images a previous attempt committed; positions keep part names stable."""
    if not done or unit.format != "images":
        return unit
    keep = [i for i, image_id in enumerate(unit.image_ids) if image_id not in done]
    if len(keep) == len(unit.uris):
        return unit
    base = unit.positions or tuple(range(len(unit.uris)))
    return replace(
        unit,
        uris=tuple(unit.uris[i] for i in keep),
        label_uris=tuple(unit.label_uris[i] for i in keep) if unit.label_uris else (),
        image_ids=tuple(unit.image_ids[i] for i in keep),
        positions=tuple(base[i] for i in keep),
    )


def shard_skips(units: list[SourceUnit], done: set[str]) -> dict[int, set[str]]:
    """For tar and Parquet units, the committed ids each read task must drop. Tar ids start with
    their shard's path; Parquet ids are free-form, so each Parquet unit gets them all."""
    if not done:
        return {}
    skips: dict[int, set[str]] = {}
    for unit in units:
        if unit.format == "tar":
            prefix = unit.image_ids[0] + "/"
            skips[unit.index] = {i for i in done if i.startswith(prefix)}
        elif unit.format == "parquet":
            skips[unit.index] = done
    return skips


def summarize_run(store: RunStore, num_classes: int, class_names: list[str]) -> dict:
    """summary.json from what the run directory holds (so a resumed run counts every attempt)."""
    total = ClassAreas.zeros(num_classes)
    metrics = store.read_table(METRICS)
    labeled = 0
    if metrics is not None:
        columns = {a: metrics.column(a).to_pylist() for a in AREAS}
        labeled = metrics.num_rows
        for i in range(metrics.num_rows):
            total += ClassAreas(*(np.asarray(columns[a][i], dtype=np.int64) for a in AREAS))
    masks = store.read_table(MASKS, columns=["image_id"])
    errors = store.read_table(ERRORS, columns=["image_id"])
    # a chunked mask has several rows: count images, not rows
    summary = {"images": pc.count_distinct(masks.column("image_id")).as_py() if masks is not None else 0, "errors": errors.num_rows if errors is not None else 0, "labeled_images": labeled, "class_names": class_names}
    summary.update(summarize(total))
    return summary


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("segpipe", "torch", "ray", "pyarrow", "numpy", "pillow", "fsspec", "pydantic", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")
