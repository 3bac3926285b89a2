"""Where a run's images and labels are read from (image folders only): the labels paired with the
compared images as the run paired them, read and turned into class maps as the run read them, and
the photos, for the confusion matrices, the report's pictures and the receptive fields."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.analysis.compare.runs import Run
from pipeline.config import LabelsConfig
from pipeline.io.source import key_stem, list_labels  # the label pairing of ImageFolderReader
from pipeline.io.storage import open_fs, read_bytes
from pipeline.metrics.semantic import LabelReading


@dataclass
class Sources:
    """Where the compared images and their labels are read from (image folders only)."""

    images_uri: str | None = None
    labels: dict[str, str] = field(default_factory=dict)  # image_id -> label URI
    exif_transpose: bool = True
    reading: LabelReading | None = None  # how the run read its labels (a binary task's masks or class indices)
    notes: list[str] = field(default_factory=list)


def find_sources(run: Run, image_ids: list[str], storage_options: dict) -> Sources:
    """The images and labels of `run`'s config: labels are paired as pipeline.io.source's
    ImageFolderReader pairs them (the image's relative key, any label extension, the earliest of
    `labels.extensions` preferred), from one listing of the labels prefix."""
    cfg = run.config
    inp = cfg.get("input") or {}
    fmt = inp.get("format") or (run.info.get("identity") or {}).get("input.format")
    metrics = cfg.get("metrics") or {}
    src = Sources(
        exif_transpose=bool(inp.get("exif_transpose", True)),
        reading=LabelReading.of(
            metrics.get("task", "semantic"),
            metrics.get("binary_labels", "class_index"),  # runs from before binary_labels read class indices
            metrics.get("ignore_index"),
            int(metrics.get("positive_class", 1)) if run.num_classes == 2 and (run.info.get("model") or {}).get("num_classes") != 1 else 1,
            run.num_classes,
            bool(metrics.get("reduce_zero_label")),  # as the run decided it (null never reaches run.json)
        ),
    )
    if fmt != "images":
        src.notes.append(
            f"the input is {fmt or 'not an image folder'} ({inp.get('uri')}): confusion matrices and photos need an image folder"
        )
        return src
    src.images_uri = inp.get("uri")
    labels_cfg = inp.get("labels") or {}
    labels_uri = labels_cfg.get("uri")
    if not labels_uri:
        src.notes.append(f"run {run.label} has no labels configured: no confusion matrices")
        return src
    extensions = labels_cfg.get("extensions") or LabelsConfig().extensions
    try:
        labels = list_labels(labels_uri, extensions, storage_options)
    except OSError as exc:
        src.notes.append(f"labels {labels_uri} are not reachable ({' '.join(str(exc).split())[:200]}): no confusion matrices")
        return src
    if not labels:
        src.notes.append(f"no label files under {labels_uri} (missing or empty): no confusion matrices")
        return src
    for image_id in image_ids:
        hit = labels.get(key_stem(image_id))
        if hit is not None:
            src.labels[image_id] = hit
    return src


def read_label(src: Sources, image_id: str, storage_options: dict) -> np.ndarray | None:
    from pipeline.io.decode import decode_label

    uri = src.labels.get(image_id)
    if uri is None:
        return None
    fs, path = open_fs(uri, storage_options)
    return decode_label(read_bytes(fs, path), exif_transpose=src.exif_transpose)


def label_classes(src: Sources, label: np.ndarray, num_classes: int) -> tuple[np.ndarray, int | None]:
    """The label's class map as the run read it (a binary task's mask or class indices), and the
    value in it that counts nowhere; LabelReadingError where the run's reading refuses it."""
    reading = src.reading or LabelReading(num_classes)
    return reading.class_map(label, reading.decide(np.unique(label)))


def read_photo(src: Sources, image_id: str, storage_options: dict) -> np.ndarray | None:
    from pipeline.io.decode import decode_image

    if not src.images_uri:
        return None
    fs, root = open_fs(src.images_uri, storage_options)
    return decode_image(read_bytes(fs, f"{root.rstrip('/')}/{image_id}"), exif_transpose=src.exif_transpose)
