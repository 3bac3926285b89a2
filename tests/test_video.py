"""pipeline.io.video (input.format video): frames as written, their timestamps, every_n and fps
sampling, units and their seeks, without Ray; then one run over two videos with labels, its export
and its resume."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pytest
from helpers import job_config, read_run_table, strict_json_load, write_png, write_video, write_yaml

from jobs.cli import main
from pipeline.config import load_config
from pipeline.io.decode import decode_label
from pipeline.io.source import read_clip, reader_for
from pipeline.io.video import _frames_from, decode_frames, probe_video, sampled_frames
from pipeline.results.runstore import read_mask
from pipeline.rows import IdSet, SourceUnit

FPS = 10


def noise_frames(n: int, height: int = 48, width: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def lossless(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """12 frames of noise in FFV1 (.mkv: no frame count in the header), a keyframe every 4 frames."""
    frames = noise_frames(12)
    return write_video(tmp_path_factory.mktemp("video") / "a.mkv", frames, FPS, gop=4), frames


def test_frames_of_a_lossless_video_equal_the_frames_written_with_their_timestamps(lossless):
    path, frames = lossless
    info = probe_video(str(path))
    assert (info.frames, info.rate, info.height, info.width, info.counted) == (12, Fraction(FPS), 48, 64, True)
    decoded = list(decode_frames(str(path), list(range(12))))
    assert [index for index, *_ in decoded] == list(range(12))
    assert [error for *_, error in decoded] == [None] * 12
    assert [seconds for _, seconds, _, _ in decoded] == pytest.approx([i / FPS for i in range(12)])
    for index, _, pixels, _ in decoded:
        assert pixels.dtype == np.uint8 and np.array_equal(pixels, frames[index]), index


def test_a_unit_read_alone_seeks_to_its_keyframe_and_gives_the_frames_of_a_full_decode(lossless):
    path, frames = lossless
    with av.open(str(path)) as container:  # a seek: decoding starts at the keyframe before frame 9, not at 0
        assert [index for index, _ in _frames_from(container, container.streams.video[0], 9)] == [8, 9, 10, 11]
    alone = list(decode_frames(str(path), [5, 6, 9]))
    assert [(index, seconds) for index, seconds, _, _ in alone] == [(5, 0.5), (6, 0.6), (9, 0.9)]
    assert all(np.array_equal(pixels, frames[index]) for index, _, pixels, _ in alone)
    # frames past the end (a frame count that was wrong) are each an errors row naming where it stopped
    assert [(i, e) for i, _, _, e in decode_frames(str(path), [11, 12, 13])] == [
        (11, None),
        *[(i, "the video ended after frame 11 (its frames were counted before the run)") for i in (12, 13)],
    ]


def test_an_mp4_states_its_frame_count_and_seeks_as_a_full_decode_reads(tmp_path):
    frames = noise_frames(12, seed=1)
    path = write_video(tmp_path / "b.mp4", frames, FPS, codec="libx264", gop=5)
    info = probe_video(str(path))
    assert (info.frames, info.rate, info.counted) == (12, Fraction(FPS), False)  # from the header
    full = {i: (s, p) for i, s, p, _ in decode_frames(str(path), list(range(12)))}
    alone = list(decode_frames(str(path), [7, 8, 11]))
    assert [i for i, *_ in alone] == [7, 8, 11]
    for index, seconds, pixels, _ in alone:
        assert seconds == pytest.approx(index / FPS) and np.array_equal(pixels, full[index][1])


def test_every_n_and_fps_sample_the_frames_nearest_their_times():
    assert sampled_frames(12, Fraction(10), every_n=1) == list(range(12))
    assert sampled_frames(12, Fraction(10), every_n=5) == [0, 5, 10]
    # 3 fps of a 10 fps video: the frames nearest 0, 1/3, 2/3, 1 s: 0, 3.33, 6.67, 10
    assert sampled_frames(12, Fraction(10), fps=3) == [0, 3, 7, 10]
    assert sampled_frames(12, Fraction(30000, 1001), fps=10) == [0, 3, 6, 9]  # 29.97 fps: 0, 2.997, 5.994, 8.991
    assert sampled_frames(5, Fraction(10), fps=25) == [0, 1, 2, 3, 4]  # more than the video has: every frame once


def test_units_hold_images_per_unit_sampled_frames_with_their_labels_and_a_resume_drops_what_was_done(lossless, tmp_path):
    path, _ = lossless
    root = tmp_path / "in"
    (root / "cams").mkdir(parents=True)
    shutil.copy(path, root / "cams" / "a.mkv")
    write_video(root / "b.mp4", noise_frames(4, seed=3), FPS)
    (root / "notes.txt").write_text("not a video")
    for index in (0, 4):
        write_png(tmp_path / "labels" / "cams" / "a" / f"{index}.png", np.zeros((48, 64), np.uint8))
    cfg = load_config(
        {
            "input": {
                "uri": str(root),
                "format": "video",
                "video": {"every_n": 2},
                "images_per_unit": 4,
                "labels": {"uri": str(tmp_path / "labels")},
            },
            "model": {"name": "segformer-b0"},
        }
    )
    reader = reader_for(cfg.input)
    units = reader.list_units()
    assert [u.image_ids for u in units] == [
        ("b.mp4#0", "b.mp4#2"),
        ("cams/a.mkv#0", "cams/a.mkv#2", "cams/a.mkv#4", "cams/a.mkv#6"),
        ("cams/a.mkv#8", "cams/a.mkv#10"),
    ]
    assert [u.index for u in units] == [0, 1, 2] and {u.format for u in units} == {"video"}
    assert units[1].uris == (str(root / "cams" / "a.mkv"),) * 4
    assert units[1].label_uris == (str(tmp_path / "labels/cams/a/0.png"), None, str(tmp_path / "labels/cams/a/4.png"), None)
    # a resume: committed frames are dropped, a unit with none left is not read again
    done = IdSet(pa.array(["b.mp4#0", "b.mp4#2", "cams/a.mkv#0", "cams/a.mkv#2"]))
    left = reader.drop_done(units, done)
    assert [u.image_ids for u in left] == [("cams/a.mkv#4", "cams/a.mkv#6"), ("cams/a.mkv#8", "cams/a.mkv#10")]
    samples = list(reader.read_unit(left[0]))
    assert [(s.image_id, s.timestamp_s, s.error, s.has_label) for s in samples] == [
        ("cams/a.mkv#4", 0.4, None, True),
        ("cams/a.mkv#6", 0.6, None, False),
    ]
    assert np.array_equal(samples[0].pixels, lossless[1][4]) and decode_label(samples[0].label_bytes).shape == (48, 64)


def test_a_file_that_is_no_video_is_its_own_errors_row(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "bad.mp4").write_bytes(b"no video here")
    cfg = load_config({"input": {"uri": str(tmp_path / "v"), "format": "video"}, "model": {"name": "segformer-b0"}})
    reader = reader_for(cfg.input)
    units = reader.list_units()
    assert [u.image_ids for u in units] == [("bad.mp4",)]
    (sample,) = reader.read_unit(units[0])
    assert sample.image_id == "bad.mp4" and sample.error.startswith("read: ") and "bad.mp4" not in sample.error[:6]


def stability(masks: list[np.ndarray]) -> tuple[int, int, int]:
    """(pairs, pixels, changed) over consecutive frames, by numpy."""
    pairs = list(pairwise(masks))
    return len(pairs), sum(a.size for a, _ in pairs), sum(int((a != b).sum()) for a, b in pairs)


def test_a_video_run_segments_sampled_frames_with_timestamps_metrics_stability_export_and_resume(ray_session, tmp_path, checkpoint, capsys):
    """Two videos (12 frames each, every 2nd sampled, units of 2 frames), labels for some frames: one
    run, its png export, then a resume of a run whose first attempt committed only some units."""
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    write_video(videos / "a.mkv", noise_frames(12, seed=5), FPS, gop=4)
    write_video(videos / "sub" / "b.mkv", noise_frames(12, seed=6), FPS, gop=4)
    rng = np.random.default_rng(7)
    labels = {}
    for stem, indices in (("a", (0, 2, 4, 6)), ("sub/b", (2, 4, 10))):
        for index in indices:
            labels[f"{stem}/{index}"] = write_png(
                tmp_path / "labels" / stem / f"{index}.png", rng.integers(0, 3, (48, 64)).astype(np.uint8)
            )
    cfg = job_config(
        tmp_path, videos, checkpoint, labels=tmp_path / "labels", run_id="vid",
        input={"format": "video", "video": {"every_n": 2}, "images_per_unit": 2},
    )  # fmt: skip
    path = write_yaml(tmp_path / "video.yaml", cfg)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "vid"
    ids = [f"{key}#{i}" for key in ("a.mkv", "sub/b.mkv") for i in range(0, 12, 2)]
    masks = read_run_table(run, "masks")
    assert sorted(masks.column("image_id").to_pylist()) == sorted(ids)
    stamps = dict(zip(masks.column("image_id").to_pylist(), masks.column("timestamp_s").to_pylist()))
    assert stamps == pytest.approx({i: int(i.split("#")[1]) / FPS for i in ids})
    assert sorted(read_run_table(run, "metrics").column("image_id").to_pylist()) == sorted(
        ["a.mkv#0", "a.mkv#2", "a.mkv#4", "a.mkv#6", "sub/b.mkv#2", "sub/b.mkv#4", "sub/b.mkv#10"]
    )
    # temporal stability against a numpy count of the masks and labels read back
    summary = strict_json_load(run / "summary.json")
    expected = np.zeros(3, np.int64)
    labeled_pairs, label_counts, mask_counts = 0, np.zeros(2, np.int64), np.zeros(2, np.int64)
    for key, stem in (("a.mkv", "a"), ("sub/b.mkv", "sub/b")):
        frames = [read_mask(str(run), f"{key}#{i}") for i in range(0, 12, 2)]
        expected += stability(frames)
        for i in range(0, 10, 2):
            if f"{stem}/{i}" in labels and f"{stem}/{i + 2}" in labels:
                a, b = (decode_label(labels[f"{stem}/{j}"].read_bytes()) for j in (i, i + 2))
                labeled_pairs += 1
                label_counts += (a.size, int((a != b).sum()))
                mask_counts += (a.size, int((frames[i // 2] != frames[i // 2 + 1]).sum()))
    video = summary["video"]
    stable = video["temporal_stability"]
    assert (video["videos"], video["frames"]) == (2, 12)
    assert (stable["pairs"], stable["pixels"], stable["changed_pixels"]) == tuple(expected) == (10, 10 * 48 * 64, expected[2])
    assert stable["changed_share"] == pytest.approx(expected[2] / expected[1]) and 0 < stable["changed_share"] < 1
    assert (
        (stable["labels"]["pairs"], stable["labels"]["pixels"], stable["labels"]["changed_pixels"])
        == (labeled_pairs, *label_counts)
        == (4, 4 * 3072, label_counts[1])
    )
    assert stable["labels"]["masks_changed_share"] == pytest.approx(mask_counts[1] / mask_counts[0])
    assert f"temporal stability: {100 * stable['changed_share']:.2f}% of pixels change label" in out
    # the png export: one file per frame, <video stem>/<frame index>.png, no '#'
    assert main(["export", str(run), "--to", str(tmp_path / "png"), "--format", "png"]) == 0
    written = sorted(str(p.relative_to(tmp_path / "png")) for p in (tmp_path / "png").rglob("*.png"))
    assert written == sorted(f"{stem}/{i}.png" for stem in ("a", "sub/b") for i in range(0, 12, 2))

    # a resume: the first attempt committed units 0 and 2 of a.mkv's 3 and 3-5 of b.mkv's; the others' parts are gone
    for part in (run / "masks").glob("*.parquet"):
        if "-u000001-" in part.name or "-u000003-" in part.name:
            part.unlink()
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    again = read_run_table(run, "masks").column("image_id").to_pylist()
    assert sorted(again) == sorted(ids)  # every frame once
    counts = strict_json_load(run / "run.json")["attempts"][-1]["counts"]
    assert (counts["listed"], counts["done_earlier"], counts["to_do"], counts["processed"]) == (12, 8, 4, 4)


def test_a_video_run_without_pyav_exits_2_with_one_line_naming_the_extra_and_writes_nothing(
    ray_session, tmp_path, checkpoint, monkeypatch, capsys
):
    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "a.mkv", noise_frames(2), FPS)
    cfg = job_config(tmp_path, tmp_path / "v", checkpoint, run_id="no-av", input={"format": "video"})
    monkeypatch.setitem(sys.modules, "av", None)  # as where PyAV is not installed: `import av` fails
    assert main(["run", str(write_yaml(tmp_path / "video.yaml", cfg))]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["segpipe: input.format: video needs av: pip install 'segpipe[video]'"]
    assert not (tmp_path / "runs").exists()


def test_a_clip_models_units_are_clips_owning_their_frames_and_a_resume_keeps_a_clip_whole_owning_what_is_left(lossless, tmp_path):
    path, frames = lossless
    (tmp_path / "in").mkdir()
    shutil.copy(path, tmp_path / "in" / "a.mkv")
    cfg = load_config(
        {
            "input": {"uri": str(tmp_path / "in"), "format": "video", "video": {"every_n": 2}},
            "model": {"name": "vistr-r50"},
            "inference": {"task": "instance", "clip_length": 4, "clip_stride": 2},
        }
    )
    reader = reader_for(cfg.input, clips=(4, 2))
    units = reader.list_units()
    # 6 sampled frames (0, 2, .., 10): clips at positions [0, 4) and [2, 6), each frame owned once
    assert [(u.format, u.image_ids, u.clip, u.owned) for u in units] == [
        ("clip", ("a.mkv#0", "a.mkv#2", "a.mkv#4", "a.mkv#6"), (0, 0, 4, 6), (True, True, True, False)),
        ("clip", ("a.mkv#4", "a.mkv#6", "a.mkv#8", "a.mkv#10"), (1, 2, 6, 6), (False, True, True, True)),
    ]
    assert [u.images for u in units] == [3, 3]  # image rows: the owned frames (a frame in two clips counts once)
    # a resume: a clip whose owned frames are all committed is dropped; one with some left runs whole, owning those
    left = reader.drop_done(units, IdSet(pa.array(["a.mkv#0", "a.mkv#2", "a.mkv#4", "a.mkv#6"])))
    assert [(u.image_ids, u.owned) for u in left] == [(units[1].image_ids, (False, False, True, True))]
    # its read: ONE row, the clip's frames stacked, which frames it owns, their timestamps
    [row] = list(read_clip(left[0], cfg.input))
    assert (row.image.shape, row.height, row.width, row.image_id) == ((4 * 48, 64, 3), 48, 64, "a.mkv#8")
    assert np.array_equal(row.image, np.concatenate([frames[i] for i in (4, 6, 8, 10)]))
    assert row.clip == {
        "video": "a.mkv", "index": 1, "start": 2, "stop": 6, "video_frames": 6,
        "ids": list(units[1].image_ids), "timestamps": pytest.approx([0.4, 0.6, 0.8, 1.0]), "owned": [False, False, True, True],
    }  # fmt: skip
    # a clip with a frame that fails: no clip, an errors row for each frame it owns, naming the frame
    broken = replace(units[1], image_ids=("a.mkv#8", "a.mkv#10", "a.mkv#12", "a.mkv#14"), owned=(True, True, True, False))
    rows = list(read_clip(broken, cfg.input))
    assert [(r.image_id, r.stage) for r in rows] == [("a.mkv#8", "read"), ("a.mkv#10", "read"), ("a.mkv#12", "read")]
    assert rows[0].error.startswith("read: clip 1 of a.mkv not segmented: frame a.mkv#12: read: the video ended after frame 11")
    assert rows[2].error.startswith("read: the video ended after frame 11")


def size_changing_video(path: Path) -> Path:
    """Two MPEG-2 transport streams, 64 x 48 then 48 x 32, end to end: one video whose frame size changes
    mid-stream (a transport stream concatenates; the decoder takes the new sequence header)."""
    import io

    def segment(height: int, width: int, frames: int, start: int) -> bytes:
        out = io.BytesIO()
        with av.open(out, mode="w", format="mpegts") as container:
            stream = container.add_stream("mpeg2video", rate=FPS)
            stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
            for t in range(frames):
                frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 * t, np.uint8), format="rgb24")
                frame.pts = start + t
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return out.getvalue()

    path.write_bytes(segment(48, 64, 6, 0) + segment(32, 48, 6, 6))
    return path


def test_a_video_whose_frame_size_changes_mid_stream_goes_on_at_each_frames_size_and_says_so_once(tmp_path, ray_session):
    """The issue's bad input: frames keep their own size, one warning per change (decode_frames), carried by
    the next frame's sample (read_video_unit) to the run monitor (read_and_decode), which keeps each text once
    for run.json's attempt `warnings` and the terminal."""
    import ray

    from pipeline.io.source import read_and_decode
    from pipeline.plan import _run_monitor_class
    from pipeline.rows import SourceUnit

    path = size_changing_video(tmp_path / "cam.ts")
    warnings: list[str] = []
    frames = list(decode_frames(str(path), list(range(9)), warnings=warnings))
    sizes = [p.shape[:2] for _, _, p, e in frames if e is None]
    changed = sizes.index((32, 48))
    assert sizes[:changed] == [(48, 64)] * changed and set(sizes[changed:]) == {(32, 48)} and changed >= 4
    assert warnings == [
        f"{path}: the frame size changes mid-stream at frame {changed}, 64 x 48 -> 48 x 32: its frames are segmented at their own size"
    ]
    cfg = load_config(job_config(tmp_path, tmp_path, tmp_path / "m.safetensors", input={"format": "video"}))
    ids = tuple(f"cam.ts#{i}" for i in range(changed + 2))  # from frame 0: decoded from the start, counted
    unit = SourceUnit(0, "video", (str(path),) * len(ids), (None,) * len(ids), ids)
    monitor = _run_monitor_class().remote()
    rows = [r for r in read_and_decode(unit.to_record(), cfg=cfg, monitor=monitor) if r["image_id"]]
    assert [(r["image_id"], r["image"].shape[:2], r["error"]) for r in rows] == [
        (i, (48, 64) if k < changed else (32, 48), "") for k, i in enumerate(ids)
    ]
    monitor.add_warning.remote(warnings[0])  # said again by another unit: kept once
    assert ray.get(monitor.warnings.remote(), timeout=30) == warnings


def understated_avi(path: Path, frames: list[np.ndarray], stated: int) -> Path:
    """An AVI of `frames` (FFV1) whose header states `stated` frames (avih's total and strh's length
    rewritten): what a recorder that died before it finished its header leaves."""
    import struct

    write_video(path, frames, FPS, codec="ffv1")  # lossless: frames read back equal
    data = bytearray(path.read_bytes())
    avih, strh = data.find(b"avih"), data.find(b"strh")
    assert struct.unpack_from("<I", data, avih + 24)[0] == len(frames)  # dwTotalFrames
    assert struct.unpack_from("<I", data, strh + 40)[0] == len(frames)  # dwLength
    struct.pack_into("<I", data, avih + 24, stated)
    struct.pack_into("<I", data, strh + 40, stated)
    path.write_bytes(data)
    return path


def test_frames_past_the_count_a_header_states_are_said_by_the_videos_last_unit_not_left_out_silently(tmp_path):
    frames = noise_frames(12, seed=5)
    path = understated_avi(tmp_path / "rec.avi", frames, stated=8)
    info = probe_video(str(path))
    assert (info.frames, info.counted) == (8, False)  # what units are planned from: frames 8-11 never are
    said = (
        f"{path}: the stream goes on past the 8 frames its header states (frame 8 decoded): frames from 8 on are not "
        "segmented; remux the file (ffmpeg -i in -c copy out) so that its header counts every frame"
    )
    for wanted, sampling, last in (([0, 1, 2, 3], (1, None), False), ([4, 5, 6, 7], (1, None), True), ([3, 6], (3, None), True)):
        warnings: list[str] = []
        seen = []
        for index, _, pixels, error in decode_frames(str(path), wanted, warnings=warnings, sampling=sampling):
            assert error is None and np.array_equal(pixels, frames[index])
            seen.append((index, list(warnings)))  # the warning is there when the last frame comes: it rides on its row
        assert seen == [(i, [said] if last and i == wanted[-1] else []) for i in wanted], wanted
    assert list(decode_frames(str(path), [4, 5, 6, 7], warnings=(w := []))) and w == []  # no sampling: no check
    # the reader: the video's last unit carries it on its last frame's sample
    cfg = load_config(
        {"input": {"uri": str(tmp_path), "pattern": "*.avi", "format": "video", "images_per_unit": 5}, "model": {"name": "segformer-b0"}}
    )
    reader = reader_for(cfg.input)
    units = reader.list_units()
    assert [len(u.image_ids) for u in units] == [5, 3]
    assert [s.warning for s in reader.read_unit(units[0])] == [None] * 5
    assert [s.warning for s in reader.read_unit(units[1])] == [None, None, said]


def test_a_variable_rate_video_seeks_by_its_frames_timestamps_and_each_frame_keeps_its_own_index(tmp_path):
    """After a seek by the rate a frame's index is its timestamp times the rate: wrong where the rate
    varies (frames 24-25 would be frames 12-13 of this video). The listing sees it on the packets'
    timestamps, and its units seek by their first frame's; a unit that seeks by the rate all the same
    (the listing did not see it) checks each frame up to its first against the next and counts from
    the start on the first that disagrees."""
    frames = noise_frames(40, height=24, width=32, seed=9)
    stamps = [200 * i for i in range(20)] + [4000 + 50 * i for i in range(20)]  # ms: 5 fps, then 20 fps
    (tmp_path / "v").mkdir()
    path = write_video(tmp_path / "v" / "phone.mkv", frames, FPS, stamps_ms=stamps)
    info = probe_video(str(path))
    assert (info.frames, info.rate, info.counted, info.stamps) == (40, Fraction(FPS), True, stamps)
    assert probe_video(str(write_video(tmp_path / "steady.mkv", frames[:12], FPS))).stamps is None  # constant: seeks by the rate
    assert probe_video(str(write_video(tmp_path / "c.mp4", frames[:12], FPS))).stamps is None
    expected = [(24, 4.2, True), (25, 4.25, True), (33, 4.65, True)]
    for seek_to in ((), (20, 4000), (22, 4100)):  # by the rate, checked; by a frame's timestamp at or before the first
        got = [(i, s, np.array_equal(p, frames[i])) for i, s, p, e in decode_frames(str(path), [24, 25, 33], seek_to=seek_to)]
        assert got == expected, seek_to
    cfg = load_config({"input": {"uri": str(tmp_path / "v"), "format": "video", "images_per_unit": 16}, "model": {"name": "segformer-b0"}})
    reader = reader_for(cfg.input)
    units = reader.list_units()
    assert [(len(u.image_ids), u.seek_to) for u in units] == [(16, (0, 0)), (16, (16, 3200)), (8, (32, 4600))]
    assert units[1] == SourceUnit.from_record(units[1].to_record())  # it crosses into Ray and back
    samples = list(reader.read_unit(units[1]))
    assert [s.image_id for s in samples] == [f"phone.mkv#{i}" for i in range(16, 32)]
    assert all(np.array_equal(s.pixels, frames[16 + k]) for k, s in enumerate(samples))
    left = reader.drop_done(units, IdSet(pa.array([f"phone.mkv#{i}" for i in range(35)])))  # a resume: the seek stays
    assert [(u.image_ids, u.seek_to) for u in left] == [(tuple(f"phone.mkv#{i}" for i in range(35, 40)), (32, 4600))]
    assert [s.timestamp_s for s in reader.read_unit(left[0])] == [s / 1000 for s in stamps[35:]]
    # a clip model's units: each clip seeks by its first frame's timestamp, and reads its own frames
    cfg = load_config(
        {
            "input": {"uri": str(tmp_path / "v"), "format": "video", "video": {"every_n": 2}},
            "model": {"name": "vistr-r50"},
            "inference": {"task": "instance", "clip_length": 4, "clip_stride": 4},
        }
    )
    clips = reader_for(cfg.input, clips=(4, 4)).list_units()
    assert [u.seek_to for u in clips] == [(8 * k, stamps[8 * k]) for k in range(5)]
    [row] = list(read_clip(clips[3], cfg.input))
    assert np.array_equal(row.image, np.concatenate([frames[i] for i in (24, 26, 28, 30)]))


def test_a_video_with_a_display_rotation_is_read_upright_as_players_show_it(tmp_path):
    """A phone's portrait video is stored sideways with a display matrix that players (and FFmpeg's
    autorotate) apply. Its frames come upright: 90 degrees counter-clockwise is one turn of np.rot90,
    -90 three, 180 two, the angle read from the matrix as libavutil reads it (PyAV's frame.rotation
    agrees); input.video.autorotate false gives them as stored. The run's identity holds the setting,
    and a video run recorded before it existed (its frames as stored) is held to false. Before: frames
    segmented sideways, labels drawn on the upright frames of another size."""
    from pipeline.io.video import read_video_unit
    from pipeline.results.runstore import identity_changes, run_identity

    frames = noise_frames(3, height=32, width=48)
    for rotation, turns in ((90, 1), (-90, 3), (180, 2)):
        path = write_video(tmp_path / f"phone{rotation}.mkv", frames, FPS, rotation=rotation)
        with av.open(str(path)) as container:
            assert next(container.decode(video=0)).rotation % 360 == rotation % 360
        for autorotate in (True, False):
            cfg = load_config(
                {"input": {"uri": str(tmp_path), "format": "video", "video": {"autorotate": autorotate}}, "model": {"name": "segformer-b0"}}
            )
            ids = tuple(f"phone{rotation}.mkv#{i}" for i in range(3))
            samples = list(read_video_unit(0, (str(path),) * 3, ids, (None,) * 3, cfg.input))
            assert [s.error for s in samples] == [None] * 3 and not any(s.warning for s in samples)
            for sample, frame in zip(samples, frames):
                assert np.array_equal(sample.pixels, np.rot90(frame, turns) if autorotate else frame), (rotation, autorotate)
    cfg = load_config({"input": {"uri": str(tmp_path), "format": "video"}, "model": {"name": "segformer-b0"}})
    identity = run_identity(cfg, "segformer-b0", 3, "abc")
    assert identity["input.video.autorotate"] is True and "autorotate" not in identity["input.video"]
    before = {k: v for k, v in identity.items() if k != "input.video.autorotate"}  # recorded before the setting existed
    assert identity_changes(before, identity) == {"input.video.autorotate": [False, True]}
    as_stored = load_config(
        {"input": {"uri": str(tmp_path), "format": "video", "video": {"autorotate": False}}, "model": {"name": "segformer-b0"}}
    )
    assert identity_changes(before, run_identity(as_stored, "segformer-b0", 3, "abc")) == {}


def test_a_display_matrix_that_mirrors_or_turns_by_other_than_quarter_turns_leaves_frames_as_stored_and_says_so():
    """`upright` on frames whose display matrix (16.16 fixed point, as libavutil stores it) mirrors
    the picture or turns it by 45 degrees: the frame as stored, and a note; a quarter turn's matrix
    turns it; no matrix leaves it."""
    from pipeline.io.video import upright

    class DisplayMatrix:
        type = "Type.DISPLAYMATRIX"

        def __init__(self, a: float, b: float, c: float, d: float) -> None:
            self.values = [round(v * 65536) for v in (a, b, 0, c, d, 0)] + [0, 0, 1 << 30]

        def __bytes__(self) -> bytes:
            return np.asarray(self.values, np.int32).tobytes()

    def frame(*matrix):
        return type("Frame", (), {"side_data": [DisplayMatrix(*matrix)] if matrix else []})()

    pixels = noise_frames(1, 6, 10)[0]
    mirrored, note = upright(pixels, frame(-1, 0, 0, 1))
    assert mirrored is pixels and "mirrors frames: they are segmented as stored" in note
    half = 0.5**0.5
    tilted, note = upright(pixels, frame(half, -half, half, half))
    assert tilted is pixels and "turns frames by 45 degrees" in note
    turned, note = upright(pixels, frame(0, -1, 1, 0))  # libavutil reads 90 (counter-clockwise) from it
    assert note is None and np.array_equal(turned, np.rot90(pixels, 1))
    assert upright(pixels, frame()) == (pixels, None)
