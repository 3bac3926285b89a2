"""One huge tiled TIFF: time and peak memory of segmenting it streamed (read window by window,
pipeline.tiff, pipeline.predictor) next to decoding it whole first, and the streamed peak as the image grows taller.

    .venv/bin/python benchmarks/huge_tiff.py [--height 12000] [--width 12000] [--classes 4]
                                            [--window 500] [--stride 500] [--heights 1000,4000,12000]
                                            [--methods streamed,decoded] [--threads 1]

Each measurement runs in its own fresh subprocess on the same TIFF (written tile by tile first, a
synthetic scene that deflates well, zlib tiles of 256 x 256), with the same tiny SegFormer (random
weights, MiT widths 8..64, output stride 8) and the same windows. Memory is the peak resident set
size while the call runs, above the RSS just before it (VmHWM after writing 5 to
/proc/self/clear_refs), so imports and the model are not counted. Time is the call's wall time.

Methods:
  streamed   pipeline.predictor.segment_tiff: tiles read as windows need them, scores blended in a band
             of rows, the mask PNG-encoded in chunks as rows finish (what the job does above
             input.stream_above_pixels).
  decoded    tifffile.imread of the whole image, then segment_images (the same band stitcher) and
             the same chunked PNG encoding: what the job does for an image below the threshold.
Ratios are decoded / streamed, from the same run. Needs Linux (/proc).
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
sys.path.insert(0, str(ROOT / "tests"))  # the tiny SegFormer and the synthetic scene of the tests

METHODS = ("streamed", "decoded")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_tiff(path: str, height: int, width: int, tile: int = 256) -> None:
    """A tiled RGB TIFF written tile by tile (one tile in memory at a time)."""
    import numpy as np
    import tifffile
    from helpers import scene_pixels

    def tiles():
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                padded = np.zeros((tile, tile, 3), np.uint8)
                region = scene_pixels(y, x, min(tile, height - y), min(tile, width - x))
                padded[: region.shape[0], : region.shape[1]] = region
                yield padded

    tifffile.imwrite(
        path,
        tiles(),
        shape=(height, width, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="zlib",
        compressionargs={"level": 1},
    )


def worker(args: argparse.Namespace) -> None:
    """Run one method in this process; print a JSON line with time and memory."""
    import tifffile
    import torch
    from helpers import TINY_SEGFORMER

    from models import build_model
    from pipeline.masks import encode_chunks
    from pipeline.predictor import ModelScorer, limit_heap_growth, segment_tiff
    from pipeline.rows import StreamSource
    from pipeline.tiling import TilingSettings, segment_images

    torch.set_num_threads(args.threads)
    limit_heap_growth()  # as the predictor actor does
    torch.manual_seed(0)
    model = build_model("segformer-b0", num_classes=args.classes, **TINY_SEGFORMER).eval()
    score_fn = ModelScorer(model, torch.device("cpu"))
    settings = TilingSettings(window=(args.window, args.window), stride=(args.stride, args.stride), batch_size=args.batch)
    height, width = args.image_height, args.width
    score_fn(torch.zeros(1, 3, args.window, args.window))  # warm up outside the measurement

    def run():
        if args.method == "streamed":
            source = StreamSource(args.tiff, None, height, width)
            return segment_tiff(score_fn, source, settings, num_classes=args.classes, chunk_size=4096)[0]
        image = tifffile.imread(args.tiff)
        labels = segment_images(score_fn, [image], settings)[0].labels
        return encode_chunks(labels, None, 4096, args.classes)

    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    start = time.perf_counter()
    chunks = run()
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    print(
        json.dumps(
            {
                "method": args.method,
                "height": height,
                "seconds": seconds,
                "peak_mib": (peak - before) / 1024,
                "png_mib": sum(len(c.mask) for c in chunks) / 2**20,
            }
        )
    )


def measure(args: argparse.Namespace, method: str, tiff: str, height: int) -> dict:
    command = [sys.executable, __file__, "--method", method, "--tiff", tiff, f"--image-height={height}"] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("method", "tiff", "image_height", "methods", "heights") and v is not None
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=12000)
    parser.add_argument("--width", type=int, default=12000)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--stride", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--heights", default="", help="also stream TIFFs of these heights (same width): peak vs height")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--tiff", help=argparse.SUPPRESS)
    parser.add_argument("--image-height", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        worker(args)
        return

    pixels = args.height * args.width
    print(
        f"TIFF {args.width} x {args.height} RGB, zlib tiles of 256; {args.classes} classes, tiny SegFormer, window "
        f"{args.window}, stride {args.stride}, batch {args.batch}, {args.threads} torch thread(s)"
    )
    print(f"decoded image {pixels * 3 / 2**20:.0f} MiB; float32 scores of the whole image {pixels * args.classes * 4 / 2**20:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        tiff = os.path.join(tmp, "scene.tif")
        started = time.perf_counter()
        write_tiff(tiff, args.height, args.width)
        print(f"wrote {os.path.getsize(tiff) / 2**20:.0f} MiB in {time.perf_counter() - started:.1f} s")
        results = {method: measure(args, method, tiff, args.height) for method in args.methods.split(",")}
        streamed = results.get("streamed")
        header = f"{'method':<10}{'time s':>9}{'peak MiB':>11}{'time / streamed':>17}{'memory / streamed':>19}"
        print(header)
        print("-" * len(header))
        for method, result in results.items():
            time_ratio = result["seconds"] / streamed["seconds"] if streamed else float("nan")
            memory_ratio = result["peak_mib"] / streamed["peak_mib"] if streamed else float("nan")
            print(f"{method:<10}{result['seconds']:>9.1f}{result['peak_mib']:>11.0f}{time_ratio:>17.2f}{memory_ratio:>19.2f}")
        if args.heights:
            print(f"\nstreamed, width {args.width}: peak against height")
            print(f"{'height':>8}{'time s':>9}{'peak MiB':>11}{'decoded image MiB':>19}")
            for height in (int(h) for h in args.heights.split(",")):
                path = os.path.join(tmp, f"scene-{height}.tif")
                write_tiff(path, height, args.width)
                result = measure(args, "streamed", path, height)
                os.remove(path)
                print(f"{height:>8}{result['seconds']:>9.1f}{result['peak_mib']:>11.0f}{height * args.width * 3 / 2**20:>19.0f}")
    print("peak MiB: peak RSS during the call above the RSS before it (VmHWM after clear_refs), per fresh subprocess")


if __name__ == "__main__":
    main()
