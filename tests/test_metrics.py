"""pipeline.metrics: per-image class areas and dataset metrics, with mmsegmentation's conventions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics import ClassAreas, class_areas, summarize


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
