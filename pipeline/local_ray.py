"""Ray for a run, started early where the run starts it itself.

A `segpipe run` without a cluster (no `RAY_ADDRESS`, or `RAY_ADDRESS=local`, and no `ray start`
cluster on this machine) starts a local Ray, about 3 s on 2 cores, then Ray Data starts its own
actors at the plan's first batch. `start_in_background` (the CLI, once the config is valid) does both
in a thread while the driver imports torch, lists the input and loads the model; `connect`
(pipeline.plan.init_ray) waits for that thread, or, where nothing was started early (a cluster, a
test's Ray, a library call), calls `ray.init` as runs always did. A cluster run is exactly as before:
nothing starts early and `ray.init` gets the same arguments.

The local Ray starts lean (`lean_node`): without the processes a one-machine job never uses, which
take 2 of the 5 s that a plain local `ray.init` and `ray.shutdown` take on 2 cores: the autoscaler's
monitor (nothing to scale), the log monitor (it only carries workers' lines to the driver, which
runs without log_to_driver unless verbose) and the API server (the dashboard's head: segpipe
starts Ray without the dashboard). Ray's metrics agent stays: it is what exports the run's metrics
on Prometheus (the `monitoring` extra). SEGPIPE_RAY_LEAN=0 starts every process as ray.init does.

This module imports nothing heavy (no torch, no Ray until the thread runs), so the thread starts
before the driver's imports.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_early: dict = {}  # "ready" (an Event), "records" (Ray's log records meanwhile), "error"


def ray_init_kwargs(verbose: bool) -> dict:
    """What `ray.init` gets for a run, cluster or local: the dashboard only where a cluster has it,
    Ray's worker lines on the driver only when asked for."""
    return dict(
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=verbose or os.environ.get("SEGPIPE_RAY_LOGS", "0") == "1",
        configure_logging=False,
    )


def starts_local_ray() -> bool:
    """True where `ray.init()` would start a new local Ray rather than join a cluster: Ray's own
    reading of RAY_ADDRESS and of the address file a `ray start` on this machine leaves."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(os.environ.get("RAY_ADDRESS")) is None
    except Exception:  # an address Ray cannot read: ray.init says so, as before
        return False


class _Records(logging.Handler):
    """Ray's log lines while it starts in the thread: kept, and written when `connect` is called
    (where the run sends Ray's lines to its log file) instead of on the terminal meanwhile. With
    configure_logging=False Ray's loggers have no handler and Python writes their warnings to
    stderr through `logging.lastResort`: this handler stands in for it meanwhile."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.getMessage().startswith("SIGTERM handler is not set"):  # it is: start_in_background sets it
            self.records.append(record)


def start_in_background(verbose: bool = False) -> bool:
    """Start a local Ray and Ray Data's actors in a thread, where this run would start a local Ray
    and none is up yet. Returns whether it did."""
    with _lock:
        if _early:
            return True
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            return False
        # ray.init sets this handler only from the main thread: set it here, as it would
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        _early.update(records=_Records(), ready=threading.Event())
        # Ray imported here, before the driver imports torch: imports in two threads take turns
        # (one interpreter lock), and Ray's processes start sooner when its import is not shared
        import ray  # noqa: F401

        # a daemon that outlives its work: Ray's processes die with the thread that started them
        # (PR_SET_PDEATHSIG), so it waits, doing nothing, until the driver exits
        threading.Thread(target=_start, args=(verbose,), name="segpipe-ray-start", daemon=True).start()
        return True


def _start(verbose: bool) -> None:
    records: _Records = _early["records"]
    last_resort, logging.lastResort = logging.lastResort, records
    try:
        if starts_local_ray():  # else a cluster: `connect` calls ray.init as always
            init_local(verbose)
            _warm_ray_data()
    except BaseException as exc:  # raised again by `connect`, in the driver's thread
        _early["error"] = exc
    finally:
        logging.lastResort = last_resort
        _early["ready"].set()
    threading.Event().wait()


def init_local(verbose: bool = False, **extra) -> None:
    """`ray.init` of a new local Ray, lean (`lean_node`), with the run's arguments (`extra` beside them)."""
    import ray

    kwargs = {**ray_init_kwargs(verbose), **extra}
    with lean_node(kwargs["log_to_driver"]):
        ray.init(**kwargs)


@contextlib.contextmanager
def lean_node(log_to_driver: bool) -> Iterator[bool]:
    """Meanwhile the Ray node that `ray.init` starts here has no autoscaler monitor, no log monitor
    (unless `log_to_driver`) and no API server: options of Ray's node (`ray start --no-monitor`,
    `--include-log-monitor`) that ray.init does not pass on. Yields whether it could (a Ray whose
    node has other names starts as ray.init starts it)."""
    try:
        from ray._private.node import Node
        from ray._private.parameter import RayParams

        known = {"no_monitor", "include_log_monitor"} <= set(
            inspect.signature(RayParams).parameters
        ) and "include_dashboard" in inspect.signature(Node.start_api_server).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        known = False
    if not known or os.environ.get("SEGPIPE_RAY_LEAN", "1") == "0":
        yield False
        return
    node_init, start_api_server = Node.__init__, Node.start_api_server

    def lean_init(self, ray_params, *args, **kwargs) -> None:
        ray_params.no_monitor = True
        if not log_to_driver:
            ray_params.include_log_monitor = False
        node_init(self, ray_params, *args, **kwargs)

    def no_api_server(self, *args, **kwargs) -> None:
        self._webui_url = ""  # what a Ray without the dashboard's packages has

    Node.__init__, Node.start_api_server = lean_init, no_api_server
    try:
        yield True
    finally:
        Node.__init__, Node.start_api_server = node_init, start_api_server


def _warm_ray_data() -> None:
    """Ray Data's own actors (its stats, its autoscaling coordinator, the actor pools' location
    tracker) are started by the plan's first batch: start them now, beside the driver's work.
    Each is a named actor Ray Data gets or creates; where a Ray version has other ones, the plan
    starts what it needs as before."""
    import ray.data  # noqa: F401  (the driver's own import of Ray Data, off the critical path)

    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
        from ray.data._internal.execution.node_trackers import get_or_create_actor_location_tracker
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    for start in (get_or_create_stats_actor, get_or_create_autoscaling_coordinator, get_or_create_actor_location_tracker):
        try:
            start()
        except Exception:
            logging.getLogger(__name__).debug("warming Ray Data failed", exc_info=True)


def connect(verbose: bool = False) -> None:
    """Ray for the run: the local Ray started early (waited for), else `ray.init` as always."""
    if "ready" in _early:
        _early["ready"].wait()
        records: _Records = _early["records"]
        for record in records.records:  # now, where the run's Ray lines go
            (logging.lastResort or logging.StreamHandler()).handle(record)
        records.records.clear()
        if "error" in _early:
            raise _early.pop("error")
    import ray

    if not ray.is_initialized():
        ray.init(**ray_init_kwargs(verbose))


def stop() -> None:
    """Shut down the local Ray that `start_in_background` started, once the run is over: at once,
    where Ray's own exit hook would first sleep half a second for lines that a run without
    log_to_driver never prints. Nothing where it started none (a cluster, a test's Ray)."""
    if "ready" not in _early or _early.get("stopped"):
        return
    _early["ready"].wait()
    _early["stopped"] = True
    import ray

    if ray.is_initialized() and ray._private.worker._global_node is not None:  # a local Ray of this process
        ray.shutdown()
