"""Sliding-window inference on one large image: ours (streaming stitcher) next to MONAI's
`sliding_window_inference`, with the same model, the same windows and the same blending.

    .venv/bin/python benchmarks/sliding_window.py [--size 4000] [--classes 19] [--blend gaussian]
                                                  [--model conv|tiny|segformer-b0|...] [--threads 1]

Each method runs in its own fresh subprocess, from the same uint8 H x W x 3 image to an H x W label
map. Memory is the peak resident set size (VmHWM from /proc/self/status) while the call runs, above
the RSS just before it: the peak is reset right before the call by writing 5 to /proc/self/clear_refs,
so the image, the model and the imports are not counted. Time is the wall time of the call.

Methods:
  ours              segment_images, slide mode (StreamingStitcher): the windows' scores held as the
                    model gives them, resized to the window (F.interpolate's numbers, BilinearRows)
                    and blended a block of rows at a time when rows are final.
  monai             sliding_window_inference with a predictor that resizes the model's scores to the
                    window, as ours does: the same numbers, blended in a C x H x W buffer.
  monai-native      sliding_window_inference blending the model's stride-4 scores (MONAI's zoomed
                    output), then upsampled to H x W for the labels: less to blend, but a different
                    result (edge windows land up to 3 pixels off) and a full-size upsample at the end.
Ratios are MONAI / ours, from the same run. Needs Linux (/proc).
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

METHODS = ("ours", "monai", "monai-native")
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_model(name: str, num_classes: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "conv":  # a small conv net at output stride 4
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, num_classes, 1),
        )
    elif name == "tiny":  # the tests' tiny SegFormer (stride 8): scores channels-last, as SegFormer's head gives them
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import TINY_SEGFORMER

        from models import build_model as build_registered

        model = build_registered("segformer-b0", num_classes=num_classes, **TINY_SEGFORMER)
    else:
        from models import build_model as build_registered

        model = build_registered(name, num_classes=num_classes)
    return model.eval()


def make_image(size: int):
    import numpy as np
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, size // 64 + 2, size // 64 + 2)).astype(np.float32))
    image = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    return image.permute(1, 2, 0).round().to(torch.uint8).numpy()


def worker(args: argparse.Namespace) -> None:
    """Run one method in this process; print a JSON line with time and memory; save the labels."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.classes)
    image = make_image(args.size)
    window, stride = (args.window, args.window), (args.stride, args.stride)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def scores_at_stride(pixels):
        with torch.no_grad():
            return model((pixels - mean) / std).float()

    if args.method == "ours":
        from pipeline.predict.tiling import TilingSettings, segment_images

        settings = TilingSettings(window=window, stride=stride, blend=args.blend, batch_size=args.batch)

        def run():
            return segment_images(scores_at_stride, [image], settings)[0].labels

    else:
        from monai.inferers import sliding_window_inference

        native = args.method == "monai-native"

        def predictor(pixels):
            scores = scores_at_stride(pixels)
            return scores if native else F.interpolate(scores, size=window, mode="bilinear", align_corners=False)

        def run():
            pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # MONAI takes N x C x H x W float
            overlap = [1 - s / w for s, w in zip(stride, window)]
            mode = "constant" if args.blend == "mean" else "gaussian"
            with torch.no_grad():
                scores = sliding_window_inference(pixels, window, args.batch, predictor, overlap=overlap, mode=mode)
                if native:
                    scores = F.interpolate(scores, size=image.shape[:2], mode="bilinear", align_corners=False)
            return scores[0].argmax(0).numpy().astype(np.uint8)

    scores_at_stride(torch.zeros(1, 3, *window))  # warm up outside the measurement
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    start = time.perf_counter()
    labels = run()
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    np.save(args.labels_out, labels)
    result = {"method": args.method, "seconds": seconds, "peak_mib": (peak - before) / 1024, "base_mib": before / 1024}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4000, help="the image is size x size")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=341)
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--blend", choices=("mean", "gaussian"), default="gaussian")
    parser.add_argument(
        "--model", default="conv", help="'conv' (a small stride-4 conv net), 'tiny' (a tiny SegFormer) or a registered name"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        worker(args)
        return

    import numpy as np

    from pipeline.predict.tiling import plan_windows

    plan = plan_windows(args.size, args.size, (args.window, args.window), (args.stride, args.stride))
    print(
        f"image {args.size} x {args.size}, {args.classes} classes, model {args.model}, window {args.window}, "
        f"stride {args.stride} ({len(plan)} windows), blend {args.blend}, batch {args.batch}, "
        f"{args.threads} torch thread(s)"
    )
    print(f"scores of the whole image would take {args.classes * args.size * args.size * 4 / 2**20:.0f} MiB (float32)")
    results, labels = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = os.path.join(tmp, f"{method}.npy")
            command = [sys.executable, __file__, "--method", method, "--labels-out", out] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("method", "labels_out", "methods")
            ]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            if done.returncode != 0:
                sys.exit(f"{method} failed:\n{done.stderr}")
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
            labels[method] = np.load(out)
    ours = results.get("ours")
    header = f"{'method':<14}{'time s':>9}{'peak MiB':>11}{'time / ours':>13}{'memory / ours':>15}{'labels = ours':>15}"
    print(header)
    print("-" * len(header))
    for method, result in results.items():
        time_ratio = result["seconds"] / ours["seconds"] if ours else float("nan")
        memory_ratio = result["peak_mib"] / ours["peak_mib"] if ours else float("nan")
        same = float((labels[method] == labels["ours"]).mean()) if ours else float("nan")
        print(f"{method:<14}{result['seconds']:>9.1f}{result['peak_mib']:>11.0f}{time_ratio:>13.2f}{memory_ratio:>15.2f}{same:>14.2%}")
    print("peak MiB: peak RSS during the call above the RSS before it (VmHWM after clear_refs), per fresh subprocess")


if __name__ == "__main__":
    main()
