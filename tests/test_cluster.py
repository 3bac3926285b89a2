"""segpipe on a Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster, loopback only),
in a subprocess of its own: the test session's local Ray stays as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import job_config, labeled_folder, read_run_table, tiny_checkpoint, write_yaml

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
