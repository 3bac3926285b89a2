"""segpipe on a Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster, loopback only),
in a subprocess of its own: the test session's local Ray stays as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import job_config, labeled_folder, read_run_table, store_rows, tiny_checkpoint, write_yaml

ROOT = Path(__file__).resolve().parents[1]

# starts a head and a second node (1 CPU each), runs `segpipe run` on them, stops what it started
DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        from jobs.cli import main

        code = main(["run", sys.argv[1]])
        print(json.dumps({"code": code, "nodes": nodes}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def run_on_two_nodes(config: Path) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_local_paths_are_refused_on_two_nodes_unless_shared_and_two_actors_commit_every_image_once(tmp_path):
    data = labeled_folder(tmp_path / "data", [(40, 50)] * 6, 3)
    checkpoint = tiny_checkpoint(tmp_path / "m.safetensors", 3)
    cfg = job_config(tmp_path, data / "images", checkpoint, labels=data / "labels", run_id="two-nodes", input={"images_per_unit": 2})
    result, err = run_on_two_nodes(write_yaml(tmp_path / "local.yaml", cfg))
    assert result == {"code": 2, "nodes": 2}
    assert "input.uri" in err and "shared_filesystem" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "two-nodes").exists()

    # this machine's disk is the same mount for both nodes: say so, and the run goes through
    cfg["input"]["shared_filesystem"] = True
    cfg["output"]["shared_filesystem"] = True
    cfg["resources"]["actors"] = 2  # two actors of half a CPU on two 1-CPU nodes: each node keeps room for a read task
    result, _ = run_on_two_nodes(write_yaml(tmp_path / "shared.yaml", cfg))
    assert result == {"code": 0, "nodes": 2}
    ids = read_run_table(tmp_path / "runs" / "two-nodes", "masks").column("image_id").to_pylist()
    assert sorted(ids) == [f"img{i:03d}.png" for i in range(6)]


METRICS_DRIVER = textwrap.dedent(
    """
    import json, socket, sys, time, urllib.request
    import ray

    sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    try:
        from jobs.cli import main

        code = main(["run", sys.argv[1]])
        lines, deadline = [], time.time() + 90  # Ray exports every few seconds
        while time.time() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                lines = [l for l in text.splitlines() if l.startswith("ray_segpipe_") and 'run_id="metrics"' in l]
                if any(l.startswith("ray_segpipe_images_total") for l in lines) and any(l.startswith("ray_segpipe_read_bytes") for l in lines):
                    break
            except OSError:
                pass
            time.sleep(2)
        print(json.dumps({"code": code, "lines": lines}))
    finally:
        ray.shutdown()
    """
)


def test_a_runs_metrics_appear_on_rays_prometheus_endpoint(tmp_path):
    data = labeled_folder(tmp_path / "data", [(40, 50)] * 3, 3)
    checkpoint = tiny_checkpoint(tmp_path / "m.safetensors", 3)
    cfg = job_config(tmp_path, data / "images", checkpoint, labels=data / "labels", run_id="metrics")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", METRICS_DRIVER, str(write_yaml(tmp_path / "job.yaml", cfg))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    values = {line.split("{")[0] + ("" if "outcome" not in line else "/" + line.split('outcome="')[1].split('"')[0]): float(line.rsplit(" ", 1)[1])
              for line in result["lines"] if not line.startswith("#")}  # fmt: skip
    assert values["ray_segpipe_images_total/ok"] == 3
    assert values["ray_segpipe_windows_total"] == 3 * 2 * 2  # 40 x 50 in 32-px windows, stride 24: 2 x 2 each
    assert values["ray_segpipe_read_bytes_total"] == sum(p.stat().st_size for p in (data / "images").iterdir()) + sum(
        p.stat().st_size for p in (data / "labels").iterdir()
    )
    assert values["ray_segpipe_image_seconds_count"] == 3


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
        time.sleep(2)
    print(client.get_job_logs(job)[-3000:])
    print(json.dumps({"status": str(status.value)}))
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_session(sid: int) -> None:
    import contextlib
    import signal

    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout.split()
    for pid, session in zip(listing[::2], listing[1::2]):
        if int(session) == sid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def test_a_job_submitted_through_ray_jobs_to_two_nodes_reads_and_writes_s3_every_image_once(ray_session, s3, tmp_path):
    """`ray start` a head (with the job server) and a second node, each 1 CPU, each in a process
    session of its own; submit `segpipe run` with JobSubmissionClient; stop both sessions after."""
    import secrets

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

    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    gcs, dashboard = _free_port(), _free_port()
    sessions = []
    address_file = Path("/tmp/ray/ray_current_cluster")
    try:
        for args in (
            ["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"],
            [f"--address=127.0.0.1:{gcs}"],
        ):
            # ports of their own: the test session's local Ray holds the default agent ports
            ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                     f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                     f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]  # fmt: skip
            start = subprocess.Popen([ray_bin, "start", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats", *ports, *args],
                                     env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            sessions.append(start.pid)
            out = start.communicate(timeout=180)[0]
            assert start.returncode == 0, out[-2000:]
        # the client in a process of its own: it authenticates with the nodes' token (this test
        # process holds the token of the session's own local Ray)
        submit = subprocess.run([sys.executable, "-c", SUBMIT, f"http://127.0.0.1:{dashboard}", str(config), str(ROOT)],
                                env=env, capture_output=True, text=True, timeout=420)  # fmt: skip
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        assert json.loads(submit.stdout.strip().splitlines()[-1])["status"] == "SUCCEEDED", submit.stdout[-3000:]
    finally:
        for sid in sessions:
            _kill_session(sid)
        # `ray start` names its cluster here for later plain ray.init() calls: it is gone now
        if address_file.exists() and address_file.read_text().strip().endswith(f":{gcs}"):
            address_file.unlink()
    ids = [r["image_id"] for r in store_rows(s3.fs, f"{bucket}/runs/jobs", "masks")]
    assert sorted(ids) == [f"img{i:03d}.png" for i in range(6)]  # every image once
    info = json.loads(s3.fs.cat_file(f"{bucket}/runs/jobs/run.json"))
    assert info["attempts"][-1]["actors"]["actors"] == 2
    assert s3.storage_options["secret"] not in json.dumps(info)  # credentials never reach run.json
    # the same metrics as this machine's single-node run of the same job
    local = {**cfg, "run_id": "single", "output": {**cfg["output"], "uri": f"s3://{bucket}/single"}}
    from jobs.cli import main

    assert main(["run", str(write_yaml(tmp_path / "single.yaml", local))]) == 0
    single = json.loads(s3.fs.cat_file(f"{bucket}/single/single/summary.json"))
    assert json.loads(s3.fs.cat_file(f"{bucket}/runs/jobs/summary.json"))["IoU"] == single["IoU"]
