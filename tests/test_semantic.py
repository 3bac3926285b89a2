"""pipeline.metrics.semantic: per-image class areas and dataset metrics, with mmsegmentation's conventions."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import mmseg_reduce_zero_label

from pipeline.metrics.semantic import ClassAreas, LabelAreas, LabelReading, LabelReadingError, class_areas, summarize


def _reference_metrics(preds, labels, num_classes, ignore):
    """mmseg's definition written out directly: dataset-wide sums, then ratios."""
    inter, union, parea, larea = (np.zeros(num_classes) for _ in range(4))
    for p, t in zip(preds, labels):
        for c in range(num_classes):
            valid = t != ignore
            pc, tc = (p == c) & valid, (t == c) & valid
            inter[c] += (pc & tc).sum()
            union[c] += (pc | tc).sum()
            parea[c] += pc.sum()
            larea[c] += tc.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc, dice = inter / union, inter / larea, 2 * inter / (parea + larea)
    return inter.sum() / larea.sum(), iou, acc, dice


def test_dataset_metrics_match_mmsegs_definition_and_leave_absent_classes_out():
    rng = np.random.default_rng(3)
    C, ignore = 5, 255
    preds = [rng.integers(0, 4, (13, 17)) for _ in range(4)]  # class 4 never predicted
    labels = [np.where(rng.random((13, 17)) < 0.1, ignore, rng.integers(0, 3, (13, 17))) for _ in range(4)]  # classes 3, 4 never labeled
    total = ClassAreas.zeros(C)
    for p, t in zip(preds, labels):
        total += class_areas(p, t, C, ignore)
    s = summarize(total)
    aacc, iou, acc, dice = _reference_metrics(preds, labels, C, ignore)
    assert s["aAcc"] == pytest.approx(aacc)
    np.testing.assert_allclose(s["IoU"], iou, equal_nan=True)
    np.testing.assert_allclose(s["Acc"], acc, equal_nan=True)
    np.testing.assert_allclose(s["Dice"], dice, equal_nan=True)
    assert np.isnan(s["IoU"][4]) and not np.isnan(s["IoU"][3])  # 3 predicted but never labeled: IoU 0
    assert s["IoU"][3] == 0.0 and np.isnan(s["Acc"][3])
    assert s["mIoU"] == pytest.approx(np.nanmean(iou))
    assert s["mAcc"] == pytest.approx(np.nanmean(acc))
    assert s["mDice"] == pytest.approx(np.nanmean(dice))


def test_class_areas_drop_ignored_pixels_and_values_outside_the_classes():
    pred = np.array([[0, 1, 2], [1, 1, 7]])
    label = np.array([[0, 255, 2], [2, 1, 1]])
    areas = class_areas(pred, label, 3, ignore_index=255)
    assert areas.intersection.tolist() == [1, 1, 1]
    assert areas.pred_area.tolist() == [1, 2, 1]  # (0, 1) is ignored; 7 is no class
    assert areas.label_area.tolist() == [1, 2, 2]
    assert areas.union.tolist() == [1, 3, 2]
    with pytest.raises(ValueError, match="differ in size"):
        class_areas(pred, label[:, :2], 3)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_class_areas_equal_the_per_class_definition_with_stray_values_on_both_sides(dtype):
    rng = np.random.default_rng(5)
    C, ignore = 6, 255 if dtype is not np.int16 else -1
    low = 0 if dtype is np.uint8 else -3
    pred = rng.integers(low, C + 3, (31, 29)).astype(dtype)  # stray values: below 0 and above C - 1
    label = rng.integers(low, C + 3, (31, 29)).astype(dtype)
    label[rng.random(label.shape) < 0.15] = ignore
    areas = class_areas(pred, label, C, ignore)
    valid = label != ignore
    for c in range(C):
        pc, tc = (pred == c) & valid, (label == c) & valid
        assert areas.intersection[c] == (pc & tc).sum()
        assert areas.union[c] == (pc | tc).sum()
        assert areas.pred_area[c] == pc.sum()
        assert areas.label_area[c] == tc.sum()
    assert all(getattr(areas, k).dtype == np.int64 and getattr(areas, k).shape == (C,) for k in ClassAreas.FIELDS)
    assert areas.outside == (valid & ((label < 0) | (label >= C))).sum() > 0  # labeled, no class: counted


# --------------------------------------------------------------------------- LabelReading


def _blob_labels(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A 0/1 prediction and a 0/1 label of the same scene (a disc), some pixels disagreeing."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:37, :45]
    label = (((yy - 18) ** 2 + (xx - 20) ** 2) < 144).astype(np.uint8)
    pred = np.where(rng.random(label.shape) < 0.1, 1 - label, label).astype(np.uint8)
    return pred, label


def _areas(reading: LabelReading, pred: np.ndarray, label: np.ndarray, rows: int = 8) -> ClassAreas:
    """Areas added band by band, as pipeline.predict.predictor.finish_image adds them."""
    areas = LabelAreas(reading)
    for top in range(0, label.shape[0], rows):
        areas.add(pred[top : top + rows], label[top : top + rows])
    return areas.finish()


@pytest.mark.parametrize("binary_labels", ["auto", "mask"])
def test_binary_masks_of_0_and_255_give_the_metrics_of_the_same_labels_written_0_and_1(binary_labels):
    pred, label01 = _blob_labels()
    as_mask = _areas(LabelReading.of("binary", binary_labels, None, 1, 2), pred, label01 * 255)
    as_classes = _areas(LabelReading.of("binary", "auto", None, 1, 2), pred, label01)
    assert (as_mask.reading, as_classes.reading) == ("mask", "class_index")
    for k in ClassAreas.FIELDS:
        np.testing.assert_array_equal(getattr(as_mask, k), getattr(as_classes, k), err_msg=k)
    assert summarize(as_mask)["IoU"][1] == summarize(as_classes)["IoU"][1] > 0.5
    assert as_mask.label_area.sum() == label01.size  # no pixel ignored: before, 255 was ignore_index
    # a foreground class 0 (positive_class 0): the mask's foreground is class 0
    flipped = _areas(LabelReading.of("binary", binary_labels, None, 0, 2), 1 - pred, label01 * 255)
    np.testing.assert_array_equal(flipped.intersection, as_mask.intersection[::-1])


def test_a_mask_is_foreground_above_128_as_pysodmetrics_binarises_it():
    reading = LabelReading.of("binary", "mask", None, 1, 2)
    label = np.array([[0, 100, 128, 129, 200, 255]], np.uint8)
    np.testing.assert_array_equal(reading.foreground(label, "mask"), label > 128)
    areas = _areas(reading, np.ones_like(label), label)
    assert areas.label_area.tolist() == [3, 3] and areas.intersection.tolist() == [0, 3]


@pytest.mark.parametrize(
    "values, expect",
    [
        ([0, 255], "mask"),
        ([255], "mask"),
        ([0, 1], "class_index"),
        ([1], "class_index"),
        ([0], "empty"),  # background either way
        ([0, 1, 255], "neither a 0/255 mask nor class indices 0, 1"),  # 255: ignored or foreground? refused
        (list(range(0, 256, 15)), "neither"),  # an anti-aliased mask: auto refuses, `mask` reads it
        ([0, 1, 7], "set metrics.binary_labels"),
    ],
)
def test_auto_reads_a_label_as_a_mask_or_class_indices_only_where_its_values_leave_no_doubt(values, expect):
    reading = LabelReading.of("binary", "auto", None, 1, 2)
    label = np.array([values], np.uint8)
    if expect in ("mask", "class_index", "empty"):
        assert _areas(reading, np.zeros_like(label), label).reading == expect
    else:
        with pytest.raises(LabelReadingError, match=expect):
            _areas(reading, np.zeros_like(label), label)


def test_explicit_readings_refuse_what_they_cannot_mean():
    anti_aliased = np.array([list(range(0, 256, 15))], np.uint8)
    areas = _areas(LabelReading.of("binary", "mask", None, 1, 2), np.ones_like(anti_aliased), anti_aliased)
    assert areas.reading == "mask" and areas.intersection.tolist() == [0, (anti_aliased > 128).sum()]
    with pytest.raises(LabelReadingError, match="0/1 label is a class-index map"):
        _areas(LabelReading.of("binary", "mask", None, 1, 2), np.zeros((2, 2), np.uint8), np.eye(2, dtype=np.uint8))
    with pytest.raises(LabelReadingError, match="8-bit"):
        _areas(LabelReading.of("binary", "mask", None, 1, 2), np.zeros((1, 2), np.uint8), np.array([[0, 65535]], np.uint16))
    with pytest.raises(LabelReadingError, match="positive_class 0"):  # all 0: background as a mask, foreground as classes
        _areas(LabelReading.of("binary", "auto", None, 0, 2), np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))
    # class_index: 255 is ignore_index by default, as a semantic task's
    areas = _areas(LabelReading.of("binary", "class_index", None, 1, 2), np.ones((1, 3), np.uint8), np.array([[0, 1, 255]], np.uint8))
    assert areas.label_area.tolist() == [1, 1] and areas.reading == "class_index"


# --------------------------------------------------------------------------- reduce_zero_label


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_reduce_zero_label_reads_labels_as_mmsegmentation_does_and_counts_the_same_areas(dtype):
    """ADE20K's labels (0: other, 1..150: classes) under metrics.reduce_zero_label: the class map is
    mmseg's reduction (0 and 255 count nowhere, v is class v - 1), band by band as the predictor adds
    them; without it the same labels are read as they are (0 is class 0, 150 outside the classes)."""
    from pipeline.metrics.semantic import reduce_zero_label

    rng = np.random.default_rng(11)
    num_classes = 150
    label = rng.integers(0, num_classes + 1, (41, 37)).astype(dtype)
    label[rng.random(label.shape) < 0.1] = 255
    label[:3] = 0
    pred = rng.integers(0, num_classes, label.shape).astype(np.uint8)
    expected = mmseg_reduce_zero_label(label)
    assert np.array_equal(reduce_zero_label(label, 255), expected) and reduce_zero_label(label, 255).dtype == label.dtype
    reading = LabelReading.of("semantic", "auto", None, 1, num_classes, reduce_zero=True)
    classes, ignore = reading.class_map(label, "class_index")
    assert np.array_equal(classes, expected) and ignore == 255
    areas = _areas(reading, pred, label)
    reference = class_areas(pred, expected, num_classes, 255)
    for name in ClassAreas.FIELDS:
        assert np.array_equal(getattr(areas, name), getattr(reference, name)), name
    assert areas.outside == 0
    as_they_are = _areas(LabelReading.of("semantic", "auto", None, 1, num_classes), pred, label)
    assert as_they_are.outside == int((label == num_classes).sum()) > 0
    # an ignore_index the label's type cannot hold: a wider map, 0 and that value ignored
    wide = reduce_zero_label(np.array([[0, 1, 5]], np.uint8), 1000)
    assert wide.tolist() == [[1000, 0, 4]]
