"""An elastic pool in a real run: resources.actors {min: 1, max: 2} on this machine's 2 CPUs, and what
run.json's `actors` says the pool did (`started`, `most_serving`, `timeline`: seconds from the plan's
start -> predictor actors alive).

    .venv/bin/python benchmarks/elastic_pool.py [--images 48] [--size 320]

Ray Data (2.60) adds an actor once the pool's utilization (batches in flight over actors) reaches 1.75,
i.e. once its one actor holds its 2 batches with more queued, and lets an idle actor go once every
input is consumed. A new actor serves only after its start (torch imported, the model loaded: 6-8 s on
2 loaded cores), so the plan must outlast that: 48 images of 320 x 320 in windows of 32 do here. A
demonstration, not a test: whether the pool grows depends on that race (the recording itself is tested
on an ordinary run, tests/test_plan.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import job_config, tiny_checkpoint  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.plan import run_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segpipe-pool-"))
    rng = np.random.default_rng(0)
    (work / "images").mkdir()
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(work / "images" / f"img{i:03d}.png")
    checkpoint = tiny_checkpoint(work / "m.safetensors", 3)
    cfg = job_config(work, work / "images", checkpoint, input={"images_per_unit": 2}, resources={"actors": {"min": 1, "max": 2}},
                     inference={"window": [32, 32], "stride": [32, 32], "batch_size": 16})  # fmt: skip
    started = time.time()
    result = run_job(load_config(cfg), progress=lambda _: None)
    attempt = json.loads((Path(result.run_dir) / "run.json").read_text())["attempts"][-1]
    print(f"{args.images} images of {args.size} x {args.size}: {result.status} in {time.time() - started:.1f} s")
    print("run.json attempts[-1].actors:", json.dumps(attempt["actors"]))


if __name__ == "__main__":
    main()
