"""What a crashed predictor costs: the same job with and without one actor dying mid-run.

    .venv/bin/python benchmarks/actor_crash.py [--images 200] [--actors 1]

A folder of `--images` random 96 x 96 images (3 classes, a tiny SegFormer, 32-pixel windows) is
segmented twice in fresh processes: once plainly, once with the test hook SEGPIPE_TEST_DIE_ON
killing the actor that gets the middle image (os._exit, once). Ray Data replaces the actor and
redoes the batch it held; the writer takes every image once. The table gives both wall times, the
difference (the crash's cost: the new actor's start and model load, plus the work in flight), and
checks that both runs hold every image once with equal metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run(config: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(config)], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    from helpers import job_config, labeled_folder, read_run_table, tiny_checkpoint, write_yaml

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--actors", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segpipe-crash-"))
    data = labeled_folder(work / "data", [(96, 96)] * args.images, 3)
    checkpoint = tiny_checkpoint(work / "m.safetensors", 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seconds, summaries = {}, {}
    for name in ("plain", "one actor dies"):
        cfg = job_config(work, data / "images", checkpoint, labels=data / "labels", run_id=name.replace(" ", "-"),
                         input={"images_per_unit": 16}, resources={"actors": args.actors})  # fmt: skip
        case_env = dict(env)
        if name != "plain":
            case_env["SEGPIPE_TEST_DIE_ON"] = f"img{args.images // 2:03d}.png:{work / 'died'}"
        seconds[name] = run(write_yaml(work / f"{cfg['run_id']}.yaml", cfg), case_env)
        run_dir = work / "runs" / cfg["run_id"]
        ids = read_run_table(run_dir, "masks").column("image_id").to_pylist()
        assert sorted(ids) == sorted(set(ids)) and len(ids) == args.images, "every image once"
        summaries[name] = json.loads((run_dir / "summary.json").read_text())
    assert (work / "died").exists(), "the actor did not die"
    assert summaries["plain"]["IoU"] == summaries["one actor dies"]["IoU"]
    print(f"{args.images} images of 96 x 96, {args.actors} actor(s), units of 16, {os.cpu_count()} cores")
    print(f"| {'run':<16} | {'seconds':>8} | {'images/s':>8} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 10}|")
    for name, s in seconds.items():
        print(f"| {name:<16} | {s:8.1f} | {args.images / s:8.2f} |")
    print(f"crash cost: {seconds['one actor dies'] - seconds['plain']:+.1f} s; every image once, metrics equal")


if __name__ == "__main__":
    main()
