"""Mask disagreement: one pass over the compared images' masks, the fraction of pixels where the runs
do not all agree, the images where they disagree most and, with labels, each run's confusion matrix.

Runs with a confidence map (output.confidence: each pixel's largest class probability, 8-bit) also
say how sure each was where the runs disagree (`disagreement_confidence`): the share of the image's
pixels where the runs disagree and that run is confident (at least CONFIDENT), and its mean
confidence over those pixels. A disagreement both runs are sure of is one of them confidently wrong
(what a reviewer looks at first); one where they hesitate is an ambiguous region.

Masks are read one part per run at a time (PNG bytes, never decoded masks) and decoded one image at
a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.analysis.compare.runs import Run
from pipeline.analysis.compare.sources import Sources, label_classes, read_label
from pipeline.metrics.semantic import LabelReadingError
from pipeline.results.masks import assemble_mask
from pipeline.results.run_tables import CHUNK_FIELDS, MASKS

CONFIDENT = 0.9  # a run is confident at a pixel whose largest class probability is at least this
CONFIDENT_U8 = 230  # the same on the stored scale: round(255 p) >= 230 exactly where p >= 0.9 (229.5 / 255)


@dataclass
class RunConfidence:
    """One run's confidence where the runs disagree, on one image."""

    confident: float  # share of the image's pixels where the runs disagree and this run is confident
    mean: float  # its mean confidence (0-1) over the pixels where the runs disagree; NaN where they agree everywhere


def disagreement(masks: list[np.ndarray], confidences: list[np.ndarray | None]) -> tuple[np.ndarray, list[RunConfidence | None]]:
    """The pixels where the runs' masks are not all the same (H x W bool) and, for each run with a
    confidence map (uint8 round(255 p); None: the run has none), its `RunConfidence` there."""
    differ = np.zeros(masks[0].shape, bool)
    for m in masks[1:]:
        differ |= m != masks[0]
    pixels, disagreeing = differ.size, int(differ.sum())
    measures: list[RunConfidence | None] = []
    for confidence in confidences:
        if confidence is None:
            measures.append(None)
            continue
        at = confidence[differ]
        confident = int(np.count_nonzero(at >= CONFIDENT_U8))
        mean = float(at.sum(dtype=np.int64)) / (255 * disagreeing) if disagreeing else math.nan
        measures.append(RunConfidence(confident / pixels if pixels else 0.0, mean))
    return differ, measures


@dataclass
class MaskPass:
    """What one pass over the compared images' masks gives."""

    disagreement: dict[str, float] = field(default_factory=dict)  # image_id -> fraction of pixels not all runs agree on
    confusion: list[np.ndarray] | None = None  # per run: C x C counts, rows label, columns prediction
    confusion_images: int = 0
    top: list[tuple[float, str]] = field(default_factory=list)  # (fraction, image_id): where the runs disagree most
    with_confidence: list[bool] = field(default_factory=list)  # per run: it has a confidence map (output.confidence)
    confidence: dict[str, list[RunConfidence | None]] = field(default_factory=dict)  # image_id -> per run (None: no map)
    notes: list[str] = field(default_factory=list)


class _PartCache:
    """The masks rows of one part of one run at a time (PNG bytes, never decoded masks)."""

    def __init__(self, run: Run) -> None:
        self.run, self.part, self.table, self.rows = run, None, None, {}
        self.confidence = False  # the part holds a confidence column (output.confidence)
        self.any_confidence = False  # some part read so far did

    def image(self, part: str, image_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The image's mask and its confidence map (None where its part has none)."""
        if part != self.part:
            self.confidence = "confidence" in self.run.store.part_schema(MASKS, part).names
            self.any_confidence |= self.confidence
            columns = ["image_id", "height", "width", *CHUNK_FIELDS, "mask", *(["confidence"] if self.confidence else [])]
            self.table = self.run.store.read_part(MASKS, part, columns)
            self.rows = {}
            for i, image in enumerate(self.table.column("image_id").to_pylist()):
                self.rows.setdefault(image, []).append(i)
            self.part = part
        rows = self.table.take(pa.array(self.rows[image_id], pa.int64()))
        return assemble_mask(rows), assemble_mask(rows, "confidence") if self.confidence else None


def _label_classes(source: Sources, image_id: str, shape: tuple[int, ...], c: int, storage_options: dict):
    """An image's label as `source`'s run read it (classes, ignored value); None where it cannot be
    read, does not fit the mask or the run's reading refuses it: that image has no confusion count."""
    try:
        label = read_label(source, image_id, storage_options)
    except Exception:
        return None
    if label is None or label.shape != shape:
        return None
    try:
        return label_classes(source, label, c)
    except LabelReadingError:
        return None


def mask_parts(run: Run) -> dict[str, str]:
    """image_id -> the latest committed part holding its mask (the run store's view)."""
    return run.store.mask_parts()


def scan_masks(runs: list[Run], image_ids: list[str], sources: list[Sources], storage_options: dict, top: int = 6) -> MaskPass:
    """One pass over the compared images: each run's mask decoded one image at a time (masks read
    one part per run at a time), the fraction of pixels where the runs do not all agree, and, with
    labels, each run's confusion matrix, against its labels read as that run read them (`sources`:
    each run's); a label file read once however many runs share it."""
    result = MaskPass()
    c = runs[0].num_classes
    parts = [mask_parts(r) for r in runs]
    caches = [_PartCache(r) for r in runs]
    if any(s.labels for s in sources):
        result.confusion = [np.zeros((c, c), np.int64) for _ in runs]
    order = sorted(image_ids, key=lambda i: (tuple(p.get(i, "") for p in parts), i))
    unreadable = 0
    for image_id in order:
        masks, confidences = zip(*(cache.image(p[image_id], image_id) for cache, p in zip(caches, parts)))
        if any(m.shape != masks[0].shape for m in masks[1:]):
            result.notes.append(f"{image_id}: the runs' masks differ in size; left out of the disagreement")
            continue
        differ, measures = disagreement(list(masks), list(confidences))
        fraction = float(differ.mean()) if differ.size else 0.0
        result.disagreement[image_id] = fraction
        if any(m is not None for m in measures):
            result.confidence[image_id] = measures
        if result.confusion is not None:
            read: dict[tuple, tuple[np.ndarray, int | None] | None] = {}  # (label file, reading) -> its classes
            counted = failed = False
            for k, (m, source) in enumerate(zip(masks, sources)):
                uri = source.labels.get(image_id)
                if uri is None:
                    continue
                key = (uri, source.reading)
                if key not in read:
                    read[key] = _label_classes(source, image_id, m.shape, c, storage_options)
                if read[key] is None:
                    failed = True
                    continue
                label, ignore = read[key]
                keep = (label >= 0) & (label < c) if ignore is None else (label != ignore) & (label >= 0) & (label < c)
                truth, pred = label[keep].astype(np.int64), m[keep].astype(np.int64)
                ok = pred < c
                result.confusion[k] += np.bincount(truth[ok] * c + pred[ok], minlength=c * c).reshape(c, c)
                counted = True
            unreadable += failed
            result.confusion_images += counted
    if unreadable:
        result.notes.append(f"{unreadable} labels could not be read or do not fit their mask: left out of the confusion matrices")
    result.with_confidence = [cache.any_confidence for cache in caches]
    # the most disagreement first; among equal fractions the first image id
    result.top = [(f, i) for i, f in sorted(result.disagreement.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    return result
