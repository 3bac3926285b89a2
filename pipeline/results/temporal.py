"""A video run's summary (input.format video, pipeline.io.video): its videos and frames, and for
semantic runs the temporal stability of the masks and of the labels.

Temporal stability: the share of pixels whose label changes between consecutive frames, summed over
every pair of consecutive sampled frames that the run segmented (frame order within each video, frames
that failed left out), over all videos. Labels the same over the pairs whose two frames both have a
label (their values as stored, read as the run read them), beside the masks' share over those same
pairs, so that the two compare. A pair whose frames differ in size is not counted (`size_changes`).

It runs once the run's parts are committed: each video's masks are read in frame order, two at a
time, from the latest committed part that holds each (one masks part held at a time, and the one
before it), and each frame's label once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.io.decode import decode_label
from pipeline.io.source import list_labels
from pipeline.io.storage import open_fs, read_bytes
from pipeline.io.video import split_frame_id, video_stem
from pipeline.metrics.video import FrameChanges
from pipeline.results.run_tables import CHUNK_FIELDS, MASKS
from pipeline.results.runstore import RunStore, read_mask


def video_summary(store: RunStore, cfg: JobConfig) -> dict[str, Any]:
    """summary.json's `video`: videos and frames segmented; for the semantic task `temporal_stability`
    (see the module's docstring): pairs, pixels, changed pixels, their share, and `labels` where any
    pair of frames has two labels."""
    parts = store.mask_parts()  # frame id -> the latest committed part holding its mask
    videos: dict[str, list[tuple[int, str]]] = {}
    for image_id in parts:
        found = split_frame_id(image_id)
        if found is not None:
            videos.setdefault(found[0], []).append((found[1], image_id))
    out: dict[str, Any] = {"videos": len(videos), "frames": sum(len(v) for v in videos.values())}
    if cfg.inference.task != "semantic":
        return out
    labels: dict[str, str] = {}
    if cfg.input.labels is not None:
        labels = list_labels(cfg.input.labels.uri, cfg.input.labels.extensions, cfg.input.storage_options)
        lfs = open_fs(cfg.input.labels.uri, cfg.input.storage_options)[0]
    tables: dict[str, pa.Table] = {}  # the masks parts held: the latest two

    def mask(image_id: str) -> np.ndarray:
        part = parts[image_id]
        if part not in tables:
            if len(tables) >= 2:
                del tables[next(iter(tables))]
            tables[part] = store.read_part(MASKS, part, ["image_id", "height", "width", *CHUNK_FIELDS, "mask"])
        return read_mask(tables[part], image_id)

    def label(key: str, index: int) -> np.ndarray | None:
        uri = labels.get(f"{video_stem(key)}/{index}")
        if uri is None:
            return None
        data = read_bytes(lfs, uri)
        return decode_label(data, cfg.input.max_pixels, exif_transpose=cfg.input.exif_transpose)

    masks, label_changes, masks_on_labeled = FrameChanges(), FrameChanges(), FrameChanges()
    size_changes = 0
    for key in sorted(videos):
        before: tuple[np.ndarray, np.ndarray | None] | None = None
        for index, image_id in sorted(videos[key]):
            now = (mask(image_id), label(key, index) if labels else None)
            if before is not None:
                if before[0].shape != now[0].shape:
                    size_changes += 1
                else:
                    masks.add(before[0], now[0])
                    if before[1] is not None and now[1] is not None and before[1].shape == now[1].shape == now[0].shape:
                        label_changes.add(before[1], now[1])
                        masks_on_labeled.add(before[0], now[0])
            before = now
    stability: dict[str, Any] = {
        "pairs": masks.pairs,
        "pixels": masks.pixels,
        "changed_pixels": masks.changed,
        "changed_share": masks.share,
        "size_changes": size_changes,
        "labels": None,
    }
    if label_changes.pairs:
        stability["labels"] = {
            "pairs": label_changes.pairs,
            "pixels": label_changes.pixels,
            "changed_pixels": label_changes.changed,
            "changed_share": label_changes.share,
            "masks_changed_share": masks_on_labeled.share,  # the masks over the same pairs
        }
    out["temporal_stability"] = stability
    return out
