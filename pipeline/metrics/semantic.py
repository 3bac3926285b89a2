"""Segmentation metrics with mmsegmentation's conventions.

Per image: per-class intersection, union, predicted area and labeled area (pixels equal to
ignore_index count nowhere; label values outside the classes count in no label area, and are
counted apart: `ClassAreas.outside`; the type is pipeline.rows', which a prediction carries). Per dataset: the sums over images, then per class
IoU = I / U, Acc = I / label_area, Dice = 2 I / (pred_area + label_area); a class with a zero
denominator is NaN and left out of the means (mIoU, mAcc, mDice); aAcc = sum(I) / sum(label_area).

How a label becomes the class map those areas count (`LabelReading`): a semantic task's labels are
class-index maps; a binary task's are class-index maps (foreground = the positive class) or 8-bit
masks (foreground = values above 128, `pipeline.config.MASK_THRESHOLD`, as PySODMetrics binarises `gt > 128`), told apart by
`metrics.binary_labels` (`auto`: per image, from the values the label holds; see `LabelReading.decide`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import MASK_THRESHOLD
from pipeline.metrics.areas import PhysicalAreas
from pipeline.rows import ClassAreas  # what the rows carry; counted here


def class_areas(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int | None = 255, valid: np.ndarray | None = None
) -> ClassAreas:
    """Per-class areas of one image, as mmseg's `intersect_and_union`: pixels whose label is
    ignore_index are dropped (None: no value is ignored); values outside [0, num_classes) fall
    outside every class's bin, and the labeled ones are counted as `outside`. `valid` (bool, the
    shape of pred): pixels where it is false (a raster's no-data) count nowhere at all."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    if ignore_index is None and valid is None:
        t, p = label.ravel(), pred.ravel()
    else:
        keep = label != ignore_index if ignore_index is not None else np.ones(label.shape, bool)
        if valid is not None:
            keep &= valid
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
    return ClassAreas(intersection, union, pred_area, label_area, outside=int(confusion[num_classes].sum()))


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


BINARY_LABELS = ("auto", "mask", "class_index")


class LabelReadingError(ValueError):
    """A label that the configured reading cannot read without guessing: that image's error."""


@dataclass(frozen=True)
class LabelReading:
    """How a label becomes the class map its metrics count.

    `binary` None: class-index maps (the semantic task). A binary task (two classes, `positive` the
    foreground) reads "class_index" maps (foreground = `positive`, other classes background), or
    "mask"s (8-bit, foreground > 128, the rest background: as PySODMetrics and the COD benchmarks
    read them), or decides per image ("auto", `decide`). `ignore`: the label value that counts
    nowhere, None for none (a mask's ignored value, when set, is one of its background values)."""

    num_classes: int
    ignore: int | None = 255
    binary: str | None = None
    positive: int = 1
    reduce_zero: bool = False  # class-index labels: 0 counts nowhere, v is class v - 1 (mmseg's reduce_zero_label)

    @classmethod
    def of(
        cls, task: str, binary_labels: str, ignore_index: int | None, positive_class: int, num_classes: int, reduce_zero: bool = False
    ) -> LabelReading:
        """The reading of a config's metrics section (plain values, so that run.json's config does too):
        ignore_index null is 255 for class-index maps and none for masks (and for `auto`, where 255
        is a mask's foreground); `reduce_zero`: metrics.reduce_zero_label, as the run decided it."""
        if task != "binary":
            return cls(num_classes, 255 if ignore_index is None else ignore_index, reduce_zero=bool(reduce_zero))
        if ignore_index is None and binary_labels == "class_index":
            ignore_index = 255
        return cls(num_classes, ignore_index, binary_labels, positive_class)

    @property
    def candidates(self) -> tuple[str, ...]:
        """The readings an image's label may get: both while `auto` has not seen the whole label."""
        if self.binary is None:
            return ("class_index",)
        return ("class_index", "mask") if self.binary == "auto" else (self.binary,)

    def class_map(self, label: np.ndarray, reading: str) -> tuple[np.ndarray, int | None]:
        """(the class map of `label` under `reading`, the value in it that counts nowhere)."""
        if reading != "mask":
            return (reduce_zero_label(label, self.ignore) if self.reduce_zero else label), self.ignore
        classes = np.where(label > MASK_THRESHOLD, self.positive, 1 - self.positive).astype(np.uint8)
        if self.ignore is None:
            return classes, None
        classes[label == self.ignore] = 255  # no class of two
        return classes, 255

    def foreground(self, label: np.ndarray, reading: str) -> np.ndarray:
        """The label's foreground (bool) under `reading`; ignored pixels are background."""
        classes, ignore = self.class_map(label, reading)
        return (classes == self.positive) & (classes != ignore) if ignore is not None else classes == self.positive

    def decide(self, values: np.ndarray) -> str:
        """The reading of one image's label from the distinct values it holds (LabelReadingError
        where it cannot be read without guessing).

        `auto`: a label of 0 and 255 only is a mask; one whose values are all classes (0, 1) is a
        class-index map; one of 0 only is background either way ("empty"); anything else (0, 1 and
        255; anti-aliased masks; other values) is refused, naming `metrics.binary_labels`. The
        ignore_index, when set, may appear in either. `mask`: 8-bit values; a label of 0 and 1 only
        is refused (a 0/1 file has no foreground above 128: it is a class-index map)."""
        seen = {int(v) for v in values}
        if self.binary is None or self.binary == "class_index":
            return "class_index"
        rest = seen - {self.ignore}
        if self.binary == "mask":
            if max(seen, default=0) > 255:
                raise LabelReadingError(f"label values up to {max(seen)}: a mask label is 8-bit (metrics.binary_labels: mask)")
            if rest == {0, 1} or rest == {1}:
                raise LabelReadingError(
                    "label values 0/1: no foreground above 128 in a mask; a 0/1 label is a class-index map "
                    "(metrics.binary_labels: class_index or auto)"
                )
            return "mask"
        classes = set(range(self.num_classes))
        if rest <= {0}:
            if self.positive != 0:
                return "empty"
            raise LabelReadingError(
                "a label of 0 only is background as a mask but foreground as class indices with positive_class 0: "
                "set metrics.binary_labels to mask or class_index"
            )
        if rest <= {0, 255} and 255 in rest and 255 not in classes:
            return "mask"
        if rest <= classes:
            return "class_index"
        raise LabelReadingError(
            f"label values {_describe(seen)} are neither a 0/255 mask nor class indices {_describe(classes)}"
            + (f" (ignore_index {self.ignore})" if self.ignore is not None else "")
            + ": set metrics.binary_labels to mask (foreground > 128) or class_index"
        )


def _describe(values: set[int]) -> str:
    ordered = sorted(values)
    return (
        ", ".join(map(str, ordered))
        if len(ordered) <= 6
        else f"{', '.join(map(str, ordered[:4]))}, ... {ordered[-1]} ({len(ordered)} values)"
    )


def reduce_zero_label(label: np.ndarray, ignore: int | None) -> np.ndarray:
    """mmsegmentation's reduce_zero_label: 0 becomes `ignore` (255 where none is set), every other
    value v becomes v - 1, and `ignore` stays itself; in the label's own type where `ignore` fits it."""
    ignore = 255 if ignore is None else ignore
    integer = np.issubdtype(label.dtype, np.integer)
    fits = not integer or np.iinfo(label.dtype).min <= ignore <= np.iinfo(label.dtype).max
    reduced = label.copy() if fits else label.astype(np.int64)
    zero, ignored = label == 0, label == ignore
    reduced -= 1
    reduced[zero | ignored] = ignore
    return reduced


class LabelAreas:
    """One image's class areas, added band by band, under every reading it may get (`auto`: both,
    until `finish` has seen the whole label and decides)."""

    def __init__(self, reading: LabelReading, physical: PhysicalAreas | None = None) -> None:
        self.reading, self.physical = reading, physical  # physical: the label's areas in square metres or microns too
        self.areas = {r: ClassAreas.zeros(reading.num_classes) for r in reading.candidates}
        self.counts = np.zeros(256, np.int64)  # the 8-bit values seen (auto and mask decide on them)
        self.wide: set[int] = set()  # values of wider labels, seen as they come

    def add(self, pred: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None, y0: int = 0) -> None:
        """One band: predicted rows, their label rows (the first is row `y0`); `valid`: where false, pixels count nowhere."""
        if self.reading.binary in ("auto", "mask"):
            seen = label[valid] if valid is not None else label.ravel()  # a reading decides on valid pixels only
            if seen.dtype == np.uint8:
                self.counts += np.bincount(seen, minlength=256)
            else:
                self.wide.update(int(v) for v in np.unique(seen))
        for name, areas in self.areas.items():
            classes, ignore = self.reading.class_map(label, name)
            areas += class_areas(pred, classes, self.reading.num_classes, ignore, valid)
            if self.physical is not None:
                self.physical.add_label(y0, name, classes, ignore, valid)

    def finish(self) -> ClassAreas:
        """The image's areas under its reading (ClassAreas.reading says which)."""
        values = np.union1d(np.flatnonzero(self.counts), np.fromiter(self.wide, np.int64, len(self.wide)))
        reading = self.reading.decide(values)
        areas = self.areas["class_index" if reading == "empty" else reading]
        areas.reading = reading
        return areas
