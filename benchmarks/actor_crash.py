"""What a crash costs: the same job plainly, with one actor dying mid-run, and killed whole and resumed.

    .venv/bin/python benchmarks/actor_crash.py [--images 200] [--actors 1]

A folder of `--images` random 96 x 96 images (3 classes, a tiny SegFormer, 32-pixel windows) is
segmented twice in fresh processes: once plainly, once with the test hook SEGPIPE_TEST_DIE_ON
killing the actor that gets the middle image (os._exit, once). Ray Data replaces the actor and
redoes the batch it held; the writer takes every image once. The table gives both wall times, the
difference (the crash's cost: the new actor's start and model load, plus the work in flight), and
checks that both runs hold every image once with equal metrics.

The third case is a lost driver: the run is SIGKILLed with its whole process session (its local
Ray, its actors) once half of its parts are committed, then run again with the same config. The
table gives the rerun's wall time, its time to its first newly committed part (the time to resume:
Ray's start, the listing, reading what is committed, the actor's model load, one unit) against the
plain run's time to its first part, and checks every image once with the plain run's metrics.
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
    resume = killed_and_resumed(work, data, checkpoint, env, args)
    assert json.loads((work / "runs" / "killed" / "summary.json").read_text())["IoU"] == summaries["plain"]["IoU"]
    assert summaries["plain"]["IoU"] == summaries["one actor dies"]["IoU"]
    print(f"{args.images} images of 96 x 96, {args.actors} actor(s), units of 16, {os.cpu_count()} cores")
    print(f"| {'run':<16} | {'seconds':>8} | {'images/s':>8} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 10}|")
    for name, s in seconds.items():
        print(f"| {name:<16} | {s:8.1f} | {args.images / s:8.2f} |")
    print(f"crash cost: {seconds['one actor dies'] - seconds['plain']:+.1f} s; every image once, metrics equal")
    print()
    print(f"killed at {resume['committed']} of {args.images} images committed, then rerun:")
    print(f"| {'':<34} | {'seconds':>8} |")
    print(f"|{'-' * 36}|{'-' * 10}|")
    print(f"| {'plain run: first part committed':<34} | {resume['plain_first']:8.1f} |")
    print(f"| {'rerun: first new part committed':<34} | {resume['first']:8.1f} |")
    print(f"| {'rerun: to the end':<34} | {resume['total']:8.1f} |")


def first_part_seconds(proc: subprocess.Popen, masks: Path, before: set[str], start: float, timeout: float = 600) -> float:
    """Seconds from `start` until a part not in `before` is committed under `masks`."""
    while time.perf_counter() - start < timeout:
        if {p.name for p in masks.glob("part-*.parquet")} - before:
            return time.perf_counter() - start
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("no new part was committed")


def killed_and_resumed(work: Path, data: Path, checkpoint: Path, env: dict, args) -> dict:
    from helpers import job_config, read_run_table, write_yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from test_reruns import kill_session

    cfg = job_config(work, data / "images", checkpoint, labels=data / "labels", run_id="killed",
                     input={"images_per_unit": 16}, resources={"actors": args.actors})  # fmt: skip
    config = write_yaml(work / "killed.yaml", cfg)
    masks = work / "runs" / "killed" / "masks"
    command = [sys.executable, "-m", "jobs.cli", "run", str(config)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    plain_first = first_part_seconds(proc, masks, set(), start)
    half = args.images // 16 // 2
    while proc.poll() is None and len(list(masks.glob("part-*.parquet"))) < half:
        time.sleep(0.05)
    kill_session(proc.pid)
    proc.wait(timeout=60)
    committed = len(read_run_table(work / "runs" / "killed", "masks"))
    before = {p.name for p in masks.glob("part-*.parquet")}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = first_part_seconds(proc, masks, before, start)
    assert proc.wait(timeout=900) == 0
    total = time.perf_counter() - start
    ids = read_run_table(work / "runs" / "killed", "masks").column("image_id").to_pylist()
    assert sorted(ids) == sorted(set(ids)) and len(ids) == args.images, "every image once"
    return {"committed": committed, "plain_first": plain_first, "first": first, "total": total}


if __name__ == "__main__":
    main()
