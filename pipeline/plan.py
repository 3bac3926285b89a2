"""The Ray Data plan: the one place that wires the stages of a job.

    list units (driver: keys only)
      -> read + decode   (CPU tasks)       pipeline.source, pipeline.decode
      -> predict         (actor pool)      pipeline.predictor (tiling, model, stitching, encode, areas)
      -> write parts     (one actor)       pipeline.sink (commits), pipeline.runstore (the run directory)
    driver: progress from the small rows the writer returns; summary.json from the written parts.

`run_job` is prepare -> execute -> finish. Everything that can be found wrong before the first image
is segmented (config, input and labels locations, model, checkpoint, a rerun that would change the
run's results) is raised by `prepare_job` before anything is written.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import platform
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.config import ConfigError, JobConfig, public_config
from pipeline.decode import DecodeError, decode_image, decode_label
from pipeline.runstore import RunStore
from pipeline.source import RawSample, SourceUnit, list_units, read_unit, resolve_format
from pipeline.storage import StoreStats, scrub

log = logging.getLogger(__name__)

IMAGES_PER_PREDICT_BATCH = 4  # rows per actor call; windows are batched inside by inference.batch_size
PROGRESS_SECONDS = 5.0


@dataclass
class RunResult:
    run_id: str
    run_dir: str
    status: str  # "succeeded" | "failed" | "interrupted"
    summary: dict
    message: str = ""


# ---- stage 1: read and decode (a Ray task per unit) -------------------------------------------

def read_and_decode(row: dict[str, Any], *, input_cfg: dict, monitor=None) -> Iterator[dict[str, Any]]:
    """One unit in, one decoded row per image out, then the unit's end marker (`unit_rows`: how
    many image rows came before it). A failure is a row with `error` set. What the store did
    (retries, failures) goes to the run monitor when the unit ends."""
    import ray

    from pipeline.config import InputConfig

    cfg = InputConfig.model_validate(input_cfg)
    unit = unit_from_row(row["unit"])
    skip = set(row.get("skip") or ())
    stats = StoreStats()
    sent = 0
    try:
        for sample in read_unit(unit, cfg, stats):
            if sample.image_id in skip:  # committed by an earlier attempt of this run
                continue
            yield decode_sample(sample, cfg.max_pixels, exif_transpose=cfg.exif_transpose)
            sent += 1
        yield unit_end_row(unit.index, sent)
    finally:
        if monitor is not None:
            ray.get(monitor.add_store_stats.remote(stats.as_dict()))  # before the task ends, so the driver sees it


def unit_from_row(data: dict[str, Any]) -> SourceUnit:
    """A SourceUnit back from the plain dict that travels in a Ray block (Arrow has no dataclasses)."""
    return SourceUnit(
        index=int(data["index"]),
        format=str(data["format"]),
        **{k: tuple(data.get(k) if data.get(k) is not None else ()) for k in ("uris", "label_uris", "image_ids")},
    )


def _decoded_row(unit: int, index_in_unit: int, image_id: str) -> dict[str, Any]:
    return {
        "unit": unit,
        "index_in_unit": index_in_unit,
        "unit_rows": -1,  # >= 0 only in a unit's end marker
        "image_id": image_id,
        "image": np.zeros((0, 0, 3), np.uint8),
        "label": np.zeros((0, 0), np.int64),
        "has_label": False,
        "height": 0,
        "width": 0,
        "error": "",
        "stage": "",
        "stream_uri": "",  # set for an image to stream: the predictor reads it window by window
        "stream_label_uri": "",
    }


def unit_end_row(unit: int, image_rows: int) -> dict[str, Any]:
    return {**_decoded_row(unit, -1, ""), "unit_rows": image_rows}


def decode_sample(sample: RawSample, max_pixels: int, *, exif_transpose: bool = True) -> dict[str, Any]:
    """One decoded row per sample. A sample the read stage marked for streaming (`sample.stream`, a
    pipeline.huge.StreamSource: a TIFF too large to decode whole) is not decoded: its row says where
    it is (`stream_uri`, `stream_label_uri`) and how large, and the predictor reads it window by window."""
    out = _decoded_row(sample.unit, sample.index_in_unit, sample.image_id)
    stream = getattr(sample, "stream", None)
    if sample.error:
        out.update(error=sample.error, stage="read")
        return out
    if stream is not None:
        out.update(
            stream_uri=stream.uri, stream_label_uri=stream.label_uri or "", has_label=bool(stream.label_uri),
            height=stream.height, width=stream.width,
        )
        return out
    try:
        image = decode_image(sample.image_bytes, max_pixels, exif_transpose=exif_transpose)
        out.update(image=image, height=image.shape[0], width=image.shape[1])
    except DecodeError as exc:
        out.update(error=str(exc), stage="decode")
        return out
    if sample.label_bytes is not None:
        try:
            label = decode_label(sample.label_bytes, max_pixels, exif_transpose=exif_transpose)
        except DecodeError as exc:
            out.update(error=f"label: {exc}", stage="decode")
            return out
        if label.shape != image.shape[:2]:
            out.update(error=f"label is {label.shape[1]} x {label.shape[0]} but the image is {image.shape[1]} x {image.shape[0]}", stage="decode")
            return out
        out.update(label=label, has_label=True)
    return out


def _run_monitor_class():
    import ray

    @ray.remote(num_cpus=0)
    class RunMonitor:
        """What tasks and actors report on the side (fire and forget): store stats from read tasks
        for run.json, and how far the predictor is inside a streamed image, for the progress line."""

        def __init__(self) -> None:
            self.total = StoreStats()
            self.streams: dict[str, tuple[int, int]] = {}

        def add_store_stats(self, stats: dict) -> None:
            self.total.add(StoreStats(**stats))

        def store_stats(self) -> dict:
            return self.total.as_dict()

        def stream_rows(self, image_id: str, done: int, total: int) -> None:
            if done >= total:
                self.streams.pop(image_id, None)
            else:
                self.streams[image_id] = (done, total)

        def streaming(self) -> dict[str, tuple[int, int]]:
            return dict(self.streams)

    return RunMonitor


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


@dataclass
class PreparedJob:
    """What `prepare_job` found: nothing of it has been written yet."""

    cfg: JobConfig
    store: RunStore
    attempt: int
    previous: dict  # run.json of the earlier attempts ({} for a new run)
    identity: dict
    units: list[SourceUnit]  # what is left to do
    skips: dict[int, list[str]]  # per unit: ids committed earlier that a shard's read task drops
    listed: int
    done: int  # images segmented (or failed and not retried) by earlier attempts
    retried: int  # images that failed earlier and are tried again
    labels: dict
    model_info: dict
    started: float
    list_stats: StoreStats


def run_job(cfg: JobConfig, progress: Callable[[str], None] = print, *, retry_errors: bool = True) -> RunResult:
    """Run (or resume) a job. Raises ConfigError or models.ModelError before anything is written."""
    job = prepare_job(cfg, progress, retry_errors=retry_errors)
    try:
        outcome = execute_job(job, progress)
    except KeyboardInterrupt:
        outcome = Execution(status="interrupted", message="interrupted (Ctrl-C): rerun the same config to finish")
    except Exception as exc:  # noqa: BLE001 - the attempt is recorded as failed; the CLI prints one line
        log.debug("run failed", exc_info=True)
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        message = scrub(f"{type(exc).__name__}: {first_line}", cfg.input.storage_options, cfg.output.storage_options)
        outcome = Execution(status="failed", message=message)
    return finish_job(job, outcome)


def prepare_job(cfg: JobConfig, progress: Callable[[str], None] = print, *, retry_errors: bool = True) -> PreparedJob:
    from pipeline.predictor import load_job_model, weights_sha256

    cfg = cfg.with_run_id()
    started = time.time()
    store = RunStore(cfg.output.uri, cfg.output.storage_options, cfg.run_id)
    previous = store.read_json("run.json") or {}

    list_stats = StoreStats()
    try:
        units = list_units(cfg.input, list_stats)
    except FileNotFoundError as exc:
        raise ConfigError(f"input: {exc}") from None
    except OSError as exc:
        raise ConfigError(scrub(f"input: {exc}", cfg.input.storage_options)) from None
    listed = sum(len(u.uris) for u in units)
    labels = labels_report(cfg, units)

    model = load_job_model(cfg.model)  # on the driver too: fails fast on a bad checkpoint, names the classes
    class_names = model.class_names or [str(i) for i in range(model.num_classes)]
    model_info = {"name": model.name, "family": model.family, "num_classes": model.num_classes, "class_names": class_names,
                  "checkpoint": cfg.model.checkpoint, "parameters": sum(p.numel() for p in model.parameters())}
    identity = run_identity(cfg, model.name, model.num_classes, weights_sha256(model))
    del model
    if previous.get("identity"):
        changed = [k for k in sorted(set(identity) | set(previous["identity"])) if identity.get(k) != previous["identity"].get(k)]
        if changed:
            raise ConfigError(
                f"run {cfg.run_id} was made with other {', '.join(changed)}: its results would mix; "
                "use another run_id (or restore the settings to resume it)"
            )

    store.discard_uncommitted()
    outcomes = store.outcomes()
    done = outcomes.segmented | (set() if retry_errors else outcomes.failed)
    units = [u for u in (drop_done(u, done) for u in units) if u.uris]
    attempts = previous.get("attempts") if isinstance(previous.get("attempts"), list) else []
    return PreparedJob(
        cfg=cfg, store=store, attempt=len(attempts) + 1, previous=previous, identity=identity, units=units,
        skips=shard_skips(units, done), listed=listed, done=len(done),
        retried=len(outcomes.failed) if retry_errors else 0, labels=labels, model_info=model_info,
        started=started, list_stats=list_stats,
    )


@dataclass
class Execution:
    status: str = "succeeded"
    message: str = ""
    processed: int = 0
    failed: int = 0
    units_done: int = 0
    seconds: float = 0.0
    store: dict | None = None
    actors: dict | None = None


def execute_job(job: PreparedJob, progress: Callable[[str], None]) -> Execution:
    import ray

    from pipeline.predictor import Predictor

    cfg = job.cfg
    todo = sum(len(u.uris) for u in job.units)
    init_ray()
    monitor = _run_monitor_class().remote()
    actor_plan = plan_actors(cfg, ray.cluster_resources())
    if actor_plan.note:
        progress(f"resources: {actor_plan.note}")
    write_run_record(job, Execution(status="running", actors=vars(actor_plan)))
    already = f", {job.done} done earlier" if job.done else ""
    retried = f", {job.retried} failed earlier and retried" if job.retried else ""
    progress(f"run {cfg.run_id} (attempt {job.attempt}): {todo} of {job.listed} images to segment{already}{retried} -> {job.store.uri}")
    if job.labels.get("note"):
        progress(f"labels: {job.labels['note']}")

    result = Execution(actors=vars(actor_plan))
    started = time.time()
    stop_watch = threading.Event()
    watcher = threading.Thread(target=_report_streams, args=(monitor, stop_watch, progress), daemon=True)
    watcher.start()
    try:
        if job.units:
            ds = build_dataset(cfg, job, actor_plan, binary=job.model_info["num_classes"] == 2, predictor_cls=Predictor, monitor=monitor)
            last = time.time()
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                images = batch["unit_done"] < 0
                result.processed += int(images.sum())
                result.failed += int((~batch["ok"].astype(bool) & images).sum())
                result.units_done += int((~images).sum())
                if time.time() - last > PROGRESS_SECONDS or result.processed == todo:
                    rate = result.processed / max(time.time() - started, 1e-9)
                    progress(f"  {result.processed}/{todo} images, {result.failed} errors, {rate:.2f} images/s")
                    last = time.time()
    finally:
        stop_watch.set()
        result.seconds = time.time() - started
        try:
            result.store = ray.get(monitor.store_stats.remote(), timeout=10)
            ray.kill(monitor)
        except Exception:  # noqa: BLE001 - stats are a nicety; an interrupted run may not reach them
            result.store = None
    if result.units_done < len(job.units):
        # a unit whose rows did not all reach the writer: say so, never skip it silently
        result.status = "failed"
        result.message = f"{len(job.units) - result.units_done} of {len(job.units)} input units were not committed: rerun to finish them"
    return result


def _report_streams(monitor, stop: threading.Event, progress: Callable[[str], None]) -> None:
    """While the job runs: a line for each streamed image in progress (they take minutes each)."""
    import ray

    while not stop.wait(PROGRESS_SECONDS):
        try:
            streams = ray.get(monitor.streaming.remote(), timeout=PROGRESS_SECONDS)
        except Exception:  # noqa: BLE001 - progress only
            return
        for image_id, (done, total) in sorted(streams.items()):
            progress(f"  streaming {image_id}: {done}/{total} rows ({done / max(total, 1):.0%})")


def finish_job(job: PreparedJob, outcome: Execution) -> RunResult:
    cfg = job.cfg
    summary = job.store.summarize(job.model_info["num_classes"], job.model_info["class_names"])
    this_attempt = {
        "attempt": job.attempt, "images": outcome.processed, "seconds": round(outcome.seconds, 3),
        "images_per_second": outcome.processed / outcome.seconds if outcome.seconds > 0 else None,
    }
    earlier = [a for a in job.previous.get("attempts", []) if isinstance(a, dict)] if isinstance(job.previous.get("attempts"), list) else []
    images = sum(a.get("counts", {}).get("processed", 0) for a in earlier) + outcome.processed
    seconds = sum(a.get("seconds", 0.0) for a in earlier) + outcome.seconds
    summary["throughput"] = {"images": images, "seconds": round(seconds, 3), "images_per_second": images / seconds if seconds > 0 else None}
    summary["this_attempt"] = this_attempt
    job.store.write_json("summary.json", summary)

    if outcome.status == "succeeded":
        total = summary["images"] + summary["errors"]
        error_fraction = summary["errors"] / total if total else 0.0
        if job.listed == 0:
            outcome.status, outcome.message = "failed", f"no images found under {cfg.input.uri} matching {cfg.input.pattern!r}"
        elif error_fraction > cfg.max_error_fraction:
            outcome.status = "failed"
            outcome.message = f"{summary['errors']} of {total} images failed ({error_fraction:.1%} > max_error_fraction {cfg.max_error_fraction:.1%})"
    write_run_record(job, outcome, summary)
    return RunResult(cfg.run_id, job.store.uri, outcome.status, summary, outcome.message)


def write_run_record(job: PreparedJob, outcome: Execution, summary: dict | None = None) -> None:
    """run.json: the run's identity and first config, and one record per attempt (this one updated)."""
    cfg, previous = job.cfg, job.previous
    config = public_config(cfg)
    first_config = previous.get("config", config)
    attempts = [a for a in previous.get("attempts", []) if isinstance(a, dict)] if isinstance(previous.get("attempts"), list) else []
    counts = {
        "listed": job.listed,
        "done_earlier": job.done,
        "retried": job.retried,
        "to_do": sum(len(u.uris) for u in job.units),
        "processed": outcome.processed,
        "failed": outcome.failed,
    }
    record = {
        "attempt": job.attempt,
        "started": _iso(job.started),
        "ended": None if outcome.status == "running" else _iso(time.time()),
        "status": outcome.status,
        "message": outcome.message,
        "seconds": round(outcome.seconds, 3),
        "counts": counts,
        "config_changes": config_changes(first_config, config),
        "actors": outcome.actors,
        "store": job.list_stats.as_dict() if outcome.store is None else StoreStats(**outcome.store).add(job.list_stats).as_dict(),
        "versions": package_versions(),
    }
    info = {
        "run_id": cfg.run_id,
        "status": outcome.status,
        "message": outcome.message,
        "identity": job.identity,
        "config": first_config,
        "model": job.model_info,
        "labels": job.labels,
        "versions": record["versions"],  # of the latest attempt; each attempt keeps its own
        "started": previous.get("started", _iso(job.started)),
        "ended": record["ended"],
        "counts": {"listed": job.listed, **({"segmented": summary["images"], "errors": summary["errors"], "labeled": summary["labeled_images"]} if summary else {})},
        "attempts": [*attempts, record],
    }
    job.store.write_json("run.json", info)


def run_identity(cfg: JobConfig, model_name: str, num_classes: int, weights: str) -> dict[str, Any]:
    """What decides a run's results. A rerun under the same run_id that changes any of it is refused:
    its masks would mix with the earlier ones. Batch size, actors and output chunking are free to change."""
    fmt = resolve_format(cfg.input)
    inference = cfg.inference
    identity = {
        "input.uri": cfg.input.uri.rstrip("/"),
        "input.format": fmt,
        "model.name": model_name,
        "model.num_classes": num_classes,
        "model.weights_sha256": weights,
        "inference.mode": inference.mode,
        "inference.window": list(inference.window),
        "inference.stride": list(inference.stride),
        "inference.blend": inference.blend,
        "inference.precision": inference.precision,
        "inference.tta": inference.tta.model_dump(mode="json"),
    }
    if fmt == "images":
        identity["input.pattern"] = cfg.input.pattern
    return identity


def config_changes(first: dict, now: dict, prefix: str = "") -> dict[str, list]:
    """Fields whose value differs from the first attempt's config: {"a.b": [first, now]}."""
    out: dict[str, list] = {}
    for key in sorted(set(first) | set(now)):
        a, b = first.get(key), now.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, name + "."))
        elif a != b and name != "run_id":
            out[name] = [a, b]
    return out


def labels_report(cfg: JobConfig, units: list[SourceUnit]) -> dict:
    """How many listed images have a label: said on the terminal and in run.json (image folders only;
    shards carry labels inside and are counted as they are read: summary.json's labeled_images)."""
    if cfg.input.labels is None:
        return {"configured": False}
    if not units or units[0].format != "images":
        return {"configured": True}
    with_label = sum(1 for u in units for uri in u.label_uris if uri is not None)
    listed = sum(len(u.uris) for u in units)
    report: dict[str, Any] = {"configured": True, "uri": cfg.input.labels.uri, "images_with_label": with_label, "images_without_label": listed - with_label}
    if listed and with_label == 0:
        report["note"] = f"none of the {listed} images has a label under {cfg.input.labels.uri} (label files share the image's relative path; the extension may differ)"
    elif with_label < listed:
        report["note"] = f"{with_label} of {listed} images have a label; {listed - with_label} have none and get no metrics"
    return report


def build_dataset(cfg: JobConfig, job: PreparedJob, actors: ActorPlan, binary: bool, predictor_cls: type, monitor=None):
    import ray

    from pipeline.sink import PartWriter

    ctx = ray.data.DataContext.get_current()
    # segpipe prints its own progress line; Ray's bars only when asked for
    ctx.enable_progress_bars = os.environ.get("SEGPIPE_RAY_PROGRESS", "0") == "1"
    units = [{"unit": dataclasses.asdict(u), "skip": job.skips.get(u.index, [])} for u in job.units]
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.flat_map(read_and_decode, fn_kwargs={"input_cfg": cfg.input.model_dump(mode="json"), "monitor": monitor})
    ds = ds.map_batches(
        predictor_cls,
        fn_constructor_kwargs={
            "model_cfg": cfg.model.model_dump(mode="json"),
            "inference_cfg": cfg.inference.model_dump(mode="json"),
            "ignore_index": cfg.metrics.ignore_index,
            "num_threads": actors.threads,
            "chunk_size": cfg.output.chunk_size,
            "input_storage_options": cfg.input.storage_options,
            "monitor": monitor,
        },
        batch_size=IMAGES_PER_PREDICT_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors.actors),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
    )
    # one writer, holding no CPU: every row of a unit must meet in one place to commit it as parts
    ds = ds.map_batches(
        PartWriter,
        fn_constructor_kwargs={
            "output_uri": cfg.output.uri, "storage_options": cfg.output.storage_options, "run_id": cfg.run_id,
            "attempt": job.attempt, "binary": binary, "images_per_part": cfg.input.images_per_unit,
        },
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0,
    )
    return ds


def drop_done(unit: SourceUnit, done: set[str]) -> SourceUnit:
    """An image-folder unit without the images earlier attempts committed (shards drop theirs as read)."""
    if not done or unit.format != "images":
        return unit
    keep = [i for i, image_id in enumerate(unit.image_ids) if image_id not in done]
    if len(keep) == len(unit.uris):
        return unit
    return dataclasses.replace(
        unit,
        uris=tuple(unit.uris[i] for i in keep),
        label_uris=tuple(unit.label_uris[i] for i in keep) if unit.label_uris else (),
        image_ids=tuple(unit.image_ids[i] for i in keep),
    )


def shard_skips(units: list[SourceUnit], done: set[str]) -> dict[int, list[str]]:
    """For tar and Parquet units, the committed ids each read task must drop. Tar ids start with
    their shard's path; Parquet ids are free-form, so each Parquet unit gets them all."""
    if not done:
        return {}
    skips: dict[int, list[str]] = {}
    for unit in units:
        if unit.format == "tar":
            prefix = unit.image_ids[0] + "/"
            skips[unit.index] = sorted(i for i in done if i.startswith(prefix))
        elif unit.format == "parquet":
            skips[unit.index] = sorted(done)
    return skips


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
