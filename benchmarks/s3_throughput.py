"""Images per second of the same job from local files and from an S3 endpoint on loopback, in one run.

    .venv/bin/python benchmarks/s3_throughput.py [--images 200] [--shards 4] [--size 64] [--repeats 2]

The job: WebDataset-style tar shards (KEY.png with KEY.label.png) through a tiny SegFormer with
random weights (whole-image inference), masks and metrics written as Parquet. The same shards are
read from a local directory and from a bucket of moto's S3 server on 127.0.0.1 (s3fs pointed at it
with `endpoint_url`), and the run is written locally or to a second bucket. The S3 server runs in
this process, next to the Ray driver, so it shares the machine's cores with the job: the ratio is
what the store path (s3fs, HTTP, moto) costs a small-model job, not what a real bucket would do.

Ray starts once; a warm-up job (not counted) loads what the actors import. The cases then run in
turn, `--repeats` times, each with a new run_id; the table shows the median. `images/s` is
images segmented over the job's wall time (listing, actor start, reads, inference, writes,
summary), as summary.json reports it.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = (("local", "local"), ("s3", "local"), ("s3", "s3"))
NUM_CLASSES = 3


def write_shards(directory: Path, images: int, shards: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    def png(array) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    rng = np.random.default_rng(0)
    per_shard = -(-images // shards)
    for s in range(shards):
        with tarfile.open(directory / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                label = rng.integers(0, NUM_CLASSES, (size, size), dtype=np.uint8)
                for name, data in ((f"img{i:06d}.png", png(image)), (f"img{i:06d}.label.png", png(label))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="images are size x size")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import fsspec
    from moto.server import ThreadedMotoServer

    from models import build_model, save_native
    from pipeline.config import load_config
    from pipeline.plan import init_ray, run_job

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per dataset otherwise
    work = Path(tempfile.mkdtemp(prefix="segpipe-s3-bench-"))
    shards = work / "shards"
    shards.mkdir()
    write_shards(shards, args.images, args.shards, args.size)
    checkpoint = work / "tiny-segformer.safetensors"
    save_native(
        build_model("segformer-b0", num_classes=NUM_CLASSES, hidden_sizes=[16, 32, 64, 128], num_heads=[1, 1, 2, 4], decoder_dim=32),
        checkpoint,
    )

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto takes any credentials; a real job takes them from the environment or the options
    options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench", "client_kwargs": {"region_name": "us-west-2"}}
    s3 = fsspec.filesystem("s3", **options)
    s3.mkdir("bench-archive")
    s3.mkdir("bench-runs")
    s3.put(str(shards) + "/", "bench-archive/shards/", recursive=True)
    uris = {"local": (str(shards), str(work / "runs")), "s3": ("s3://bench-archive/shards", "s3://bench-runs")}

    def job(source: str, sink: str, run_id: str) -> dict:
        cfg = {
            "run_id": run_id,
            "input": {"uri": uris[source][0], "format": "tar", "labels": {}, "storage_options": options if source == "s3" else {}},
            "model": {"checkpoint": str(checkpoint)},
            "inference": {"mode": "whole", "window": [args.size, args.size], "stride": [args.size, args.size]},
            "output": {"uri": uris[sink][1], "storage_options": options if sink == "s3" else {}},
        }
        start = time.perf_counter()
        result = run_job(load_config(cfg), progress=lambda _: None)
        wall = time.perf_counter() - start
        if result.status != "succeeded" or result.summary["images"] != args.images:
            sys.exit(f"{run_id}: {result.status} {result.message} ({result.summary['images']} images)")
        return {"wall": wall, "rate": result.summary["throughput"]["images_per_second"]}

    try:
        init_ray()
        job("local", "local", "warm-up")
        results: dict[tuple[str, str], list[dict]] = {case: [] for case in CASES}
        for r in range(args.repeats):
            for source, sink in CASES:
                results[source, sink].append(job(source, sink, f"{source}-to-{sink}-{r}"))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    base = statistics.median(x["rate"] for x in results["local", "local"])
    print(
        f"{args.images} images of {args.size} x {args.size} in {args.shards} tar shards, tiny SegFormer "
        f"(random weights, whole-image inference), {cpus} CPUs; median of {args.repeats} runs per case"
    )
    print()
    print("| input | output | job wall s | images/s | ratio to local -> local |")
    print("| --- | --- | ---: | ---: | ---: |")
    for source, sink in CASES:
        rows = results[source, sink]
        rate = statistics.median(x["rate"] for x in rows)
        wall = statistics.median(x["wall"] for x in rows)
        print(f"| {source} | {sink} | {wall:.1f} | {rate:.1f} | {rate / base:.2f} |")
    print()
    print(f"s3: moto's S3 server on {host} (loopback), in this process; local: files in a temporary directory")


if __name__ == "__main__":
    main()
