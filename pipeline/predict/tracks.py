"""A clip model's tracks: the committed clips table joined into tracks per video, written as the
`tracks` and `track_ids` tables at the end of each attempt (derived from committed parts, so
rewritten whole each time, as summary.json is).

For each video (in key order) its clips are planned again from its sampled frame count and the run's
clip_length / clip_stride (pipeline.io.clip_plan); each clip's instance sequences are its rows of the
latest committed part that holds the clip (a resumed clip's later rows win); a clip never committed
adds no sequence. pipeline.predict.clips.TrackJoiner joins them in clip order with IoU threshold
inference.objects.merge_iou (the rule of window pieces). Memory: one run's clips table (RLE strings),
one video's masks of one clip at a time decoded.

    tracks/tracks.parquet        one row per track and frame where it has a mask (TRACKS_SCHEMA)
    track_ids/track_ids.parquet  (video, frame, owning clip, instance) -> track: the masks table's
                                 instance-id maps read as tracks (TRACK_IDS_SCHEMA)
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.coco_codec import decode_rle
from pipeline.predict.clips import TrackJoiner, frame_owners, plan_clips
from pipeline.results.run_tables import CLIPS, TRACK_IDS, TRACK_IDS_SCHEMA, TRACKS, TRACKS_SCHEMA
from pipeline.results.runstore import RunStore


@dataclass
class ClipSequence:
    """One clip's instance as the joiner takes it (InstanceSequenceLike)."""

    instance: int
    label: int
    score: float
    masks: np.ndarray  # T x H x W bool


def latest_clip_rows(store: RunStore) -> pa.Table | None:
    """The committed clips rows, each (video, clip) from the latest part that holds it."""
    tables = []
    for i, part in enumerate(store.parts_of(CLIPS)):
        table = store.read_part(CLIPS, part)
        tables.append(table.append_column("_part", pa.array(np.full(table.num_rows, i, np.int32))))
    if not tables:
        return None
    table = pa.concat_tables(tables)
    keys = pc.binary_join_element_wise(table.column("video_id"), pc.cast(table.column("clip"), pa.string()), "#")
    table = table.append_column("_key", keys)
    last = table.group_by("_key").aggregate([("_part", "max")])
    latest = last.column("_part_max").take(pc.index_in(keys, value_set=last.column("_key")))
    return table.filter(pc.equal(table.column("_part"), latest)).drop_columns(["_part", "_key"])


def write_tracks(store: RunStore, clip_length: int, clip_stride: int, iou_threshold: float) -> dict:
    """Join and write the tracks (the module's docstring); summary.json's counts: clips, tracks."""
    table = latest_clip_rows(store)
    tracks: list[dict] = []
    track_ids: list[dict] = []
    clips_done = 0
    for video, rows in _by_video(table):
        video_frames = int(rows[0]["video_frames"])
        clips = plan_clips(video_frames, clip_length, clip_stride)
        owners = frame_owners(clips)
        by_clip: dict[int, list[dict]] = {}
        for r in rows:
            by_clip.setdefault(int(r["clip"]), []).append(r)
        clips_done += len(by_clip)
        numbers: dict[int, int] = {}
        per_clip: list[list[ClipSequence]] = []
        for k, clip in enumerate(clips):
            held = by_clip.get(k, [])
            per_clip.append(_sequences(held, clip.length))
            # the file's frame numbers of the clip's positions: its rows' frames in order
            for t, frame in enumerate(sorted({int(r["frame"]) for r in held if r["frame"] is not None})):
                numbers.setdefault(clip.start + t, frame)
        joiner = TrackJoiner(video, clips, iou_threshold, [numbers.get(p, -1) for p in range(video_frames)])
        found = []
        for sequences in per_clip:
            found += joiner.add(sequences)
        found += joiner.finish()
        for track in found:
            for frame, rle in track.masks.items():
                tracks.append(
                    {
                        "video_id": video,
                        "track_id": track.track_id,
                        "class_id": track.label,
                        "score": track.score,
                        "first_frame": track.first_frame,
                        "last_frame": track.last_frame,
                        "frame": frame,
                        "height": rle["size"][0],
                        "width": rle["size"][1],
                        "rle": rle["counts"],
                    }
                )
        # which track each instance of a frame's id map is: the frames each clip owns
        track_of = {piece: t.track_id for t in found for piece in t.pieces}
        for k, (clip, sequences) in enumerate(zip(clips, per_clip)):
            for seq in sequences:
                track = track_of.get((k, seq.instance))
                for t in range(clip.length):
                    position = clip.start + t
                    if track is not None and owners[position] == k and seq.masks[t].any():
                        track_ids.append(
                            {"video_id": video, "frame": numbers[position], "clip": k, "instance": seq.instance, "track_id": track}
                        )
    _write(store, f"{TRACKS}/{TRACKS}.parquet", pa.Table.from_pylist(tracks, schema=TRACKS_SCHEMA))
    _write(store, f"{TRACK_IDS}/{TRACK_IDS}.parquet", pa.Table.from_pylist(track_ids, schema=TRACK_IDS_SCHEMA))
    return {"clips": clips_done, "tracks": len({(r["video_id"], r["track_id"]) for r in tracks})}


def _by_video(table: pa.Table | None):
    if table is None:
        return
    rows = table.to_pylist()
    videos: dict[str, list[dict]] = {}
    for r in rows:
        videos.setdefault(r["video_id"], []).append(r)
    for video in sorted(videos):
        yield video, videos[video]


def _sequences(rows: list[dict], length: int) -> list[ClipSequence]:
    """A clip's instances from its rows (instance 0: the clip found none), masks over its frames in order."""
    by_instance: dict[int, list[dict]] = {}
    for r in rows:
        if r["instance"]:
            by_instance.setdefault(int(r["instance"]), []).append(r)
    out = []
    for instance in sorted(by_instance):
        frames = sorted(by_instance[instance], key=lambda r: r["frame"])
        if len(frames) != length:
            raise ValueError(
                f"{frames[0]['video_id']} clip {frames[0]['clip']}: instance {instance} has {len(frames)} frames, the clip {length}"
            )
        masks = np.stack([decode_rle({"size": [r["height"], r["width"]], "counts": r["rle"]}) for r in frames]).astype(bool)
        out.append(ClipSequence(instance, int(frames[0]["class_id"]), float(frames[0]["score"]), masks))
    return out


def _write(store: RunStore, name: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.write_bytes(name, buffer.getvalue())
