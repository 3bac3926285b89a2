"""A written result is never lost: reruns under one run_id, through `segpipe run` on local Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    file_bytes,
    job_config,
    kill_session,
    labeled_folder,
    read_run_table,
    run_iou,
    segpipe_run,
    strict_json_load,
    tiny_checkpoint,
    write_png,
    write_video,
    write_yaml,
)

from jobs.cli import main

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3


def test_image_added_before_the_others_keeps_every_committed_mask_byte_for_byte(ray_session, tmp_path, seed0_checkpoint, capsys):
    data = labeled_folder(tmp_path / "data", [(40, 50)] * 5, NUM_CLASSES, names=[f"b{i}" for i in range(5)])
    cfg = job_config(tmp_path, data / "images", seed0_checkpoint, labels=data / "labels", run_id="inc")
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run_dir = tmp_path / "runs" / "inc"
    before = {k: v for k, v in file_bytes(run_dir).items() if k.startswith(("masks/", "metrics/", "errors/"))}
    assert len([k for k in before if k.startswith("masks/")]) == 1  # one part of 5 images

    # an image that sorts before the others: the listing's positions all shift
    labeled_folder(tmp_path / "data", [(30, 30)], NUM_CLASSES, seed=1, names=["a0"])
    capsys.readouterr()
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    assert "1 of 6 images to segment" in capsys.readouterr().out
    after = file_bytes(run_dir)
    for name, data_bytes in before.items():
        assert after[name] == data_bytes, f"{name} changed"
    masks = read_run_table(run_dir, "masks")
    assert sorted(masks.column("image_id").to_pylist()) == ["a0.png"] + [f"b{i}.png" for i in range(5)]
    summary = strict_json_load(run_dir / "summary.json")
    assert summary["images"] == 6 and summary["labeled_images"] == 6

    # a no-op rerun: the whole run is still counted, this attempt did nothing
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    summary = strict_json_load(run_dir / "summary.json")
    assert summary["images"] == 6 and summary["this_attempt"]["images"] == 0 and summary["throughput"]["images"] == 6
    info = strict_json_load(run_dir / "run.json")
    assert [a["attempt"] for a in info["attempts"]] == [1, 2, 3]
    assert [a["counts"]["processed"] for a in info["attempts"]] == [5, 1, 0]
    assert all(a["status"] == "succeeded" for a in info["attempts"])


def test_failed_image_is_retried_by_a_rerun_and_its_error_superseded(ray_session, tmp_path, seed0_checkpoint):
    data = labeled_folder(tmp_path / "data", [(40, 50)] * 3, NUM_CLASSES)
    good = (data / "images" / "img000.png").read_bytes()
    (data / "images" / "img000.png").write_bytes(good[: len(good) // 3])  # truncated
    cfg = job_config(tmp_path, data / "images", seed0_checkpoint, labels=data / "labels", run_id="retry", max_error_fraction=0.5)
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run_dir = tmp_path / "runs" / "retry"
    assert strict_json_load(run_dir / "summary.json")["errors"] == 1

    # --no-retry-errors keeps it failed
    assert segpipe_run(tmp_path / "job.yaml", cfg, "--no-retry-errors") == 0
    assert strict_json_load(run_dir / "summary.json")["errors"] == 1
    assert strict_json_load(run_dir / "run.json")["attempts"][-1]["counts"]["processed"] == 0

    (data / "images" / "img000.png").write_bytes(good)  # fixed
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    summary = strict_json_load(run_dir / "summary.json")
    assert summary["images"] == 3 and summary["errors"] == 0 and summary["labeled_images"] == 3
    errors = read_run_table(run_dir, "errors").to_pylist()
    assert [(e["image_id"], e["attempt"]) for e in errors] == [("img000.png", 1)]  # kept, superseded by the mask
    assert "img000.png" in read_run_table(run_dir, "masks").column("image_id").to_pylist()


def test_other_checkpoint_under_the_same_run_id_is_refused_and_changes_nothing(ray_session, tmp_path, seed0_checkpoint, capsys):
    data = labeled_folder(tmp_path / "data", [(40, 50)] * 2, NUM_CLASSES)
    cfg = job_config(tmp_path, data / "images", seed0_checkpoint, run_id="bound")
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run_dir = tmp_path / "runs" / "bound"
    before = file_bytes(run_dir)
    other = tiny_checkpoint(tmp_path / "other.safetensors", NUM_CLASSES, seed=7)
    changes = [
        ({"model": {"checkpoint": str(other)}}, "model.weights_sha256"),
        ({"inference": {"window": [48, 48]}}, "inference.window"),
        ({"input": {"pattern": "*.png"}}, "input.pattern"),
    ]
    for change, field in changes:
        capsys.readouterr()
        assert segpipe_run(tmp_path / "job.yaml", job_config(tmp_path, data / "images", seed0_checkpoint, run_id="bound", **change)) == 2
        err = capsys.readouterr().err
        assert field in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert file_bytes(run_dir) == before
    # a change that does not touch results is a resume
    assert (
        segpipe_run(
            tmp_path / "job.yaml", job_config(tmp_path, data / "images", seed0_checkpoint, run_id="bound", inference={"batch_size": 2})
        )
        == 0
    )
    info = strict_json_load(run_dir / "run.json")
    assert info["attempts"][-1]["config_changes"] == {"inference.batch_size": [8, 2]}


def test_labels_missing_or_unmatched_are_said(ray_session, tmp_path, seed0_checkpoint, capsys):
    data = labeled_folder(tmp_path / "data", [(40, 50)] * 3, NUM_CLASSES)
    cfg = job_config(tmp_path, data / "images", seed0_checkpoint, labels=tmp_path / "nowhere", run_id="nolabels")
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 2
    err = capsys.readouterr().err
    assert "input.labels.uri" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "nolabels").exists()

    (data / "labels" / "img001.png").unlink()
    assert (
        segpipe_run(tmp_path / "job.yaml", job_config(tmp_path, data / "images", seed0_checkpoint, labels=data / "labels", run_id="some"))
        == 0
    )
    assert "2 of 3 images have a label" in capsys.readouterr().out
    info = strict_json_load(tmp_path / "runs" / "some" / "run.json")
    assert (info["labels"]["images_with_label"], info["labels"]["images_without_label"]) == (2, 1)
    assert strict_json_load(tmp_path / "runs" / "some" / "summary.json")["labeled_images"] == 2
    # labels under a folder that pairs with no image: what the run says (the note the run prints and keeps)
    from pipeline.config import load_config
    from pipeline.results.runstore import labels_report

    other = load_config(job_config(tmp_path, data / "images", seed0_checkpoint, labels=tmp_path / "other", run_id="none"))
    assert labels_report(other, 3, 0)["note"].startswith("none of the 3 images has a label under")
    # labels.required: a missing label is an errors row
    cfg = job_config(tmp_path, data / "images", seed0_checkpoint, labels=data / "labels", run_id="required", max_error_fraction=0.5)
    cfg["input"]["labels"]["required"] = True
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    errors = read_run_table(tmp_path / "runs" / "required", "errors").to_pylist()
    assert [e["image_id"] for e in errors] == ["img001.png"] and "no label" in errors[0]["error"]


def test_parts_follow_images_per_unit_and_summary_json_is_strict_json_with_null_for_absent_classes(ray_session, tmp_path, seed0_checkpoint):
    data = labeled_folder(tmp_path / "data", [(20, 30)] * 5, NUM_CLASSES)
    # labels of class 0 only: classes 1 and 2 may be absent from labels and predictions alike
    for label in (data / "labels").glob("*.png"):
        write_png(label, np.zeros((20, 30), np.uint8))
    cfg = job_config(tmp_path, data / "images", seed0_checkpoint, labels=data / "labels", run_id="units", input={"images_per_unit": 2})
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run_dir = tmp_path / "runs" / "units"
    parts = sorted((run_dir / "masks").glob("*.parquet"))
    sizes = sorted(len(read_run_table_file(p)) for p in parts)
    assert sizes == [1, 2, 2]
    assert not any(p.name.startswith(".") or p.name.startswith("_") for p in run_dir.iterdir())  # no temporary leftovers
    summary = strict_json_load(run_dir / "summary.json")
    assert None in summary["IoU"] and all(v is None or isinstance(v, float) for v in summary["IoU"])  # null, never NaN
    strict_json_load(run_dir / "run.json")


def read_run_table_file(path: Path) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path).column("image_id").to_pylist()


def test_bad_checkpoints_and_model_names_are_one_line_exit_2(ray_session, tmp_path, seed0_checkpoint, capsys):
    data = labeled_folder(tmp_path / "data", [(20, 30)], NUM_CLASSES)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(seed0_checkpoint.read_bytes()[: seed0_checkpoint.stat().st_size // 2])
    cases = [
        (job_config(tmp_path, data / "images", truncated, run_id="c1"), "truncated.safetensors"),
        (job_config(tmp_path, data / "images", seed0_checkpoint, run_id="c2", model={"num_classes": 5}), "num_classes"),
        ({**job_config(tmp_path, data / "images", seed0_checkpoint, run_id="c3"), "model": {"name": "segformer-b9"}}, "segformer-b0"),
    ]
    for cfg, expect in cases:
        capsys.readouterr()
        assert segpipe_run(tmp_path / "job.yaml", cfg) == 2
        err = capsys.readouterr().err
        assert expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "runs" / cfg["run_id"]).exists()
    assert main(["convert", str(seed0_checkpoint), str(tmp_path / "x.safetensors"), "--name", "segformer-b1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "segformer-b1" in err
    # YAML's true is no number: strict config types
    for section, field in (("inference", "batch_size"), ("resources", "gpus_per_actor")):
        assert (
            segpipe_run(
                tmp_path / "job.yaml", job_config(tmp_path, data / "images", seed0_checkpoint, run_id="c4", **{section: {field: True}})
            )
            == 2
        )
        assert f"{section}.{field}" in capsys.readouterr().err


def images_of_attempt(run_dir: Path, attempt: int) -> int:
    """The images the committed parts of one attempt hold (parts are named part-a<attempt>-...)."""
    files = sorted((run_dir / "masks").glob(f"part-a{attempt:04d}-*.parquet"))
    return len(set(read_run_table_file_ids(files)))


def read_run_table_file_ids(files: list[Path]) -> list[str]:
    import pyarrow.parquet as pq

    return [i for f in files for i in pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()]


def stop_after_first_part(config: Path, run_dir: Path, attempt: int, signum: int) -> subprocess.CompletedProcess:
    """`segpipe run config` in a subprocess of its own session, stopped once attempt `attempt` has
    committed a part: sent `signum`, or, for SIGKILL, every process of its session killed (the driver,
    its local Ray, its actors: what a lost machine does, no goodbye)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not any((run_dir / "masks").glob(f"part-a{attempt:04d}-*.parquet")):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before its first part was committed: make the job longer"
    if signum == signal.SIGKILL:
        kill_session(proc.pid)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_video_run_stopped_by_sigterm_then_killed_resumes_each_time_and_ends_with_every_frame_once(
    ray_session, tmp_path, seed0_checkpoint
):
    """Three attempts of one run over a video (16 frames, units of 2): SIGTERM (as Kubernetes and KubeRay
    stop a pod; Ctrl-C's SIGINT takes the same handler, tests/test_plan.py), SIGKILL (a lost machine),
    then to the end: every frame once."""
    rng = np.random.default_rng(0)
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "cam.mkv", [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(16)], gop=4)
    for index in range(16):
        write_png(tmp_path / "labels" / "cam" / f"{index}.png", rng.integers(0, NUM_CLASSES, (64, 64)).astype(np.uint8))
    cfg = job_config(tmp_path, tmp_path / "videos", seed0_checkpoint, labels=tmp_path / "labels", run_id="stopped",
                     input={"format": "video", "images_per_unit": 2},
                     inference={"window": [16, 16], "stride": [8, 8], "batch_size": 4})  # fmt: skip
    config = write_yaml(tmp_path / "job.yaml", cfg)
    run_dir = tmp_path / "runs" / "stopped"
    frames = [f"cam.mkv#{i}" for i in range(16)]
    # attempt 1: SIGTERM ends cleanly, exit 128 + 15, one line, and counts what its parts hold
    proc = stop_after_first_part(config, run_dir, 1, signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.startswith("segpipe:")] == [
        "segpipe: interrupted (SIGTERM): rerun the same config to finish"
    ]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted" and [a["status"] for a in info["attempts"]] == ["interrupted"]
    committed = read_run_table(run_dir, "masks").column("image_id").to_pylist()
    assert 0 < len(committed) < 16
    first = info["attempts"][0]
    assert first["counts"]["processed"] == len(committed) and first["seconds"] > 0 and first["wall_seconds"] >= first["seconds"]
    assert f"this attempt: {len(committed)} images" in proc.stdout
    assert strict_json_load(run_dir / "summary.json")["images"] == len(committed)

    # attempt 2: SIGKILL: nothing updates run.json, which still says running
    stop_after_first_part(config, run_dir, 2, signal.SIGKILL)
    committed = read_run_table(run_dir, "masks").column("image_id").to_pylist()
    assert 0 < len(committed) < 16 and images_of_attempt(run_dir, 2) > 0
    assert strict_json_load(run_dir / "run.json")["status"] == "running"

    # attempt 3: to the end, every frame once
    assert main(["run", str(config)]) == 0
    ids = read_run_table(run_dir, "masks").column("image_id").to_pylist()
    assert sorted(ids) == sorted(frames)
    summary = strict_json_load(run_dir / "summary.json")
    assert summary["images"] == summary["throughput"]["images"] == summary["labeled_images"] == 16
    # the killed attempt, found running, is lost; each attempt counts by what its parts hold
    info = strict_json_load(run_dir / "run.json")
    assert info["status"] == "succeeded" and [a["status"] for a in info["attempts"]] == ["interrupted", "lost", "succeeded"]
    assert "found running by attempt 3" in info["attempts"][1]["message"]
    assert [a["counts"]["processed"] for a in info["attempts"]] == [images_of_attempt(run_dir, a) for a in (1, 2, 3)]
    # the metrics summed over three attempts are the committed masks' own
    label_name = lambda frame: "cam/" + frame.split("#")[1] + ".png"
    assert summary["IoU"] == pytest.approx(run_iou(run_dir, tmp_path / "labels", NUM_CLASSES, label_name=label_name), abs=1e-4)


def test_a_predictor_that_dies_is_replaced_and_every_image_is_committed_once(ray_session, tmp_path, seed0_checkpoint, monkeypatch):
    from pipeline.predict.predictor import DIE_ON

    data = labeled_folder(tmp_path / "data", [(40, 50)] * 8, NUM_CLASSES)
    marker = tmp_path / "died"
    monkeypatch.setenv(DIE_ON, f"img005.png:{marker}")  # the actor that gets img005 dies, once
    cfg = job_config(tmp_path, data / "images", seed0_checkpoint, labels=data / "labels", run_id="dies", input={"images_per_unit": 2})
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    assert marker.exists() and int(marker.read_text()) > 0  # it did die
    ids = read_run_table(tmp_path / "runs" / "dies", "masks").column("image_id").to_pylist()
    assert sorted(ids) == [f"img{i:03d}.png" for i in range(8)]  # every image once
    # the metrics of a run whose actor died are the committed masks' own
    summary = strict_json_load(tmp_path / "runs" / "dies" / "summary.json")
    assert summary["images"] == 8
    assert summary["IoU"] == pytest.approx(run_iou(tmp_path / "runs" / "dies", data / "labels", NUM_CLASSES), abs=1e-4)
