"""The Ray Data plan: the one place that wires the stages of a job.

    list units (driver: keys only)           pipeline.source  reader_for(cfg).list_units
      -> read + decode   (CPU tasks)       pipeline.source  read_and_decode (pipeline.decode)
      -> predict         (actor pool)      pipeline.predictor  Predictor (tiling, model, stitching, masks, areas)
      -> write parts     (one actor)       pipeline.sink  PartWriter (commits through pipeline.runstore)
    driver: progress from the small rows the writer returns; summary.json from the written parts.

`run_job` is prepare -> execute -> finish. Everything that can be found wrong before the first image
is segmented (config, input and labels locations, model, checkpoint, a rerun that would change the
run's results) is raised by `prepare_job` before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipeline.config import ConfigError, JobConfig
from pipeline.predictor import DIE_ON, Predictor, load_job_model, weights_sha256
from pipeline.rows import IdSet, SourceUnit
from pipeline.runstore import RunRecord, RunStore, labels_report, run_identity, runs_of_job
from pipeline.sink import PartWriter
from pipeline.source import read_and_decode, reader_for
from pipeline.storage import StoreStats, is_local, scrub

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


# ---- what tasks and actors report on the side ---------------------------------------------------


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
    task_cpus: float = 1.0  # what each read task asks for


def plan_actors(cfg: JobConfig, cluster: dict[str, float], node_cpus: list[float] | None = None) -> ActorPlan:
    """Size the actor pool from what the cluster has.

    Read and write tasks need CPUs too: actors that hold every CPU starve them and the job hangs
    (seen with Ray 2.60 on 2 cores), so CPU actors together leave at least one CPU free. On a
    cluster of several nodes every node must keep room for a read task wherever the actors land
    (two actors of 0.5 CPU on two 1-CPU nodes left neither a whole CPU: the read task never ran), so
    where a node has under 2 CPUs read tasks ask for half a CPU and each node keeps that half.
    """
    cpus = float(cluster.get("CPU", 1))
    nodes = [c for c in (node_cpus or [cpus]) if c > 0]
    task_cpus = 1.0 if min(nodes) >= 2 else 0.5
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
    # room for the read and write tasks: one CPU on one node; on several nodes, a task's worth on each
    free = max(cpus - (1.0 if len(nodes) == 1 else task_cpus * len(nodes)), 0.5)
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
    return ActorPlan(actors, num_cpus, num_gpus, threads=threads, note="; ".join(notes), task_cpus=task_cpus)


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def size_actors(cfg: JobConfig, nodes: list[dict] | None = None) -> ActorPlan:
    """`plan_actors` for the cluster Ray is connected to: its totals and each (alive) node's CPUs."""
    import ray

    nodes = alive_nodes() if nodes is None else nodes
    return plan_actors(cfg, ray.cluster_resources(), [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes])


# ---- the job --------------------------------------------------------------------------------------


def init_ray(verbose: bool = False) -> None:
    import ray

    if not ray.is_initialized():
        # inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local one starts
        ray.init(
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=verbose or os.environ.get("SEGPIPE_RAY_LOGS", "0") == "1",
            configure_logging=False,
        )


@contextlib.contextmanager
def ray_lines_to(path: str | None) -> Iterator[None]:
    """Everything written to this process's stderr (file descriptor 2) goes to `path` meanwhile:
    Ray's Python loggers, its C++ core worker and its notices all write there, and none of it is
    for the person at the terminal. Our progress goes to stdout. None: leave stderr alone."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run_job(
    cfg: JobConfig,
    progress: Callable[[str], None] = print,
    *,
    retry_errors: bool = True,
    incremental: bool = False,
    verbose: bool = False,
) -> RunResult:
    """Run (or resume) a job: prepare (raises ConfigError or models.ModelError before anything is
    written) -> execute (the Ray Data plan; Ray's own lines go to the run's log file unless
    `verbose`) -> finish (summary.json, run.json, logs/attempt-N.log)."""
    job = prepare_job(cfg, retry_errors=retry_errors, incremental=incremental)
    try:
        with ray_lines_to(None if verbose else job.log_path):
            outcome = execute_job(job, progress, verbose=verbose)
    except ConfigError:  # found before the first image (the cluster's shape): nothing written, exit 2
        raise
    except KeyboardInterrupt:
        outcome = Execution(status="interrupted", message="interrupted (Ctrl-C): rerun the same config to finish")
    except Exception as exc:
        log.debug("run failed", exc_info=True)
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        outcome = Execution(
            status="failed", message=scrub(f"{type(exc).__name__}: {first_line}", cfg.input.storage_options, cfg.output.storage_options)
        )
    return finish_job(job, outcome)


@dataclass
class PreparedJob:
    """What `prepare_job` found: nothing of it has been written yet."""

    cfg: JobConfig
    store: RunStore
    record: RunRecord  # run.json: earlier attempts, this attempt's number
    units: list[SourceUnit]  # what is left to do
    listed: int
    done: int  # images segmented (or failed and not retried) by earlier attempts
    retried: int  # images that failed earlier and are tried again
    labels: dict
    model_info: dict
    list_stats: StoreStats
    log_path: str  # a local file for Ray's lines; copied into the run directory at the end


def prepare_job(cfg: JobConfig, *, retry_errors: bool = True, incremental: bool = False) -> PreparedJob:
    if incremental and not cfg.job:
        raise ConfigError("job: --incremental needs a job name (the config's `job`, or its file name)")
    cfg = cfg.with_run_id(prefix=cfg.job if incremental else "run")
    store = RunStore(cfg.output.uri, cfg.output.storage_options, cfg.run_id)
    reader = reader_for(cfg.input)
    list_stats = StoreStats()
    try:
        units = reader.list_units(list_stats)
    except OSError as exc:  # FileNotFoundError names the field; a store that refuses is scrubbed
        raise ConfigError(scrub(f"input: {exc}", cfg.input.storage_options)) from None
    model = load_job_model(cfg.model)  # on the driver too: fails fast on a bad checkpoint, names the classes
    one_logit = cfg.metrics.task == "binary" and model.num_classes == 1  # sigmoid head: masks of 2 classes
    class_names = (model.class_names if not one_logit else None) or (
        ["background", "foreground"] if one_logit else [str(i) for i in range(model.num_classes)]
    )
    model_info = {
        "name": model.name,
        "family": model.family,
        "num_classes": model.num_classes,
        "mask_classes": 2 if one_logit else model.num_classes,  # the classes of the masks and the metrics
        "class_names": class_names,
        "checkpoint": cfg.model.checkpoint,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    record = RunRecord.load(store, cfg, run_identity(cfg, model.name, model.num_classes, weights_sha256(model)))  # refuses a changed run
    store.discard_uncommitted()
    outcomes = store.outcomes()
    done = IdSet.union(outcomes.segmented, *([] if retry_errors else [outcomes.failed]))
    if incremental:  # what the job's other runs hold is done too
        record.incremental = {
            "job": cfg.job,
            "runs_consulted": [r for r in runs_of_job(cfg.output.uri, cfg.output.storage_options, cfg.job) if r != cfg.run_id],
        }
        held = IdSet.union(
            *(RunStore(cfg.output.uri, cfg.output.storage_options, r).outcomes().segmented for r in record.incremental["runs_consulted"])
        )
        record.incremental["skipped"] = (
            int(held.contains([i for u in units for i in u.image_ids]).sum()) if cfg.input.format == "images" else None
        )
        done = IdSet.union(done, held)
    listed = sum(len(u.uris) for u in units)
    todo = reader.drop_done(units, done)
    return PreparedJob(
        cfg=cfg,
        store=store,
        record=record,
        units=todo,
        listed=listed,
        # image folders know now what is done; shards learn it as they are read
        done=listed - sum(len(u.uris) for u in todo) if cfg.input.format == "images" else len(done),
        retried=len(outcomes.failed) if retry_errors else 0,
        labels=labels_report(cfg, units),
        model_info=model_info,
        list_stats=list_stats,
        log_path=_local_log_path(cfg.run_id),
    )


def _local_log_path(run_id: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"segpipe-{run_id}-", suffix=".log")
    os.close(fd)
    return path


def progress_line(processed: int, failed: int, todo: int, seconds: float, known_total: bool = True) -> str:
    """`  12/40 images, 0 errors, 2.10 images/s, ETA 13 s` (no ETA while the total is unknown: shards)."""
    rate = processed / max(seconds, 1e-9)
    line = (
        f"  {processed}/{todo} images, {failed} errors, {rate:.2f} images/s"
        if known_total
        else f"  {processed} images, {failed} errors, {rate:.2f} images/s"
    )
    if known_total and 0 < processed < todo and rate > 0:
        line += f", ETA {format_seconds((todo - processed) / rate)}"
    return line


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


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


def execute_job(job: PreparedJob, progress: Callable[[str], None], verbose: bool = False) -> Execution:
    import ray

    cfg = job.cfg
    todo = sum(len(u.uris) for u in job.units)
    init_ray(verbose)
    nodes = alive_nodes()
    refuse_local_paths_on_a_cluster(cfg, nodes)
    monitor = _run_monitor_class().remote()
    actor_plan = size_actors(cfg, nodes)
    if actor_plan.note:
        progress(f"resources: {actor_plan.note}")
    result = Execution(actors=vars(actor_plan))
    job.record.write(job, "running")
    earlier = (f", {job.done} done earlier" if job.done else "") + (f", {job.retried} failed earlier and retried" if job.retried else "")
    what = f"{todo} of {job.listed} images" if cfg.input.format == "images" else f"{len(job.units)} {cfg.input.format} files"
    progress(f"run {cfg.run_id} (attempt {job.record.attempt}): {what} to segment{earlier} -> {job.store.uri}")
    if job.labels.get("note"):
        progress(f"labels: {job.labels['note']}")

    started = time.time()
    stop_watch = threading.Event()
    threading.Thread(target=_report_streams, args=(monitor, stop_watch, progress), daemon=True).start()
    try:
        if job.units:
            ds = build_dataset(
                cfg,
                job.units,
                actor_plan,
                attempt=job.record.attempt,
                binary=cfg.metrics.task == "binary" or job.model_info["mask_classes"] == 2,
                monitor=monitor,
            )
            last = time.time()
            with ctrl_c_stops() as interrupted:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    if interrupted.is_set():
                        raise KeyboardInterrupt
                    images = batch["unit_done"] < 0
                    result.processed += int(images.sum())
                    result.failed += int((~batch["ok"].astype(bool) & images).sum())
                    result.units_done += int((~images).sum())
                    if time.time() - last > PROGRESS_SECONDS or result.processed == todo:
                        progress(progress_line(result.processed, result.failed, todo, time.time() - started, cfg.input.format == "images"))
                        last = time.time()
                if interrupted.is_set():
                    raise KeyboardInterrupt
    finally:
        stop_watch.set()
        result.seconds = time.time() - started
        try:
            result.store = ray.get(monitor.store_stats.remote(), timeout=10)
            ray.kill(monitor)
        except Exception:
            result.store = None
    if result.units_done < len(job.units):
        # a unit whose rows did not all reach the writer: say so, never skip it silently
        result.status = "failed"
        result.message = f"{len(job.units) - result.units_done} of {len(job.units)} input units were not committed: rerun to finish them"
    return result


@contextlib.contextmanager
def ctrl_c_stops() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) while the plan runs: remembered, and raised as KeyboardInterrupt. Remembered
    because Ray Data's iterator can catch the exception in one of its own threads' waits and carry
    on; the loop then stops at its next batch all the same."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # signals reach the main thread only
        return

    def on_sigint(signum, frame) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def refuse_local_paths_on_a_cluster(cfg: JobConfig, nodes: list) -> None:
    """On a cluster of several nodes a local input or output path names a different disk on each
    node: the read tasks would miss images and the writer's parts would land on one node. ConfigError
    (exit 2, before anything is written) unless the config says the path is a shared mount."""
    if len(nodes) < 2:
        return
    for field, uri, shared in (
        ("input", cfg.input.uri, cfg.input.shared_filesystem),
        ("output", cfg.output.uri, cfg.output.shared_filesystem),
    ):
        if not shared and is_local(uri):
            raise ConfigError(
                f"{field}.uri: {uri} is a local path on a cluster of {len(nodes)} nodes, where each node has its own disk: "
                f"use an object store (s3://, gs://, ...) or set {field}.shared_filesystem: true for a mount every node shares"
            )


def _report_streams(monitor, stop: threading.Event, progress: Callable[[str], None]) -> None:
    """While the job runs: a line for each streamed image in progress (they take minutes each)."""
    import ray

    while not stop.wait(PROGRESS_SECONDS):
        try:
            streams = ray.get(monitor.streaming.remote(), timeout=PROGRESS_SECONDS)
        except Exception:
            return
        for image_id, (done, total) in sorted(streams.items()):
            progress(f"  streaming {image_id}: {done}/{total} rows ({done / max(total, 1):.0%})")


def finish_job(job: PreparedJob, outcome: Execution) -> RunResult:
    cfg = job.cfg
    job.store.save_log(f"attempt-{job.record.attempt:04d}", job.log_path, cfg.input.storage_options, cfg.output.storage_options)
    outcomes = job.store.outcomes()
    job.store.write_index(outcomes)  # one read for a later --incremental run of the job
    summary = job.store.summarize(job.model_info["mask_classes"], job.model_info["class_names"], outcomes)
    summary.update(job.record.throughput(outcome.processed, outcome.seconds))
    job.store.write_json("summary.json", summary)
    if outcome.status == "succeeded":
        total = summary["images"] + summary["errors"]
        error_fraction = summary["errors"] / total if total else 0.0
        if job.listed == 0:
            outcome.status, outcome.message = "failed", f"no images found under {cfg.input.uri} matching {cfg.input.pattern!r}"
        elif error_fraction > cfg.max_error_fraction:
            outcome.status = "failed"
            outcome.message = (
                f"{summary['errors']} of {total} images failed ({error_fraction:.1%} > max_error_fraction {cfg.max_error_fraction:.1%})"
            )
    job.record.write(job, outcome.status, outcome, summary)
    return RunResult(cfg.run_id, job.store.uri, outcome.status, summary, outcome.message)


def build_dataset(cfg: JobConfig, units: list[SourceUnit], actors: ActorPlan, *, attempt: int, binary: bool, monitor=None):
    """The Ray Data plan. The validated config crosses into Ray as it is (a frozen object): no stage
    validates it again."""
    import ray

    ctx = ray.data.DataContext.get_current()
    # segpipe prints its own progress line; Ray's bars only when asked for
    ctx.enable_progress_bars = os.environ.get("SEGPIPE_RAY_PROGRESS", "0") == "1"
    ds = ray.data.from_items([u.to_record() for u in units], override_num_blocks=len(units))
    ds = ds.flat_map(read_and_decode, fn_kwargs={"cfg": cfg, "monitor": monitor}, num_cpus=actors.task_cpus)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"cfg": cfg, "num_threads": actors.threads, "monitor": monitor},
        batch_size=IMAGES_PER_PREDICT_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors.actors),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
        # a dead actor is replaced and its batch redone (Ray Data's defaults, stated): the writer takes
        # every image once; the test hook that kills one reaches the actors through their environment
        max_restarts=-1,
        max_task_retries=-1,
        **({"runtime_env": {"env_vars": {DIE_ON: os.environ[DIE_ON]}}} if os.environ.get(DIE_ON) else {}),
    )
    # one writer, holding no CPU: every row of a unit must meet in one place to commit it as parts
    return ds.map_batches(
        PartWriter,
        fn_constructor_kwargs={"cfg": cfg, "attempt": attempt, "binary": binary},
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0,
    )
