"""A small labeled folder through `segpipe run` on local Ray, real files in and out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from jobs.cli import main
from models import build_model, save_native
from pipeline.masks import decode_png as decode_mask
from pipeline.metrics import ClassAreas, class_areas, summarize

NUM_CLASSES = 3
SIZES = [(40, 56), (64, 64), (97, 75), (33, 130), (70, 41)]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        sub = root / "images" / ("a" if i % 2 else "b")
        lab = root / "labels" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        lab.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
        label[:3] = 255  # ignored rows
        ext = ".jpg" if i == 1 else ".png"  # a .jpg image whose label is a .png
        Image.fromarray(image).save(sub / f"img{i}{ext}")
        Image.fromarray(label).save(lab / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "images" / "unlabeled.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    model = build_model("segformer-b0", num_classes=NUM_CLASSES)
    model.class_names = ["zero", "one", "two"]
    save_native(model, path)
    return path


def write_config(tmp_path: Path, archive: Path, checkpoint: Path, **extra) -> Path:
    cfg = {
        "run_id": "t1",
        "input": {"uri": str(archive / "images"), "pattern": "**/*", "labels": {"uri": str(archive / "labels")}, "images_per_unit": 2},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"mode": "slide", "window": [48, 48], "stride": [32, 32], "batch_size": 4},
        "resources": {"actors": 1},
        "output": {"uri": str(tmp_path / "runs")},
        "metrics": {"ignore_index": 255},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_dir(run: Path, kind: str):
    files = sorted((run / kind).glob("*.parquet"))
    return pq.read_table([str(f) for f in files]) if files else None


def test_run_writes_masks_metrics_and_summary(ray_session, tmp_path, archive, checkpoint, capsys):
    config = write_config(tmp_path, archive, checkpoint)
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "images/s" in out
    run = tmp_path / "runs" / "t1"
    masks = read_dir(run, "masks").to_pylist()
    ids = sorted(m["image_id"] for m in masks)
    expected_ids = sorted([f"{'a' if i % 2 else 'b'}/img{i}{'.jpg' if i == 1 else '.png'}" for i in range(len(SIZES))] + ["unlabeled.png"])
    assert ids == expected_ids  # one mask per image, ids relative to input.uri with the extension
    total = ClassAreas.zeros(NUM_CLASSES)
    for row in masks:
        mask = decode_mask(row["mask"])
        assert mask.shape == (row["height"], row["width"])
        image = Image.open(archive / "images" / row["image_id"])
        assert mask.shape == (image.height, image.width)
        assert mask.max() < NUM_CLASSES
        if row["image_id"] != "unlabeled.png":
            label = np.asarray(Image.open(archive / "labels" / (row["image_id"].rsplit(".", 1)[0] + ".png")))
            total += class_areas(mask, label, NUM_CLASSES, 255)
    expected = summarize(total)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images"] == 6 and summary["errors"] == 0 and summary["labeled_images"] == 5
    for key in ("aAcc", "mIoU", "mAcc", "mDice"):
        assert summary[key] == pytest.approx(expected[key])
    np.testing.assert_allclose(summary["IoU"], expected["IoU"])
    assert summary["class_names"] == ["zero", "one", "two"]
    metrics = read_dir(run, "metrics")
    assert metrics.num_rows == 5 and set(metrics.column_names) == {"image_id", "intersection", "union", "pred_area", "label_area"}
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "succeeded" and info["counts"]["segmented"] == 6
    assert info["model"]["num_classes"] == NUM_CLASSES and "torch" in info["versions"]

    # resume: the same run_id again writes nothing new and counts every image once
    parts = sorted(p.name for p in (run / "masks").iterdir())
    assert main(["run", str(config)]) == 0
    assert sorted(p.name for p in (run / "masks").iterdir()) == parts
    # lose one part: the rerun segments just its images
    lost = run / "masks" / parts[0]
    lost_ids = pq.read_table(lost).column("image_id").to_pylist()
    lost.unlink()
    assert main(["run", str(config)]) == 0
    again = read_dir(run, "masks").column("image_id").to_pylist()
    assert sorted(again) == expected_ids and set(lost_ids) <= set(again)
    summary2 = json.loads((run / "summary.json").read_text())
    assert summary2["mIoU"] == pytest.approx(summary["mIoU"]) and summary2["images"] == 6


def test_bad_images_become_error_rows(ray_session, tmp_path, archive, checkpoint):
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    for f in (archive / "images").rglob("*.png"):
        (bad / "images" / f.name).write_bytes(f.read_bytes())
    (bad / "images" / "empty.png").write_bytes(b"")
    good = (archive / "images" / "b" / "img0.png").read_bytes()
    (bad / "images" / "corrupt.png").write_bytes(good[: len(good) // 3])
    config = write_config(tmp_path, bad, checkpoint, run_id="bad", max_error_fraction=0.5,
                          input={"uri": str(bad / "images"), "labels": None})
    assert main(["run", str(config)]) == 0
    run = tmp_path / "runs" / "bad"
    errors = {r["image_id"]: r for r in read_dir(run, "errors").to_pylist()}
    assert set(errors) == {"empty.png", "corrupt.png"}
    assert all(r["stage"] == "decode" for r in errors.values())
    assert "empty" in errors["empty.png"]["error"]
    masks = read_dir(run, "masks").column("image_id").to_pylist()
    assert len(masks) == len(list((bad / "images").glob("*.png"))) - 2
    # the same run with a tighter error budget fails with exit code 1
    config = write_config(tmp_path, bad, checkpoint, run_id="bad2", max_error_fraction=0.1,
                          input={"uri": str(bad / "images"), "labels": None})
    assert main(["run", str(config)]) == 1
    assert json.loads((tmp_path / "runs" / "bad2" / "run.json").read_text())["status"] == "failed"


def test_whole_mode_and_missing_input(ray_session, tmp_path, archive, checkpoint, capsys):
    config = write_config(tmp_path, archive, checkpoint, run_id="whole", inference={"mode": "whole"})
    assert main(["run", str(config)]) == 0
    masks = read_dir(tmp_path / "runs" / "whole", "masks")
    assert masks.num_rows == 6
    config = write_config(tmp_path, archive, checkpoint, run_id="none", input={"uri": str(tmp_path / "nowhere")})
    capsys.readouterr()
    assert main(["run", str(config)]) == 2  # found before the first image: usage, one line
    err = capsys.readouterr().err
    assert "input.uri" in err and "nowhere" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "none").exists()
