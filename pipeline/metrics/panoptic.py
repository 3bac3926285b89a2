"""Panoptic quality (panopticapi's definitions) and COCO mask AP (pycocotools' definitions), in numpy.

Two accumulators, one image at a time; nothing here reads files, imports Ray, panopticapi or
pycocotools:

- `PanopticQuality`: PQ, SQ and RQ as panopticapi's `pq_compute` (panopticapi/evaluation.py,
  `pq_compute_single_core` and `PQStat.pq_average`), over All, Things and Stuff and per class.
  Images come as segment-id maps plus their `Segment`s; `coco_panoptic_label` turns a COCO
  panoptic PNG (already decoded to RGB) and its `segments_info` into that form.
- `MaskAP`: COCO mask AP as `COCOeval(iouType="segm")` `evaluate`, `accumulate` and `summarize`
  (AP, AP50, AP75, APs, APm, APl) and per class, from boolean masks. RLE is decoded by the caller.

Where the references fail or print a placeholder, the values here are NaN: a class absent from
prediction and ground truth (panopticapi prints 0.0), a group of classes none of which is present
(panopticapi divides by zero), an AP with no ground truth to average over (COCOeval says -1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.io.coco_codec import OFFSET, VOID, rgb_to_id

# -----------------------------------------------------------------------------------------------
# COCO panoptic labels: the segment-id map (pipeline.io.coco_codec decodes the PNG) and the JSON's segments_info


@dataclass(frozen=True)
class Segment:
    """One segment of a panoptic label or prediction: the pixels whose id is `id` in its map."""

    id: int
    category_id: int
    iscrowd: bool = False  # ground truth only: a crowd region (never matched, absorbs predictions)


def segments_from_coco(segments_info: Iterable[Mapping]) -> list[Segment]:
    """`Segment`s from a COCO panoptic annotation's segments_info (id, category_id, iscrowd; area and bbox unused)."""
    return [Segment(int(s["id"]), int(s["category_id"]), bool(s.get("iscrowd", 0))) for s in segments_info]


def coco_panoptic_label(png_rgb: np.ndarray, segments_info: Iterable[Mapping]) -> tuple[np.ndarray, list[Segment]]:
    """A COCO panoptic label (its PNG decoded to H x W x 3 uint8, and its segments_info) as
    (segment-id map, segments): the form `PanopticQuality.update` takes."""
    return rgb_to_id(png_rgb), segments_from_coco(segments_info)


# -----------------------------------------------------------------------------------------------
# Panoptic quality (panopticapi/evaluation.py)


@dataclass
class CategoryCounts:
    """panopticapi's PQStatCat: summed IoU of the matches, and the match counts, of one category."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: CategoryCounts) -> CategoryCounts:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


@dataclass(frozen=True)
class Quality:
    """PQ, SQ, RQ (fractions, not percent) and n: the categories averaged (for one class, 1 if present)."""

    pq: float
    sq: float
    rq: float
    n: int


@dataclass(frozen=True)
class PanopticSummary:
    all: Quality
    things: Quality
    stuff: Quality
    per_class: dict[int, Quality]  # every declared category; NaN with n = 0 where absent

    def to_record(self) -> dict[str, float]:
        """Flat values for a run summary, named as detectron2 names them (PQ, PQ_th, PQ_st, ...)."""
        record = {}
        for suffix, quality in (("", self.all), ("_th", self.things), ("_st", self.stuff)):
            record.update({f"PQ{suffix}": quality.pq, f"SQ{suffix}": quality.sq, f"RQ{suffix}": quality.rq})
        return record


def _segment_map(segment_map: np.ndarray, name: str) -> np.ndarray:
    segment_map = np.asarray(segment_map)
    if segment_map.ndim != 2 or not np.issubdtype(segment_map.dtype, np.integer):
        raise TypeError(f"{name} must be an H x W integer array of segment ids, got {segment_map.dtype} {segment_map.shape}")
    if segment_map.size and (segment_map.min() < 0 or segment_map.max() >= OFFSET):
        raise ValueError(f"{name} has segment ids outside [0, {OFFSET})")
    return segment_map.astype(np.uint64)


def _segments_by_id(segments: Iterable[Segment], name: str) -> dict[int, Segment]:
    by_id: dict[int, Segment] = {}
    for segment in segments:
        if segment.id == VOID:
            raise ValueError(f"{name} segment id {VOID} is reserved for unlabeled pixels")
        if segment.id in by_id:
            raise ValueError(f"{name} segment id {segment.id} is listed twice")
        by_id[segment.id] = segment
    return by_id


def _areas(segment_map: np.ndarray, by_id: dict[int, Segment], name: str) -> dict[int, int]:
    """Pixels per listed segment; every nonzero id in the map must be listed (panopticapi checks
    predictions so: an unlisted id, or a listed segment with no pixel, is an error)."""
    ids, counts = np.unique(segment_map, return_counts=True)
    areas = {int(i): int(c) for i, c in zip(ids, counts) if i != VOID}
    unlisted = sorted(set(areas) - set(by_id))
    if unlisted:
        raise ValueError(f"{name} segment ids {unlisted} are in the map but not in the segments")
    return areas


class PanopticQuality:
    """PQ, SQ, RQ over a stream of images, as panopticapi's `pq_compute`.

    Per category c and image: a predicted and a ground-truth segment of c (not crowd) match when
    IoU > 0.5, IoU = intersection / (union - the predicted segment's pixels on ground-truth VOID);
    matches are unique because IoU > 0.5. Unmatched ground truth (not crowd) is a false negative.
    An unmatched prediction whose pixels on VOID plus on the crowd region of c (the last crowd
    segment of c in the list, as panopticapi's dict keeps it) exceed half its area is ignored, else
    it is a false positive. Per category, over all images: PQ = sum IoU / (TP + FP/2 + FN/2),
    SQ = sum IoU / TP (0 when TP = 0), RQ = TP / (TP + FP/2 + FN/2); All, Things and Stuff are
    plain means over the categories present (TP + FP + FN > 0) among the declared ones.

    Ground-truth areas are pixel counts of the map (panopticapi reads them from the JSON, which
    COCO writes from the same PNG). Unlike panopticapi, ground-truth ids missing from the segments
    and categories not declared are errors for ground truth as for predictions.
    """

    def __init__(self, categories: Mapping[int, bool]) -> None:
        """`categories`: category id -> is a thing (False: stuff), in the order of the dataset's categories."""
        self.categories = {int(c): bool(is_thing) for c, is_thing in categories.items()}
        self.counts = {c: CategoryCounts() for c in self.categories}
        self.images = 0

    def update(
        self,
        pred_segment_map: np.ndarray,
        pred_segments: Sequence[Segment],
        gt_segment_map: np.ndarray,
        gt_segments: Sequence[Segment],
    ) -> None:
        """Add one image: H x W segment-id maps (0 = VOID) and the segments they name."""
        pred_map = _segment_map(pred_segment_map, "pred_segment_map")
        gt_map = _segment_map(gt_segment_map, "gt_segment_map")
        if pred_map.shape != gt_map.shape:
            raise ValueError(f"prediction {pred_map.shape} and ground truth {gt_map.shape} differ in size")
        pred_by_id = _segments_by_id(pred_segments, "prediction")
        gt_by_id = _segments_by_id(gt_segments, "ground truth")
        for name, by_id in (("prediction", pred_by_id), ("ground truth", gt_by_id)):
            unknown = sorted({s.category_id for s in by_id.values()} - set(self.categories))
            if unknown:
                raise ValueError(f"{name} has categories {unknown} that were not declared")
        pred_area = _areas(pred_map, pred_by_id, "prediction")
        absent = sorted(set(pred_by_id) - set(pred_area))
        if absent:
            raise ValueError(f"predicted segments {absent} have no pixel in the map")
        gt_area = _areas(gt_map, gt_by_id, "ground truth")

        # pixels per (ground-truth id, predicted id) pair
        pairs, pair_counts = np.unique(gt_map * np.uint64(OFFSET) + pred_map, return_counts=True)
        overlap = {(int(p) // OFFSET, int(p) % OFFSET): int(n) for p, n in zip(pairs, pair_counts)}

        image = {c: CategoryCounts() for c in self.categories}
        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for (gt_id, pred_id), intersection in overlap.items():
            if gt_id not in gt_by_id or pred_id not in pred_by_id:
                continue
            gt, pred = gt_by_id[gt_id], pred_by_id[pred_id]
            if gt.iscrowd or gt.category_id != pred.category_id:
                continue
            union = pred_area[pred_id] + gt_area.get(gt_id, 0) - intersection - overlap.get((VOID, pred_id), 0)
            iou = intersection / union
            if iou > 0.5:
                image[gt.category_id].tp += 1
                image[gt.category_id].iou += iou
                gt_matched.add(gt_id)
                pred_matched.add(pred_id)

        crowd_of_category: dict[int, int] = {}
        for gt_id, gt in gt_by_id.items():
            if gt_id in gt_matched:
                continue
            if gt.iscrowd:
                crowd_of_category[gt.category_id] = gt_id
                continue
            image[gt.category_id].fn += 1

        for pred_id, pred in pred_by_id.items():
            if pred_id in pred_matched:
                continue
            ignorable = overlap.get((VOID, pred_id), 0)
            if pred.category_id in crowd_of_category:
                ignorable += overlap.get((crowd_of_category[pred.category_id], pred_id), 0)
            if ignorable / pred_area[pred_id] > 0.5:
                continue
            image[pred.category_id].fp += 1

        for c, counts in image.items():
            self.counts[c] += counts
        self.images += 1

    def merge(self, other: PanopticQuality) -> None:
        """Add the counts of an accumulator of other images (same categories)."""
        if other.categories != self.categories:
            raise ValueError("cannot merge accumulators of different categories")
        for c, counts in other.counts.items():
            self.counts[c] += counts
        self.images += other.images

    def _class_quality(self, c: int) -> Quality:
        k = self.counts[c]
        if k.tp + k.fp + k.fn == 0:
            return Quality(float("nan"), float("nan"), float("nan"), 0)
        denominator = k.tp + 0.5 * k.fp + 0.5 * k.fn
        return Quality(k.iou / denominator, k.iou / k.tp if k.tp != 0 else 0.0, k.tp / denominator, 1)

    def _average(self, per_class: dict[int, Quality], is_thing: bool | None) -> Quality:
        present = [q for c, q in per_class.items() if q.n and (is_thing is None or self.categories[c] == is_thing)]
        if not present:
            return Quality(float("nan"), float("nan"), float("nan"), 0)
        pq = sq = rq = 0.0
        for q in present:  # summed in the categories' order, as panopticapi sums them
            pq += q.pq
            sq += q.sq
            rq += q.rq
        n = len(present)
        return Quality(pq / n, sq / n, rq / n, n)

    def summary(self) -> PanopticSummary:
        per_class = {c: self._class_quality(c) for c in self.categories}
        return PanopticSummary(
            all=self._average(per_class, None),
            things=self._average(per_class, True),
            stuff=self._average(per_class, False),
            per_class=per_class,
        )


# -----------------------------------------------------------------------------------------------
# COCO mask AP (pycocotools/cocoeval.py, iouType="segm", default Params)

# np.linspace exactly as COCOeval's Params builds them, so that every threshold is the same double
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = 100  # per image and category
AREA_RANGES = {"all": (0**2, 1e5**2), "small": (0**2, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e5**2)}
_IOU_50, _IOU_75 = 0, 5  # indices of 0.5 and 0.75 in IOU_THRESHOLDS
_CHUNK_PIXELS = 1 << 16  # pixels per matrix product in mask_ious: float32 sums stay exact, buffers small


@dataclass(frozen=True, eq=False)
class InstanceDetection:
    category_id: int
    score: float
    mask: np.ndarray  # H x W, bool (nonzero = inside)


@dataclass(frozen=True, eq=False)
class InstanceTruth:
    category_id: int
    mask: np.ndarray  # H x W, bool (nonzero = inside)
    iscrowd: bool = False
    area: float | None = None  # COCO's annotation "area" (a polygon's area in COCO's files); None: the mask's pixels


@dataclass(frozen=True)
class MaskAPSummary:
    """COCOeval's stats[0:6] (maxDets 100) and the per-class AP (all areas, IoU .50:.95); NaN where COCO says -1."""

    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    per_class: dict[int, float]

    def to_record(self) -> dict[str, float]:
        return {
            "AP": self.ap,
            "AP50": self.ap50,
            "AP75": self.ap75,
            "APs": self.ap_small,
            "APm": self.ap_medium,
            "APl": self.ap_large,
        }


@dataclass(frozen=True, eq=False)
class _ImageMatches:
    """COCOeval.evaluateImg for one image, category and area range (maxDet 100): what accumulate needs."""

    scores: np.ndarray  # (D,) float64, highest first
    matched: np.ndarray  # (T, D) bool: matched to a ground truth at each IoU threshold
    ignored: np.ndarray  # (T, D) bool: matched to an ignored ground truth, or unmatched and outside the area range
    counted_truths: int  # ground truths not ignored (not crowd, inside the area range)


def _as_masks(masks: Sequence[np.ndarray], shape: tuple[int, ...] | None) -> np.ndarray:
    arrays = [np.asarray(m) for m in masks]
    for m in arrays:
        if m.ndim != 2 or (shape is not None and m.shape != shape):
            raise ValueError(f"masks of one image must be 2-D and of one size, got {m.shape} and {shape}")
    if not arrays:
        return np.zeros((0, *(shape or (0, 0))), dtype=bool)
    return np.stack([m if m.dtype == bool else m != 0 for m in arrays])


def _flat(masks: np.ndarray) -> np.ndarray:
    """N x H x W -> N x (H W), N = 0 included."""
    return masks.reshape(masks.shape[0], masks.shape[1] * masks.shape[2])


def mask_ious(detections: np.ndarray, truths: np.ndarray, truth_is_crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of boolean masks (D x H x W, G x H x W) as pycocotools' `maskUtils.iou`: intersection
    / union, or intersection / detection area for a crowd ground truth; 0 where they do not meet."""
    d, g = len(detections), len(truths)
    flat_d, flat_g = _flat(detections), _flat(truths)
    area_d = np.count_nonzero(flat_d, axis=1).astype(np.int64)
    area_g = np.count_nonzero(flat_g, axis=1).astype(np.int64)
    covered = np.flatnonzero(flat_g.any(axis=0))  # intersections lie where some truth is
    intersection = np.zeros((d, g), dtype=np.int64)
    for start in range(0, len(covered), _CHUNK_PIXELS):
        pixels = covered[start : start + _CHUNK_PIXELS]
        intersection += (flat_d[:, pixels].astype(np.float32) @ flat_g[:, pixels].T.astype(np.float32)).astype(np.int64)
    union = np.where(truth_is_crowd[None, :], area_d[:, None], area_d[:, None] + area_g[None, :] - intersection)
    ious = np.zeros((d, g), dtype=np.float64)
    np.divide(intersection, union, out=ious, where=intersection > 0)
    return ious


def _last_best(ious: np.ndarray, candidates: np.ndarray) -> int:
    """COCOeval's scan for one detection over a group of ground truths: the best IoU among the
    candidates, the last of equal ones (it replaces on >=); -1 when there is none."""
    index = np.flatnonzero(candidates)
    if index.size == 0:
        return -1
    values = ious[index]
    return int(index[np.flatnonzero(values == values.max())[-1]])


def _match(
    ious: np.ndarray,
    scores: np.ndarray,
    detection_areas: np.ndarray,
    truth_areas: np.ndarray,
    truth_is_crowd: np.ndarray,
    area_range: tuple[float, float],
) -> _ImageMatches:
    """COCOeval.evaluateImg: detections (already highest score first) matched greedily to ground
    truths at each IoU threshold; crowd and out-of-range ground truths are ignored and sorted last."""
    lo, hi = area_range
    truth_ignored = truth_is_crowd | (truth_areas < lo) | (truth_areas > hi)
    order = np.argsort(truth_ignored, kind="mergesort")
    ious, truth_ignored, truth_is_crowd = ious[:, order], truth_ignored[order], truth_is_crowd[order]
    regular = ~truth_ignored

    t_count, d_count = len(IOU_THRESHOLDS), len(scores)
    matched = np.zeros((t_count, d_count), dtype=bool)
    ignored = np.zeros((t_count, d_count), dtype=bool)
    if ious.size:
        for t, threshold in enumerate(IOU_THRESHOLDS):
            threshold = min(threshold, 1 - 1e-10)
            taken = np.zeros(len(truth_ignored), dtype=bool)
            for d in range(d_count):
                # a taken ground truth stays available only if crowd; a match to a regular one
                # ends the scan before the ignored ones, so those are tried only when none matched
                candidates = (~taken | truth_is_crowd) & (ious[d] >= threshold)
                m = _last_best(ious[d], candidates & regular)
                if m < 0:
                    m = _last_best(ious[d], candidates & truth_ignored)
                if m < 0:
                    continue
                matched[t, d] = True
                ignored[t, d] = truth_ignored[m]
                taken[m] = True
    outside = (detection_areas < lo) | (detection_areas > hi)
    ignored |= ~matched & outside[None, :]
    return _ImageMatches(scores, matched, ignored, int(np.count_nonzero(regular)))


def precision_recall(evals: Sequence[_ImageMatches], max_detections: int) -> tuple[np.ndarray, np.ndarray] | None:
    """COCOeval.accumulate for one category and area range over the matches of its images (or videos),
    each cut to its `max_detections` best: precision (T, R: made non-increasing in recall, read at the
    101 recall points) and recall (T); None where no ground truth counts (COCOeval's -1)."""
    counted = sum(e.counted_truths for e in evals)
    if not evals or counted == 0:
        return None
    scores = np.concatenate([e.scores[:max_detections] for e in evals])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([e.matched[:, :max_detections] for e in evals], axis=1)[:, order]
    ignored = np.concatenate([e.ignored[:, :max_detections] for e in evals], axis=1)[:, order]
    tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(float)
    fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    precision, recall = np.zeros((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS))), np.zeros(len(IOU_THRESHOLDS))
    for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum)):
        rc = tp / counted
        recall[t] = rc[-1] if len(tp) else 0
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision made non-increasing in recall
        at = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        reached = at < len(pr)
        precision[t, reached] = pr[at[reached]]
    return precision, recall


def per_category(
    categories: list[int], detections: Sequence[Any], truths: Sequence[Any], detection_name: str
) -> list[tuple[int, list, list]]:
    """Per declared category with a detection or a ground truth (COCOeval's evaluateImg returns None
    for the others): its detections by score (stable), at most MAX_DETECTIONS, and its ground truths.
    ValueError naming categories that were not declared."""
    for name, items in ((detection_name, detections), ("ground truth", truths)):
        unknown = sorted({int(i.category_id) for i in items} - set(categories))
        if unknown:
            raise ValueError(f"{name} categories {unknown} were not declared")
    out = []
    for category in categories:
        dts = [d for d in detections if d.category_id == category]
        gts = [g for g in truths if g.category_id == category]
        if dts or gts:
            order = np.argsort([-float(d.score) for d in dts], kind="mergesort")[:MAX_DETECTIONS]
            out.append((category, [dts[i] for i in order], gts))
    return out


def defined_mean(s: np.ndarray) -> float:
    """COCOeval.summarize's mean over the defined entries (-1 is undefined); NaN when none is."""
    defined = s[s > -1]
    return float(np.mean(defined)) if defined.size else float("nan")


class MaskAP:
    """COCO mask AP over a stream of images, as COCOeval(iouType="segm") with default parameters.

    Per image and category: the 100 detections of highest score (stable order on ties), IoU from
    the masks (crowd: intersection / detection area), greedy matching at IoU .50:.05:.95 for each
    area range all/small/medium/large (ground-truth area: `area`, else the mask's pixels; detection
    area: its pixels); a detection matched to a crowd or out-of-range ground truth is ignored, as is
    an unmatched detection outside the range. Per category and area range, over the images in
    ascending image id: detections by score (stable), precision made monotone and read at 101
    recall points, -1 where the category has no counted ground truth; AP is the mean of the rest.
    Only the per-image matches are kept (scores and flags of at most 100 detections), never masks.
    """

    def __init__(self, categories: Iterable[int]) -> None:
        self.categories = sorted({int(c) for c in categories})  # COCOeval sorts its catIds
        self._category_index = {c: k for k, c in enumerate(self.categories)}
        self._images: dict[int, dict[tuple[int, int], _ImageMatches]] = {}

    @property
    def images(self) -> int:
        return len(self._images)

    def update(self, image_id: int, detections: Sequence[InstanceDetection], truths: Sequence[InstanceTruth]) -> None:
        """Add one image: its detections and its ground-truth instances (masks of one size)."""
        image_id = int(image_id)
        if image_id in self._images:
            raise ValueError(f"image {image_id} was already added")
        by_category = per_category(self.categories, detections, truths, "detection")  # checks them first
        shapes = {np.shape(i.mask) for i in (*detections, *truths)}
        if len(shapes) > 1:
            raise ValueError(f"masks of one image must be of one size, got {sorted(shapes)}")
        shape = shapes.pop() if shapes else None

        results: dict[tuple[int, int], _ImageMatches] = {}
        for category, dts, gts in by_category:
            dt_masks = _as_masks([d.mask for d in dts], shape)
            gt_masks = _as_masks([g.mask for g in gts], shape)
            crowd = np.array([bool(g.iscrowd) for g in gts], dtype=bool)
            ious = mask_ious(dt_masks, gt_masks, crowd)
            scores = np.array([float(d.score) for d in dts], dtype=np.float64)
            dt_areas = np.count_nonzero(_flat(dt_masks), axis=1).astype(np.int64)
            gt_pixels = np.count_nonzero(_flat(gt_masks), axis=1).astype(np.int64)
            gt_areas = np.array([float(g.area) if g.area is not None else float(n) for g, n in zip(gts, gt_pixels)], dtype=np.float64)
            for a, area_range in enumerate(AREA_RANGES.values()):
                results[self._category_index[category], a] = _match(ious, scores, dt_areas, gt_areas, crowd, area_range)
        self._images[image_id] = results

    def merge(self, other: MaskAP) -> None:
        """Add the images of another accumulator (same categories, other image ids)."""
        if other.categories != self.categories:
            raise ValueError("cannot merge accumulators of different categories")
        shared = sorted(set(self._images) & set(other._images))
        if shared:
            raise ValueError(f"images {shared[:5]} are in both accumulators")
        self._images.update(other._images)

    def precision(self) -> np.ndarray:
        """COCOeval.accumulate's precision at maxDets 100: (T=10, R=101, K categories, A=4), -1 where undefined."""
        precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(self.categories), len(AREA_RANGES)))
        image_ids = sorted(self._images)
        for k in range(len(self.categories)):
            for a in range(len(AREA_RANGES)):
                found = precision_recall([self._images[i][k, a] for i in image_ids if (k, a) in self._images[i]], MAX_DETECTIONS)
                if found is not None:
                    precision[:, :, k, a] = found[0]
        return precision

    def summary(self) -> MaskAPSummary:
        precision, mean = self.precision(), defined_mean
        area = {name: a for a, name in enumerate(AREA_RANGES)}
        return MaskAPSummary(
            ap=mean(precision[:, :, :, area["all"]]),
            ap50=mean(precision[[_IOU_50], :, :, area["all"]]),
            ap75=mean(precision[[_IOU_75], :, :, area["all"]]),
            ap_small=mean(precision[:, :, :, area["small"]]),
            ap_medium=mean(precision[:, :, :, area["medium"]]),
            ap_large=mean(precision[:, :, :, area["large"]]),
            per_class={c: mean(precision[:, :, k, area["all"]]) for k, c in enumerate(self.categories)},
        )
