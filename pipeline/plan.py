"""The Ray Data plan: the one place that wires the stages of a job.

    list units (driver: keys only)     pipeline.io.source  reader_for(cfg).iter_units, in batches (Listing)
      -> read + decode   (CPU tasks)       pipeline.io.source  read_and_decode (pipeline.io.decode)
      -> predict         (actor pool)      pipeline.predict.predictor  Predictor (tiling, model, stitching, masks, areas)
      -> write parts     (one actor)       pipeline.results.sink  PartWriter (commits through pipeline.results.runstore)
    driver: progress from the small rows the writer returns; summary.json from the written parts.

`run_job` is prepare -> execute -> finish, inside `stop_signals` (Ctrl-C and SIGTERM). Everything
that can be found wrong before the first image is segmented (config, input and labels locations, an
input with no image, model, checkpoint, metrics that do not fit the model, a rerun or an
--incremental night that would change results) is raised by `prepare_job` before anything is
written. An archive larger than input.listing_batch runs as one Ray Data plan per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from models.onnx_backend import onnxruntime_available
from pipeline.config import ConfigError, JobConfig, check_metrics_against_model
from pipeline.io.raster import check_raster_job, require_geo
from pipeline.io.source import read_and_decode, reader_for
from pipeline.io.storage import StoreStats, is_local
from pipeline.io.video import require_video
from pipeline.local_ray import connect as connect_ray
from pipeline.metrics.coco_labels import InstanceLabels, LabelsError, PanopticLabels, YtvisLabels, mask_ap_of
from pipeline.predict.job_model import check_clip_job, is_clip_model, load_job_model, weights_sha256
from pipeline.predict.predictor import DIE_ON, Predictor
from pipeline.predict.tracks import write_tracks
from pipeline.redaction import scrub
from pipeline.results.run_tables import INSTANCES
from pipeline.results.runstore import (
    HEARTBEAT_SECONDS,
    LOSSY_SUFFIXES,
    AttemptReport,
    RunRecord,
    RunStore,
    check_job_identity,
    job_runs,
    labels_report,
    run_identity,
)
from pipeline.results.sink import PartWriter
from pipeline.results.temporal import video_summary
from pipeline.rows import IdSet, SourceUnit
from pipeline.telemetry import STAGES

log = logging.getLogger(__name__)

MAX_WARNINGS = 100  # warnings kept in run.json per attempt (each text once); more are counted
IMAGES_PER_PREDICT_BATCH = 4  # rows per actor call; windows are batched inside by inference.batch_size
PROGRESS_SECONDS = 5.0


@dataclass
class RunResult:
    run_id: str
    run_dir: str
    status: str  # "succeeded" | "failed" | "interrupted" | "nothing_new" (an --incremental night: nothing written)
    summary: dict
    message: str = ""
    signum: int = 0  # the signal that interrupted it (SIGINT, SIGTERM)


STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Stopped(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (what Kubernetes and KubeRay send to stop a pod): the attempt stops,
    what it committed stays, and the run is `interrupted` (exit 128 + the signal's number)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(STOP_SIGNALS.get(signum, str(signum)))
        self.signum = int(signum)


# ---- what tasks and actors report on the side ---------------------------------------------------


def _run_monitor_class():
    import ray

    @ray.remote(num_cpus=0)
    class RunMonitor:
        """What tasks and actors report on the side (fire and forget): store stats from read tasks
        for run.json, how far the predictor is inside a streamed image, for the progress line, and the
        predictor actors' starts, calls and ends: the pool as it ran (run.json's actors)."""

        def __init__(self) -> None:
            self.total = StoreStats()
            self.streams: dict[str, tuple[int, int]] = {}
            self.stages = dict.fromkeys(STAGES, 0.0)
            self.batch_sizes: dict[str, int] = {}
            self.slide_windows = {"slides": 0, "windows_run": 0, "windows_skipped": 0, "mpp": [], "scanned": []}
            self.warnings_seen: set[str] = set()
            self.warnings_kept: list[str] = []
            self.warnings_more = 0
            self.call_seconds = 0.0  # the predictor actors' calls, wall time summed (StageClock.call_seconds)
            # the predictor pool as it ran, on this actor's clock (one clock however many nodes):
            # seconds from the plan's start (start_clock) at which each report arrived
            self.origin = time.monotonic()
            self.actors_started: set[str] = set()
            self.actors_alive: set[str] = set()
            self.timeline: list[tuple[float, int]] = []  # (seconds, actors alive) at each change
            self.serving: dict[str, list[float]] = {}  # actor id -> [its first call's start, its last call's end]

        def start_clock(self) -> None:
            self.origin = time.monotonic()

        def _seconds(self) -> float:
            return time.monotonic() - self.origin

        def actor_started(self, actor_id: str) -> None:
            """A predictor actor up, its model loaded (a restarted one again, under the same id)."""
            self.actors_started.add(actor_id)
            if actor_id not in self.actors_alive:
                self.actors_alive.add(actor_id)
                self.timeline.append((self._seconds(), len(self.actors_alive)))

        def actor_stopped(self, actor_id: str) -> None:
            """A predictor actor Ray Data let go (scaled down, or the plan done)."""
            if actor_id in self.actors_alive:
                self.actors_alive.discard(actor_id)
                self.timeline.append((self._seconds(), len(self.actors_alive)))

        def lower_batch_sizes(self, sizes: dict[str, int]) -> None:
            """Windows per forward an actor came down to (out of memory), by window size, and the device bytes from
            which an actor stitches on the CPU (tiling.BatchSizes.report): the least of any actor."""
            for window, size in sizes.items():
                self.batch_sizes[window] = min(size, self.batch_sizes.get(window, size))

        def lowered_batch_sizes(self) -> dict[str, int]:
            return dict(self.batch_sizes)

        def add_store_stats(self, stats: dict) -> None:
            self.total.add(StoreStats(**stats))

        def add_stage_seconds(self, seconds: dict, call_seconds: float = 0.0, actor_id: str | None = None) -> None:
            for stage, value in seconds.items():
                self.stages[stage] = self.stages.get(stage, 0.0) + value
            self.call_seconds += call_seconds
            if actor_id is not None:  # a predictor's call, reported as it ended
                end = self._seconds()
                self.serving.setdefault(actor_id, [end - call_seconds, end])[1] = end

        def pool(self) -> dict:
            """run.json's record of the pool as it ran: the predictor actors that started, the most that
            served at once (their spans from first call to last overlapping), and the actors alive over
            the plan's seconds."""
            ends = sorted([(first, 1) for first, _ in self.serving.values()] + [(last, -1) for _, last in self.serving.values()])
            most = serving = 0
            for _, step in ends:  # at a tie an end comes first: spans that only touch are not at once
                serving += step
                most = max(most, serving)
            return {
                "started": len(self.actors_started),
                "most_serving": most,
                "timeline": [[round(t, 2), alive] for t, alive in self.timeline],
            }

        def forward_busy(self) -> dict:
            """The predictor actors' calls: their wall seconds summed, and the share of them the forward ran."""
            share = self.stages["forward"] / self.call_seconds if self.call_seconds else None
            return {
                "call_seconds": round(self.call_seconds, 3),
                "forward_busy_share": None if share is None else float(f"{min(share, 1.0):.3g}"),
            }

        def stage_seconds(self) -> dict:
            return {stage: round(value, 3) for stage, value in self.stages.items()}

        def store_stats(self) -> dict:
            return self.total.as_dict()

        def add_slide(
            self, run: int, skipped: int, mpp: float | None, level0_mpp: float | None = None, objective_power: float | None = None
        ) -> None:
            """A slide segmented (pipeline.predict.slides): its windows run and skipped (no tissue), its
            target mpp, and as scanned its level 0's mpp with its objective power (each pair seen once)."""
            counts = self.slide_windows
            counts["slides"] += 1
            counts["windows_run"] += run
            counts["windows_skipped"] += skipped
            if mpp not in counts["mpp"]:
                counts["mpp"] = sorted([*counts["mpp"], mpp], key=lambda v: (v is None, v or 0))
            scanned = {"mpp": level0_mpp, "objective_power": objective_power}
            if scanned not in counts["scanned"]:
                order = lambda s: (s["objective_power"] is None, s["objective_power"] or 0, s["mpp"] is None, s["mpp"] or 0)
                counts["scanned"] = sorted([*counts["scanned"], scanned], key=order)

        def slides(self) -> dict | None:
            return dict(self.slide_windows) if self.slide_windows["slides"] else None

        def add_warning(self, text: str) -> None:
            """A read task's warning (the run goes on): each text once, the first MAX_WARNINGS kept."""
            if text in self.warnings_seen:
                return
            self.warnings_seen.add(text)
            self.warnings_more += len(self.warnings_seen) > MAX_WARNINGS
            if len(self.warnings_seen) <= MAX_WARNINGS:
                self.warnings_kept.append(text)

        def warnings(self) -> list[str]:
            more = [f"{self.warnings_more} more warnings not kept"] if self.warnings_more else []
            return [*self.warnings_kept, *more]

        def stream_rows(self, image_id: str, done: int, total: int, note: str = "") -> None:
            if done >= total:
                self.streams.pop(image_id, None)
            else:
                self.streams[image_id] = (done, total, note) if note else (done, total)

        def streaming(self) -> dict[str, tuple[int, int]]:
            return dict(self.streams)

    return RunMonitor


# ---- actor sizing -------------------------------------------------------------------------------


@dataclass
class ActorPlan:
    actors: int  # the pool's size; an elastic pool's largest
    num_cpus: float
    num_gpus: float
    threads: int
    note: str = ""
    task_cpus: float = 1.0  # what each read task asks for
    read_tasks: int = 1  # read and decode tasks that fit beside the actors at once (run.json says it)
    min_actors: int | None = None  # an elastic pool's smallest (resources.actors {min, max}); None: a fixed pool

    def pool(self):
        """Ray Data's ActorPoolStrategy for the predictors: a fixed size, or min and max sizes."""
        import ray

        if self.min_actors is None:
            return ray.data.ActorPoolStrategy(size=self.actors)
        return ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=self.actors)


def plan_actors(cfg: JobConfig, cluster: dict[str, float], node_cpus: list[float] | None = None) -> ActorPlan:
    """Size the actor pool from what the cluster has.

    Read and write tasks need CPUs too: actors that hold every CPU starve them and the job hangs
    (seen with Ray 2.60 on 2 cores), so CPU actors together leave at least one CPU free. On a
    cluster of several nodes every node must keep room for a read task wherever the actors land
    (two actors of 0.5 CPU on two 1-CPU nodes left neither a whole CPU: the read task never ran), so
    where a node has under 2 CPUs read tasks ask for half a CPU and each node keeps that half.

    An elastic pool's CPU actors are sized so that its largest size leaves that room. GPU actors ask
    for GPUs the cluster must have (`await_gpus` waits for them first): a fixed pool is cut to the
    GPUs there are; an elastic pool's min is, and its max stays (an autoscaler brings the GPUs).
    """
    cpus = float(cluster.get("CPU", 1))
    nodes = [c for c in (node_cpus or [cpus]) if c > 0]
    task_cpus = 1.0 if min(nodes) >= 2 else 0.5
    gpus = float(cluster.get("GPU", 0))
    want = cfg.resources
    notes = []
    num_gpus = want.gpus_per_actor
    if num_gpus > 0 and gpus < num_gpus:  # never a silent CPU run: gpus_per_actor 0 is how one is asked for
        raise ConfigError(no_gpus_message(want.gpus_per_actor, gpus))
    elastic = not isinstance(want.actors, int)
    low, actors = want.min_actors, want.max_actors
    if num_gpus > 0 and low * num_gpus > gpus:
        low = max(1, int(gpus // num_gpus))
        notes.append(f"{low} actors fit on {gpus:g} GPUs" + (f" now (the pool may grow to {actors})" if elastic else ""))
    if not elastic:
        actors = low
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
        low = min(low, actors)
        num_cpus = min(want.cpus_per_actor, share) if want.cpus_per_actor else share
        if want.cpus_per_actor and want.cpus_per_actor > share:
            notes.append(f"cpus_per_actor {want.cpus_per_actor:g} lowered to {share:g} so that read and write tasks can run")
    num_cpus = round(num_cpus, 3)
    # torch threads: the actors' share of the whole machine, not of their reservation. The CPU kept
    # for read and write tasks is mostly idle (decoding is cheap next to the model), and a 1-thread
    # actor on 2 cores ran at 0.38x a plain 2-thread loop (benchmarks/pipeline_throughput.py).
    threads = max(1, math.ceil(num_cpus)) if num_gpus > 0 else max(1, int(cpus // actors))
    read_tasks = max(1, int((cpus - actors * num_cpus) // task_cpus))
    return ActorPlan(
        actors,
        num_cpus,
        num_gpus,
        threads=threads,
        note="; ".join(notes),
        task_cpus=task_cpus,
        read_tasks=read_tasks,
        min_actors=low if elastic else None,
    )


def no_gpus_message(per_actor: float, gpus: float, waited: float | None = None) -> str:
    after = f" after waiting {waited:g} s (resources.wait_for_gpus_s)" if waited is not None else ""
    return (
        f"resources.gpus_per_actor: {per_actor:g}, but the cluster has {gpus:g} GPUs{after}: "
        "start GPU nodes (or let the autoscaler), or set resources.gpus_per_actor: 0 for a CPU run"
    )


GPU_POLL_SECONDS = 5.0


def await_gpus(cfg: JobConfig, progress: Callable[[str], None] = print, poll: float = GPU_POLL_SECONDS) -> None:
    """With gpus_per_actor > 0: return once the cluster Ray is connected to has a GPU actor's worth of
    GPUs, asking its autoscaler for the smallest pool's GPUs (a hint; a GPU group at zero starts
    nodes for it) and polling ray.cluster_resources() up to resources.wait_for_gpus_s; then
    ConfigError (exit 2, nothing written). Never a silent CPU run."""
    import ray

    want = cfg.resources
    if want.gpus_per_actor <= 0 or ray.cluster_resources().get("GPU", 0) >= want.gpus_per_actor:
        return
    bundle = {"GPU": want.gpus_per_actor, "CPU": want.cpus_per_actor or 1.0}
    asked = _request_resources([bundle] * want.min_actors)
    progress(f"resources: waiting up to {want.wait_for_gpus_s:g} s for GPUs (the cluster has none)")
    deadline = time.monotonic() + want.wait_for_gpus_s
    try:
        while True:
            gpus = float(ray.cluster_resources().get("GPU", 0))
            if gpus >= want.gpus_per_actor:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConfigError(no_gpus_message(want.gpus_per_actor, gpus, want.wait_for_gpus_s))
            time.sleep(min(poll, left))
    finally:
        if asked:  # the pool's actors ask for themselves from here on
            _request_resources([])


def _request_resources(bundles: list[dict]) -> bool:
    """The autoscaler's resource request (persistent until the next call); False where none can be made."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
        return True
    except Exception:  # a hint only: a cluster without an autoscaler just never gets the GPUs
        log.debug("resource request not made", exc_info=True)
        return False


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def size_actors(cfg: JobConfig, nodes: list[dict] | None = None) -> ActorPlan:
    """`plan_actors` for the cluster Ray is connected to: its totals and each (alive) node's CPUs
    (after `await_gpus`: without the GPUs asked for, ConfigError)."""
    import ray

    nodes = alive_nodes() if nodes is None else nodes
    return plan_actors(cfg, ray.cluster_resources(), [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes])


# ---- the job --------------------------------------------------------------------------------------


def init_ray(verbose: bool = False) -> None:
    """Ray for the run: inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local
    one starts (the CLI starts it early: pipeline.local_ray)."""
    # ray.init makes SIGTERM sys.exit(15): no summary, run.json left `running`. A handler of ours
    # before it (`stop_signals`, while a run runs) is put back.
    on_sigterm = signal.getsignal(signal.SIGTERM)
    connect_ray(verbose)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)


class _RayPrints:
    """Whether Ray's driver-side prints may reach the terminal: the copies of worker lines
    (log_to_driver) and the raylet's and GCS's error messages, which Ray prints from its own threads
    to sys.stdout, beside our progress and past `ray_lines_to`'s hold on stderr (a "(raylet) ... killed
    by ray.kill" line at Ctrl-C). `route_ray_prints` sends them to stderr (fd 2: the attempt's log
    while `ray_lines_to` holds it), and drops what comes after a quiet job has let go of fd 2."""

    shown = True  # outside a job: False once a job that was not verbose ran


def route_ray_prints() -> None:
    """Wrap Ray's printer of driver-side lines (ray._private.worker.print_worker_logs, looked up at
    each call by the error listener and the log-to-driver handler) once, as `_RayPrints` says."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_worker_logs", None)
    if original is None or getattr(original, "segpipe_routed", False):
        return

    def to_stderr(data, print_file, ignore_prefix: bool = False):
        if _RayPrints.shown:  # to fd 2 itself, whatever object sys.stderr is
            with open(2, "w", closefd=False, encoding="utf-8", errors="replace") as fd2:
                original(data, fd2, ignore_prefix)

    to_stderr.segpipe_routed = True
    ray_worker.print_worker_logs = to_stderr


@contextlib.contextmanager
def ray_lines_to(path: str, echo: bool = False) -> Iterator[None]:
    """Everything written to this process's stderr (file descriptor 2) goes to `path` meanwhile, and
    with `echo` (--verbose) to the terminal too: Ray's Python loggers, its C++ core worker, its
    notices and (route_ray_prints) its copies of worker lines and raylet errors all write there. Our
    progress goes to stdout. Processes started meanwhile (Ray's) keep what fd 2 was."""
    route_ray_prints()
    sys.stderr.flush()
    saved = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    tee = _Tee(log_fd, saved) if echo else None
    os.dup2(tee.write_fd if tee else log_fd, 2)
    _RayPrints.shown = True
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        if tee:
            tee.detach_log()  # the thread goes on copying late lines (a child's) to the terminal
        os.close(log_fd)
        os.close(saved)
        _RayPrints.shown = echo


class _Tee:
    """A pipe whose bytes a daemon thread copies to the log file and to the terminal: fd 2 of a
    verbose job. Ray's processes started meanwhile inherit the pipe, so it is never closed; once the
    job lets go, what still comes goes to the terminal only."""

    FLUSHED = b"\0segpipe: the log has it all\0"  # one atomic pipe write: all before it was copied

    def __init__(self, log_fd: int, terminal_fd: int) -> None:
        self.log_fd, self.terminal_fd = os.dup(log_fd), os.dup(terminal_fd)
        read_fd, self.write_fd = os.pipe()
        self.lock = threading.Lock()
        self.flushed = threading.Event()
        threading.Thread(target=self._copy, args=(read_fd,), name="segpipe-tee", daemon=True).start()

    def _copy(self, read_fd: int) -> None:
        while data := os.read(read_fd, 65536):
            if self.FLUSHED in data:
                data = data.replace(self.FLUSHED, b"")
                self._write(data)
                self.flushed.set()
            else:
                self._write(data)

    def _write(self, data: bytes) -> None:
        with self.lock:
            for fd in (self.log_fd, self.terminal_fd):
                if fd >= 0 and data:
                    with contextlib.suppress(OSError):
                        os.write(fd, data)

    def detach_log(self) -> None:
        """After fd 2 is restored: the log gets what the pipe holds, then nothing more."""
        os.write(self.write_fd, self.FLUSHED)
        self.flushed.wait(timeout=5)
        with self.lock:
            os.close(self.log_fd)
            self.log_fd = -1
        os.close(self.write_fd)  # ours; a child's copy may stay open


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
    `verbose`) -> finish (summary.json, run.json, logs/attempt-N.log). Ctrl-C or SIGTERM: Stopped
    before anything is written, an `interrupted` run after. An --incremental night with nothing new
    writes nothing (status `nothing_new`)."""
    with stop_signals() as stop:
        job = prepare_job(cfg, retry_errors=retry_errors, incremental=incremental)
        if incremental and job.record.attempt == 1 and nothing_to_do(job):
            os.remove(job.log_path)
            cfg = job.cfg
            return RunResult(
                cfg.run_id,
                job.store.uri,
                "nothing_new",
                {},
                f"nothing new: the {job.listed} images under {cfg.input.uri} are held by job {cfg.job}'s runs; nothing written",
            )
        outcome = Execution()
        try:
            with ray_lines_to(job.log_path, echo=verbose):
                execute_job(job, progress, verbose=verbose, result=outcome, stop=stop)
        except ConfigError:  # found before the first image (the cluster's shape): nothing written, exit 2
            raise
        except KeyboardInterrupt as exc:
            outcome.signum = getattr(exc, "signum", signal.SIGINT)
            outcome.status = "interrupted"
            outcome.message = f"interrupted ({STOP_SIGNALS.get(outcome.signum, outcome.signum)}): rerun the same config to finish"
        except Exception as exc:
            log.debug("run failed", exc_info=True)
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            outcome.status = "failed"
            outcome.message = scrub(f"{type(exc).__name__}: {first_line}", cfg.input.storage_options, cfg.output.storage_options)
        stop.finishing = True  # a signal now is remembered, never raised half way through run.json
        result = finish_job(job, outcome)
        missing = (result.summary.get("raster") or {}).get("without_crs") or []
        if missing:  # said once for the run: their masks have no place on a map
            progress(
                f"raster: {len(missing)} raster(s) without a CRS or geotransform (first: {missing[0]}) were segmented but are not georeferenced: "
                "no geotiff/cog/polygon export for them"
            )
        return result


def nothing_to_do(job: PreparedJob) -> bool:
    """Every image listed is held already (image folders listed whole; shards learn it as they are read)."""
    return job.cfg.input.lists_files and job.listing.exhausted and not job.units


class Listing:
    """The input's units in batches of at most input.listing_batch images, each without what earlier
    attempts (and, with --incremental, the job's other runs) hold, and the counts so far.

    A batch is what one Ray Data plan runs; the next one is listed while it runs (`list_ahead`), so
    the driver holds a batch or two of keys, whatever the archive's size. An input that fits one
    batch is listed whole before anything starts, and its counts are known up front."""

    def __init__(self, cfg: JobConfig, stats: StoreStats, clips: tuple[int, int] | None = None) -> None:
        self.cfg = cfg
        self.reader = reader_for(cfg.input, clips)  # clips: a clip model's units (pipeline.io.source.VideoReader)
        self.done, self.held = IdSet(), None  # set by prepare_job once the run's outcomes are read
        self.units = self.reader.iter_units(stats)
        self.listed = 0  # images (shards: files) listed so far
        self.done_earlier = 0  # of them, held by earlier attempts or runs (image folders)
        self.skipped = 0  # of them, held by the job's other runs (--incremental, image folders)
        self.with_label = 0
        self.jpeg_labels = 0  # of them, labels in a lossy format: class values move at edges
        self.to_do = 0
        self.exhausted = False

    def next_batch(self) -> list[SourceUnit] | None:
        """The next batch's units to do (maybe none: all done), or None once the listing is over."""
        batch = self.list_batch()
        return None if batch is None else self.drop_done(batch)

    def list_batch(self) -> list[SourceUnit] | None:
        """The next batch as listed, or None once the listing is over (the first batch is a list, maybe empty)."""
        if self.exhausted:
            return None
        batch, images = [], 0
        for unit in self.units:
            batch.append(unit)
            images += unit.images
            if images >= self.cfg.input.listing_batch:
                break
        else:
            self.exhausted = True
        if not batch and self.listed:
            return None
        self.listed += images
        self.with_label += sum(1 for u in batch for uri in u.label_uris if uri is not None)
        self.jpeg_labels += sum(1 for u in batch for uri in u.label_uris if uri is not None and uri.lower().endswith(LOSSY_SUFFIXES))
        return batch

    def drop_done(self, batch: list[SourceUnit]) -> list[SourceUnit]:
        images = sum(u.images for u in batch)
        if self.held is not None and self.cfg.input.lists_files:
            self.skipped += int(self.held.contains([i for u in batch for i in u.image_ids]).sum())
        todo = self.reader.drop_done(batch, self.done)
        if self.cfg.input.lists_files:
            self.done_earlier += images - sum(u.images for u in todo)
        self.to_do += sum(u.images for u in todo)
        return todo


@dataclass
class PreparedJob:
    """What `prepare_job` found: nothing of it has been written yet."""

    cfg: JobConfig
    store: RunStore
    record: RunRecord  # run.json: earlier attempts, this attempt's number
    units: list[SourceUnit]  # the first batch's units left to do (all of them unless the listing goes on)
    listing: Listing  # the batches after the first, and the counts so far
    object_labels: ObjectLabels  # the object tasks' label files, read once (pipeline.metrics.coco_labels)
    retried: int  # images that failed earlier and are tried again
    model_info: dict
    list_stats: StoreStats
    log_path: str  # a local file for Ray's lines; copied into the run directory at the end
    video_labels_match: dict = dataclasses.field(default_factory=dict)  # a clip run's labels against its videos (at the end)
    notes: list[str] = dataclasses.field(default_factory=list)  # said on the terminal as the run starts (after its first line)

    @property
    def listed(self) -> int:
        return self.listing.listed

    @property
    def done(self) -> int:
        """Images segmented (or failed and not retried) by earlier attempts: image folders know it
        as they are listed; shards learn it as they are read."""
        return self.listing.done_earlier if self.cfg.input.lists_files else len(self.listing.done)

    @property
    def to_do(self) -> int:
        return self.listing.to_do

    @property
    def labels(self) -> dict:
        videos = self.object_labels.videos
        if videos is not None:  # a clip model's YouTube-VIS JSON: how its videos matched, once scored
            return {
                "configured": True,
                "uri": self.cfg.input.labels.uri,
                "format": "youtube-vis",
                "annotated_videos": len(videos.videos),
            } | self.video_labels_match
        return labels_report(self.cfg, self.listing.listed, self.listing.with_label, self.listing.jpeg_labels)

    def report(self, outcome: Execution | None = None) -> AttemptReport:
        """What run.json records of this attempt: the job's counts, and `outcome`'s once the plan runs."""
        report = AttemptReport(self.listed, self.done, self.retried, self.to_do, self.model_info, self.labels, self.list_stats)
        if outcome is None:
            return report
        return dataclasses.replace(
            report,
            message=outcome.message,
            seconds=outcome.seconds,
            processed=outcome.processed,
            failed=outcome.failed,
            actors=outcome.actors,
            stages=outcome.stages,
            store=outcome.store,
            slides=outcome.slides,
            warnings=outcome.warnings,
        )


def decide_reduce_zero_label(cfg: JobConfig, stated: bool | None) -> JobConfig:
    """metrics.reduce_zero_label decided once, on the driver, before the config reaches run.json and
    the actors: null takes what the checkpoint's image processor states (`stated`: transformers'
    do_reduce_labels, None where it states nothing), as transformers' processors reduce the labels
    they are given; false where nothing is stated or for a binary task."""
    if cfg.metrics.reduce_zero_label is not None:
        return cfg
    decided = bool(stated) and cfg.metrics.task == "semantic"
    return cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"reduce_zero_label": decided})})


def reduce_zero_label_note(cfg: JobConfig, stated: bool | None) -> str:
    """One line for the terminal where labels are read with reduce_zero_label, or where the config
    reads them otherwise than the checkpoint's image processor states."""
    if cfg.input.labels is None or cfg.metrics.task != "semantic":
        return ""
    if cfg.metrics.reduce_zero_label:
        why = "the checkpoint's image processor states do_reduce_labels" if stated else "metrics.reduce_zero_label"
        return f"label value 0 counts nowhere and every other value v is class v - 1 ({why})"
    if stated:
        return (
            "the checkpoint's image processor states do_reduce_labels, but metrics.reduce_zero_label is false: labels are read as they are"
        )
    return ""


def prepare_job(cfg: JobConfig, *, retry_errors: bool = True, incremental: bool = False) -> PreparedJob:
    if incremental and not cfg.job:
        raise ConfigError("job: --incremental needs a job name (the config's `job`, or its file name)")
    notes = []
    if incremental and cfg.run_id:  # each night a run of its own: a run_id in the config would make every night the same run
        notes.append(f"--incremental: a new run of job {cfg.job}; the config's run_id {cfg.run_id} is not used")
        cfg = cfg.model_copy(update={"run_id": None})
    cfg = cfg.with_run_id(prefix=cfg.job if incremental else "run")
    if cfg.input.format == "raster":
        require_geo()  # before anything is listed or written
    if cfg.input.format == "video":
        require_video()
    store = RunStore.of_job(cfg)
    list_stats = StoreStats()
    listing = Listing(cfg, list_stats)
    try:
        first = listing.list_batch() or []
    except OSError as exc:  # FileNotFoundError names the field; a store that refuses is scrubbed
        raise ConfigError(scrub(f"input: {exc}", cfg.input.storage_options)) from None
    if not first:  # before Ray starts, writing nothing: a run directory of no image helps nobody
        where = f"input.pattern: no file under {cfg.input.uri} matches {cfg.input.pattern!r}"
        raise ConfigError(
            scrub(where if cfg.input.lists_files else f"input.uri: nothing to read in {cfg.input.uri}", cfg.input.storage_options)
        )
    if cfg.inference.backend == "onnxruntime" and not onnxruntime_available():
        raise ConfigError("inference.backend onnxruntime needs ONNX Runtime and onnxscript: pip install 'segpipe[onnx]'")
    model = load_job_model(cfg.model)  # on the driver too: fails fast on a bad checkpoint, names the classes
    cfg = decide_reduce_zero_label(cfg, model.reduce_labels)
    if reduce_note := reduce_zero_label_note(cfg, model.reduce_labels):
        notes.append(f"labels: {reduce_note}")
    check_clip_job(cfg, model)  # the task of the model; a clip model's input and clip_length
    if is_clip_model(model):  # a unit per clip: the first batch listed again, the clip plan in hand
        list_stats = StoreStats()
        listing = Listing(cfg, list_stats, clips=(cfg.inference.clip_length, cfg.inference.clip_stride))
        first = listing.list_batch() or []
    check_metrics_against_model(cfg.metrics, model.num_classes, model.name or model.family)
    if cfg.output.confidence and model.num_classes <= 2:
        raise ConfigError(
            f"output.confidence is for multi-class runs: {model.name or model.family} has {model.num_classes} "
            "classes, whose masks carry the foreground probability (column probability) already"
        )
    if cfg.input.format == "raster":  # the first raster against the bands, the scale and the model
        if cfg.inference.task == "panoptic":  # its segment map is painted whole: rasters are read window by window
            raise ConfigError("input.format raster: rasters are segmented by the semantic or the instance task, not panoptic")
        check_raster_job(cfg.input, first[0].uris[0], model.in_channels, model.num_classes)
    elif model.in_channels != 3:
        raise ConfigError(
            f"model: {model.name or model.family} takes {model.in_channels} input channels; images give 3 "
            "(input.format: raster with input.bands feeds other counts)"
        )
    object_labels = read_object_labels(cfg, model.num_classes, clips=is_clip_model(model))
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
        "input_kind": getattr(model, "input_kind", "image"),  # "clip": VisTR's runs (units of clips, tracks)
        "reduce_labels": model.reduce_labels,  # what its image processor says (transformers' do_reduce_labels), null: nothing
    }
    record = RunRecord.load(store, cfg, run_identity(cfg, model.name, model.num_classes, weights_sha256(model)))  # refuses a changed run
    store.discard_uncommitted()
    outcomes = store.outcomes()
    done = IdSet.union(outcomes.segmented, *([] if retry_errors else [outcomes.failed]))
    if incremental:  # what the job's other runs hold is done too; the job is bound as a run_id is
        others = [r for r in job_runs(cfg.output.uri, cfg.output.storage_options, cfg.job) if r.run_id != cfg.run_id]
        check_job_identity(cfg.job, others, record.identity)
        record.incremental = {"job": cfg.job, "runs_consulted": [r.run_id for r in others]}
        listing.held = IdSet.union(*(r.outcomes.segmented for r in others))
        done = IdSet.union(done, listing.held)
    listing.done = done.sorted_for_lookup()  # shipped to every shard's read task: sorted once, here
    units = listing.drop_done(first)
    if incremental:
        record.incremental["skipped"] = listing.skipped if cfg.input.lists_files else None
    return PreparedJob(
        cfg=cfg,
        store=store,
        record=record,
        units=units,
        listing=listing,
        object_labels=object_labels,
        retried=len(outcomes.failed) if retry_errors else 0,
        model_info=model_info,
        list_stats=list_stats,
        log_path=_local_log_path(cfg.run_id),
        notes=notes,
    )


@dataclass
class ObjectLabels:
    panoptic: PanopticLabels | None = None  # metrics.panoptic_labels
    instances: InstanceLabels | None = None  # metrics.instance_labels
    videos: YtvisLabels | None = None  # a clip model's input.labels.uri: YouTube-VIS annotations (track AP)


def read_object_labels(cfg: JobConfig, num_classes: int, clips: bool = False) -> ObjectLabels:
    """The object tasks' label files, read and fitted to the model before anything runs (ConfigError),
    and kept for the run's summary; `clips`: a clip model's run, whose input.labels.uri is a YouTube-VIS JSON."""
    labels = ObjectLabels()
    try:
        if clips and cfg.input.labels is not None:
            labels.videos = YtvisLabels.load(cfg.input.labels.uri, cfg.input.storage_options)
            labels.videos.check_classes(num_classes)
        if cfg.metrics.panoptic_labels:
            labels.panoptic = PanopticLabels.load(cfg.metrics.panoptic_labels, cfg.input.storage_options)
            labels.panoptic.categories.check_classes(num_classes, "metrics.panoptic_labels")
        if cfg.metrics.instance_labels:
            labels.instances = InstanceLabels.load(cfg.metrics.instance_labels, cfg.input.storage_options)
            labels.instances.categories.check_classes(num_classes, "metrics.instance_labels")
    except LabelsError as exc:
        raise ConfigError(scrub(str(exc), cfg.input.storage_options)) from None
    return labels


def _local_log_path(run_id: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"segpipe-{run_id}-", suffix=".log")
    os.close(fd)
    return path


def progress_line(
    processed: int, failed: int, todo: int, seconds: float, known_total: bool = True, steady: tuple[int, float] | None = None
) -> str:
    """`  12/40 images, 0 errors, 2.10 images/s, ETA 13 s` (no ETA while the total is unknown: shards).

    `steady`: (images, seconds) since the first images were committed. The rate and the ETA come from
    it, not from the whole attempt, whose first seconds are the actors' start and model load: from
    them an early ETA was mostly start-up (1 min 04 s with 2.5 s to go). No ETA before it."""
    rate = processed / max(seconds, 1e-9)
    steady_rate = steady[0] / steady[1] if steady and steady[0] > 0 and steady[1] > 0 else None
    shown = rate if steady_rate is None else steady_rate
    line = (
        f"  {processed}/{todo} images, {failed} errors, {shown:.2f} images/s"
        if known_total
        else f"  {processed} images, {failed} errors, {shown:.2f} images/s"
    )
    if known_total and 0 < processed < todo and steady_rate:
        line += f", ETA {format_seconds((todo - processed) / steady_rate)}"
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
    processed: int = 0  # images committed (segmented or failed): the driver's count while it runs, the parts' at the end
    failed: int = 0
    signum: int = 0  # the signal that interrupted it
    units_done: int = 0
    seconds: float = 0.0
    store: dict | None = None
    actors: dict | None = None
    stages: dict | None = None  # seconds per stage, summed over the processes (pipeline.telemetry.StageClock)
    slides: dict | None = None  # slides segmented: windows run and skipped (RunMonitor.add_slide)
    warnings: list[str] = dataclasses.field(default_factory=list)  # the read tasks' (RunMonitor.add_warning)
    first_commit: tuple[float, int] | None = None  # when the first images came back, and how many: the ETA's start


def execute_job(
    job: PreparedJob,
    progress: Callable[[str], None],
    verbose: bool = False,
    result: Execution | None = None,
    stop: StopFlag | None = None,
) -> Execution:
    """The plan over each batch of the listing in turn (one batch unless the archive is larger than
    input.listing_batch), the next batch listed while one runs. `result` is filled as it goes, so
    that an interrupted attempt keeps its counts and seconds. `stop`: the run's flag (run_job's
    `stop_signals`), which each batch checks as its rows come back."""
    import ray

    cfg = job.cfg
    result = result if result is not None else Execution()
    stop = stop if stop is not None else StopFlag()
    init_ray(verbose)
    await_gpus(cfg, progress)  # before the nodes are counted: GPU nodes may join meanwhile
    nodes = alive_nodes()
    refuse_local_paths_on_a_cluster(cfg, nodes)
    monitor = _run_monitor_class().remote()
    actor_plan = size_actors(cfg, nodes)
    if actor_plan.note:
        progress(f"resources: {actor_plan.note}")
    # the pool as planned, the batch sizes its actors came down to where they ran out of memory, and
    # (at the end) the seconds of their calls and the share of them the forward ran
    result.actors = {
        **vars(actor_plan),
        "lowered_batch_sizes": {},
        "call_seconds": None,
        "forward_busy_share": None,
        **dict.fromkeys(("started", "most_serving", "timeline")),  # the pool as it ran (RunMonitor.pool), at the end
    }
    job.record.write(job.report(), "running")
    listing = job.listing
    earlier = (f", {job.done} done earlier" if job.done else "") + (f", {job.retried} failed earlier and retried" if job.retried else "")
    if not cfg.input.lists_files:
        what = f"{len(job.units)} {cfg.input.format} files"
    elif listing.exhausted:
        what = f"{job.to_do} of {job.listed} images"
    else:
        what = f"{job.to_do} of the first {job.listed} images (listed in batches of {cfg.input.listing_batch})"
    progress(f"run {cfg.run_id} (attempt {job.record.attempt}): {what} to segment{earlier} -> {job.store.uri}")
    if job.labels.get("note") and listing.exhausted:
        progress(f"labels: {job.labels['note']}")
    for note in job.notes:
        progress(note)

    started = time.time()
    monitor.start_clock.remote()  # the pool's timeline counts from here
    stop_watch = threading.Event()

    def heartbeat() -> None:  # run.json says how far the attempt got, should it be killed outright
        job.record.write(job.report(dataclasses.replace(result, seconds=time.time() - started)), "running")

    watcher = threading.Thread(target=_report_streams, args=(monitor, stop_watch, progress, heartbeat), daemon=True)
    watcher.start()
    units_sent = 0
    try:
        batch: list[SourceUnit] | None = job.units
        while batch is not None:
            following = list_ahead(listing)
            if batch:
                units_sent += len(batch)
                ds = build_dataset(
                    cfg,
                    batch,
                    actor_plan,
                    attempt=job.record.attempt,
                    binary=cfg.metrics.task == "binary" or job.model_info["mask_classes"] == 2,
                    monitor=monitor,
                    clips=job.model_info.get("input_kind") == "clip",
                    done=listing.done if not cfg.input.lists_files and len(listing.done) else None,
                )
                run_batch(ds, result, progress, listing, started, cfg.input.lists_files and listing.exhausted, stop)
            batch = following()
    finally:
        stop_watch.set()
        result.seconds = time.time() - started
        watcher.join(timeout=10)  # a heartbeat being written ends first (RunRecord drops a later one)
        try:
            result.store = ray.get(monitor.store_stats.remote(), timeout=10)
            result.stages = ray.get(monitor.stage_seconds.remote(), timeout=10)
            result.actors["lowered_batch_sizes"] = ray.get(monitor.lowered_batch_sizes.remote(), timeout=10)
            result.slides = ray.get(monitor.slides.remote(), timeout=10)
            result.warnings = ray.get(monitor.warnings.remote(), timeout=10)
            for warning in result.warnings:
                progress(f"warning: {warning}")
            result.actors.update(ray.get(monitor.forward_busy.remote(), timeout=10))
            result.actors.update(ray.get(monitor.pool.remote(), timeout=10))
            ray.kill(monitor)
        except Exception as exc:  # the record goes without what the monitor held, and says so in the log
            log.warning("the run monitor did not answer: %r", exc)
            result.store = None
    if result.units_done < units_sent:
        # a unit whose rows did not all reach the writer: say so, never skip it silently
        result.status = "failed"
        result.message = f"{units_sent - result.units_done} of {units_sent} input units were not committed: rerun to finish them"
    return result


def list_ahead(listing: Listing) -> Callable[[], list[SourceUnit] | None]:
    """Start listing the next batch in a thread (the store's listing overlaps the plan that runs);
    the function returned waits for it. A listing error is raised there, in the driver's thread."""
    if listing.exhausted:
        return lambda: None
    out: dict = {}

    def work() -> None:
        try:
            out["batch"] = listing.next_batch()
        except BaseException as exc:  # raised again by the caller
            out["error"] = exc

    thread = threading.Thread(target=work, name="segpipe-listing", daemon=True)
    thread.start()

    def wait() -> list[SourceUnit] | None:
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["batch"]

    return wait


def run_batch(
    ds, result: Execution, progress: Callable[[str], None], listing: Listing, started: float, known_total: bool, stop: StopFlag
) -> None:
    """Drain one batch's plan: count the rows the writer returns, a progress line every few seconds.
    A signal `stop` remembers (its Stopped swallowed on the way: see `stop_signals`), before this
    batch or during it, stops it at its next rows."""
    last = time.time()
    for rows in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if stop.is_set():
            raise Stopped(stop.signum)
        images = rows["unit_done"] < 0
        result.processed += int(images.sum())
        result.failed += int((~rows["ok"].astype(bool) & images).sum())
        result.units_done += int((~images).sum())
        now = time.time()
        if result.first_commit is None and result.processed:
            result.first_commit = (now, result.processed)  # the rate is counted from here (progress_line)
        if now - last > PROGRESS_SECONDS or result.processed == listing.to_do:
            first_at, first_images = result.first_commit or (now, result.processed)
            steady = (result.processed - first_images, now - first_at)
            progress(progress_line(result.processed, result.failed, listing.to_do, now - started, known_total, steady))
            last = now
    if stop.is_set():
        raise Stopped(stop.signum)


class StopFlag(threading.Event):
    """Set by Ctrl-C or SIGTERM; `signum` says which. While `finishing`, a signal is only remembered."""

    signum: int = signal.SIGINT
    finishing: bool = False


@contextlib.contextmanager
def stop_signals() -> Iterator[StopFlag]:
    """Ctrl-C (SIGINT) and SIGTERM (Kubernetes, KubeRay) while a run runs: remembered, and raised as
    Stopped. Remembered because Ray Data's iterator can catch the exception in one of its own
    threads' waits and carry on; the plan's loop then stops at its next batch all the same."""
    stop = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals reach the main thread only
        return

    def on_signal(signum, frame) -> None:
        if not stop.is_set():
            stop.signum = signum
        stop.set()
        if not stop.finishing:
            raise Stopped(signum)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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


def _report_streams(monitor, stop: threading.Event, progress: Callable[[str], None], heartbeat: Callable[[], None]) -> None:
    """While the job runs: a line for each streamed image in progress (they take minutes each), and
    the attempt's heartbeat in run.json every HEARTBEAT_SECONDS."""
    import ray

    beat = time.time()
    while not stop.wait(PROGRESS_SECONDS):
        if time.time() - beat >= HEARTBEAT_SECONDS:
            beat = time.time()
            try:
                heartbeat()
            except Exception:  # a store that fails now is retried at the next beat; the run goes on
                log.debug("heartbeat not written", exc_info=True)
        try:
            streams = ray.get(monitor.streaming.remote(), timeout=PROGRESS_SECONDS)
        except Exception:  # the monitor is slow or gone: no stream lines this time, the heartbeat goes on
            continue
        for image_id, (done, total, *note) in sorted(streams.items()):
            progress(f"  streaming {image_id}: {done}/{total} rows ({done / max(total, 1):.0%})" + "".join(f", {n}" for n in note))


def finish_job(job: PreparedJob, outcome: Execution) -> RunResult:
    cfg = job.cfg
    job.store.save_log(f"attempt-{job.record.attempt:04d}", job.log_path, cfg.input.storage_options, cfg.output.storage_options)
    outcomes = job.store.outcomes()
    job.store.write_index(outcomes)  # one read for a later --incremental run of the job
    summary = job.store.summarize(job.model_info["mask_classes"], job.model_info["class_names"], outcomes)
    if cfg.input.format == "raster":
        summary["raster"] = job.store.raster_summary(job.model_info["class_names"])
    if cfg.input.format == "video":
        summary["video"] = video_summary(job.store, cfg)
        if job.model_info.get("input_kind") == "clip":  # derived from the committed clips: rewritten each attempt
            inference = cfg.inference
            summary["video"].update(
                write_tracks(job.store, inference.clip_length, inference.clip_stride, inference.objects.merge_iou, job.object_labels.videos)
            )
            if "mask_ap" in summary["video"]:  # what of the labels matched the run: run.json's labels
                matched = ("videos", "videos_unlabeled", "frame_count_mismatches", "size_mismatches", "note")
                job.video_labels_match = {k: v for k, v in summary["video"]["mask_ap"].items() if k in matched}
    if cfg.inference.task != "semantic":
        summary["objects"] = job.store.object_summary(cfg.inference.task, job.model_info["class_names"])
    if job.object_labels.panoptic is not None:
        categories = job.object_labels.panoptic.categories
        summary["panoptic"] = job.store.panoptic_summary(categories.names, categories.ids, categories.is_thing)
    if job.object_labels.instances is not None:
        summary["mask_ap"] = mask_ap_of(job.store.latest_rows(INSTANCES), outcomes.segmented.to_pylist(), job.object_labels.instances)
    # what this attempt's parts hold: the driver's count misses rows in flight when it is interrupted
    outcome.processed, outcome.failed = job.store.committed_by(job.record.attempt)
    summary.update(job.record.throughput(outcome.processed, outcome.seconds, time.time() - job.record.started))
    job.store.write_json("summary.json", summary)
    if outcome.status == "succeeded":
        total = summary["images"] + summary["errors"]
        error_fraction = summary["errors"] / total if total else 0.0
        if error_fraction > cfg.max_error_fraction:
            outcome.status = "failed"
            outcome.message = (
                f"{summary['errors']} of {total} images failed ({error_fraction:.1%} > max_error_fraction {cfg.max_error_fraction:.1%})"
            )
    job.record.write(job.report(outcome), outcome.status, summary)
    return RunResult(cfg.run_id, job.store.uri, outcome.status, summary, outcome.message, outcome.signum)


def build_dataset(
    cfg: JobConfig,
    units: list[SourceUnit],
    actors: ActorPlan,
    *,
    attempt: int,
    binary: bool,
    monitor=None,
    done: IdSet | None = None,
    clips: bool = False,
):
    """The Ray Data plan. The validated config crosses into Ray as it is (a frozen object): no stage
    validates it again. `done`: ids the read tasks drop (shards: known once read). `clips`: a clip
    model's run (units of clips, their pieces of tracks committed with them)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    # segpipe prints its own progress line; Ray's bars only when asked for
    ctx.enable_progress_bars = os.environ.get("SEGPIPE_RAY_PROGRESS", "0") == "1"
    ds = ray.data.from_items([u.to_record() for u in units], override_num_blocks=len(units))
    ds = ds.flat_map(read_and_decode, fn_kwargs={"cfg": cfg, "monitor": monitor, "done": done}, num_cpus=actors.task_cpus)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"cfg": cfg, "num_threads": actors.threads, "monitor": monitor},
        batch_size=1 if clips else IMAGES_PER_PREDICT_BATCH,  # a clip row holds clip_length frames
        batch_format="numpy",
        compute=actors.pool(),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
        # a dead actor is replaced and its batch redone (Ray Data's defaults for an actor pool:
        # max_restarts and max_task_retries -1; passing them is deprecated): the writer takes every
        # image once; the test hook that kills one reaches the actors through their environment
        runtime_env={"env_vars": {DIE_ON: os.environ[DIE_ON]}} if os.environ.get(DIE_ON) else None,
    )
    # one writer, holding no CPU: every row of a unit must meet in one place to commit it as parts
    return ds.map_batches(
        PartWriter,
        fn_constructor_kwargs={"cfg": cfg, "attempt": attempt, "binary": binary, "monitor": monitor, "clips": clips},
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0,
    )
