"""Scheduled jobs: incremental runs of a job, its rollup, the dry run, and a quiet terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import job_config, labeled_folder, read_run_table, strict_json_load, tiny_checkpoint, write_yaml

from jobs.cli import main
from pipeline.plan import format_seconds

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3


def nightly_config(tmp_path: Path, data: Path, checkpoint: Path, **extra) -> Path:
    cfg = job_config(tmp_path, data / "images", checkpoint, labels=data / "labels", run_id=None, input={"images_per_unit": 2}, **extra)
    cfg.pop("run_id")
    return write_yaml(tmp_path / "nightly.yaml", cfg)  # the job is named after the file: nightly


def test_incremental_runs_segment_only_what_is_new_and_roll_up_to_one_run(ray_session, tmp_path, seed0_checkpoint, capsys):
    data = labeled_folder(tmp_path / "data", [(30, 40)] * 3, NUM_CLASSES, names=["n1/a", "n1/b", "n1/c"])
    config = nightly_config(tmp_path, data, seed0_checkpoint)
    assert main(["run", str(config), "--incremental"]) == 0
    labeled_folder(tmp_path / "data", [(20, 50)] * 2, NUM_CLASSES, seed=1, names=["n2/d", "n2/e"])  # the next night's
    assert main(["run", str(config), "--incremental"]) == 0
    # nothing new: one line, exit 0, and nothing written (no empty run for `summary --job` to list)
    capsys.readouterr()
    assert main(["run", str(config), "--incremental"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "nothing new: the 5 images" in out and "nothing written" in out
    # a night with another checkpoint or window is no run of this job: exit 2 naming the fields, nothing written
    other = tiny_checkpoint(tmp_path / "other.safetensors", NUM_CLASSES, seed=7)
    labeled_folder(tmp_path / "data", [(20, 20)], NUM_CLASSES, seed=2, names=["n3/f"])
    night = ["run", str(config), "--incremental", "--set", f"model.checkpoint={other}", "--set", "inference.window=[48,48]"]
    assert main(night) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "job nightly was run with other inference.window, model.weights_sha256" in err
    (data / "images" / "n3" / "f.png").unlink()

    runs = sorted((tmp_path / "runs").iterdir(), key=lambda p: json.loads((p / "run.json").read_text())["started"])
    infos = [json.loads((r / "run.json").read_text()) for r in runs]
    assert len(runs) == 2 and all(i["job"] == "nightly" and i["run_id"].startswith("nightly-") for i in infos)
    segmented = [sorted(read_run_table(r, "masks").column("image_id").to_pylist()) for r in runs]
    assert segmented == [["n1/a.png", "n1/b.png", "n1/c.png"], ["n2/d.png", "n2/e.png"]]
    assert infos[1]["attempts"][0]["incremental"]["runs_consulted"] == [infos[0]["run_id"]]
    assert infos[1]["attempts"][0]["incremental"]["skipped"] == 3
    assert strict_json_load(runs[1] / "summary.json")["images"] == 2  # each run's summary covers its own images

    capsys.readouterr()
    assert main(["summary", str(tmp_path / "runs"), "--job", "nightly"]) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and f"model.weights_sha256={infos[0]['identity']['model.weights_sha256'][:12]}" in out
    rollup = strict_json_load(tmp_path / "runs" / "nightly.summary.json")
    # the roll-up lists each run's identity: every run of the job was made the same way
    assert [r["identity"] for r in rollup["runs"]] == [i["identity"] for i in infos] == [rollup["identity"]] * 2
    # one run over everything gives the same summary, to the last pixel
    once = job_config(tmp_path, data / "images", seed0_checkpoint, labels=data / "labels", run_id="all-at-once")
    assert main(["run", str(write_yaml(tmp_path / "once.yaml", once))]) == 0
    single = strict_json_load(tmp_path / "runs" / "all-at-once" / "summary.json")
    for key in ("images", "errors", "labeled_images", "aAcc", "mIoU", "mAcc", "mDice", "IoU", "Acc", "Dice"):
        assert rollup[key] == single[key], key
    areas = pq.read_table(tmp_path / "runs" / "all-at-once" / "metrics").column("label_area").to_pylist()
    rolled = [t for r in runs for t in read_run_table(r, "metrics").column("label_area").to_pylist()]
    assert sorted(map(tuple, rolled)) == sorted(map(tuple, areas))


def test_a_dry_run_writes_plan_json_only_and_counts_what_the_run_then_does(ray_session, tmp_path, seed0_checkpoint, capsys):
    data = labeled_folder(tmp_path / "data", [(30, 40), (64, 20), (50, 50)], NUM_CLASSES)
    cfg = job_config(tmp_path, data / "images", seed0_checkpoint, labels=data / "labels", run_id="planned")
    (data / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    config = write_yaml(tmp_path / "job.yaml", {**cfg, "max_error_fraction": 0.5})
    assert main(["run", str(config), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "runs" / "planned"
    plan = strict_json_load(run / "plan.json")
    assert not any((run / kind).exists() for kind in ("masks", "metrics", "errors"))
    assert plan["images"] == 4 and plan["images_unreadable"] == 1 and plan["pixels"] == 30 * 40 + 64 * 20 + 50 * 50
    # 32-px windows, stride 24, the last at the edge: 30x40 -> 1x2, 64x20 -> 3x1 (0, 24, 32), 50x50 -> 2x2
    assert plan["windows"] == 2 + 3 + 4 and plan["estimated_seconds"] >= 0 and plan["batch_seconds"] > 0
    # the estimate is the run's fixed cost (each part measured here: an actor's start and model load
    # take a second at least) plus the batches, and says so
    fixed = plan["fixed_seconds"]
    assert set(fixed) == {"listing", "ray_start", "actor_start", "plan"} and fixed["actor_start"] > 0.5
    assert plan["estimated_seconds"] == pytest.approx(sum(fixed.values()) + plan["segmenting_seconds"], abs=0.11)
    assert plan["segmenting_seconds"] == pytest.approx(2 * plan["batch_seconds"], abs=0.06)  # 9 windows: 2 batches of 8
    assert "fixed_seconds" in plan["estimate_basis"] and plan["dry_run_seconds"] > 0
    assert f"estimate: about {format_seconds(plan['estimated_seconds'])} = start-up " in printed and "this dry run took" in printed

    assert main(["run", str(config)]) == 0
    info = strict_json_load(run / "run.json")
    masks = read_run_table(run, "masks")
    assert info["attempts"][-1]["counts"]["processed"] == plan["images"]
    assert sum(h * w for h, w in zip(masks.column("height").to_pylist(), masks.column("width").to_pylist())) == plan["pixels"]
    assert read_run_table(run, "errors").num_rows == plan["images_unreadable"]


def test_a_dry_run_sizes_a_video_unit_s_frames_from_the_video_header_without_decoding_them(tmp_path):
    import numpy as np
    from helpers import write_video

    from pipeline.config import load_config
    from pipeline.estimate import _unit_headers
    from pipeline.io.source import reader_for

    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "a.mkv", [np.zeros((48, 64, 3), np.uint8)] * 4, 10)
    (tmp_path / "v" / "b.mp4").write_bytes(b"no video")
    cfg = load_config({"input": {"uri": str(tmp_path / "v"), "format": "video"}, "model": {"name": "segformer-b0"}})
    rows = [r for unit in reader_for(cfg.input).list_units() for r in _unit_headers(unit.to_record(), cfg)]
    assert [(r["image_id"], r["height"], r["width"]) for r in rows] == [(f"a.mkv#{i}", 48, 64) for i in range(4)] + [("b.mp4", 0, 0)]
    assert [bool(r["error"]) for r in rows] == [False] * 4 + [True]


def test_a_clip_models_dry_run_counts_the_clips_left_to_run_and_times_one_clip_forward(tmp_path):
    """No Ray: the dry run's read task, what it counts and the forward it times, on a tiny VisTR."""
    import numpy as np
    import pyarrow as pa
    from helpers import tiny_vistr_checkpoint, write_video

    from pipeline.config import load_config
    from pipeline.estimate import format_plan, model_inputs_of, read_headers, time_forward
    from pipeline.io.source import reader_for
    from pipeline.rows import IdSet

    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "a.mkv", [np.zeros((48, 64, 3), np.uint8)] * 10, 10)
    checkpoint = tiny_vistr_checkpoint(tmp_path / "vistr.safetensors")
    cfg = load_config(
        {
            "input": {"uri": str(tmp_path / "v"), "format": "video"},
            "model": {"checkpoint": str(checkpoint)},
            "inference": {"task": "instance", "clip_length": 4, "clip_stride": 2},
        }
    )
    reader = reader_for(cfg.input, clips=(4, 2))  # clips [0,4) [2,6) [4,8) [6,10), owning 0-2, 3-4, 5-6, 7-9
    done = IdSet(pa.array([f"a.mkv#{i}" for i in (0, 1, 2, 3)]))  # clip 0 committed, clip 1 partly
    units = reader.drop_done(reader.list_units(), done)
    rows = [r for unit in units for r in read_headers(unit.to_record(), cfg=cfg)]
    # a row per frame to write (no frame decoded), one forward of the whole clip on each clip's first
    assert [(r["image_id"], r["height"], r["width"], r["error"]) for r in rows] == [(f"a.mkv#{i}", 48, 64, "") for i in range(4, 10)]
    assert [r["clip_frames"] for r in rows] == [4, 4, 0, 4, 0, 0]
    assert model_inputs_of(rows, cfg, clip_model=True) == ([], 3)  # 3 clips to run: no windows
    timing = time_forward(cfg, threads=1, repeats=1, clip_frame=(48, 64))  # a clip of 4 frames scaled as the run does
    assert timing["seconds"] > 0 and timing["device"] == "cpu"
    plan = {
        "run_id": "r", "images": 6, "images_listed": 10, "images_done_earlier": 4, "pixels": 6 * 48 * 64, "clips": 3, "clip_length": 4,
        "windows": 0, "batch_size": 8, "images_unreadable": 0, "estimated_seconds": 9.0, "segmenting_seconds": 0.3, "batch_seconds": 0.1,
        "timed_on": "cpu", "actors": {"actors": 1}, "listing_seconds": 0.1, "header_seconds": 0.1, "dry_run_seconds": 9.5, "path": "p",
        "fixed_seconds": {"listing": 0.1, "ray_start": 2.0, "actor_start": 3.0, "plan": 0.5},
    }  # fmt: skip
    printed = format_plan(plan)
    assert "clips 3 of 4 frames" in printed and "(3 clips at 0.100 s each on cpu, 1 actors)" in printed and "windows" not in printed


def test_an_incremental_night_is_a_run_of_its_own_even_where_the_config_names_a_run_id(tmp_path, seed0_checkpoint):
    """--incremental with a config that sets run_id (configs/demo.yaml does): each night is a new run
    `<job>-<UTC time>`, the config's run_id set aside with a note. Before: every night resumed that one
    run, and a night under another job moved it (and what it held) to that job without a word."""
    from pipeline.config import load_config
    from pipeline.plan import prepare_job

    data = labeled_folder(tmp_path / "data", [(30, 40)], NUM_CLASSES)
    cfg = load_config({**job_config(tmp_path, data / "images", seed0_checkpoint, run_id="fixed"), "job": "nightly"})
    job = prepare_job(cfg, incremental=True)
    assert job.cfg.run_id.startswith("nightly-") and job.notes == [
        "--incremental: a new run of job nightly; the config's run_id fixed is not used"
    ]
    assert prepare_job(cfg).cfg.run_id == "fixed" and prepare_job(cfg).notes == []
