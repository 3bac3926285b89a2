"""segpipe on a Ray cluster of two nodes on this machine: one cluster for the module, started with
`ray start` (a head with Ray Jobs' server and a second node, 1 CPU each, loopback only), each node
in a process session of its own and a temp dir of its own, so that no plain `ray.init()` on this
machine finds it; both sessions are stopped by process id after the module."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import job_config, kill_session, labeled_folder, read_run_table, run_iou, store_rows, tiny_checkpoint, write_yaml

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TwoNodes:
    address: str  # the head's GCS, for RAY_ADDRESS
    dashboard: str  # Ray Jobs' server
    metrics_ports: list[int]  # each node's Prometheus endpoint
    env: dict  # the nodes' token: a driver or a client needs it


@pytest.fixture(scope="module")
def two_nodes(ray_session, tmp_path_factory):
    # the session's own Ray is up first (ray_session): the cluster's temp dir is its own anyway
    temp_dir = tmp_path_factory.mktemp("ray")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    gcs, dashboard = _free_port(), _free_port()
    metrics_ports, sessions = [], []
    try:
        for args in (
            ["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"],
            [f"--address=127.0.0.1:{gcs}"],
        ):
            metrics_ports.append(_free_port())
            # ports of their own: the test session's local Ray holds the default agent ports
            ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                     f"--metrics-export-port={metrics_ports[-1]}", f"--runtime-env-agent-port={_free_port()}",
                     f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]  # fmt: skip
            start = subprocess.Popen([ray_bin, "start", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
                                      f"--temp-dir={temp_dir}", *ports, *args],
                                     env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            sessions.append(start.pid)
            out = start.communicate(timeout=180)[0]
            assert start.returncode == 0, out[-2000:]
        yield TwoNodes(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", metrics_ports, env)
    finally:
        for sid in sessions:
            kill_session(sid)


def segpipe_on(cluster: TwoNodes, config: Path) -> subprocess.CompletedProcess:
    """`segpipe run CONFIG` as a driver of its own on the cluster (RAY_ADDRESS set, as `ray job submit` sets it)."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT), "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120"}
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )


@pytest.fixture(scope="module")
def shared_run(two_nodes, tmp_path_factory):
    """A job of 6 local images on the two nodes: refused while its paths are local, then run with
    them said to be a shared mount (two actors)."""
    tmp_path = tmp_path_factory.mktemp("shared")
    data = labeled_folder(tmp_path / "data", [(40, 50)] * 6, 3)
    checkpoint = tiny_checkpoint(tmp_path / "m.safetensors", 3)
    cfg = job_config(tmp_path, data / "images", checkpoint, labels=data / "labels", run_id="two-nodes", input={"images_per_unit": 2})
    refused = segpipe_on(two_nodes, write_yaml(tmp_path / "local.yaml", cfg))
    written_when_refused = (tmp_path / "runs" / "two-nodes").exists()
    # this machine's disk is the same mount for both nodes: say so, and the run goes through
    cfg["input"]["shared_filesystem"] = True
    cfg["output"]["shared_filesystem"] = True
    cfg["resources"]["actors"] = 2  # two actors of half a CPU on two 1-CPU nodes: each node keeps room for a read task
    shared = segpipe_on(two_nodes, write_yaml(tmp_path / "shared.yaml", cfg))
    return {
        "refused": refused,
        "written_when_refused": written_when_refused,
        "shared": shared,
        "data": data,
        "run": tmp_path / "runs" / "two-nodes",
    }


def test_local_paths_are_refused_on_two_nodes_unless_shared_and_two_actors_commit_every_image_once(shared_run):
    refused = shared_run["refused"]
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "input.uri" in refused.stderr and "cluster of 2 nodes" in refused.stderr and "shared_filesystem" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not shared_run["written_when_refused"]

    assert shared_run["shared"].returncode == 0, shared_run["shared"].stderr[-3000:]
    ids = read_run_table(shared_run["run"], "masks").column("image_id").to_pylist()
    assert sorted(ids) == [f"img{i:03d}.png" for i in range(6)]
    assert json.loads((shared_run["run"] / "run.json").read_text())["attempts"][-1]["actors"]["actors"] == 2


def prometheus_values(ports: list[int], run_id: str) -> dict[str, float]:
    """segpipe's metrics of `run_id` on the nodes' Prometheus endpoints, summed over the nodes:
    `name` or `name/outcome` -> value."""
    values: dict[str, float] = {}
    for port in ports:
        with contextlib.suppress(OSError):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            for line in text.splitlines():
                if line.startswith("ray_segpipe_") and f'run_id="{run_id}"' in line:
                    name = line.split("{")[0] + ("" if "outcome" not in line else "/" + line.split('outcome="')[1].split('"')[0])
                    values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def test_a_runs_metrics_appear_on_rays_prometheus_endpoints(shared_run, two_nodes):
    assert shared_run["shared"].returncode == 0
    data = shared_run["data"]
    read_bytes = sum(p.stat().st_size for kind in ("images", "labels") for p in (data / kind).iterdir())
    deadline, values = time.time() + 90, {}  # Ray exports every few seconds
    while time.time() < deadline:
        values = prometheus_values(two_nodes.metrics_ports, "two-nodes")
        if values.get("ray_segpipe_images_total/ok") == 6 and values.get("ray_segpipe_read_bytes_total") == read_bytes:
            break
        time.sleep(2)
    assert values.get("ray_segpipe_images_total/ok") == 6, values
    assert values["ray_segpipe_windows_total"] == 6 * 2 * 2  # 40 x 50 in 32-px windows, stride 24: 2 x 2 each
    assert values["ray_segpipe_read_bytes_total"] == read_bytes
    assert values["ray_segpipe_image_seconds_count"] == 6


# submits `segpipe run CONFIG` to the job server at URL with the repository as the working dir, waits
SUBMIT = textwrap.dedent(
    """
    import json, sys, time
    from ray.job_submission import JobSubmissionClient

    url, config, root = sys.argv[1:4]
    client = JobSubmissionClient(url)
    deadline = time.time() + 120
    while True:  # the head's agent takes a moment to come up
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} -m jobs.cli run {config}",
                runtime_env={"working_dir": root, "excludes": [".venv", ".git", "demo-out", "runs", "*.egg-info", "__pycache__"],
                             "env_vars": {"RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120"}},
            )
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)
    deadline = time.time() + 300
    while not (status := client.get_job_status(job)).is_terminal() and time.time() < deadline:
        time.sleep(1)
    print(client.get_job_logs(job)[-3000:])
    print(json.dumps({"status": str(status.value)}))
    """
)


def test_a_job_submitted_through_ray_jobs_to_two_nodes_reads_and_writes_s3_every_image_once(two_nodes, s3, tmp_path):
    """Submit `segpipe run` with JobSubmissionClient to the head's job server; the run reads and
    writes S3, two actors on the two nodes."""
    bucket = s3.bucket("jobs").removeprefix("s3://")
    data = labeled_folder(tmp_path / "data", [(40, 50)] * 6, 3)
    for kind in ("images", "labels"):
        for path in (data / kind).iterdir():
            s3.fs.put_file(str(path), f"{bucket}/{kind}/{path.name}")
    checkpoint = tiny_checkpoint(tmp_path / "m.safetensors", 3)
    options = s3.storage_options
    cfg = job_config(tmp_path, f"s3://{bucket}/images", checkpoint, labels=f"s3://{bucket}/labels", run_id="jobs",
                     input={"images_per_unit": 2, "storage_options": options}, resources={"actors": 2},
                     output={"uri": f"s3://{bucket}/runs", "storage_options": options})  # fmt: skip
    config = write_yaml(tmp_path / "job.yaml", cfg)
    # the client in a process of its own: it authenticates with the nodes' token (this test
    # process holds the token of the session's own local Ray)
    submit = subprocess.run([sys.executable, "-c", SUBMIT, two_nodes.dashboard, str(config), str(ROOT)],
                            env=two_nodes.env, capture_output=True, text=True, timeout=420)  # fmt: skip
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    assert json.loads(submit.stdout.strip().splitlines()[-1])["status"] == "SUCCEEDED", submit.stdout[-3000:]
    ids = [r["image_id"] for r in store_rows(s3.fs, f"{bucket}/runs/jobs", "masks")]
    assert sorted(ids) == [f"img{i:03d}.png" for i in range(6)]  # every image once
    info = json.loads(s3.fs.cat_file(f"{bucket}/runs/jobs/run.json"))
    assert info["attempts"][-1]["actors"]["actors"] == 2
    assert s3.storage_options["secret"] not in json.dumps(info)  # credentials never reach run.json
    # the metrics summed over two nodes are the committed masks' own, counted here in numpy
    summary = json.loads(s3.fs.cat_file(f"{bucket}/runs/jobs/summary.json"))
    assert summary["IoU"] == pytest.approx(run_iou(f"s3://{bucket}/runs/jobs", data / "labels", 3, options), abs=1e-4)
