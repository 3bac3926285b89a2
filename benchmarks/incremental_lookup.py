"""Driver memory and time of an --incremental run's lookup: which listed ids does the job hold already.

    .venv/bin/python benchmarks/incremental_lookup.py [--ids 100000 1000000] [--runs 4]

Setup (once per size, outside the measurement): a job of `--runs` earlier runs under one output
directory, each with its `ids.parquet` index (pipeline.results.runstore.RunStore.write_index), holding `ids`
ids between them, and a listing of `ids` + 10% ids (the earlier ones plus new ones), as the driver
holds it: units of 64 image ids.

Measured, each in a fresh subprocess, with the result still referenced: `held` = Python objects
(tracemalloc) + Arrow buffers (pyarrow's allocator) that the lookup added; `peak` the same at their
highest; `rss` the resident set growth (allocators keep freed pages, so it overstates both):
  segpipe      RunStore.outcomes() of every run as Arrow (IdSet), one IdSet.union, then
               ImageFolderReader.drop_done over the whole listing (one pc.is_in)
  python set   the reference: every held id read into one Python set, then a comprehension over
               the listing (what a driver that "just uses a set" does)
Per id = held / ids held by the job. Needs Linux (/proc).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def image_id(i: int) -> str:
    return f"cam-{i // 1000:04d}/img-{i:09d}.png"


def setup(root: Path, ids: int, runs: int) -> None:
    import pyarrow as pa

    from pipeline.results.runstore import Outcomes, RunStore
    from pipeline.rows import IdSet

    per_run = ids // runs
    for r in range(runs):
        store = RunStore(str(root / "runs"), {}, f"nightly-{r:02d}")
        held = pa.array([image_id(i) for i in range(r * per_run, (r + 1) * per_run)], pa.string())
        store.write_index(Outcomes(IdSet(held), IdSet(), set()))
        store.write_json("run.json", {"run_id": f"nightly-{r:02d}", "job": "nightly", "started": f"2026-01-{r + 1:02d}"})


def worker(root: Path, ids: int, method: str) -> dict:
    import gc

    from pipeline.config import InputConfig
    from pipeline.io.source import ImageFolderReader
    from pipeline.results.runstore import RunStore, runs_of_job
    from pipeline.rows import IdSet, SourceUnit

    listed = int(ids * 1.1)
    units = [
        SourceUnit(
            index=u,
            format="images",
            uris=tuple(image_id(i) for i in range(s, min(s + 64, listed))),
            image_ids=tuple(image_id(i) for i in range(s, min(s + 64, listed))),
        )
        for u, s in enumerate(range(0, listed, 64))
    ]
    import tracemalloc

    import pyarrow as pa

    reader = ImageFolderReader(InputConfig(uri=str(root)))
    gc.collect()
    before = rss_kib("VmRSS")
    pool = pa.default_memory_pool()
    arrow_before = pool.bytes_allocated()
    tracemalloc.start()
    start = time.perf_counter()
    run_ids = runs_of_job(str(root / "runs"), {}, "nightly")
    if method == "segpipe":
        held = IdSet.union(*(RunStore(str(root / "runs"), {}, r).outcomes().segmented for r in run_ids))
        todo = reader.drop_done(units, held)
        count = len(held)
    else:
        import pyarrow.parquet as pq

        held = set()
        for r in run_ids:
            held.update(pq.read_table(root / "runs" / r / "ids.parquet", columns=["image_id"]).column("image_id").to_pylist())
        todo = [[i for i in u.image_ids if i not in held] for u in units]
        todo = [u for u in todo if u]
        count = len(held)
    seconds = time.perf_counter() - start
    gc.collect()
    python_now, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    arrow_now = pool.bytes_allocated() - arrow_before
    held_kib = (python_now + arrow_now) / 1024
    peak_kib = (python_peak + max(pool.max_memory() - arrow_before, arrow_now)) / 1024
    rss = rss_kib("VmRSS") - before
    left = sum(len(u.image_ids) if hasattr(u, "image_ids") else len(u) for u in todo)
    assert left == listed - ids, (left, listed, ids)
    return {"method": method, "ids": count, "seconds": seconds, "held_kib": held_kib, "peak_kib": peak_kib, "rss_kib": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ids", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--worker", nargs=3, metavar=("ROOT", "IDS", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), int(args.worker[1]), args.worker[2])))
        return
    print(
        f"| {'ids held':>9} | {'method':<10} | {'seconds':>7} | {'held MiB':>8} | {'peak MiB':>8} | {'rss MiB':>8} | {'bytes/id':>8} | {'ratio':>5} |"
    )
    print(f"|{'-' * 11}|{'-' * 12}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 7}|")
    for ids in args.ids:
        root = Path(tempfile.mkdtemp(prefix="segpipe-incremental-"))
        try:
            setup(root, ids, args.runs)
            rows = {}
            for method in ("segpipe", "python set"):
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", str(root), str(ids), method], capture_output=True, text=True, check=True
                )
                rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
            for method, r in rows.items():
                per_id = r["held_kib"] * 1024 / r["ids"]
                ratio = r["held_kib"] / max(rows["python set"]["held_kib"], 1)
                print(
                    f"| {r['ids']:>9,} | {method:<10} | {r['seconds']:7.2f} | {r['held_kib'] / 1024:8.1f} | "
                    f"{r['peak_kib'] / 1024:8.1f} | {r['rss_kib'] / 1024:8.1f} | {per_id:8.1f} | {ratio:5.2f} |"
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print("held: Python objects + Arrow buffers the lookup added, its result still referenced (the listing is built before)")


if __name__ == "__main__":
    main()
