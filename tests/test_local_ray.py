"""pipeline.local_ray: the `segpipe` program's local Ray, started in a thread while the driver
works (its lines held for the run's log, Ray Data's actors started with it) and shut down at the
end; a cluster address starts nothing early and ray.init gets what it always got."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.local_ray import ray_init_kwargs

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    # RAY_AUTH_MODE too: a Ray started in this process sets it, and Ray then warns of nothing at start
    environment = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180
    )


def test_ray_init_gets_what_runs_always_gave_it():
    assert ray_init_kwargs(verbose=False) == {
        "include_dashboard": False,
        "ignore_reinit_error": True,
        "log_to_driver": False,
        "configure_logging": False,
    }
    assert ray_init_kwargs(verbose=True)["log_to_driver"] is True


def test_a_cluster_address_starts_nothing_early():
    proc = python(
        """
        from pipeline import local_ray
        local_ray.start_in_background()
        local_ray._early["ready"].wait()
        import ray
        print(local_ray.starts_local_ray(), ray.is_initialized())
        """,
        RAY_ADDRESS="127.0.0.1:9",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False"]


def test_the_early_local_ray_has_ray_datas_actors_holds_its_lines_for_the_log_and_stops():
    proc = python(
        """
        import json, os, sys, time
        from pipeline import local_ray
        assert local_ray.start_in_background()
        time.sleep(0.5)
        print("BEFORE CONNECT", file=sys.stderr, flush=True)
        local_ray.connect()  # where a run sends Ray's lines to its log file
        import ray
        names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
        up = ray.is_initialized()
        children = []  # the processes ray.init started here
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid()):
                    children.append(open(f"/proc/{pid}/cmdline").read().replace("\\0", " "))
            except OSError:
                pass
        local_ray.stop()
        print(json.dumps({"up": up, "names": names, "after_stop": ray.is_initialized(), "children": children}))
        """,
        RAY_ADDRESS="local",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["up"] and not out["after_stop"]
    assert "ActorLocationTracker" in out["names"] and len(out["names"]) >= 3  # and Ray Data's stats and autoscaling actors
    before, _, after = proc.stderr.partition("BEFORE CONNECT")
    assert before.strip() == ""  # nothing of Ray's on the terminal while the driver works
    assert "Token authentication" in after  # Ray's lines meanwhile, written when the run takes them
    # lean: the GCS, the raylet (whose agents stay) and no autoscaler monitor, log monitor or API server
    started = " ".join(out["children"])
    assert "gcs_server" in started and "raylet" in started
    assert "monitor.py" not in started and "log_monitor.py" not in started and "dashboard.py" not in started
