"""A clip model's tracks: the committed clips table joined into tracks per video, written as the
`tracks` and `track_ids` tables at the end of each attempt (derived from committed parts, so
rewritten whole each time, as summary.json is), and scored against YouTube-VIS labels when the run
has them (summary.json's `video.mask_ap`).

For each video (in key order) its clips are planned again from its sampled frame count and the run's
clip_length / clip_stride (pipeline.io.clip_plan); each clip's instance sequences are its rows of the
latest committed part that holds the clip (a resumed clip's later rows win); a clip never committed
adds no sequence. pipeline.predict.clips.TrackJoiner joins them in clip order with IoU threshold
inference.objects.merge_iou (the rule of window pieces).

Memory: video by video. The parts' `video_id` and `clip` columns are read first (which part holds
each clip last); then each video's rows are read from its parts alone (filtered on video_id), joined,
scored and dropped before the next video: one video's pieces (RLE strings, one clip's masks decoded
at a time) and the tracks found so far as Arrow tables.

    tracks/tracks.parquet        one row per track and frame where it has a mask (TRACKS_SCHEMA)
    track_ids/track_ids.parquet  (video, frame, owning clip, instance) -> track: the masks table's
                                 instance-id maps read as tracks (TRACK_IDS_SCHEMA)

Track AP (`YtvisLabels`, pipeline.metrics.coco_labels: the matching rule is there): each video that
the labels list and whose clips the run committed is one video of pipeline.metrics.video.VideoMaskAP,
its frames keyed by their position in the video's sampled frames (the k-th file name of the
annotations is position k); tracks of a class that is no category of the file are not scored
(COCOeval evaluates the ground truth's categories only).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.coco_codec import decode_rle
from pipeline.io.video import video_stem
from pipeline.metrics.coco_labels import YtvisLabels
from pipeline.metrics.video import TrackDetection, VideoMaskAP
from pipeline.predict.clips import Track, TrackJoiner, frame_owners, plan_clips
from pipeline.results.run_tables import CLIPS, TRACK_IDS, TRACK_IDS_SCHEMA, TRACKS, TRACKS_SCHEMA
from pipeline.results.runstore import RunStore

MISMATCHES_LISTED = 20  # videos named in the labels' note and in mask_ap's frame_count_mismatches


@dataclass
class ClipSequence:
    """One clip's instance as the joiner takes it (InstanceSequenceLike)."""

    instance: int
    label: int
    score: float
    masks: np.ndarray  # T x H x W bool


@dataclass
class VideoTracks:
    """One video's tracks and what scoring them needs."""

    video: str
    video_frames: int  # sampled frames
    clips_done: int
    tracks: list[Track]
    positions: dict[int, int]  # the file's frame number -> its position in the sampled frames
    tracks_table: pa.Table
    track_ids_table: pa.Table


def clip_parts(store: RunStore) -> dict[str, dict[int, str]]:
    """video -> clip -> the latest committed part that holds it, from the parts' video_id and clip
    columns alone (parts in the order they were written: a later one wins)."""
    latest: dict[str, dict[int, str]] = {}
    for part in store.parts_of(CLIPS):
        table = store.read_part(CLIPS, part, ["video_id", "clip"])
        for video, clip in set(zip(table.column("video_id").to_pylist(), table.column("clip").to_pylist())):
            latest.setdefault(video, {})[int(clip)] = part
    return latest


def video_clip_rows(store: RunStore, video: str, clips: dict[int, str]) -> list[dict]:
    """The clips rows of one video: each clip's from the part that holds it last (`clip_parts`)."""
    rows: list[dict] = []
    for part in sorted(set(clips.values())):
        table = store.read_part(CLIPS, part, filters=[("video_id", "=", video)])
        rows += [r for r in table.to_pylist() if clips.get(int(r["clip"])) == part]
    return rows


def write_tracks(store: RunStore, clip_length: int, clip_stride: int, iou_threshold: float, labels: YtvisLabels | None = None) -> dict:
    """Join, write and score the tracks (the module's docstring); summary.json's `video` counts:
    clips, tracks, and with labels `mask_ap`."""
    scoring = TrackScoring(labels) if labels is not None else None
    tracks, track_ids, clips_done, track_count = [], [], 0, 0
    for video, clips in sorted(clip_parts(store).items()):
        found = video_tracks(video, video_clip_rows(store, video, clips), clip_length, clip_stride, iou_threshold)
        tracks.append(found.tracks_table)
        track_ids.append(found.track_ids_table)
        clips_done += found.clips_done
        track_count += len(found.tracks)
        if scoring is not None:
            scoring.add(found)
    _write(store, f"{TRACKS}/{TRACKS}.parquet", pa.concat_tables(tracks) if tracks else TRACKS_SCHEMA.empty_table())
    _write(store, f"{TRACK_IDS}/{TRACK_IDS}.parquet", pa.concat_tables(track_ids) if track_ids else TRACK_IDS_SCHEMA.empty_table())
    out: dict = {"clips": clips_done, "tracks": track_count}
    if scoring is not None:
        out["mask_ap"] = scoring.record()
    return out


def video_tracks(video: str, rows: list[dict], clip_length: int, clip_stride: int, iou_threshold: float) -> VideoTracks:
    """One video's clips rows joined into tracks, with its rows of the tracks and track_ids tables."""
    video_frames = int(rows[0]["video_frames"])
    clips = plan_clips(video_frames, clip_length, clip_stride)
    owners = frame_owners(clips)
    by_clip: dict[int, list[dict]] = {}
    for r in rows:
        by_clip.setdefault(int(r["clip"]), []).append(r)
    numbers: dict[int, int] = {}
    per_clip: list[list[ClipSequence]] = []
    for k, clip in enumerate(clips):
        held = by_clip.get(k, [])
        per_clip.append(_sequences(held, clip.length))
        # the file's frame numbers of the clip's positions: its rows' frames in order
        for t, frame in enumerate(sorted({int(r["frame"]) for r in held if r["frame"] is not None})):
            numbers.setdefault(clip.start + t, frame)
    joiner = TrackJoiner(video, clips, iou_threshold, [numbers.get(p, -1) for p in range(video_frames)])
    found: list[Track] = []
    for sequences in per_clip:
        found += joiner.add(sequences)
    found += joiner.finish()
    tracks = [
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
        for track in found
        for frame, rle in track.masks.items()
    ]
    # which track each instance of a frame's id map is: the frames each clip owns
    track_of = {piece: t.track_id for t in found for piece in t.pieces}
    track_ids = []
    for k, (clip, sequences) in enumerate(zip(clips, per_clip)):
        for seq in sequences:
            track = track_of.get((k, seq.instance))
            for t in range(clip.length):
                position = clip.start + t
                if track is not None and owners[position] == k and seq.masks[t].any():
                    track_ids.append(
                        {"video_id": video, "frame": numbers[position], "clip": k, "instance": seq.instance, "track_id": track}
                    )
    return VideoTracks(
        video,
        video_frames,
        len(by_clip),
        found,
        {frame: position for position, frame in numbers.items()},
        pa.Table.from_pylist(tracks, schema=TRACKS_SCHEMA),
        pa.Table.from_pylist(track_ids, schema=TRACK_IDS_SCHEMA),
    )


class TrackScoring:
    """A run's tracks against YouTube-VIS labels, video by video (the module's docstring)."""

    def __init__(self, labels: YtvisLabels) -> None:
        self.labels = labels
        self.categories = set(labels.categories.ids)
        self.ap = VideoMaskAP(labels.categories.ids)
        self.unlabeled = 0  # videos of the run that the labels do not list
        self.mismatches: list[dict] = []  # sampled frames != annotated frames
        self.size_mismatches: list[dict] = []  # frames of another size than the annotations': not scored

    def add(self, found: VideoTracks) -> None:
        stem = video_stem(found.video)
        truths = self.labels.truths(stem)
        if truths is None:
            self.unlabeled += 1
            return
        annotated = self.labels.videos[stem]
        sizes = {tuple(rle["size"]) for t in found.tracks for rle in t.masks.values()}
        if sizes - {(annotated.height, annotated.width)}:
            size = "x".join(map(str, sorted(sizes)[0]))
            self.size_mismatches.append({"video_id": found.video, "frames": size, "annotated": f"{annotated.height}x{annotated.width}"})
            return
        if annotated.frames != found.video_frames:
            self.mismatches.append({"video_id": found.video, "sampled": found.video_frames, "annotated": annotated.frames})
        detections = [
            TrackDetection(t.label, t.score, {found.positions[frame]: rle for frame, rle in t.masks.items()})
            for t in found.tracks
            if t.label in self.categories
        ]
        self.ap.update(annotated.id, detections, truths)

    def note(self) -> str | None:
        """One line on what did not match (run.json's labels note, the terminal), None when all did."""
        parts = []
        if self.mismatches:
            named = ", ".join(f"{m['video_id']} {m['sampled']} sampled, {m['annotated']} annotated" for m in self.mismatches[:3])
            parts.append(
                f"{len(self.mismatches)} videos have another count of sampled frames than of annotated frames ({named}"
                + (", ..." if len(self.mismatches) > 3 else "")
                + "): the k-th file name is scored as the k-th sampled frame, so sample as the annotations were (input.video)"
            )
        if self.size_mismatches:
            m = self.size_mismatches[0]
            parts.append(
                f"{len(self.size_mismatches)} videos are not scored: their frames are not the annotations' size "
                f"({m['video_id']} {m['frames']}, annotated {m['annotated']})"
            )
        if self.unlabeled:
            parts.append(
                f"{self.unlabeled} of the run's videos are not in the labels (a video is the annotated one whose file names' "
                "folder is its stem: cams/a.mp4 -> cams/a/00000.jpg)"
            )
        return "; ".join(parts) or None

    def record(self) -> dict:
        """summary.json's video.mask_ap: YouTube-VIS's AP and AR over the videos scored; {} when none."""
        out: dict = {}
        if self.ap.videos:
            out.update(self.ap.summary().to_record())
        out["videos"] = self.ap.videos
        out["videos_unlabeled"] = self.unlabeled
        out["frame_count_mismatches"] = self.mismatches[:MISMATCHES_LISTED]
        if self.size_mismatches:
            out["size_mismatches"] = self.size_mismatches[:MISMATCHES_LISTED]
        note = self.note()
        if note:
            out["note"] = note
        return out


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
