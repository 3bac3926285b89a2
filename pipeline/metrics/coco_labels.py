"""COCO label files for the object tasks' metrics: a panoptic JSON (with its PNGs as the run's labels)
and an instances JSON, read once, matched to images by file name; and a YouTube-VIS annotations JSON
for a clip model's tracks (`YtvisLabels`), matched to videos by folder.

Classes: class k of the model is the k-th category of the JSON's `categories` list (the dataset's
order, as detectron2's contiguous ids and transformers' id2label of COCO models are made), whatever
its `id`; a model with more classes than the JSON has categories is refused. YouTube-VIS is the
exception: a clip model's class index IS the category id (VisTR's YouTube-VIS checkpoints predict
the dataset's ids 1..40 directly, as `segpipe export --format ytvis` writes them).

YouTube-VIS matching: an annotated video (`videos[i]`, its `file_names` such as `cams/a/00000.jpg`)
is the run's video whose stem (key without extension: `cams/a.mp4` -> `cams/a`) equals the folder
of its file names; its k-th file name is that video's k-th SAMPLED frame (input.video: sample as the
annotations were sampled, e.g. every_n 5 for YouTube-VIS 2019's every fifth frame). The file names'
own numbers are not read: a video whose sampled frame count differs from its file names' count is
scored as it stands and named in run.json's labels note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from pipeline.io.coco_codec import annotation_mask, decode_rle
from pipeline.io.storage import open_fs, read_bytes
from pipeline.metrics.panoptic import InstanceTruth, Segment, segments_from_coco
from pipeline.metrics.video import TrackTruth


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


def mask_ap_of(instances, segmented: list[str], labels: InstanceLabels) -> dict:
    """COCO mask AP (pipeline.metrics.panoptic.MaskAP, COCOeval's definitions) of a run's instances
    table (pyarrow) against an instances JSON, over the images the run segmented (`segmented`: their
    ids, with or without instances) that the JSON lists; {} when there are none."""
    from pipeline.metrics.panoptic import InstanceDetection, MaskAP

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


@dataclass
class YtvisVideo:
    id: int
    height: int
    width: int
    frames: int  # its file names: the sampled frames annotated


@dataclass
class YtvisLabels:
    """A YouTube-VIS annotations JSON (`videos` with `file_names`, `annotations` with per-frame
    `segmentations`: RLE, compressed or not, polygons, or null where the object is absent): its
    categories, and the videos by stem (the folder of their file names: the module's docstring)."""

    categories: CocoCategories
    videos: dict[str, YtvisVideo]
    annotations: dict[int, list[dict]]  # video id -> its annotations (one per object track)

    @classmethod
    def load(cls, uri: str, storage_options: dict, field: str = "input.labels.uri") -> YtvisLabels:
        data = _read_json(uri, storage_options, field)
        try:
            videos: dict[str, YtvisVideo] = {}
            for v in data["videos"]:
                folders = {str(PurePosixPath(name).parent) for name in v["file_names"]}
                if len(folders) != 1 or folders == {"."}:
                    raise ValueError(
                        f"video {v['id']}: its file_names must share one folder (<video stem>/<frame>.jpg), got {sorted(folders)[:3]}"
                    )
                stem = folders.pop()
                if stem in videos:
                    raise ValueError(f"two videos have the folder {stem}")
                videos[stem] = YtvisVideo(int(v["id"]), int(v["height"]), int(v["width"]), len(v["file_names"]))
            annotations: dict[int, list[dict]] = {}
            for a in data.get("annotations", []):
                if not isinstance(a["segmentations"], list):
                    raise ValueError(f"annotation {a.get('id')}: segmentations is no list")
                annotations.setdefault(int(a["video_id"]), []).append(a)
        except (KeyError, TypeError, ValueError) as exc:
            raise LabelsError(f"{field}: {uri}: not a YouTube-VIS annotations file ({type(exc).__name__}: {exc})") from None
        return cls(CocoCategories.from_json(data, field), videos, annotations)

    def check_classes(self, num_classes: int, field: str = "input.labels.uri") -> None:
        """A clip model's class index is the category id: at least one category must be a class."""
        if not any(0 <= c < num_classes for c in self.categories.ids):
            raise LabelsError(
                f"{field}: none of the file's category ids {self.categories.ids[:5]} is a class of the model (0..{num_classes - 1}):"
                " a clip model's class index is the YouTube-VIS category id"
            )

    def truths(self, stem: str) -> list[TrackTruth] | None:
        """The ground-truth tracks of the video of `stem`, masks keyed by the position of the frame
        in the video's sampled frames (the k-th file name: k); None when the file does not list it."""
        video = self.videos.get(stem)
        if video is None:
            return None
        out = []
        for a in self.annotations.get(video.id, []):
            size = (int(a.get("height", video.height)), int(a.get("width", video.width)))
            masks = {k: annotation_mask(s, size) for k, s in enumerate(a["segmentations"]) if s is not None}
            out.append(TrackTruth(int(a["category_id"]), masks, bool(a.get("iscrowd", 0))))
        return out
