"""pipeline.metrics.panoptic: PQ/SQ/RQ against hand-computed panopticapi answers, mask AP against pycocotools."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.io.coco_codec import id_to_rgb, rgb_to_id
from pipeline.metrics.panoptic import (
    IOU_THRESHOLDS,
    RECALL_THRESHOLDS,
    InstanceDetection,
    InstanceTruth,
    MaskAP,
    PanopticQuality,
    Quality,
    Segment,
    coco_panoptic_label,
    mask_ious,
)

NAN = float("nan")


def _assert_quality(actual: Quality, pq: float, sq: float, rq: float, n: int) -> None:
    assert actual.n == n
    for name, got, want in (("pq", actual.pq, pq), ("sq", actual.sq, sq), ("rq", actual.rq, rq)):
        if math.isnan(want):
            assert math.isnan(got), name
        else:
            assert got == pytest.approx(want, abs=1e-12), name


def _counts(metric: PanopticQuality, category: int) -> tuple[int, int, int]:
    k = metric.counts[category]
    return k.tp, k.fp, k.fn


# ---------------------------------------------------------------------------------------------
# Panoptic quality: small maps, answers by hand (0 = VOID in both maps)


def test_identical_prediction_gives_pq_sq_rq_of_one_for_things_and_stuff():
    gt = np.zeros((6, 6), np.int32)
    gt[:, :3] = 1  # thing, 18 px
    gt[:, 3:] = 2  # stuff, 18 px
    pred = np.where(gt == 1, 7, 9)  # same regions, other ids
    metric = PanopticQuality({1: True, 2: False})
    metric.update(pred, [Segment(7, 1), Segment(9, 2)], gt, [Segment(1, 1), Segment(2, 2)])
    summary = metric.summary()
    # each category: TP 1, IoU 18/18 = 1 -> PQ = 1 / (1 + 0 + 0) = 1
    _assert_quality(summary.all, 1, 1, 1, 2)
    _assert_quality(summary.things, 1, 1, 1, 1)
    _assert_quality(summary.stuff, 1, 1, 1, 1)
    assert summary.to_record() == {"PQ": 1, "SQ": 1, "RQ": 1, "PQ_th": 1, "SQ_th": 1, "RQ_th": 1, "PQ_st": 1, "SQ_st": 1, "RQ_st": 1}


def test_iou_just_above_one_half_matches_and_exactly_one_half_does_not():
    gt = np.zeros((8, 8), np.int32)
    gt[0:4, 0:4] = 1  # category 1, 16 px
    gt[4:8, 4:8] = 2  # category 2, 16 px
    pred = np.zeros((8, 8), np.int32)
    pred[0:3, 0:3] = 11  # category 1: 9 px inside gt 1
    pred[4:6, 4:8] = 12  # category 2: 8 px inside gt 2
    metric = PanopticQuality({1: True, 2: True})
    metric.update(pred, [Segment(11, 1), Segment(12, 2)], gt, [Segment(1, 1), Segment(2, 2)])
    # category 1: IoU = 9 / (9 + 16 - 9 - 0 on void) = 9/16 = 0.5625 > 0.5: TP
    #   PQ = 0.5625 / 1 = 0.5625, SQ = 0.5625, RQ = 1
    # category 2: IoU = 8 / (8 + 16 - 8) = 8/16 = 0.5, not > 0.5: gt 2 is FN; pred 12 has
    #   0 of 8 px on void: FP. PQ = 0 / (0 + 1/2 + 1/2) = 0, SQ = 0 (no TP), RQ = 0
    # all (both things): PQ = (0.5625 + 0)/2 = 0.28125, SQ = 0.28125, RQ = (1 + 0)/2 = 0.5
    assert _counts(metric, 1) == (1, 0, 0)
    assert _counts(metric, 2) == (0, 1, 1)
    summary = metric.summary()
    _assert_quality(summary.per_class[1], 0.5625, 0.5625, 1, 1)
    _assert_quality(summary.per_class[2], 0, 0, 0, 1)
    _assert_quality(summary.all, 0.28125, 0.28125, 0.5, 2)
    _assert_quality(summary.things, 0.28125, 0.28125, 0.5, 2)
    _assert_quality(summary.stuff, NAN, NAN, NAN, 0)  # no stuff category: NaN, where panopticapi divides by 0


def test_prediction_pixels_on_void_leave_the_union_so_a_match_appears():
    pred = np.zeros((8, 8), np.int32)
    pred[0:4, 1:7] = 5  # category 1, 24 px
    segments = [Segment(5, 1)]
    categories = {1: True, 2: False}

    with_void = np.zeros((8, 8), np.int32)
    with_void[0:4, 0:4] = 1  # category 1, 16 px; the rest is void
    metric = PanopticQuality(categories)
    metric.update(pred, segments, with_void, [Segment(1, 1)])
    # intersection = rows 0-3 x cols 1-3 = 12; pred on void = rows 0-3 x cols 4-6 = 12
    # IoU = 12 / (24 + 16 - 12 - 12) = 12/16 = 0.75 > 0.5: TP (the plain IoU would be 12/28 = 0.43)
    # category 2 is in neither map: not counted, so All = category 1 alone
    summary = metric.summary()
    _assert_quality(summary.all, 0.75, 0.75, 1, 1)
    _assert_quality(summary.per_class[2], NAN, NAN, NAN, 0)

    labeled = with_void.copy()
    labeled[0:4, 4:8] = 2  # the same pixels labeled as stuff (16 px) instead of void
    metric = PanopticQuality(categories)
    metric.update(pred, segments, labeled, [Segment(1, 1), Segment(2, 2)])
    # IoU = 12 / (24 + 16 - 12 - 0) = 12/28 < 0.5: gt 1 FN; pred 5 FP (0 px on void)
    # category 2: gt 2 FN. PQ = SQ = RQ = 0 for both, n = 2
    assert _counts(metric, 1) == (0, 1, 1)
    assert _counts(metric, 2) == (0, 0, 1)
    _assert_quality(metric.summary().all, 0, 0, 0, 2)


def test_crowd_region_absorbs_predictions_of_its_category_only():
    gt = np.zeros((8, 8), np.int32)
    gt[0:4, :] = 1  # category 1 crowd, 32 px
    gt[4:8, 0:4] = 2  # category 1, 16 px
    gt[4:8, 4:6] = 3  # category 2 (stuff), 8 px; cols 6-7 of rows 4-7 are void
    pred = np.zeros((8, 8), np.int32)
    pred[0:2, 0:4] = 11  # category 1, 8 px all on the crowd
    pred[0:2, 4:8] = 12  # category 2, 8 px on category 1's crowd
    pred[3:5, 0:4] = 13  # category 1, 8 px: 4 on the crowd, 4 on gt 2
    pred[5:8, 0:4] = 14  # category 1, 12 px inside gt 2
    pred[4:8, 5:8] = 15  # category 2, 12 px: 4 on gt 3, 8 on void
    pred_segments = [Segment(11, 1), Segment(12, 2), Segment(13, 1), Segment(14, 1), Segment(15, 2)]
    gt_segments = [Segment(1, 1, iscrowd=True), Segment(2, 1), Segment(3, 2)]
    metric = PanopticQuality({1: True, 2: False})
    metric.update(pred, pred_segments, gt, gt_segments)
    # 14 vs gt 2: IoU = 12 / (12 + 16 - 12 - 0) = 0.75: TP. 13 vs gt 2: 4 / (8 + 16 - 4) = 0.2: no match
    # 15 vs gt 3: IoU = 4 / (12 + 8 - 4 - 8 on void) = 4/8 = 0.5, not > 0.5: no match; gt 3 FN
    # unmatched predictions, (void + crowd of their category) / area:
    #   11: (0 + 8)/8 = 1 > 0.5 ignored;  12: category 2 has no crowd, 0/8: FP
    #   13: (0 + 4)/8 = 0.5, not > 0.5: FP;  15: 8/12 > 0.5 ignored
    # category 1: TP 1, FP 1, FN 0 (the crowd is never a FN): PQ = 0.75 / 1.5 = 0.5, SQ = 0.75, RQ = 1/1.5 = 2/3
    # category 2: TP 0, FP 1, FN 1: PQ = SQ = RQ = 0
    assert _counts(metric, 1) == (1, 1, 0)
    assert _counts(metric, 2) == (0, 1, 1)
    summary = metric.summary()
    _assert_quality(summary.things, 0.5, 0.75, 2 / 3, 1)
    _assert_quality(summary.stuff, 0, 0, 0, 1)
    _assert_quality(summary.all, 0.25, 0.375, 1 / 3, 2)  # (0.5 + 0)/2, (0.75 + 0)/2, (2/3 + 0)/2


def _three_images() -> list[tuple[np.ndarray, list[Segment], np.ndarray, list[Segment]]]:
    """Categories 1, 2, 5 things, 3, 4 stuff; 6 x 6 images (pred map, pred segments, gt map, gt segments)."""
    gt1 = np.zeros((6, 6), np.int32)
    gt1[0:3, 0:3] = 1  # category 1, 9 px
    gt1[3:6, :] = 2  # category 3, 18 px; rows 0-2 x cols 3-5 void
    pred1 = np.zeros((6, 6), np.int32)
    pred1[0:3, 0:3] = 21  # category 1, exact: IoU 1
    pred1[3:6, 0:4] = 22  # category 3, 12 px inside gt 2: IoU 12/18 = 2/3
    pred1[0:3, 3:6] = 23  # category 2, 9 px all on void: ignored
    image1 = (pred1, [Segment(21, 1), Segment(22, 3), Segment(23, 2)], gt1, [Segment(1, 1), Segment(2, 3)])

    gt2 = np.zeros((6, 6), np.int32)
    gt2[0:2, :] = 1  # category 2, 12 px
    gt2[2:6, :] = 2  # category 4, 24 px
    pred2 = np.zeros((6, 6), np.int32)
    pred2[0:3, :] = 31  # category 2, 18 px: 12 on gt 1, 6 on gt 2: IoU 12 / (18 + 12 - 12) = 2/3
    pred2[3:6, :] = 32  # category 4, 18 px inside gt 2: IoU 18/24 = 0.75
    image2 = (pred2, [Segment(31, 2), Segment(32, 4)], gt2, [Segment(1, 2), Segment(2, 4)])

    gt3 = np.zeros((6, 6), np.int32)
    gt3[:, 0:3] = 1  # category 1, nothing predicted: FN
    image3 = (np.zeros((6, 6), np.int32), [], gt3, [Segment(1, 1)])
    return [image1, image2, image3]


CATEGORIES_12345 = {1: True, 2: True, 3: False, 4: False, 5: True}


def test_things_and_stuff_are_means_over_their_present_categories_across_images():
    metric = PanopticQuality(CATEGORIES_12345)
    for image in _three_images():
        metric.update(*image)
    assert metric.images == 3
    summary = metric.summary()
    # category 1: TP 1 (IoU 1), FN 1:  PQ = 1/1.5 = 2/3, SQ = 1, RQ = 2/3
    # category 2: TP 1 (IoU 2/3) (its void-only prediction ignored): PQ = SQ = 2/3, RQ = 1
    # category 3: TP 1 (IoU 2/3): PQ = SQ = 2/3, RQ = 1;  category 4: TP 1 (IoU 3/4): 3/4, 3/4, 1
    # category 5: in no image: not counted
    _assert_quality(summary.per_class[1], 2 / 3, 1, 2 / 3, 1)
    _assert_quality(summary.per_class[2], 2 / 3, 2 / 3, 1, 1)
    _assert_quality(summary.per_class[4], 0.75, 0.75, 1, 1)
    _assert_quality(summary.per_class[5], NAN, NAN, NAN, 0)
    # things (1, 2): PQ = (2/3 + 2/3)/2 = 2/3, SQ = (1 + 2/3)/2 = 5/6, RQ = (2/3 + 1)/2 = 5/6
    _assert_quality(summary.things, 2 / 3, 5 / 6, 5 / 6, 2)
    # stuff (3, 4): PQ = SQ = (2/3 + 3/4)/2 = 17/24, RQ = 1
    _assert_quality(summary.stuff, 17 / 24, 17 / 24, 1, 2)
    # all: PQ = (2/3 + 2/3 + 2/3 + 3/4)/4 = 11/16, SQ = (1 + 2/3 + 2/3 + 3/4)/4 = 37/48, RQ = (2/3 + 3)/4 = 11/12
    _assert_quality(summary.all, 11 / 16, 37 / 48, 11 / 12, 4)


def test_merged_accumulators_equal_one_accumulator_over_all_images():
    images = _three_images()
    whole = PanopticQuality(CATEGORIES_12345)
    for image in images:
        whole.update(*image)
    first, second = PanopticQuality(CATEGORIES_12345), PanopticQuality(CATEGORIES_12345)
    first.update(*images[0])
    for image in images[1:]:
        second.update(*image)
    first.merge(second)
    assert first.images == 3
    assert first.counts == whole.counts
    assert first.summary().to_record() == whole.summary().to_record()


def test_coco_panoptic_png_colours_decode_to_ids_and_back():
    ids = np.array([[0, 1, 256], [65536, 1 + 2 * 256 + 3 * 65536, 256**3 - 1]])
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8
    assert rgb[1, 1].tolist() == [1, 2, 3]
    assert rgb[1, 2].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(rgb_to_id(rgb), ids)

    # a label as COCO stores it: the PNG's colours and segments_info; the prediction equals it
    gt_ids = np.zeros((6, 6), np.int64)
    gt_ids[:, :3] = 3 + 256 * 7  # a thing
    gt_ids[:, 3:5] = 65536 * 2  # crowd of the same category
    segments_info = [
        {"id": 3 + 256 * 7, "category_id": 1, "iscrowd": 0, "area": 18, "bbox": [0, 0, 3, 6]},
        {"id": 65536 * 2, "category_id": 1, "iscrowd": 1, "area": 12, "bbox": [3, 0, 2, 6]},
    ]
    segment_map, segments = coco_panoptic_label(id_to_rgb(gt_ids), segments_info)
    assert segments == [Segment(3 + 256 * 7, 1, False), Segment(65536 * 2, 1, True)]
    np.testing.assert_array_equal(segment_map, gt_ids)
    metric = PanopticQuality({1: True})
    metric.update(segment_map, segments, segment_map, segments)  # the crowd predicted as itself: ignored
    assert _counts(metric, 1) == (1, 0, 0)


def test_inconsistent_segments_are_errors_as_in_panopticapi():
    gt = np.ones((4, 4), np.int32)
    pred = np.full((4, 4), 5, np.int32)
    metric = PanopticQuality({1: True})
    with pytest.raises(ValueError, match="in the map but not in the segments"):
        metric.update(pred, [], gt, [Segment(1, 1)])
    with pytest.raises(ValueError, match="no pixel"):
        metric.update(pred, [Segment(5, 1), Segment(6, 1)], gt, [Segment(1, 1)])
    with pytest.raises(ValueError, match="not declared"):
        metric.update(pred, [Segment(5, 9)], gt, [Segment(1, 1)])
    assert metric.images == 0


# ---------------------------------------------------------------------------------------------
# Mask AP against pycocotools' COCOeval (segm)


def test_thresholds_are_cocos():
    assert len(IOU_THRESHOLDS) == 10 and IOU_THRESHOLDS[0] == 0.5 and IOU_THRESHOLDS[5] == 0.75
    assert len(RECALL_THRESHOLDS) == 101


def test_mask_iou_with_a_crowd_truth_is_intersection_over_detection_area():
    det = np.zeros((1, 10, 10), bool)
    det[0, 0:4, 0:5] = True  # 20 px
    truths = np.zeros((3, 10, 10), bool)
    truths[0, 0:4, 3:8] = True  # 20 px, 8 shared
    truths[1] = truths[0]
    truths[2, 6:9, 6:9] = True  # disjoint
    ious = mask_ious(det, truths, np.array([False, True, False]))
    np.testing.assert_array_equal(ious, [[8 / 32, 8 / 20, 0.0]])


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _cocoeval_segm(images, categories):
    """COCOeval(segm) on images [(image_id, detections, truths)]: stats and the precision array."""
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c)} for c in categories]}
    dt = []
    for image_id, detections, truths in images:
        shape = (detections or truths)[0].mask.shape
        gt["images"].append({"id": image_id, "height": shape[0], "width": shape[1]})
        for truth in truths:
            area = float(truth.area) if truth.area is not None else float(truth.mask.sum())
            rle = _rle(truth.mask)
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": truth.category_id,
                    "segmentation": rle,
                    "area": area,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(truth.iscrowd),
                }
            )
        for d in detections:
            dt.append({"image_id": image_id, "category_id": d.category_id, "segmentation": _rle(d.mask), "score": d.score})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats, evaluator.eval["precision"]


def _blob(shape, center, radii, rectangle: bool) -> np.ndarray:
    """A filled rectangle or ellipse, clipped by the image's border."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    (cy, cx), (ry, rx) = center, radii
    if rectangle:
        return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
    return ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1


def _random_images(seed: int):
    """Seven images of 160 x 200 (32,000 px): objects of 3 categories, small (< 32^2 px), medium and
    large (> 96^2 px); detections that shift, grow or shrink them, false positives, scores with
    ties (one decimal), a crowd region per image with detections on it, an image with only
    detections, one with only ground truth, one with more than 100 detections of a category,
    one with a tie of IoUs, and a category (4) that is only ever detected."""
    rng = np.random.default_rng(seed)
    shape = (160, 200)
    images = []
    for image_id in (3, 10, 11, 25, 40, 41):
        truths, detections = [], []
        for _ in range(rng.integers(2, 7)):
            size = rng.choice(["small", "medium", "large"])
            radius = {"small": (3, 12), "medium": (17, 40), "large": (50, 75)}[size]
            radii = tuple(int(r) for r in rng.integers(*radius, size=2))
            center = (int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1])))
            rectangle = bool(rng.random() < 0.5)
            truth = _blob(shape, center, radii, rectangle)
            if not truth.any():
                continue
            category = int(rng.integers(1, 4))
            truths.append(InstanceTruth(category, truth))
            for _ in range(rng.integers(0, 3)):  # detections of it: moved and resized (IoU about 0.3 to 1)
                shift = rng.integers(-(radii[0] // 4) - 1, radii[0] // 4 + 2, size=2)
                scale = rng.uniform(0.75, 1.3, size=2)
                det_center = (center[0] + int(shift[0]), center[1] + int(shift[1]))
                det_radii = (int(radii[0] * scale[0]), int(radii[1] * scale[1]))
                det_category = category if rng.random() < 0.9 else int(rng.integers(1, 5))
                det_mask = _blob(shape, det_center, det_radii, rectangle)
                detections.append(InstanceDetection(det_category, round(float(rng.uniform(0.2, 1)), 1), det_mask))
        crowd_center = (int(rng.integers(20, 140)), int(rng.integers(20, 180)))
        crowd_category = int(rng.integers(1, 4))
        truths.append(InstanceTruth(crowd_category, _blob(shape, crowd_center, (20, 30), True), iscrowd=True))
        detections.append(InstanceDetection(crowd_category, 0.9, _blob(shape, crowd_center, (8, 8), False)))
        for _ in range(rng.integers(1, 4)):  # false positives anywhere
            center = (int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1])))
            radii = tuple(int(r) for r in rng.integers(2, 40, size=2))
            fp_mask = _blob(shape, center, radii, bool(rng.random() < 0.5))
            detections.append(InstanceDetection(int(rng.integers(1, 5)), round(float(rng.random()), 1), fp_mask))
        images.append([image_id, detections, truths])

    images[1][2] = []  # image 10: detections only
    images[2][1] = []  # image 11: ground truth only
    # image 25: 120 more detections of category 2 at low scores, then an exact one of a category-2
    # truth ranked below them all: outside COCO's 100 per image and category, so that truth is missed
    centers = rng.integers(0, 160, size=(120, 2))
    many = [InstanceDetection(2, round(float(rng.uniform(0.05, 0.3)), 2), _blob(shape, (int(y), int(x)), (2, 2), True)) for y, x in centers]
    missed = _blob(shape, (100, 100), (10, 10), True)
    images[3][1].extend([*many, InstanceDetection(2, 0.01, missed)])
    images[3][2].append(InstanceTruth(2, missed))
    if images[4][2]:  # image 40: a COCO 'area' field that differs from the mask's pixels
        truth = images[4][2][0]
        images[4][2][0] = InstanceTruth(truth.category_id, truth.mask, truth.iscrowd, area=1024.0)

    # image 50: a detection covering two equal truths has IoU 0.5 with each and takes the later one
    # (COCOeval replaces its match on >=), which leaves the first to the next detection
    left, right, both, mostly_left = (np.zeros(shape, bool) for _ in range(4))
    left[10:30, 10:30] = True
    right[10:30, 30:50] = True
    both[10:30, 10:50] = True
    mostly_left[10:30, 10:34] = True  # IoU 400/480 with left, 80/800 with right
    images.append(
        [50, [InstanceDetection(3, 0.95, both), InstanceDetection(3, 0.8, mostly_left)], [InstanceTruth(3, left), InstanceTruth(3, right)]]
    )
    return [tuple(image) for image in images]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_ap_equals_pycocotools_cocoeval_segm(seed):
    images = _random_images(seed)
    categories = [1, 2, 3, 4, 5]
    stats, coco_precision = _cocoeval_segm(images, categories)

    metric = MaskAP(categories)
    for image_id, detections, truths in reversed(images):  # the order of updates does not matter
        metric.update(image_id, detections, truths)
    summary = metric.summary()

    ours = [summary.ap, summary.ap50, summary.ap75, summary.ap_small, summary.ap_medium, summary.ap_large]
    expected = [NAN if s == -1 else float(s) for s in stats[:6]]
    assert any(0 < v < 1 for v in ours)  # not a degenerate case
    assert np.isnan(summary.per_class[4]) and np.isnan(summary.per_class[5])  # no ground truth of 4 or 5
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(metric.precision(), coco_precision[..., -1])  # maxDets 100, bit for bit
    for k, category in enumerate(categories):
        s = coco_precision[:, :, k, 0, -1]
        want = float(np.mean(s[s > -1])) if (s > -1).any() else NAN
        np.testing.assert_allclose(summary.per_class[category], want, rtol=0, atol=1e-12)


def test_merged_mask_ap_accumulators_equal_one_over_all_images():
    images = _random_images(5)
    whole, first, second = MaskAP([1, 2, 3, 4]), MaskAP([1, 2, 3, 4]), MaskAP([1, 2, 3, 4])
    for i, (image_id, detections, truths) in enumerate(images):
        whole.update(image_id, detections, truths)
        (first if i % 2 else second).update(image_id, detections, truths)
    first.merge(second)
    assert first.images == len(images)
    np.testing.assert_array_equal(first.precision(), whole.precision())
    with pytest.raises(ValueError, match="already added"):
        first.update(images[0][0], [], [])


def test_a_detection_on_a_crowd_region_is_neither_true_nor_false_positive():
    shape = (64, 64)
    person = np.zeros(shape, bool)
    person[5:25, 5:25] = True  # 400 px: small
    crowd = np.zeros(shape, bool)
    crowd[30:60, 10:60] = True
    on_crowd = np.zeros(shape, bool)
    on_crowd[35:45, 20:30] = True  # inside the crowd: crowd IoU = 100 / 100 = 1
    detections = [InstanceDetection(1, 0.95, on_crowd), InstanceDetection(1, 0.9, person)]
    truths = [InstanceTruth(1, person), InstanceTruth(1, crowd, iscrowd=True)]
    metric = MaskAP([1])
    metric.update(7, detections, truths)
    summary = metric.summary()
    # the first-ranked detection is ignored, the second matches at every IoU: precision 1 at every
    # recall point, AP 1 (counted as a false positive it would give precision 1/2, AP 0.5);
    # precision is tp / (tp + fp + eps), 1 - 2.2e-16, as in COCOeval
    for ap in (summary.ap, summary.ap50, summary.ap75, summary.ap_small):
        assert ap == pytest.approx(1.0, abs=1e-15)
    assert math.isnan(summary.ap_medium) and math.isnan(summary.ap_large)  # no counted truth there
    stats, _ = _cocoeval_segm([(7, detections, truths)], [1])
    assert stats[0] == summary.ap and stats[3] == summary.ap_small and stats[4] == -1


def test_detections_and_truths_of_undeclared_categories_are_errors():
    metric = MaskAP([1, 2])
    mask = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="not declared"):
        metric.update(1, [InstanceDetection(3, 0.5, mask)], [])
    with pytest.raises(ValueError, match="one size"):
        metric.update(1, [InstanceDetection(1, 0.5, mask)], [InstanceTruth(1, np.ones((5, 4), bool))])
    assert metric.images == 0
