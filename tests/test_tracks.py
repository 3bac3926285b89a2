"""pipeline.predict.tracks without Ray: the committed clips table read video by video, joined into
tracks, and scored against YouTube-VIS labels (the matching rule, its notes)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.clip_plan import plan_clips
from pipeline.io.coco_codec import encode_rle
from pipeline.metrics.coco_labels import YtvisLabels
from pipeline.predict.tracks import write_tracks
from pipeline.results.run_tables import CLIPS, CLIPS_SCHEMA, ERRORS_SCHEMA, METRICS_SCHEMA, TRACKS, masks_schema, part_name
from pipeline.results.runstore import RunStore

H, W = 12, 16


def _square(frame: int) -> np.ndarray:
    """A square moving one pixel right per sampled frame."""
    mask = np.zeros((H, W), bool)
    mask[2:8, 1 + frame : 7 + frame] = True
    return mask


def _clip_rows(
    video: str, frames: list[int], clip_index: int, clip_length: int = 4, clip_stride: int = 2, label: int = 1, score: float = 0.9
) -> list[dict]:
    """The clips rows of one clip: one instance, the moving square on each of its frames."""
    clip = plan_clips(len(frames), clip_length, clip_stride)[clip_index]
    return [
        {
            "video_id": video,
            "clip": clip_index,
            "clip_start": clip.start,
            "clip_stop": clip.stop,
            "video_frames": len(frames),
            "instance": 1,
            "class_id": label,
            "score": score,
            "frame": frames[p],
            "height": H,
            "width": W,
            "rle": encode_rle(_square(p))["counts"],
        }
        for p in range(clip.start, clip.stop)
    ]


def _commit(store: RunStore, unit: int, rows: list[dict], attempt: int = 1) -> None:
    empty = masks_schema(False, video=True).empty_table()
    clips = pa.Table.from_pylist(rows, schema=CLIPS_SCHEMA)
    assert store.write_part(part_name(attempt, unit, 0), empty, METRICS_SCHEMA.empty_table(), ERRORS_SCHEMA.empty_table(), {CLIPS: clips})


class RecordingStore(RunStore):
    """A real store that records which videos each read of the clips' rows returned."""

    reads: list[tuple[list | None, list | None, set[str]]]

    def read_part(self, kind, part, columns=None, filters=None):
        table = super().read_part(kind, part, columns, filters)
        if kind == CLIPS:
            self.reads.append((columns, filters, set(table.column("video_id").to_pylist())))
        return table


def test_tracks_are_built_video_by_video_reading_only_that_videos_rows_the_latest_part_of_a_clip_winning(tmp_path):
    frames = list(range(6))  # clips [0,4) [2,6)
    store = RecordingStore(str(tmp_path), {}, "run")
    store.reads = []
    unit = 0
    for video in ("b.mkv", "a.mkv", "c.mkv"):
        for k in range(2):
            _commit(store, unit, _clip_rows(video, frames, k))
            unit += 1
    _commit(store, unit, _clip_rows("a.mkv", frames, 1, label=2), attempt=2)  # a.mkv's clip 1 again, later: its class wins
    counts = write_tracks(store, 4, 2, 0.5)
    assert counts == {"clips": 6, "tracks": 4}  # a.mkv: clip 0 class 1, clip 1 class 2 -> two tracks; b, c: one each
    tracks = pq.read_table(tmp_path / "run" / TRACKS / f"{TRACKS}.parquet").to_pylist()
    assert [(r["video_id"], r["class_id"]) for r in tracks if r["frame"] == 5] == [("a.mkv", 2), ("b.mkv", 1), ("c.mkv", 1)]
    assert sorted({(r["video_id"], r["track_id"], r["first_frame"], r["last_frame"]) for r in tracks if r["video_id"] != "a.mkv"}) == [
        ("b.mkv", 1, 0, 5),
        ("c.mkv", 1, 0, 5),
    ]
    # the rows (RLE) of the clips table are read video by video, each read one video's, filtered on it;
    # every other read is of the id columns alone
    full = [(filters, videos) for columns, filters, videos in store.reads if columns is None]
    assert full
    for filters, videos in full:
        assert len(videos) == 1 and filters == [("video_id", "=", *videos)]
    order = [next(iter(videos)) for _, videos in full]
    assert order == sorted(order) and set(order) == {"a.mkv", "b.mkv", "c.mkv"}
    assert all(columns == ["video_id", "clip"] for columns, _, _ in store.reads if columns is not None)


def test_tracks_are_scored_against_youtube_vis_labels_by_sampled_position_and_mismatches_are_named(tmp_path):
    store = RunStore(str(tmp_path), {}, "run")
    sampled = [0, 5, 10, 15, 20, 25]  # every_n 5: the file's frame numbers
    for k in range(2):
        _commit(store, k, _clip_rows("cams/a.mkv", sampled, k))
        _commit(store, 2 + k, _clip_rows("cams/b.mkv", sampled, k, score=0.8))
        _commit(store, 4 + k, _clip_rows("cams/c.mkv", sampled, k))
        _commit(store, 6 + k, _clip_rows("d.mkv", sampled, k))
    square = [encode_rle(_square(p)) for p in range(6)]
    data = {
        "videos": [
            # a: 6 file names, the square on each: position p is the p-th sampled frame (frame 5p)
            {"id": 1, "height": H, "width": W, "file_names": [f"cams/a/{i:05d}.jpg" for i in range(6)]},
            # b: 4 file names (a mismatch: scored as it stands), the square on the first 4
            {"id": 2, "height": H, "width": W, "file_names": [f"cams/b/{i:05d}.jpg" for i in range(4)]},
            # c: annotated at another size: not scored
            {"id": 3, "height": H + 1, "width": W, "file_names": [f"cams/c/{i:05d}.jpg" for i in range(6)]},
        ],
        "annotations": [
            {"id": 1, "video_id": 1, "category_id": 1, "iscrowd": 0, "segmentations": square},
            {"id": 2, "video_id": 2, "category_id": 1, "iscrowd": 0, "segmentations": square[:4]},
            {"id": 3, "video_id": 3, "category_id": 1, "iscrowd": 0, "segmentations": [None] * 6},
        ],
        "categories": [{"id": 1, "name": "square"}],
    }
    (tmp_path / "vis.json").write_text(json.dumps(data))
    out = write_tracks(store, 4, 2, 0.5, YtvisLabels.load(str(tmp_path / "vis.json"), {}))
    ap = out["mask_ap"]
    # a: IoU 1, found at every threshold; b (scored lower): 4 of its 6 frames annotated -> IoU 2/3, a match
    # at .50 .. .65 and a false positive after a's true one at .70 .. .95 (precision 1 up to recall 0.5)
    assert ap["videos"] == 2 and ap["AP50"] == 1.0 and abs(ap["AP75"] - 51 / 101) < 1e-12
    assert abs(ap["AP"] - (4 * 1.0 + 6 * 51 / 101) / 10) < 1e-12 and abs(ap["AR100"] - (4 * 1.0 + 6 * 0.5) / 10) < 1e-12
    assert ap["frame_count_mismatches"] == [{"video_id": "cams/b.mkv", "sampled": 6, "annotated": 4}]
    assert ap["size_mismatches"] == [{"video_id": "cams/c.mkv", "frames": f"{H}x{W}", "annotated": f"{H + 1}x{W}"}]
    assert ap["videos_unlabeled"] == 1  # d.mkv
    note = ap["note"]
    assert (
        "\n" not in note
        and "1 videos have another count of sampled frames than of annotated frames (cams/b.mkv 6 sampled, 4 annotated)" in note
    )
    assert "1 videos are not scored: their frames are not the annotations' size (cams/c.mkv 12x16, annotated 13x16)" in note
    assert "1 of the run's videos are not in the labels" in note
