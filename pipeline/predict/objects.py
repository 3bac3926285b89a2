"""Objects from query models: instance and panoptic post-processing, and merging the instances of
overlapping sliding windows into whole-image objects (their COCO RLE: pipeline.io.coco_codec).

Pure torch / numpy: no Ray, no I/O. Read top to bottom:
  results             `Instances` (one image or window), `PanopticSegments`, `ImageObject` (a box
                      and the mask inside it, in full-image pixels)
  instances           `instances_from_queries`
  panoptic            `panoptic_from_queries`
  window merging      `WindowInstanceMerger` (incremental) and `merge_window_instances`

Inputs are one image's query outputs, as `forward_queries` gives them for a batch of one:
class_logits Q x (C+1) (the last class is "no object"), mask_logits Q x h x w.

Conventions:
- Boxes are COCO's: x, y, width, height in pixels, tight around the mask (an empty mask: 0, 0, 0, 0).
- Where masks are resized (`mask_size`): transformers' processors and the original (detectron2)
  inference differ only there. None, the default, is the original: mask logits are upsampled
  bilinearly to `target_size`, then binarised, scored and (panoptic) argmaxed there. transformers'
  MaskFormer processor works at the logits' own size (`mask_size=mask_logits.shape[-2:]`), its
  Mask2Former processor at (384, 384); their binary instance masks are then upsampled to the target
  by nearest neighbour, their panoptic mask probabilities bilinearly. With those sizes the results
  equal transformers' (tests/test_objects.py).
- Instances come sorted by score, highest first (ties keep the class-probability top-k's order).
  transformers keeps the order of an unsorted top-k, an implementation detail of torch; the masks,
  classes and scores are the same.
- Panoptic segment ids run 1..S in the order of the queries that made them; 0 in the map is void
  (no segment). transformers uses 0 too, except when no query passes `threshold`: then its map is
  all -1. We write 0 always, so the map is COCO panoptic's (0 = unlabeled) and fits an unsigned PNG.
  transformers also restarts its id counter from a fused (stuff) class's id when a later query joins
  that class's segment, so the next new segment can get the id of an earlier one; ours are always
  distinct (ids and pixels otherwise equal).
  The overlap test compares the segment's area with the query's mask area computed on the
  score-weighted probabilities, as transformers does (detectron2 uses the unweighted ones).

Merging across windows. Sliding-window inference sees an object that crosses a window's edge in
every window it touches, each time cut (or whole, in the windows that contain it). The rule:
  two instances of different windows are the same object when they have the same class and their
  masks, restricted to the region both windows cover, have IoU >= `iou_threshold` there (and share
  at least one pixel). "Same object" is closed transitively (union-find), so an object spanning four
  windows, whose pieces meet pairwise in the overlaps, comes out as one. Instances of one window are
  never compared with each other (the model said they are distinct), though they can end up in one
  object through a third instance that matches both.
  The merged object's mask is the union of its pieces; its score is the mean of the pieces' scores
  weighted by their areas: a piece cut by a window edge sees a sliver with little context and
  scores low, and the window that saw most of the object should decide; unlike the max, the mean
  does not rise with the number of windows that happened to see the object.
Memory: pieces are kept as a box and the mask inside it, never as image-size bitmaps, and windows
arrive in raster order (all windows of a row of windows, then the next row, as pipeline.predict.tiling
plans them): when a window starting at row y arrives, no later window reaches above y, so every
object whose windows all end at or above y is final and leaves the merger. What it holds is the
pieces of the last two rows of windows (rows overlap), whatever the image's height; a merged object's
mask is as large as its own box.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.predict.piece_groups import PieceGroups

Size = tuple[int, int]  # (height, width)

# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def tight_boxes(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """K x H (does row y hold a pixel of object k) and K x W -> K x 4 int64 COCO boxes x, y, w, h;
    0, 0, 0, 0 for an object without pixels (as pycocotools' toBbox)."""
    boxes = np.zeros((rows.shape[0], 4), np.int64)
    present = rows.any(1)
    r, c = rows[present], cols[present]
    y0, y1 = r.argmax(1), r.shape[1] - r[:, ::-1].argmax(1)
    x0, x1 = c.argmax(1), c.shape[1] - c[:, ::-1].argmax(1)
    boxes[present] = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
    return boxes


@dataclass
class Instances:
    """The objects of one image (or one window): K of them, masks at the target size.

    bbox (K x 4 int64, COCO x, y, w, h) and area (K int64, pixels) are derived from the masks."""

    class_id: np.ndarray  # K int64
    score: np.ndarray  # K float32
    masks: np.ndarray  # K x H x W bool
    bbox: np.ndarray = field(init=False)
    area: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.bbox = tight_boxes(self.masks.any(2), self.masks.any(1))
        self.area = self.masks.sum((1, 2), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.class_id)


@dataclass
class PanopticSegments:
    """One image's panoptic segmentation: every pixel in at most one segment.

    segment_map: H x W int32, the segment id of each pixel, 0 = void. Then one entry per segment
    (S of them), in id order: segment_id (int32, 1..S), class_id (int64), score (float32: the
    class probability of the query that made it; of the first such query for a fused class),
    is_thing (bool), area (int64 pixels) and bbox (S x 4 int64, COCO x, y, w, h)."""

    segment_map: np.ndarray
    segment_id: np.ndarray
    class_id: np.ndarray
    score: np.ndarray
    is_thing: np.ndarray
    area: np.ndarray
    bbox: np.ndarray

    def __len__(self) -> int:
        return len(self.segment_id)


@dataclass
class ImageObject:
    """One object in full-image pixels: its box (COCO x, y, w, h) and its mask within the box
    (h x w bool). `pipeline.io.coco_codec.encode_rle(obj.mask, size=(H, W), offset=(y, x))` gives its COCO RLE in the image
    without building an image-size bitmap."""

    class_id: int
    score: float
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    area: int

    def full_mask(self, size: Size) -> np.ndarray:
        """The mask pasted into an all-False image of `size` (for small images and tests)."""
        out = np.zeros(size, bool)
        x, y, w, h = self.bbox
        out[y : y + h, x : x + w] = self.mask
        return out


# ---------------------------------------------------------------------------------------------
# Instance segmentation
# ---------------------------------------------------------------------------------------------


def _check_queries(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
    if class_logits.dim() != 2 or mask_logits.dim() != 3 or class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            "one image's queries: class_logits Q x (C+1) and mask_logits Q x h x w, "
            f"got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )


def _resize(x: torch.Tensor, size: Size, mode: str) -> torch.Tensor:
    """K x h x w -> K x size (bilinear: align_corners=False); unchanged when the size is already that."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if not len(x):  # interpolate refuses an empty batch
        return x.new_zeros((0, *size))
    if mode == "bilinear":
        return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return F.interpolate(x[None], size=tuple(size), mode=mode)[0]


def _logit(probability: float) -> float:
    """The mask logit above which sigmoid(logit) > probability: thresholding logits, not sigmoids,
    keeps 0.5 exactly at logit 0 (a float32 sigmoid of a tiny positive logit rounds to 0.5)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"mask_threshold must be in (0, 1), got {probability}")
    return math.log(probability / (1.0 - probability))


def instances_from_queries(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    target_size: Size,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    top_k: int | None = None,
    mask_size: Size | None = None,
) -> Instances:
    """One image's instances (transformers' `post_process_instance_segmentation` with binary maps).

    The top_k (default Q) best (query, class) pairs by class probability (softmax, no-object class
    dropped) become candidates, several classes per query allowed. A candidate's mask is its
    query's mask probability > mask_threshold (at `mask_size`, see the module's docstring); its
    score is class probability x mean mask probability inside the mask. Kept: score >= threshold
    and a mask not empty at target_size. (transformers' processors ignore their mask_threshold here
    and always cut at 0.5.)
    """
    _check_queries(class_logits, mask_logits)
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    target_size = (int(target_size[0]), int(target_size[1]))
    mask_size = target_size if mask_size is None else (int(mask_size[0]), int(mask_size[1]))
    k = min(num_queries if top_k is None else top_k, num_queries * num_classes)

    class_probs = class_logits.float().softmax(-1)[:, :-1]
    class_score, pair = class_probs.flatten().topk(k)
    # the mask score is at most 1, so a candidate below threshold on its class probability alone
    # can never pass: drop it before its mask is resized
    candidate = class_score >= threshold
    class_score, pair = class_score[candidate], pair[candidate]
    query, class_id = pair // num_classes, pair % num_classes

    logits = _resize(mask_logits[query].float(), mask_size, "bilinear")
    binary = (logits > _logit(mask_threshold)).float()
    mask_score = (logits.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    score = class_score * mask_score
    masks = _resize(binary, target_size, "nearest") > 0.5

    keep = (score >= threshold) & masks.flatten(1).any(1)
    # highest score first; equal scores keep their top-k order
    order = torch.sort(score[keep], descending=True, stable=True).indices
    kept = keep.nonzero()[:, 0][order]
    return Instances(
        class_id=class_id[kept].cpu().numpy().astype(np.int64),
        score=score[kept].cpu().numpy().astype(np.float32),
        masks=masks[kept].cpu().numpy(),
    )


# ---------------------------------------------------------------------------------------------
# Panoptic segmentation
# ---------------------------------------------------------------------------------------------


def panoptic_from_queries(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    target_size: Size,
    threshold: float = 0.8,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Iterable[int] | None = None,
    thing_ids: Iterable[int] | None = None,
    mask_size: Size | None = None,
) -> PanopticSegments:
    """One image's panoptic segmentation (transformers' `post_process_panoptic_segmentation`).

    Each query takes its most probable class; queries of the no-object class or with probability
    <= threshold drop out. Every pixel goes to the query with the highest class probability x mask
    probability (at target_size). A query becomes a segment when it wins some pixels and its won
    area is > overlap_mask_area_threshold x its own mask area (score-weighted probability >=
    mask_threshold); otherwise its pixels stay void. Queries of a class in label_ids_to_fuse (stuff)
    share one segment per class. is_thing: class in thing_ids when given, else class not fused.
    """
    _check_queries(class_logits, mask_logits)
    num_classes = class_logits.shape[1] - 1
    height, width = int(target_size[0]), int(target_size[1])
    mask_size = (height, width) if mask_size is None else (int(mask_size[0]), int(mask_size[1]))
    fuse = {int(c) for c in label_ids_to_fuse or ()}
    things = None if thing_ids is None else {int(c) for c in thing_ids}

    class_score, class_id = class_logits.float().softmax(-1).max(-1)
    keep = (class_id != num_classes) & (class_score > threshold)
    class_score, class_id = class_score[keep], class_id[keep]
    segment_of_query: list[int] = []  # per kept query: its segment id, 0 for none
    segments: list[tuple[int, int, float]] = []  # (segment id, class, score), in id order
    segment_map = torch.zeros(height, width, dtype=torch.int64)
    if len(class_id):
        logits = _resize(mask_logits[keep].float(), mask_size, "bilinear")
        probs = _resize(logits.sigmoid(), (height, width), "bilinear")  # a no-op at the default mask_size
        probs *= class_score.view(-1, 1, 1)
        winner = probs.argmax(0)  # H x W: the query each pixel goes to
        won_area = torch.bincount(winner.flatten(), minlength=len(class_id))
        own_area = (probs >= mask_threshold).flatten(1).sum(1)
        stuff_segment: dict[int, int] = {}
        for k in range(len(class_id)):
            cls = int(class_id[k])
            valid = won_area[k] > 0 and own_area[k] > 0 and (won_area[k] / own_area[k]).item() > overlap_mask_area_threshold
            if not valid:
                segment_of_query.append(0)
            elif cls in stuff_segment:
                segment_of_query.append(stuff_segment[cls])
            else:
                segment_id = len(segments) + 1
                segments.append((segment_id, cls, float(class_score[k])))
                segment_of_query.append(segment_id)
                if cls in fuse:
                    stuff_segment[cls] = segment_id
        segment_map = torch.tensor(segment_of_query, dtype=torch.int64)[winner.cpu()]

    segment_map = segment_map.cpu().numpy().astype(np.int32)
    count = len(segments)
    # which rows and columns each segment reaches, in one pass over the map
    rows = np.zeros((count + 1, height), bool)
    cols = np.zeros((count + 1, width), bool)
    rows[segment_map, np.arange(height)[:, None]] = True
    cols[segment_map, np.arange(width)[None, :]] = True
    classes = np.array([cls for _, cls, _ in segments], np.int64)
    return PanopticSegments(
        segment_map=segment_map,
        segment_id=np.arange(1, count + 1, dtype=np.int32),
        class_id=classes,
        score=np.array([score for _, _, score in segments], np.float32),
        is_thing=np.array([(c in things) if things is not None else (c not in fuse) for c in classes.tolist()], bool),
        area=np.bincount(segment_map.ravel(), minlength=count + 1)[1:].astype(np.int64),
        bbox=tight_boxes(rows[1:], cols[1:]),
    )


# ---------------------------------------------------------------------------------------------
# Merging instances across sliding windows
# ---------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 in image pixels, ends exclusive


def _intersect(a: Box, b: Box) -> Box | None:
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[2] and box[1] < box[3] else None


@dataclass
class _Piece:
    """One window's instance: its window and box in image pixels, its mask inside the box."""

    class_id: int
    score: float
    window: Box
    box: Box
    mask: np.ndarray
    area: int

    def over(self, region: Box) -> np.ndarray:
        """The mask over `region`, False outside the box."""
        out = np.zeros((region[2] - region[0], region[3] - region[1]), bool)
        common = _intersect(self.box, region)
        if common is not None:
            y0, x0, y1, x1 = common
            out[y0 - region[0] : y1 - region[0], x0 - region[1] : x1 - region[1]] = self.mask[
                y0 - self.box[0] : y1 - self.box[0], x0 - self.box[1] : x1 - self.box[1]
            ]
        return out


def _same_object(a: _Piece, b: _Piece, iou_threshold: float) -> bool:
    """Same class, and mask IoU >= iou_threshold within the region both windows cover."""
    if a.class_id != b.class_id:
        return False
    overlap = _intersect(a.window, b.window)
    if overlap is None or _intersect(a.box, overlap) is None or _intersect(b.box, overlap) is None:
        return False
    # the union of the two masks in the overlap lies inside the union of their boxes
    hull = (min(a.box[0], b.box[0]), min(a.box[1], b.box[1]), max(a.box[2], b.box[2]), max(a.box[3], b.box[3]))
    region = _intersect(hull, overlap)
    if region is None:
        return False
    ma, mb = a.over(region), b.over(region)
    inter = int(np.count_nonzero(ma & mb))
    return inter > 0 and inter / int(np.count_nonzero(ma | mb)) >= iou_threshold


class WindowInstanceMerger:
    """Merges the instances of one image's windows into whole-image objects, window by window.

    Call `add((y, x), instances)` for each window in raster order (y never decreasing), with the
    window's instances at window resolution and its top-left corner in the image; it returns the
    objects that this window's arrival made final (their windows all end at or above y). `finish()`
    returns the rest. The rule is in the module's docstring.
    """

    def __init__(self, iou_threshold: float = 0.5) -> None:
        self.iou_threshold = iou_threshold
        self._groups: PieceGroups[_Piece] = PieceGroups()
        self._top: int | None = None  # the last window's top row

    def add(self, offset: Size, instances: Instances) -> list[ImageObject]:
        y, x = int(offset[0]), int(offset[1])
        if self._top is not None and y < self._top:
            raise ValueError(f"windows must come in raster order: a window at row {y} after one at row {self._top}")
        self._top = y
        finished = self._pop_finished(lambda piece: piece.window[2] <= y)
        height, width = instances.masks.shape[1:]
        window = (y, x, y + height, x + width)
        earlier = self._groups.items()
        for k in range(len(instances)):
            if instances.area[k] == 0:
                continue
            bx, by, bw, bh = (int(v) for v in instances.bbox[k])
            piece = _Piece(
                class_id=int(instances.class_id[k]),
                score=float(instances.score[k]),
                window=window,
                box=(y + by, x + bx, y + by + bh, x + bx + bw),
                mask=instances.masks[k, by : by + bh, bx : bx + bw].copy(),
                area=int(instances.area[k]),
            )
            i = self._groups.add(piece)
            for j, other in earlier:
                if other.window != window and _same_object(piece, other, self.iou_threshold):
                    self._groups.join(i, j)
        return finished

    def finish(self) -> list[ImageObject]:
        """Every object still open: call once the last window has been added."""
        return self._pop_finished(lambda piece: True)

    def _pop_finished(self, is_final) -> list[ImageObject]:
        """Remove and merge the objects all of whose pieces are final, in order of their first piece."""
        return [_merge(pieces) for pieces in self._groups.pop_finished(is_final)]


def _merge(pieces: list[_Piece]) -> ImageObject:
    """One object from a window's pieces (`merge_objects`)."""
    return merge_objects(
        [ImageObject(p.class_id, p.score, (p.box[1], p.box[0], p.box[3] - p.box[1], p.box[2] - p.box[0]), p.mask, p.area) for p in pieces]
    )


def merge_objects(parts: list[ImageObject]) -> ImageObject:
    """One object from parts of one class: the union of their masks; the area-weighted mean of their
    scores (the merge across windows, and the panoptic painter's fusion of a stuff class)."""
    x0, y0 = min(o.bbox[0] for o in parts), min(o.bbox[1] for o in parts)
    x1, y1 = max(o.bbox[0] + o.bbox[2] for o in parts), max(o.bbox[1] + o.bbox[3] for o in parts)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for o in parts:
        x, y, w, h = o.bbox
        mask[y - y0 : y - y0 + h, x - x0 : x - x0 + w] |= o.mask
    weights = np.array([o.area for o in parts], np.float64)
    score = float(np.dot(weights, [o.score for o in parts]) / weights.sum())
    return ImageObject(class_id=parts[0].class_id, score=score, bbox=(x0, y0, x1 - x0, y1 - y0), mask=mask, area=int(mask.sum()))


def merge_window_instances(windows: Iterable[tuple[Size, Instances]], iou_threshold: float = 0.5) -> list[ImageObject]:
    """Every object of an image from its windows' ((y, x) offset, instances), in raster order."""
    merger = WindowInstanceMerger(iou_threshold)
    objects: list[ImageObject] = []
    for offset, instances in windows:
        objects += merger.add(offset, instances)
    return objects + merger.finish()
