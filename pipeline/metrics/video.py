"""Video metrics in numpy: video instance segmentation's mask AP (YouTube-VIS's definitions), and
a semantic run's temporal stability (`FrameChanges`, counted at the end by pipeline.results.temporal).

YouTube-VIS scores tracks, not masks: its evaluation (the youtubevos/cocoapi fork, `YTVOSeval`) is
COCOeval with a video in the place of an image and one change, the IoU of a predicted track and a
ground-truth track:

    IoU = sum over frames of |D_f & G_f|  /  sum over frames of |D_f | G_f|

where a frame in which one of the two has no mask adds the other's area to the union (and nothing
to the intersection), and a pair whose union is empty has IoU 0. Everything else is COCOeval's, as
pipeline.metrics.panoptic.MaskAP has it: per video and category the 100 highest-scoring tracks,
greedy matching at IoU .50:.05:.95, crowd ground truths ignored (and matchable again), area ranges
all / small / medium / large on a track's mean area over the frames where it has pixels (the fork's
`avg_area`; its ranges, not COCO's: small under 128^2, medium to 256^2, large above: YTVIS_AREA_RANGES),
precision at 101 recall points; plus the recall at 1, 10 and 100 tracks per video
(AR1, AR10, AR100), which YouTube-VIS reports beside AP.

`VideoMaskAP` takes one video at a time and keeps only the matches, never masks. Masks come per
frame as boolean arrays or COCO RLE (pipeline.io.coco_codec); a frame absent from a track's
mapping is a frame where it has no mask (the results JSON's None).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.io.coco_codec import decode_rle
from pipeline.metrics.panoptic import (
    IOU_THRESHOLDS,
    MAX_DETECTIONS,
    RECALL_THRESHOLDS,
    _ImageMatches,
    _match,
    defined_mean,
    per_category,
    precision_recall,
)

MAX_TRACKS = (1, 10, MAX_DETECTIONS)  # COCOeval's maxDets: AR1, AR10, AR100 (AP at 100)
_IOU_50, _IOU_75 = 0, 5  # indices of 0.5 and 0.75 in IOU_THRESHOLDS

FrameMask = np.ndarray | dict  # H x W bool, or COCO RLE


# YTVOSeval's Params.setDetParams (youtubevos/cocoapi): a track's mean area, in ranges of its own (COCO's
# 32^2 and 96^2 would call nearly every track of a video medium or large)
YTVIS_AREA_RANGES = {"all": (0**2, 1e5**2), "small": (0**2, 128**2), "medium": (128**2, 256**2), "large": (256**2, 1e5**2)}


@dataclass(frozen=True, eq=False)
class TrackDetection:
    """A predicted track: frame -> its mask in that frame (frames without a mask left out)."""

    category_id: int
    score: float
    masks: Mapping[int, FrameMask]


@dataclass(frozen=True, eq=False)
class TrackTruth:
    """A ground-truth track (YouTube-VIS annotation): frame -> mask, frames where it is absent left out."""

    category_id: int
    masks: Mapping[int, FrameMask]
    iscrowd: bool = False


@dataclass(frozen=True)
class VideoAPSummary:
    """COCOeval's 12 stats as YouTube-VIS prints them, NaN where COCO says -1, and the per-class AP."""

    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    ar1: float
    ar10: float
    ar100: float
    ar_small: float
    ar_medium: float
    ar_large: float
    per_class: dict[int, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, float]:
        """Flat values for a run summary, as YouTube-VIS's evaluation names them."""
        names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
        return dict(zip(names, self.stats()))

    def stats(self) -> list[float]:
        """In COCOeval.stats' order."""
        return [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]


def _frame_mask(mask: FrameMask) -> np.ndarray:
    return decode_rle(mask) if isinstance(mask, dict) else np.asarray(mask).astype(bool, copy=False)


def _per_frame(tracks: Sequence[TrackDetection | TrackTruth]) -> tuple[dict[int, list[tuple[int, np.ndarray]]], np.ndarray]:
    """frame -> [(track index, flat mask)], and each track's mean area over its non-empty frames."""
    frames: dict[int, list[tuple[int, np.ndarray]]] = {}
    mean_areas = np.zeros(len(tracks))
    shape = None
    for k, track in enumerate(tracks):
        areas = []
        for frame, mask in track.masks.items():
            mask = _frame_mask(mask)
            if shape is not None and mask.shape != shape:
                raise ValueError(f"masks of one video must be of one size, got {mask.shape} and {shape}")
            shape = mask.shape
            area = int(np.count_nonzero(mask))
            if area:
                frames.setdefault(int(frame), []).append((k, mask.ravel()))
                areas.append(area)
        mean_areas[k] = np.mean(areas) if areas else 0.0  # the fork's avg_area: over frames with pixels
    return frames, mean_areas


def spatiotemporal_ious(detections: Sequence[TrackDetection], truths: Sequence[TrackTruth]) -> np.ndarray:
    """(D, G): per pair, the intersections summed over frames over the unions summed over frames."""
    d_frames, _ = _per_frame(detections)
    g_frames, _ = _per_frame(truths)
    intersection = np.zeros((len(detections), len(truths)))
    area_d = np.zeros(len(detections))
    area_g = np.zeros(len(truths))
    for frame in set(d_frames) | set(g_frames):
        ds, gs = d_frames.get(frame, []), g_frames.get(frame, [])
        for k, mask in ds:
            area_d[k] += np.count_nonzero(mask)
        for k, mask in gs:
            area_g[k] += np.count_nonzero(mask)
        if ds and gs:
            # float64 products count pixels exactly (far below 2^53)
            d_stack = np.stack([m for _, m in ds]).astype(np.float64)
            g_stack = np.stack([m for _, m in gs]).astype(np.float64)
            intersection[np.ix_([k for k, _ in ds], [k for k, _ in gs])] += d_stack @ g_stack.T
    union = area_d[:, None] + area_g[None, :] - intersection
    ious = np.zeros_like(intersection)
    np.divide(intersection, union, out=ious, where=union > 0)
    return ious


class VideoMaskAP:
    """YouTube-VIS mask AP and AR over a stream of videos (the module's docstring has the rules)."""

    def __init__(self, categories: Iterable[int]) -> None:
        self.categories = sorted({int(c) for c in categories})
        self._category_index = {c: k for k, c in enumerate(self.categories)}
        self._videos: dict[int, dict[tuple[int, int], _ImageMatches]] = {}

    @property
    def videos(self) -> int:
        return len(self._videos)

    def update(self, video_id: int, detections: Sequence[TrackDetection], truths: Sequence[TrackTruth]) -> None:
        """Add one video: its predicted tracks and its ground-truth tracks."""
        video_id = int(video_id)
        if video_id in self._videos:
            raise ValueError(f"video {video_id} was already added")
        results: dict[tuple[int, int], _ImageMatches] = {}
        for category, dts, gts in per_category(self.categories, detections, truths, "track"):
            ious = spatiotemporal_ious(dts, gts)
            _, dt_areas = _per_frame(dts)
            _, gt_areas = _per_frame(gts)
            crowd = np.array([bool(g.iscrowd) for g in gts], dtype=bool)
            scores = np.array([float(d.score) for d in dts], dtype=np.float64)
            for a, area_range in enumerate(YTVIS_AREA_RANGES.values()):
                results[self._category_index[category], a] = _match(ious, scores, dt_areas, gt_areas, crowd, area_range)
        self._videos[video_id] = results

    def accumulate(self) -> tuple[np.ndarray, np.ndarray]:
        """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M), M over MAX_TRACKS,
        -1 where a category has no counted ground truth."""
        k_count, a_count, m_count = len(self.categories), len(YTVIS_AREA_RANGES), len(MAX_TRACKS)
        precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), k_count, a_count, m_count))
        recall = -np.ones((len(IOU_THRESHOLDS), k_count, a_count, m_count))
        video_ids = sorted(self._videos)
        for k in range(k_count):
            for a in range(a_count):
                evals = [self._videos[v][k, a] for v in video_ids if (k, a) in self._videos[v]]
                for m, max_tracks in enumerate(MAX_TRACKS):
                    found = precision_recall(evals, max_tracks)
                    if found is not None:
                        precision[:, :, k, a, m], recall[:, k, a, m] = found
        return precision, recall

    def summary(self) -> VideoAPSummary:
        (precision, recall), mean = self.accumulate(), defined_mean
        area = {name: a for a, name in enumerate(YTVIS_AREA_RANGES)}
        at_100 = MAX_TRACKS.index(MAX_DETECTIONS)
        everything = area["all"]
        return VideoAPSummary(
            ap=mean(precision[:, :, :, everything, at_100]),
            ap50=mean(precision[[_IOU_50], :, :, everything, at_100]),
            ap75=mean(precision[[_IOU_75], :, :, everything, at_100]),
            ap_small=mean(precision[:, :, :, area["small"], at_100]),
            ap_medium=mean(precision[:, :, :, area["medium"], at_100]),
            ap_large=mean(precision[:, :, :, area["large"], at_100]),
            ar1=mean(recall[:, :, everything, 0]),
            ar10=mean(recall[:, :, everything, 1]),
            ar100=mean(recall[:, :, everything, at_100]),
            ar_small=mean(recall[:, :, area["small"], at_100]),
            ar_medium=mean(recall[:, :, area["medium"], at_100]),
            ar_large=mean(recall[:, :, area["large"], at_100]),
            per_class={c: mean(precision[:, :, k, everything, at_100]) for k, c in enumerate(self.categories)},
        )


# -----------------------------------------------------------------------------------------------
# Temporal stability of a semantic run: how much of a frame's label map changes from the frame before


@dataclass
class FrameChanges:
    """Pixels whose class changes between consecutive frames, counted over pairs of frames (the pairs
    are the caller's to form: frames of one video, in order, of one size); pipeline.results.temporal
    counts a run's masks and its labels with it."""

    pairs: int = 0
    pixels: int = 0
    changed: int = 0

    def add(self, previous: np.ndarray, current: np.ndarray) -> int:
        """Count one pair; the pixels that changed in it."""
        if previous.shape != current.shape:
            raise ValueError(f"consecutive frames of {previous.shape} and {current.shape}: not one size")
        changed = int(np.count_nonzero(previous != current))
        self.pairs += 1
        self.pixels += current.size
        self.changed += changed
        return changed

    @property
    def share(self) -> float | None:
        """Changed pixels over all pixels of the pairs; None before any pair."""
        return self.changed / self.pixels if self.pixels else None
