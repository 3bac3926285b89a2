"""COCO label files for the object tasks' metrics: a panoptic JSON (with its PNGs as the run's labels)
and an instances JSON, read once, matched to images by file name.

Classes: class k of the model is the k-th category of the JSON's `categories` list (the dataset's
order, as detectron2's contiguous ids and transformers' id2label of COCO models are made), whatever
its `id`; a model with more classes than the JSON has categories is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from pipeline.objects import decode_rle
from pipeline.panoptic_metrics import InstanceTruth, Segment, segments_from_coco
from pipeline.storage import open_fs, read_bytes


class LabelsError(ValueError):
    """A COCO label file segpipe cannot use; one line."""


def _read_json(uri: str, storage_options: dict, field: str) -> dict:
    fs, path = open_fs(uri, storage_options)
    try:
        return json.loads(read_bytes(fs, path, uri=uri))
    except (OSError, ValueError) as exc:
        raise LabelsError(f"{field}: {uri}: {exc}") from None


def image_key(name: str) -> str:
    """What pairs an image with its annotation: the file name without folders and extension."""
    return PurePosixPath(name).stem


@dataclass
class CocoCategories:
    ids: list[int]  # dataset category id of each model class
    names: list[str]
    is_thing: list[bool]

    @classmethod
    def from_json(cls, data: dict, field: str) -> CocoCategories:
        categories = data.get("categories")
        if not categories:
            raise LabelsError(f"{field}: no categories")
        return cls(
            [int(c["id"]) for c in categories],
            [str(c.get("name", c["id"])) for c in categories],
            [bool(c.get("isthing", 1)) for c in categories],
        )

    def check_classes(self, num_classes: int, field: str) -> None:
        if num_classes > len(self.ids):
            raise LabelsError(f"{field}: the model has {num_classes} classes but the file {len(self.ids)} categories")


@dataclass
class PanopticLabels:
    """A COCO panoptic JSON: its categories and each annotation's segments, by image key."""

    categories: CocoCategories
    segments: dict[str, list[Segment]]

    @classmethod
    def load(cls, uri: str, storage_options: dict) -> PanopticLabels:
        field = "metrics.panoptic_labels"
        data = _read_json(uri, storage_options, field)
        try:
            segments = {image_key(a["file_name"]): segments_from_coco(a.get("segments_info", [])) for a in data["annotations"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise LabelsError(f"{field}: {uri}: not a COCO panoptic file ({type(exc).__name__}: {exc})") from None
        return cls(CocoCategories.from_json(data, field), segments)


@dataclass
class InstanceLabels:
    """A COCO instances JSON: categories, and the annotations of each image key."""

    categories: CocoCategories
    images: dict[str, dict]  # key -> the image entry (id, height, width)
    annotations: dict[int, list[dict]]  # COCO image id -> its annotations

    @classmethod
    def load(cls, uri: str, storage_options: dict) -> InstanceLabels:
        field = "metrics.instance_labels"
        data = _read_json(uri, storage_options, field)
        try:
            images = {image_key(i["file_name"]): {k: int(i[k]) for k in ("id", "height", "width")} for i in data["images"]}
            annotations: dict[int, list[dict]] = {}
            for a in data.get("annotations", []):
                annotations.setdefault(int(a["image_id"]), []).append(a)
        except (KeyError, TypeError, ValueError) as exc:
            raise LabelsError(f"{field}: {uri}: not a COCO instances file ({type(exc).__name__}: {exc})") from None
        return cls(CocoCategories.from_json(data, field), images, annotations)

    def truths(self, key: str) -> list[InstanceTruth] | None:
        """The ground truth of one image (masks at its size), None when the file does not list it."""
        image = self.images.get(key)
        if image is None:
            return None
        size = (int(image["height"]), int(image["width"]))
        return [
            InstanceTruth(int(a["category_id"]), annotation_mask(a["segmentation"], size), bool(a.get("iscrowd", 0)), a.get("area"))
            for a in self.annotations.get(int(image["id"]), [])
        ]


def annotation_mask(segmentation: dict | list, size: tuple[int, int]) -> np.ndarray:
    """A COCO segmentation as a boolean mask, as pycocotools' COCOeval rasterises it (`annToRLE`):
    RLE (compressed or not) decoded exactly, polygons each by `polygon_mask` (pycocotools'
    `frPyObjects`, bit for bit), several polygons of one object united (`merge`). An empty list is
    an empty mask (pycocotools fails on it), a list whose first polygon has 4 values polygons too
    (pycocotools takes it for a box and fails)."""
    if isinstance(segmentation, dict):
        return decode_rle(segmentation).astype(bool)
    mask = np.zeros(size, dtype=bool)
    for polygon in segmentation:
        mask |= polygon_mask(polygon, *size)
    return mask


POLYGON_SCALE = 5  # rleFrPoly walks the edges at 5x the pixel grid


def _c_int(values: np.ndarray | float) -> np.ndarray:
    """C's (int) cast of doubles: truncation toward zero (not floor: coordinates may be negative)."""
    return np.trunc(values).astype(np.int64)


def polygon_mask(polygon: list[float], height: int, width: int) -> np.ndarray:
    """One COCO polygon [x0, y0, x1, y1, ...] as pycocotools rasterises it (`maskApi.c` rleFrPoly,
    through `mask.frPyObjects`): the vertices scaled by 5 and rounded, every edge walked point by
    point on that grid (from its lower end, as the C code walks it, so that an edge rounds alike in
    both directions), the points where the walk crosses a pixel column's centre kept as that
    column's boundaries (the y below, rounded up, clamped to [0, height]), and the mask between them
    filled column-major by parity (even-odd: a polygon drawn around twice cancels). The same float64
    operations in the same order as the C code, so the mask is equal bit for bit (tested against
    pycocotools: fractional, negative and outside coordinates, edges on pixel centres, several parts).
    A boundary at y = height runs into the next column's top, as pycocotools' does. (A pycocotools
    built with fused multiply-adds, as compilers may do on ARM, could round an edge point otherwise.)"""
    xy = np.asarray(polygon, dtype=np.float64)
    k = len(xy) // 2
    out = np.zeros((height, width), dtype=bool)
    if k == 0 or height == 0 or width == 0:
        return out
    x = _c_int(POLYGON_SCALE * xy[0 : 2 * k : 2] + 0.5)
    y = _c_int(POLYGON_SCALE * xy[1 : 2 * k : 2] + 0.5)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    us, vs = [], []
    for j in range(k):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            t = np.arange(dx + 1)[::-1] if flip else np.arange(dx + 1)
            # a repeated vertex (dx == dy == 0) divides 0 by 0 in C; its one point's v is never read:
            # its u equals its neighbours' or is left of the image (see the column test below)
            slope = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append(_c_int(ys + slope * t + 0.5))
        else:
            t = np.arange(dy + 1)[::-1] if flip else np.arange(dy + 1)
            slope = (xe - xs) / dy
            vs.append(t + ys)
            us.append(_c_int(xs + slope * t + 0.5))
    u, v = np.concatenate(us), np.concatenate(vs)
    moved = u[1:] != u[:-1]  # consecutive points in different columns of the 5x grid
    u1, u0, v1, v0 = u[1:][moved], u[:-1][moved], v[1:][moved], v[:-1][moved]
    xd = (np.where(u1 < u0, u1, u1 - 1).astype(np.float64) + 0.5) / POLYGON_SCALE - 0.5
    column = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)  # a pixel column's centre, inside the image
    yd = np.ceil(np.clip((np.minimum(v1, v0)[column].astype(np.float64) + 0.5) / POLYGON_SCALE - 0.5, 0, height))
    starts = xd[column].astype(np.int64) * height + yd.astype(np.int64)  # column-major, as COCO's RLE
    toggles = np.bincount(starts, minlength=height * width + 1)[: height * width]
    inside = (np.cumsum(toggles) & 1).astype(bool)
    return inside.reshape(width, height).T.copy()


def mask_ap_of(instances, segmented: list[str], labels: InstanceLabels) -> dict:
    """COCO mask AP (pipeline.panoptic_metrics.MaskAP, COCOeval's definitions) of a run's instances
    table (pyarrow) against an instances JSON, over the images the run segmented (`segmented`: their
    ids, with or without instances) that the JSON lists; {} when there are none."""
    from pipeline.panoptic_metrics import InstanceDetection, MaskAP

    ap = MaskAP(labels.categories.ids)
    rows_by_key: dict[str, list[dict]] = {}
    for row in instances.to_pylist() if instances is not None else []:
        rows_by_key.setdefault(image_key(row["image_id"]), []).append(row)
    evaluated = 0
    done = {image_key(i) for i in segmented}
    for key, image in labels.images.items():
        if key not in done:
            continue
        truths = labels.truths(key) or []
        detections = [
            InstanceDetection(
                labels.categories.ids[r["class_id"]],
                r["score"],
                decode_rle({"size": [r["height"], r["width"]], "counts": r["rle"]}).astype(bool),
            )
            for r in rows_by_key.get(key, [])
        ]
        ap.update(int(image["id"]), detections, truths)
        evaluated += 1
    if not evaluated:
        return {}
    summary = ap.summary()
    return {**summary.to_record(), "images": evaluated}
