"""YouTube-VIS mask AP (pipeline/metrics/video.py) against pycocotools' COCOeval with its computeIoU
replaced by the spatio-temporal IoU and its area ranges by the fork's (Params.setDetParams: 128^2 and
256^2), which is what the YouTube-VIS cocoapi fork's YTVOSeval is."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.io.coco_codec import encode_rle
from pipeline.metrics.video import FrameChanges, TrackDetection, TrackTruth, VideoMaskAP, spatiotemporal_ious

SHAPE = (320, 360)  # mean areas fall in YouTube-VIS's small (< 128^2), medium and large (> 256^2) ranges
FRAMES = 6


def iou_seq(d_seq: list, g_seq: list) -> float:
    """The YouTube-VIS fork's computeIoU for one pair (frame lists of RLE or None), as it is written."""
    i = u = 0.0
    for d, g in zip(d_seq, g_seq):
        if d and g:
            i += mask_utils.area(mask_utils.merge([d, g], True))
            u += mask_utils.area(mask_utils.merge([d, g], False))
        elif not d and g:
            u += mask_utils.area(g)
        elif d and not g:
            u += mask_utils.area(d)
    return i / u if u > 0 else 0.0


def frame_list(track) -> list:
    """A track as YouTube-VIS JSON holds it: one pycocotools RLE or None per frame."""
    out = []
    for f in range(FRAMES):
        mask = track.masks.get(f)
        out.append(None if mask is None else mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
    return out


def mean_area(track) -> float:
    """The fork's avg_area: the mean of the frame areas that are not 0 / None."""
    areas = [int(m.sum()) for m in track.masks.values() if m.sum()]
    return float(np.mean(areas)) if areas else 0.0


class SpatioTemporalEval(COCOeval):
    """COCOeval over videos (one "image" per video) with YTVOSeval's computeIoU."""

    def __init__(self, coco_gt, coco_dt, sequences):
        super().__init__(coco_gt, coco_dt, iouType="segm")
        self.sequences = sequences  # annotation id (gt) / -id (dt) -> frame list
        self.params.areaRng = [[0**2, 1e5**2], [0**2, 128**2], [128**2, 256**2], [256**2, 1e5**2]]  # YTVOSeval's

    def computeIoU(self, imgId, catId):
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        if len(gt) == 0 and len(dt) == 0:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][: self.params.maxDets[-1]]
        ious = np.zeros((len(dt), len(gt)))
        for i, j in np.ndindex(ious.shape):
            ious[i, j] = iou_seq(self.sequences[-dt[i]["id"]], self.sequences[gt[j]["id"]])
        return ious


def reference_stats(videos, categories) -> np.ndarray:
    gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in categories]}
    dt_anns, sequences = [], {}
    dummy = mask_utils.encode(np.asfortranarray(np.ones(SHAPE, np.uint8)))
    dummy["counts"] = dummy["counts"].decode("ascii")
    for video_id, detections, truths in videos:
        gt["images"].append({"id": video_id, "height": SHAPE[0], "width": SHAPE[1]})
        for truth in truths:
            ann_id = len(gt["annotations"]) + 1
            sequences[ann_id] = frame_list(truth)
            gt["annotations"].append(
                dict(
                    id=ann_id,
                    image_id=video_id,
                    category_id=truth.category_id,
                    segmentation=dummy,
                    area=mean_area(truth),
                    iscrowd=int(truth.iscrowd),
                )
            )
        for d in detections:
            ann_id = len(dt_anns) + 1
            sequences[-ann_id] = frame_list(d)
            dt_anns.append(
                dict(
                    id=ann_id, image_id=video_id, category_id=d.category_id, segmentation=dummy, area=mean_area(d), score=d.score, iscrowd=0
                )
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": gt["images"], "annotations": dt_anns, "categories": gt["categories"]}
        coco_dt.createIndex()
        evaluator = SpatioTemporalEval(coco_gt, coco_dt, sequences)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.where(evaluator.stats == -1, np.nan, evaluator.stats)


def blob_track(rng, start_frame: int, end_frame: int, gaps: float = 0.2) -> dict[int, np.ndarray]:
    """A rectangle drifting over frames start..end-1, missing from a few of them."""
    cy, cx = rng.integers(20, SHAPE[0] - 20), rng.integers(20, SHAPE[1] - 20)
    ry, rx = rng.integers(8, 160), rng.integers(8, 180)  # up to the frame: every area range
    vy, vx = rng.integers(-8, 9), rng.integers(-8, 9)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    masks = {}
    for f in range(start_frame, end_frame):
        if rng.random() < gaps:
            continue
        y, x = cy + vy * f, cx + vx * f
        masks[f] = (np.abs(yy - y) <= ry) & (np.abs(xx - x) <= rx)
    return masks


def perturbed(rng, masks: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """A prediction of a track: shifted a little, a frame dropped or a frame added sometimes."""
    dy, dx = rng.integers(-2, 3, size=2)
    out = {f: np.roll(m, (dy, dx), axis=(0, 1)) for f, m in masks.items() if rng.random() > 0.15}
    if rng.random() < 0.3 and out:
        f = int(rng.integers(0, FRAMES))
        out[f] = next(iter(out.values()))
    return out


def random_videos(seed: int):
    """Eight videos of 6 frames: tracks of 3 categories, predictions of them (one decimal scores:
    ties), false positives, a crowd track now and then, a video with predictions only, one with
    ground truth only, and a category (4) that is only predicted."""
    rng = np.random.default_rng(seed)
    videos = []
    for video_id in (2, 5, 6, 9, 13, 14):
        truths, detections = [], []
        for _ in range(rng.integers(1, 5)):
            start = int(rng.integers(0, 3))
            masks = blob_track(rng, start, int(rng.integers(start + 2, FRAMES + 1)))
            if not masks:
                continue
            truth = TrackTruth(int(rng.integers(1, 4)), masks, iscrowd=bool(rng.random() < 0.1))
            truths.append(truth)
            for _ in range(rng.integers(0, 3)):
                category = truth.category_id if rng.random() < 0.8 else int(rng.integers(1, 5))
                detections.append(TrackDetection(category, round(float(rng.random()), 1), perturbed(rng, masks)))
        for _ in range(rng.integers(0, 3)):  # false positives
            masks = blob_track(rng, 0, FRAMES)
            if masks:
                detections.append(TrackDetection(int(rng.integers(1, 5)), round(float(rng.random()), 1), masks))
        videos.append((video_id, detections, truths))
    videos.append((20, [TrackDetection(2, 0.7, blob_track(rng, 0, FRAMES, gaps=0))], []))
    videos.append((21, [], [TrackTruth(1, blob_track(rng, 1, 4, gaps=0))]))
    return videos


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_video_mask_ap_equals_cocoeval_with_the_spatio_temporal_iou(seed):
    videos = random_videos(seed)
    categories = [1, 2, 3, 4]
    metric = VideoMaskAP(categories)
    for video_id, detections, truths in videos:
        # RLE and boolean masks alike
        as_rle = [TrackDetection(d.category_id, d.score, {f: encode_rle(m) for f, m in d.masks.items()}) for d in detections]
        metric.update(video_id, as_rle if video_id % 2 else detections, truths)
    ours = np.array(metric.summary().stats())
    expected = reference_stats(videos, categories)
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isfinite(ours[[0, 1, 2, 6, 7, 8]]).all() and 0 < ours[0] < 1
    assert np.isfinite(ours[[3, 4, 9, 10]]).all()  # tracks in YouTube-VIS's small and medium ranges both


def test_the_iou_of_two_tracks_sums_over_frames_and_counts_absent_frames_in_the_union():
    a = np.zeros(SHAPE, bool)
    a[:4, :5] = True  # 20 px
    b = np.zeros(SHAPE, bool)
    b[:4, 3:8] = True  # 20 px, 8 shared with a
    detection = TrackDetection(1, 0.9, {0: a, 1: a, 3: a})
    truth = TrackTruth(1, {0: b, 1: a, 2: b})
    # frame 0: 8 / 32; frame 1: 20 / 20; frame 2: truth alone, 20 in the union; frame 3: detection alone, 20
    iou = spatiotemporal_ious([detection], [truth])
    assert iou[0, 0] == pytest.approx((8 + 20) / (32 + 20 + 20 + 20))
    assert iou[0, 0] == pytest.approx(iou_seq(frame_list(detection), frame_list(truth)))
    assert spatiotemporal_ious([TrackDetection(1, 0.5, {})], [truth])[0, 0] == 0


def test_a_video_added_twice_or_an_undeclared_category_is_refused():
    metric = VideoMaskAP([1])
    metric.update(1, [], [])
    with pytest.raises(ValueError, match="already added"):
        metric.update(1, [], [])
    with pytest.raises(ValueError, match=r"categories \[2\] were not declared"):
        metric.update(2, [TrackDetection(2, 0.5, {})], [])


def test_frame_changes_count_the_pixels_whose_class_changes_between_frames():
    frames = [np.zeros((4, 5), np.uint8) for _ in range(3)]
    frames[1][0, :] = 2  # 5 of 20 change, then 5 change back and 1 more
    frames[2][3, 4] = 1
    changes = FrameChanges()
    assert changes.share is None
    assert [changes.add(frames[t - 1], frames[t]) for t in (1, 2)] == [5, 6]
    assert (changes.pairs, changes.pixels, changes.changed, changes.share) == (2, 40, 11, 11 / 40)
    with pytest.raises(ValueError, match="not one size"):
        changes.add(frames[0], np.zeros((5, 4), np.uint8))
