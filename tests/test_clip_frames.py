"""pipeline.predict.clip_frames and a clip model's run (VisTR over a written video): units of clips,
owned frames written once, the clips table, the tracks joined at the end and scored against
YouTube-VIS labels, the ytvis export and a resume that re-runs only the clips not committed. One Ray
run (and its resume) for all of it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import job_config, read_run_table, strict_json_load, tiny_vistr_checkpoint, write_video, write_yaml

from jobs.cli import main
from pipeline.io.clip_plan import frame_owners, plan_clips
from pipeline.io.coco_codec import decode_rle, encode_rle
from pipeline.metrics.video import TrackDetection, TrackTruth, VideoMaskAP
from pipeline.results.runstore import read_mask

FPS = 10


def test_a_vistr_run_writes_owned_frames_once_clips_tracks_a_ytvis_export_and_resumes_only_uncommitted_clips(ray_session, tmp_path, capsys):
    """10 frames of 48 x 64 noise (FFV1), clips of 4 every 2: 4 clips [0,4) [2,6) [4,8) [6,10)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    rng = np.random.default_rng(3)
    write_video(videos / "cam.mkv", [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(10)], FPS, gop=4)
    checkpoint = tiny_vistr_checkpoint(tmp_path / "vistr.safetensors")
    # YouTube-VIS labels of 8 frames (the video is sampled to 10): scored as they stand, the mismatch named
    square = np.zeros((48, 64), bool)
    square[10:30, 20:50] = True
    vis = tmp_path / "vis.json"
    vis.write_text(json.dumps(_ytvis(8, [{"category_id": 1, "segmentations": [encode_rle(square)] * 8}])))
    cfg = job_config(
        tmp_path, videos, checkpoint, run_id="clips",
        input={"format": "video", "images_per_unit": 2, "labels": {"uri": str(vis)}},
        inference={"task": "instance", "clip_length": 4, "clip_stride": 2},
    )  # fmt: skip
    path = write_yaml(tmp_path / "clips.yaml", cfg)
    assert main(["run", str(path)]) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "runs" / "clips"
    labels_record = strict_json_load(run / "run.json")["labels"]
    assert labels_record["format"] == "youtube-vis" and labels_record["videos"] == 1
    assert labels_record["frame_count_mismatches"] == [{"video_id": "cam.mkv", "sampled": 10, "annotated": 8}]
    assert (
        "1 videos have another count of sampled frames than of annotated frames (cam.mkv 10 sampled, 8 annotated)" in labels_record["note"]
    )
    assert "track mask AP " in printed and f"labels: {labels_record['note']}" in printed
    ids = [f"cam.mkv#{i}" for i in range(10)]
    masks = read_run_table(run, "masks")
    assert sorted(masks.column("image_id").to_pylist()) == sorted(ids)  # each frame once: its owner's mask
    clips = plan_clips(10, 4, 2)
    owners = frame_owners(clips)
    assert [(c.start, c.stop) for c in clips] == [(0, 4), (2, 6), (4, 8), (6, 10)] and owners.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    # one part per clip: the masks of the frames it owns and its pieces of tracks, together
    parts = sorted(p.name for p in (run / "masks").glob("*.parquet"))
    assert len(parts) == 4 and parts == sorted(p.name for p in (run / "clips").glob("*.parquet"))
    table = read_run_table(run, "clips").to_pylist()
    instances = read_run_table(run, "instances").to_pylist()
    assert {r["clip"] for r in table} == {0, 1, 2, 3}
    for k, clip in enumerate(clips):
        rows = [r for r in table if r["clip"] == k and r["instance"]]
        assert rows, f"clip {k} found no instance (a seed whose instances hold masks is the point of the fixture)"
        # every instance of the clip on every frame of the clip, owned or not
        for instance in {r["instance"] for r in rows}:
            assert sorted(r["frame"] for r in rows if r["instance"] == instance) == list(range(clip.start, clip.stop))
        assert {(r["clip_start"], r["clip_stop"], r["video_frames"], r["video_id"]) for r in rows} == {
            (clip.start, clip.stop, 10, "cam.mkv")
        }
        assert min(r["instance"] for r in rows) >= 1 and max(r["instance"] for r in rows) <= 3
        # an owned frame's instance-id map is its clip's instances painted: each id's pixels within its mask
        for frame in np.flatnonzero(owners == k):
            id_map = read_mask(str(run), f"cam.mkv#{frame}")
            assert id_map.shape == (48, 64)
            union = np.zeros((48, 64), bool)
            for r in rows:
                if r["frame"] == frame:
                    mask = decode_rle({"size": [48, 64], "counts": r["rle"]})
                    assert not (id_map == r["instance"])[~mask.astype(bool)].any()
                    union |= mask.astype(bool)
            assert np.array_equal(id_map > 0, union)
            # the instances table: the frame's instances with the clip's ids, their masks the clips table's
            here = {r["instance_id"]: r["rle"] for r in instances if r["image_id"] == f"cam.mkv#{frame}"}
            assert here == {
                r["instance"]: r["rle"] for r in rows if r["frame"] == frame and decode_rle({"size": [48, 64], "counts": r["rle"]}).any()
            }
    # tracks: joined at the end, each track's frames contiguous, no more tracks than clips x instances
    tracks = read_run_table(run, "tracks").to_pylist()
    summary = strict_json_load(run / "summary.json")
    by_track: dict[int, list[int]] = {}
    for r in tracks:
        by_track.setdefault(r["track_id"], []).append(r["frame"])
    assert 1 <= len(by_track) <= 4 * 3
    for track_id, frames in by_track.items():
        frames = sorted(frames)
        assert frames == list(range(frames[0], frames[-1] + 1)), track_id
        assert {(r["first_frame"], r["last_frame"]) for r in tracks if r["track_id"] == track_id} == {(frames[0], frames[-1])}
    assert {k: v for k, v in summary["video"].items() if k != "mask_ap"} == {"videos": 1, "frames": 10, "clips": 4, "tracks": len(by_track)}
    assert summary["video"]["mask_ap"]["videos"] == 1 and set(summary["video"]["mask_ap"]) >= {"AP", "AP50", "AR10", "note"}
    # the id maps read as tracks: each (frame, instance) of a map names a track holding that frame
    track_ids = read_run_table(run, "track_ids").to_pylist()
    assert track_ids and all(r["frame"] in by_track[r["track_id"]] and r["clip"] == owners[r["frame"]] for r in track_ids)
    for frame in range(10):
        # every instance with a mask in the frame has its track (one covered by a higher score's too)
        shown = set(np.unique(read_mask(str(run), f"cam.mkv#{frame}")).tolist()) - {0}
        listed = {r["instance"] for r in track_ids if r["frame"] == frame}
        assert shown <= listed == {r["instance_id"] for r in instances if r["image_id"] == f"cam.mkv#{frame}"}

    # the ytvis export: results JSON (one entry per track, a segmentation or null per frame) and PNGs
    assert main(["export", str(run), "--to", str(tmp_path / "ytvis"), "--format", "ytvis"]) == 0
    results = json.loads((tmp_path / "ytvis" / "results.json").read_text())
    assert len(results) == len(by_track)
    for result in results:
        assert set(result) == {"video_id", "category_id", "score", "segmentations"} and result["video_id"] == 1
        assert len(result["segmentations"]) == 10
        assert [i for i, s in enumerate(result["segmentations"]) if s is not None] in [sorted(f) for f in by_track.values()]
    videos_json = json.loads((tmp_path / "ytvis" / "videos.json").read_text())
    assert videos_json == [{"id": 1, "file_name": "cam.mkv", "length": 10, "frames": list(range(10)), "height": 48, "width": 64}]
    assert sorted(p.name for p in (tmp_path / "ytvis" / "cam").glob("*.png")) == sorted(f"{i}.png" for i in range(10))

    # a resume after clip 1's part was lost: only clip 1 runs again (the whole clip), its owned frames written
    lost = [p for p in (run / "masks").glob("*-u000001-*.parquet")]
    assert len(lost) == 1
    lost[0].unlink()
    before = sorted(r["track_id"] for r in tracks)
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    assert sorted(read_run_table(run, "masks").column("image_id").to_pylist()) == sorted(ids)
    counts = strict_json_load(run / "run.json")["attempts"][-1]["counts"]
    assert (counts["listed"], counts["done_earlier"], counts["to_do"], counts["processed"]) == (10, 8, 2, 2)
    assert sorted(r["track_id"] for r in read_run_table(run, "tracks").to_pylist()) == before  # the same weights, the same tracks

    # the resume scored the tracks against labels rewritten in between (10 frames now; read by every attempt):
    # two of the run's own tracks (of classes 0 and 1, the file's categories), and a miss drawn as a polygon on one frame
    scored = [t for t in sorted(by_track) if _track_class(tracks, t) in (0, 1)][:2]
    assert scored, "no track of class 0 or 1: the fixture's seed should give some"
    truths = [TrackTruth(_track_class(tracks, t), _track_masks(tracks, t)) for t in scored]
    polygon = [[20.0, 10.0, 50.0, 10.0, 50.0, 30.0, 20.0, 30.0]]  # the square's outline
    truths.append(TrackTruth(1, {0: square, 1: _polygon_mask(polygon)}, iscrowd=False))
    annotations = [
        {"category_id": g.category_id, "segmentations": [encode_rle(g.masks[f]) if f in g.masks else None for f in range(10)]}
        for g in truths
    ]
    annotations[-1]["segmentations"][1] = polygon
    vis.write_text(json.dumps(_ytvis(10, annotations)))
    assert main(["run", str(path)]) == 0
    printed = capsys.readouterr().out
    tracks = read_run_table(run, "tracks").to_pylist()
    expected = VideoMaskAP([0, 1])
    detections = [
        TrackDetection(_track_class(tracks, t), _track_score(tracks, t), _track_masks(tracks, t))
        for t in sorted({r["track_id"] for r in tracks})
        if _track_class(tracks, t) in (0, 1)
    ]
    expected.update(7, detections, truths)
    want = expected.summary().to_record()
    got = strict_json_load(run / "summary.json")["video"]["mask_ap"]
    assert got == {
        **{k: None if math.isnan(v) else pytest.approx(v) for k, v in want.items()},
        "videos": 1,
        "videos_unlabeled": 0,
        "frame_count_mismatches": [],
    }
    assert got["AP50"] > 0 and got["AR100"] > 0  # the truths taken from the tracks are found
    assert "note" not in strict_json_load(run / "run.json")["labels"] and "labels: " not in printed
    assert f"track mask AP {100 * want['AP']:.2f}" in printed and "(1 videos)" in printed


def _ytvis(frames: int, annotations: list[dict]) -> dict:
    """YouTube-VIS annotations of the video cam.mkv (its folder cam), `frames` file names, categories 0 and 1 (class 2 of the model: not scored)."""
    return {
        "videos": [{"id": 7, "height": 48, "width": 64, "length": frames, "file_names": [f"cam/{5 * i:05d}.jpg" for i in range(frames)]}],
        "annotations": [{"id": i + 1, "video_id": 7, "iscrowd": 0, **a} for i, a in enumerate(annotations)],
        "categories": [{"id": 0, "name": "zero"}, {"id": 1, "name": "one"}],
    }


def _track_class(tracks: list[dict], track_id: int) -> int:
    return next(r["class_id"] for r in tracks if r["track_id"] == track_id)


def _track_score(tracks: list[dict], track_id: int) -> float:
    return next(r["score"] for r in tracks if r["track_id"] == track_id)


def _track_masks(tracks: list[dict], track_id: int) -> dict[int, np.ndarray]:
    """frame -> mask (frames 0..9 sampled every frame: the frame is its position)."""
    return {r["frame"]: decode_rle({"size": [48, 64], "counts": r["rle"]}).astype(bool) for r in tracks if r["track_id"] == track_id}


def _polygon_mask(polygon: list[list[float]]) -> np.ndarray:
    from pipeline.io.coco_codec import polygon_mask

    return polygon_mask(polygon[0], 48, 64)


def test_clips_longer_than_the_model_takes_exit_2_with_one_line_naming_both_and_write_nothing(ray_session, tmp_path, capsys):
    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "a.mkv", [np.zeros((16, 16, 3), np.uint8)] * 2, FPS)
    checkpoint = tiny_vistr_checkpoint(tmp_path / "vistr.safetensors")  # clips of 4 frames
    cfg = job_config(tmp_path, tmp_path / "v", checkpoint, run_id="long", input={"format": "video"}, inference={"task": "instance"})
    assert main(["run", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2  # clip_length: the default 36
    assert capsys.readouterr().err.strip().splitlines() == [
        "segpipe: inference.clip_length 36 is more than the 4 frames vistr-r50 takes (its num_frames)"
    ]
    assert not (tmp_path / "runs").exists()


def test_youtube_vis_labels_of_no_class_of_the_model_exit_2_with_one_line_and_write_nothing(ray_session, tmp_path, capsys):
    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "a.mkv", [np.zeros((16, 16, 3), np.uint8)] * 2, FPS)
    checkpoint = tiny_vistr_checkpoint(tmp_path / "vistr.safetensors")  # classes 0..2
    vis = tmp_path / "vis.json"
    vis.write_text(json.dumps({"videos": [], "annotations": [], "categories": [{"id": 40, "name": "zebra"}]}))
    cfg = job_config(
        tmp_path, tmp_path / "v", checkpoint, run_id="vis",
        input={"format": "video", "labels": {"uri": str(vis)}}, inference={"task": "instance", "clip_length": 2, "clip_stride": 1},
    )  # fmt: skip
    assert main(["run", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input.labels.uri: none of the file's category ids [40] is a class of the model (0..2)" in err[0]
    assert not (tmp_path / "runs").exists()
