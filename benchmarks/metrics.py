"""Per-class IoU over a set of label maps: ours (pipeline.metrics.semantic) next to torchmetrics, on the same data.

    .venv/bin/python benchmarks/metrics.py [--height 1024] [--width 2048] [--classes 19 150]
                                           [--images 8] [--repeats 5] [--threads 1]

`pip install -e .[bench]` installs what every script in benchmarks/ needs (torchmetrics here;
torchmetrics needs torch only, not torchvision).

Data, per class count: `--images` uint8 label maps of H x W with 5% of the pixels 255 (ignored) and
uniform classes elsewhere, and predictions that agree with the label on 70% of the pixels (uniform
classes on the rest, ignored pixels included). Both sides start from the same uint8 arrays
(torch.from_numpy shares their memory) and go from the maps to per-class IoU and mIoU:
  segpipe              class_areas per image, summed in ClassAreas, then summarize
  torchmetrics         MulticlassJaccardIndex(C, average=None, ignore_index=255, validate_args=False):
                       update per image, then compute (one confusion-matrix bincount per image)
  torchmetrics+checks  the same with validate_args=True, torchmetrics' default (it checks the values)
One measurement is the whole set of images, accumulation reset; each method runs once as a warm-up,
then `--repeats` times in turn (the methods alternate, so load on a shared machine hits all alike).
The table gives the median and the fastest run per megapixel; `x ours` is the method's median over
ours. `max |dIoU|` is the largest per-class IoU difference to ours, over the classes present
(torchmetrics gives 0 where ours gives NaN, for a class neither labeled nor predicted): the script
fails if it exceeds 1e-6 or the two mIoU differ by more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchmetrics
from torchmetrics.classification import MulticlassJaccardIndex

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.metrics.semantic import ClassAreas, class_areas, summarize

IGNORE = 255


def label_maps(images: int, height: int, width: int, classes: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for _ in range(images):
        label = rng.integers(0, classes, (height, width), dtype=np.uint8)
        label[rng.random((height, width)) < 0.05] = IGNORE
        pred = rng.integers(0, classes, (height, width), dtype=np.uint8)
        agree = rng.random((height, width)) < 0.7
        pred[agree & (label != IGNORE)] = label[agree & (label != IGNORE)]
        preds.append(pred)
        labels.append(label)
    return preds, labels


def ours(preds: list[np.ndarray], labels: list[np.ndarray], classes: int) -> np.ndarray:
    total = ClassAreas.zeros(classes)
    for pred, label in zip(preds, labels):
        total += class_areas(pred, label, classes, IGNORE)
    return np.asarray(summarize(total)["IoU"])


def torchmetrics_iou(validate_args: bool):
    def run(preds: list[torch.Tensor], labels: list[torch.Tensor], classes: int) -> np.ndarray:
        metric = MulticlassJaccardIndex(classes, average=None, ignore_index=IGNORE, validate_args=validate_args)
        for pred, label in zip(preds, labels):
            metric.update(pred, label)
        return metric.compute().double().numpy()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--classes", type=int, nargs="+", default=[19, 150])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    megapixels = args.images * args.height * args.width / 1e6
    methods = (
        ("segpipe", ours, False),
        ("torchmetrics", torchmetrics_iou(False), True),
        ("torchmetrics+checks", torchmetrics_iou(True), True),
    )
    rows, failures = [], []
    for classes in args.classes:
        preds, labels = label_maps(args.images, args.height, args.width, classes)
        inputs = {False: (preds, labels), True: ([torch.from_numpy(p) for p in preds], [torch.from_numpy(t) for t in labels])}
        results = {name: run(*inputs[as_tensors], classes) for name, run, as_tensors in methods}  # warm-up, and the results
        seconds = {name: [] for name, _, _ in methods}
        for _ in range(args.repeats):
            for name, run, as_tensors in methods:
                start = time.perf_counter()
                run(*inputs[as_tensors], classes)
                seconds[name].append(time.perf_counter() - start)
        reference = results["segpipe"]
        present = ~np.isnan(reference)
        ours_median = statistics.median(seconds["segpipe"])
        for name, _, _ in methods:
            diff = float(np.max(np.abs(results[name][present] - reference[present])))
            miou_diff = abs(float(np.mean(results[name][present])) - float(np.nanmean(reference)))
            if diff > 1e-6 or miou_diff > 1e-6:
                failures.append(f"{name}, {classes} classes: max |dIoU| {diff:.1e}, |dmIoU| {miou_diff:.1e}")
            median = statistics.median(seconds[name])
            rows.append(
                (
                    classes,
                    name,
                    1e3 * median / megapixels,
                    1e3 * min(seconds[name]) / megapixels,
                    median / ours_median,
                    float(np.mean(results[name][present])),
                    diff,
                )
            )

    print(
        f"{args.images} maps of {args.height} x {args.width} ({megapixels:.1f} MP) per class count, ignore {IGNORE}, "
        f"{torch.get_num_threads()} torch threads, median of {args.repeats} after a warm-up "
        f"(numpy {np.__version__}, torch {torch.__version__}, torchmetrics {torchmetrics.__version__})"
    )
    header = ("classes", "method", "median (ms/MP)", "fastest (ms/MP)", "x ours", "mIoU", "max |dIoU|")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for classes, name, median, fastest, ratio, miou, diff in rows:
        print(f"| {classes} | {name} | {median:.2f} | {fastest:.2f} | {ratio:.2f} | {miou:.6f} | {diff:.1e} |")
    if failures:
        sys.exit("results differ: " + "; ".join(failures))


if __name__ == "__main__":
    main()
