"""Segmentation metrics with mmsegmentation's conventions.

Per image: per-class intersection, union, predicted area and labeled area (pixels equal to
ignore_index count nowhere). Per dataset: the sums over images, then per class
IoU = I / U, Acc = I / label_area, Dice = 2 I / (pred_area + label_area); a class with a zero
denominator is NaN and left out of the means (mIoU, mAcc, mDice); aAcc = sum(I) / sum(label_area).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass
class ClassAreas:
    FIELDS: ClassVar[tuple[str, ...]] = ("intersection", "union", "pred_area", "label_area")

    intersection: np.ndarray  # int64, one per class
    union: np.ndarray
    pred_area: np.ndarray
    label_area: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> ClassAreas:
        z = lambda: np.zeros(num_classes, dtype=np.int64)
        return cls(z(), z(), z(), z())

    def __iadd__(self, other: ClassAreas) -> ClassAreas:
        self.intersection += other.intersection
        self.union += other.union
        self.pred_area += other.pred_area
        self.label_area += other.label_area
        return self


def class_areas(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255) -> ClassAreas:
    """Per-class areas of one image, as mmseg's `intersect_and_union`: pixels whose label is
    ignore_index are dropped; values outside [0, num_classes) fall outside every class's bin."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    keep = label != ignore_index
    t, p = label[keep], pred[keep]
    # One confusion matrix (label rows, prediction columns) from one bincount; values outside the
    # classes go to an extra row and column C, so they still count on the other side (a pixel
    # labeled c and predicted 7 of 3 classes adds to c's label area and to no pred area).
    n = num_classes + 1
    rows = _class_or_outside(t, num_classes).astype(np.intp) * n
    rows += _class_or_outside(p, num_classes)
    confusion = np.bincount(rows, minlength=n * n).reshape(n, n)
    intersection = confusion.diagonal()[:num_classes].copy()
    label_area = confusion[:num_classes].sum(axis=1)
    pred_area = confusion[:, :num_classes].sum(axis=0)
    union = pred_area + label_area - intersection
    return ClassAreas(intersection, union, pred_area, label_area)


def _class_or_outside(values: np.ndarray, num_classes: int) -> np.ndarray:
    """values with those outside [0, num_classes) replaced by num_classes; as they are when all are classes."""
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        return np.where((values >= 0) & (values < num_classes), values.astype(np.intp), num_classes)
    return values


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")


def summarize(total: ClassAreas) -> dict:
    """Dataset-level metrics from summed areas."""
    iou = _ratio(total.intersection, total.union)
    acc = _ratio(total.intersection, total.label_area)
    dice = _ratio(2 * total.intersection, total.pred_area + total.label_area)
    labeled = total.label_area.sum()
    return {
        "aAcc": float(total.intersection.sum() / labeled) if labeled else float("nan"),
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "mDice": _nanmean(dice),
        "IoU": [float(v) for v in iou],
        "Acc": [float(v) for v in acc],
        "Dice": [float(v) for v in dice],
    }
