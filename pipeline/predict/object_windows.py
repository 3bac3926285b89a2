"""The predict step of the instance and panoptic tasks: objects of an image from a query model,
window by window (or in one pass in whole mode).

    windows (pipeline.predict.tiling's plan, row by row) -> query_fn: class and mask logits of each window
      -> the window's objects (pipeline.predict.objects: instances, or panoptic segments as instances),
         cropped to the image and merged across windows (`WindowInstanceMerger`, band by band)
      -> semantic rows of the same passes (instance task: the masks table's label map), blended
         by the streaming stitcher
    panoptic: the merged objects painted into one segment-id map (`paint_segments`)

Whole mode runs the image in one pass; its panoptic result is transformers' post-processing of that
pass, with its mask logits brought to the image's size before the sigmoid (detectron2's order, as the
instances: pipeline.predict.objects; transformers' MaskFormer and DETR processors take the sigmoid at the
logits' size and resize probabilities, so a segment near overlap_threshold may differ). In slide mode a panoptic segment is a window's segment merged with its pieces in
other windows (same class, mask IoU over the overlap: pipeline.predict.objects' rule), stuff classes fused
per class, then painted highest score first: a pixel claimed by two merged objects goes to the
higher-scoring one. Memory: a batch of windows, the stitcher's band, and the open objects of the
last rows of windows; a panoptic map is the image's size (in-memory images only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from models.mask_classification import semantic_scores
from pipeline.predict.objects import (
    ImageObject,
    Instances,
    PanopticSegments,
    WindowInstanceMerger,
    instances_from_queries,
    merge_objects,
    panoptic_from_queries,
    tight_boxes,
)
from pipeline.predict.tiling import (
    SKIPPED_PER_BATCH,
    BatchSizes,
    ReadWindow,
    SkipWindow,
    StreamingStitcher,
    TilingSettings,
    plan_windows,
    read_padded,
    resize_scores,
    score_within_memory,
    segment_streaming,
    to_pixels,
    window_inside,
)

# N x 3 x h x w windows on the 0-255 scale -> (class logits N x Q x (C+1), mask logits N x Q x h' x w'), CPU float32
QueryFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SemanticBand = tuple[int, np.ndarray, None]  # (first row, label rows, no probability): pipeline.predict.predictor's Band

TASK_THRESHOLDS = {"instance": 0.5, "panoptic": 0.8}  # transformers' defaults of each post-processing


@dataclass(frozen=True)
class ObjectSettings:
    task: str  # "instance" | "panoptic"
    threshold: float  # instance: score; panoptic: class probability (inference.objects.threshold)
    mask_threshold: float = 0.5
    overlap_threshold: float = 0.8  # panoptic: the share of its mask a segment must keep
    top_k: int | None = 100  # instance: candidates per window (query, class pairs)
    stuff_classes: tuple[int, ...] = ()  # panoptic: one segment per class (label_ids_to_fuse); not things
    merge_iou: float = 0.5  # an object in two windows: IoU of its masks over the windows' overlap


def window_objects(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int], settings: ObjectSettings) -> Instances:
    """One view's objects at `size`: instances, or panoptic segments as non-overlapping instances."""
    if settings.task == "instance":
        return instances_from_queries(class_logits, mask_logits, size, settings.threshold, settings.mask_threshold, top_k=settings.top_k)
    segments = segments_of_view(class_logits, mask_logits, size, settings)
    masks = segments.segment_map[None] == segments.segment_id[:, None, None]
    return Instances(class_id=segments.class_id, score=segments.score, masks=masks)


def segments_of_view(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int], settings: ObjectSettings
) -> PanopticSegments:
    return panoptic_from_queries(
        class_logits,
        mask_logits,
        size,
        settings.threshold,
        settings.mask_threshold,
        settings.overlap_threshold,
        label_ids_to_fuse=settings.stuff_classes,
    )


def find_objects(
    query_fn: QueryFn,
    read_window: ReadWindow,
    height: int,
    width: int,
    tiling: TilingSettings,
    settings: ObjectSettings,
    found: list[ImageObject],
    batch_sizes: BatchSizes | None = None,
    skip_window: SkipWindow | None = None,
) -> Iterator[SemanticBand]:
    """The objects of one image into `found` (highest score first once the generator is done),
    and meanwhile its semantic label rows from the same forward passes, top to bottom. Batches of
    tiling.batch_size windows, fewer where one ran out of memory (tiling.BatchSizes). `skip_window`
    (top, left, h, w) -> true: a window not read nor run (a raster's without valid data, a slide's
    without tissue): it has no objects, and its pixels that no run window covers are the stitcher's 255."""
    if tiling.mode == "whole":
        plan = plan_windows(height, width, (height, width), (height, width))  # one window: the image
    else:
        plan = plan_windows(height, width, tiling.window, tiling.stride)
    stitcher = StreamingStitcher(plan, tiling.blend, None)
    merger = WindowInstanceMerger(settings.merge_iou)
    windows = iter(plan.windows)
    sizes = batch_sizes or BatchSizes(tiling.batch_size)
    while batch := _next_batch(windows, plan, sizes.of(plan.window), skip_window):
        run = [w for w in batch if w != SKIP]
        logits = (
            iter(score_within_memory(query_fn, to_pixels([read_padded(read_window, plan, y0, x0) for y0, x0 in run]), plan.window, sizes))
            if run
            else iter(())
        )
        for y0, x0 in batch:  # in the plan's order: a skipped window has its place in the stitcher's
            if (y0, x0) == SKIP:
                for band in stitcher.skip():
                    yield band.y0, band.labels, None
                continue
            class_logit, mask_logit = next(logits)
            top, left, oy, ox, h, w = window_inside(plan, y0, x0)
            view = window_objects(class_logit, mask_logit, plan.window, settings)
            if (oy, ox, h, w) != (0, 0, *plan.window):  # the window's padding is not the image's
                view = Instances(view.class_id, view.score, view.masks[:, oy : oy + h, ox : ox + w])
            found += merger.add((top, left), view)
            scores = semantic_scores(class_logit[None], mask_logit[None])[0]
            for band in stitcher.add(resize_scores(scores, plan.window)):
                yield band.y0, band.labels, None
    found += merger.finish()
    found.sort(key=lambda o: -o.score)


SKIP = (-1, -1)  # a window that find_objects' skip_window refused


def _next_batch(windows: Iterator[tuple[int, int]], plan, size: int, skip_window: SkipWindow | None) -> list[tuple[int, int]]:
    """The next `size` windows to run, in the plan's order, with SKIP in the place of each window
    `skip_window` refuses among them (at most SKIPPED_PER_BATCH of those, so that bands keep coming)."""
    batch, run, skipped = [], 0, 0
    for y0, x0 in windows:
        top, left, _, _, h, w = window_inside(plan, y0, x0)
        if skip_window is not None and skip_window(top, left, h, w):
            batch.append(SKIP)
            skipped += 1
            if skipped == SKIPPED_PER_BATCH:
                break
            continue
        batch.append((y0, x0))
        run += 1
        if run == size:
            break
    return batch


def stream_bands(
    score_fn,
    objects: tuple[QueryFn, ObjectSettings, list[ImageObject]] | None,
    read_window: ReadWindow,
    height: int,
    width: int,
    tiling: TilingSettings,
    batch_sizes: BatchSizes | None = None,
    skip_window: SkipWindow | None = None,
    channels: int | None = 3,
) -> Iterator[SemanticBand]:
    """The label rows of one image read window by window (a huge TIFF, a raster, a slide): the semantic
    task's (tiling.segment_streaming), or with `objects` = (query_fn, settings, found) the instance
    task's (find_objects: its objects into `found`, from the same forward passes)."""
    if objects is None:
        return segment_streaming(
            score_fn, read_window, height, width, tiling, batch_sizes=batch_sizes, skip_window=skip_window, channels=channels
        )
    query_fn, settings, found = objects
    return find_objects(query_fn, read_window, height, width, tiling, settings, found, batch_sizes, skip_window)


def find_segments(
    query_fn: QueryFn, image: np.ndarray, tiling: TilingSettings, settings: ObjectSettings, batch_sizes: BatchSizes | None = None
) -> PanopticSegments:
    """The panoptic segmentation of an image held in memory: one pass in whole mode (transformers'
    post-processing of it, its masks resized before the sigmoid: see the module), else merged window
    segments painted by `paint_segments`."""
    height, width = image.shape[:2]
    if tiling.mode == "whole":
        class_logits, mask_logits = query_fn(to_pixels([image]))
        return segments_of_view(class_logits[0], mask_logits[0], (height, width), settings)
    found: list[ImageObject] = []
    read = lambda y, x, h, w: image[y : y + h, x : x + w]
    for _ in find_objects(query_fn, read, height, width, tiling, settings, found, batch_sizes):
        pass
    return paint_segments(found, (height, width), settings.stuff_classes)


def paint_segments(objects: list[ImageObject], size: tuple[int, int], stuff_classes: tuple[int, ...] = ()) -> PanopticSegments:
    """Objects (which may overlap) -> one segment-id map: each stuff class's objects fused into one,
    then painted highest score first onto the pixels still void; an object left without pixels is
    no segment. Ids run 1..S in painting order, 0 is void."""
    stuff = set(stuff_classes)
    fused: dict[int, list[ImageObject]] = {}
    things = []
    for obj in objects:
        (fused.setdefault(obj.class_id, []) if obj.class_id in stuff else things).append(obj)
    candidates = things + [merge_objects(group) for group in fused.values()]
    candidates.sort(key=lambda o: -o.score)
    segment_map = np.zeros(size, np.int32)
    rows: list[tuple[int, int, float, bool, int, tuple[int, int, int, int]]] = []
    for obj in candidates:
        x, y, w, h = obj.bbox
        region = segment_map[y : y + h, x : x + w]
        claim = obj.mask & (region == 0)
        if not claim.any():
            continue
        segment_id = len(rows) + 1
        region[claim] = segment_id
        bx, by, bw, bh = (int(v) for v in tight_boxes(claim.any(1)[None], claim.any(0)[None])[0])
        box = (x + bx, y + by, bw, bh)
        rows.append((segment_id, obj.class_id, obj.score, obj.class_id not in stuff, int(claim.sum()), box))
    return PanopticSegments(
        segment_map=segment_map,
        segment_id=np.array([r[0] for r in rows], np.int32),
        class_id=np.array([r[1] for r in rows], np.int64),
        score=np.array([r[2] for r in rows], np.float32),
        is_thing=np.array([r[3] for r in rows], bool),
        area=np.array([r[4] for r in rows], np.int64),
        bbox=np.array([r[5] for r in rows], np.int64).reshape(-1, 4),
    )
