"""A run's metrics on Ray's metrics API (`ray.util.metrics`): Ray exports them on each node's
Prometheus endpoint, beside Ray's own, as it does for every Ray application (with `ray[default]`,
the `monitoring` extra). Names get Ray's `ray_` prefix there:

    segpipe_images_total{run_id, outcome}    images segmented (outcome "ok") or failed ("error")
    segpipe_windows_total{run_id}            model inputs: sliding windows (or whole images) x TTA views
    segpipe_image_seconds{run_id}            seconds per image in the predictor (a histogram)
    segpipe_read_bytes_total{run_id}         image and label bytes read by the read tasks
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800]


class RunMetrics:
    """The metrics of one run, created in the process that records them (a task or an actor)."""

    def __init__(self, run_id: str) -> None:
        self.tags = {"run_id": run_id}
        try:
            from ray.util.metrics import Counter, Histogram
        except ImportError:  # metrics are a nicety: a Ray without them runs the job all the same
            self._images = self._windows = self._seconds = self._bytes = None
            return
        self._images = Counter("segpipe_images_total", description="images segmented or failed", tag_keys=("run_id", "outcome"))
        self._windows = Counter("segpipe_windows_total", description="model inputs (windows x TTA views)", tag_keys=("run_id",))
        self._seconds = Histogram(
            "segpipe_image_seconds", description="seconds per image in the predictor", boundaries=SECONDS_BUCKETS, tag_keys=("run_id",)
        )
        self._bytes = Counter("segpipe_read_bytes_total", description="image and label bytes read", tag_keys=("run_id",))

    def image(self, ok: bool, seconds: float, windows: int) -> None:
        if self._images is None:
            return
        self._images.inc(1, tags={**self.tags, "outcome": "ok" if ok else "error"})
        if ok:
            self._windows.inc(windows, tags=self.tags)
            self._seconds.observe(seconds, tags=self.tags)

    def bytes_read(self, count: int) -> None:
        if self._bytes is not None and count:
            self._bytes.inc(count, tags=self.tags)


STAGES = ("read", "decode", "transfer", "forward", "stitch", "encode", "write")


class StageClock:
    """Seconds spent in each stage of the path of an image, summed in one process (a read task, a
    predictor, the writer) and sent to the run monitor, which sums them for run.json's `stages`:
    read (store), decode, transfer (windows to the model's device and scores back: nothing on a
    CPU), forward (the model), stitch (windows in and out, the blend, the objects'
    post-processing), encode (PNG chunks, class areas), write (Parquet parts). A pipelined predictor
    encodes on a thread of its own while the model runs: its stages then sum to more than its
    `call_seconds` (the wall time of its calls), and forward / call_seconds is how busy the model was."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.call_seconds = 0.0

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def add_call(self, seconds: float) -> None:
        """The wall time of one call of the predictor actor."""
        self.call_seconds += seconds

    def model_seconds(self) -> float:
        """transfer + forward so far: what a generator that runs the model adds to the stage it is drained in."""
        return self.seconds["transfer"] + self.seconds["forward"]

    def send(self, monitor, actor_id: str | None = None) -> None:
        """Fire and forget to the run monitor (pipeline.plan's RunMonitor), then start again. A
        predictor actor's id rides along: the monitor counts the actors that served, and when."""
        if monitor is not None and (any(self.seconds.values()) or self.call_seconds):
            monitor.add_stage_seconds.remote(dict(self.seconds), self.call_seconds, actor_id)
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.call_seconds = 0.0


def current_actor_id() -> str | None:
    """The Ray actor this runs in (None outside one, or without Ray): what a predictor reports as."""
    try:
        import ray

        return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except Exception:  # a report is a nicety: never fail an actor over it
        return None


def say_warning(text: str, monitor=None) -> None:
    """A warning a run goes on after (a read task's, the writer's): to the run monitor (run.json's
    attempt `warnings`, the terminal at the run's end), fire and forget; to the log where there is no
    monitor (a stage called directly)."""
    if monitor is not None:
        monitor.add_warning.remote(text)
    else:
        log.warning("%s", text)
