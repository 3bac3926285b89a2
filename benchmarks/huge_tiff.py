"""One huge tiled TIFF: time and peak memory of segmenting it streamed (read window by window,
pipeline.io.tiff, pipeline.predict.predictor) next to decoding it whole first, and the streamed peak as the image grows taller.

    .venv/bin/python benchmarks/huge_tiff.py [--height 12000] [--width 12000] [--classes 4]
                                            [--window 500] [--stride 500] [--heights 1000,4000,12000]
                                            [--methods streamed,decoded] [--threads 1]

Each measurement runs in its own fresh subprocess on the same TIFF (written tile by tile first, a
synthetic scene that deflates well, zlib tiles of 256 x 256), with the same tiny SegFormer (random
weights, MiT widths 8..64, output stride 8) and the same windows. Memory is the peak resident set
size while the call runs, above the RSS just before it (VmHWM after writing 5 to
/proc/self/clear_refs), so imports and the model are not counted. Time is the call's wall time.

Methods:
  streamed   pipeline.predict.predictor.segment_tiff: tiles read as windows need them, scores blended in a band
             of rows, the mask PNG-encoded in chunks as rows finish (what the job does above
             input.stream_above_pixels).
  decoded    tifffile.imread of the whole image, then segment_images (the same band stitcher) and
             the same chunked PNG encoding: what the job does for an image below the threshold.
Ratios are decoded / streamed, from the same run. Needs Linux (/proc).

Against MONAI, through the whole job (issue 14):

    .venv/bin/python benchmarks/huge_tiff.py --against-monai --height 4096 --width 4096 --classes 40 \
                                            --window 512 --stride 341 --batch 8 [--blend mean] [--stream] [--repeat 3]

  ours    `segpipe run` on a folder holding the TIFF (one actor; Ray started by the run, a fresh local
          cluster), its mask read back from the run's masks table. --stream reads the TIFF window by
          window (input.stream_above_pixels=1), else the job decodes it whole (its path below 8192 x 8192).
  monai   a plain Python process: tifffile.imread, MONAI's sliding_window_inference (constant or
          gaussian blending; the predictor is the job's ModelScorer, its scores resized to the window
          as ours are), argmax, the labels saved.
Both use the same checkpoint (the tiny SegFormer with --classes classes, random weights, seed 0,
or --model NAME with random weights) and the torch threads of the run's actor (the CPUs of this
machine for its one actor, as pipeline.plan gives it). Time: each side's whole process, start to
exit (Ray start and imports included). Memory: the peak RSS (VmHWM) of the largest process of each
side's process tree, the tree polled every 0.1 s from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    from pipeline.predict.predictor import ModelScorer, limit_heap_growth, segment_tiff
    from pipeline.predict.tiling import TilingSettings, segment_images
    from pipeline.results.masks import encode_chunks
    from pipeline.rows import StreamSource

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
        if k in ("height", "width", "classes", "window", "stride", "batch", "threads")
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- against MONAI, whole job


def tree_peaks(root: int, peaks: dict[int, tuple[int, str]]) -> None:
    """Record the peak RSS (VmHWM, KiB) and name of every process under `root` (itself included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmHWM" in fields:
            hwm = int(fields["VmHWM"].split()[0])
            if hwm > peaks.get(pid, (0, ""))[0]:
                peaks[pid] = (hwm, fields["Name"].strip())


def run_tree(command: list[str], env: dict[str, str]) -> dict:
    """Run `command`; its wall time and the largest peak RSS among its process tree."""
    import threading

    peaks: dict[int, tuple[int, str]] = {}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            tree_peaks(process.pid, peaks)
            done.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, err = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    poller.join()
    if process.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed ({process.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    kib, name = max(peaks.values())
    return {"seconds": seconds, "peak_mib": kib / 1024, "process": name, "processes": len(peaks), "stdout": out}


def monai_worker(args: argparse.Namespace) -> None:
    """The reference in this process: the TIFF decoded whole, MONAI's sliding window, argmax."""
    import numpy as np
    import tifffile
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from models import load_model
    from pipeline.predict.predictor import ModelScorer

    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).eval()
    score_fn = ModelScorer(model, torch.device("cpu"))
    window = (args.window, args.window)

    def predictor(pixels: torch.Tensor) -> torch.Tensor:
        return F.interpolate(score_fn(pixels), size=window, mode="bilinear", align_corners=False)

    started = time.perf_counter()
    image = tifffile.imread(args.tiff)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # MONAI takes N x C x H x W float
    del image
    mode = "constant" if args.blend == "mean" else "gaussian"
    with torch.inference_mode():
        scores = sliding_window_inference(pixels, window, args.batch, predictor, overlap=1 - args.stride / args.window, mode=mode)
    labels = scores[0].argmax(0).numpy().astype(np.uint8 if args.classes <= 256 else np.uint16)
    seconds = time.perf_counter() - started
    np.save(args.labels_out, labels)
    print(json.dumps({"seconds_inside": seconds}))


def against_monai(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import yaml
    from helpers import TINY_SEGFORMER

    from models import build_model, save_native
    from pipeline.predict.tiling import plan_windows
    from pipeline.results.masks import read_mask

    threads = args.threads_monai or os.cpu_count() or 1  # what pipeline.plan gives one actor: every CPU
    plan = plan_windows(args.height, args.width, (args.window, args.window), (args.stride, args.stride))
    print(
        f"TIFF {args.width} x {args.height} RGB, zlib tiles of 256; {args.classes} classes, model {args.model}, window "
        f"{args.window}, stride {args.stride} ({len(plan)} windows), blend {args.blend}, batch {args.batch}; "
        f"ours {'streamed' if args.stream else 'decoded whole'} through `segpipe run` (1 actor), MONAI with {threads} torch thread(s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp, "images")
        images.mkdir()
        tiff = str(images / "scene.tif")
        write_tiff(tiff, args.height, args.width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            arch = TINY_SEGFORMER if args.model == "tiny" else {}
            model = build_model("segformer-b0" if args.model == "tiny" else args.model, num_classes=args.classes, **arch)
        checkpoint = os.path.join(tmp, "model.safetensors")
        save_native(model, checkpoint)
        del model
        config = {
            "run_id": "against-monai",
            "input": {"uri": str(images), "pattern": "*.tif", "stream_above_pixels": 1 if args.stream else None},
            "model": {"checkpoint": checkpoint},
            "inference": {
                "mode": "slide",
                "window": [args.window, args.window],
                "stride": [args.stride, args.stride],
                "blend": args.blend,
                "batch_size": args.batch,
            },
            "resources": {"actors": 1},
            "output": {"uri": os.path.join(tmp, "runs")},
        }
        Path(tmp, "job.yaml").write_text(yaml.safe_dump(config))
        env = dict(os.environ, RAY_ADDRESS="local")  # a fresh cluster of the run's own, never one left running
        segpipe = str(Path(sys.executable).with_name("segpipe"))
        labels_out = os.path.join(tmp, "monai.npy")
        monai_command = [sys.executable, __file__, "--method", "monai", "--tiff", tiff, "--checkpoint", checkpoint]
        monai_command += [f"--labels-out={labels_out}", f"--threads={threads}", f"--classes={args.classes}", f"--blend={args.blend}"]
        monai_command += [f"--window={args.window}", f"--stride={args.stride}", f"--batch={args.batch}"]
        rounds = []
        for attempt in range(args.repeat):  # one after the other, round by round: both see the same load
            shutil.rmtree(os.path.join(tmp, "runs"), ignore_errors=True)
            ours = run_tree([segpipe, "run", os.path.join(tmp, "job.yaml")], env)
            monai = run_tree(monai_command, dict(os.environ, OMP_NUM_THREADS=str(threads)))
            labels_ours, labels_monai = read_mask(os.path.join(tmp, "runs", "against-monai"), "scene.tif"), np.load(labels_out)
            same = float((labels_ours == labels_monai).mean()) if labels_ours.shape == labels_monai.shape else 0.0
            rounds.append((ours, monai, same))
            if args.repeat > 1:
                print(
                    f"round {attempt + 1}: ours {ours['seconds']:.1f} s {ours['peak_mib']:.0f} MiB, MONAI {monai['seconds']:.1f} s {monai['peak_mib']:.0f} MiB"
                )

    def median(side: int, key: str) -> float:
        return float(np.median([r[side][key] for r in rounds]))

    header = f"{'':<8}{'time s':>9}{'peak MiB':>11}  {'largest process':<18}"
    if len(rounds) > 1:
        print(f"medians of {len(rounds)} rounds")
    print(header)
    print("-" * len(header))
    for side, name in ((0, "ours"), (1, "monai")):
        print(f"{name:<8}{median(side, 'seconds'):>9.1f}{median(side, 'peak_mib'):>11.0f}  {rounds[-1][side]['process']:<18}")
    print(
        f"ratios: time MONAI / ours {median(1, 'seconds') / median(0, 'seconds'):.2f}x, peak memory ours / MONAI "
        f"{median(0, 'peak_mib') / median(1, 'peak_mib'):.2f}x; labels equal {min(r[2] for r in rounds):.4%}"
    )
    print("time: the whole process (Ray start, imports); peak: VmHWM of the largest process of its tree")


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
    parser.add_argument("--against-monai", action="store_true", help="`segpipe run` against MONAI in a plain process")
    parser.add_argument("--blend", choices=("mean", "gaussian"), default="mean", help="--against-monai: the blending")
    parser.add_argument("--stream", action="store_true", help="--against-monai: our job reads the TIFF window by window")
    parser.add_argument("--model", default="tiny", help="--against-monai: 'tiny' (the tests' SegFormer) or a registered name")
    parser.add_argument("--repeat", type=int, default=1, help="--against-monai: rounds (medians reported; the machine may be shared)")
    parser.add_argument("--threads-monai", type=int, help="--against-monai: MONAI's torch threads (default: every CPU, as the run's actor)")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--tiff", help=argparse.SUPPRESS)
    parser.add_argument("--image-height", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method == "monai":
        monai_worker(args)
        return
    if args.method:
        worker(args)
        return
    if args.against_monai:
        against_monai(args)
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
