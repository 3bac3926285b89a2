"""`segpipe demo`: the semantic and camouflage demos through the CLI, and their synthetic archives."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import file_bytes, strict_json_load
from PIL import Image

from jobs import camouflage_archive
from jobs.cli import main
from jobs.demo import CAMOUFLAGE_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
# what Ray's loggers and its core worker print: `2026-01-01 10:00:00,123\tINFO file.py:12 -- ...`,
# `[2026-01-01 10:00:00,123 E 123 123] core_worker.cc:...`, and its notices
RAY_LINE = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d|core_worker|streaming_executor|Token authentication|ray\.data|raylet")
COD_KEYS = ("Sm", "Em_mean", "Em_max", "Em_adp", "wFm", "Fm_mean", "Fm_max", "Fm_adp", "MAE")


def test_camouflage_demo_prints_the_camouflaged_object_measures_the_training_script_recorded(ray_session, tmp_path, capsys):
    assert main(["demo", "--task", "camouflage", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    cod_lines = [line for line in lines if line.startswith("Sm ")]
    assert len(cod_lines) == 1 and all(f" {key} " in cod_lines[0] for key in ("Em", "wFm", "Fm", "MAE")), lines

    run = tmp_path / "runs" / "camouflage"
    summary = strict_json_load(run / "summary.json")
    assert summary["images"] == summary["cod_images"] == 16 and summary["errors"] == 0
    assert summary["class_names"] == ["background", "object"]
    assert cod_lines[0].startswith(f"Sm {summary['Sm']:.3f}   Em {summary['Em_mean']:.3f} (max {summary['Em_max']:.3f}")
    # the bundled model is clearly better than chance on the held-out split, and the run measures
    # what jobs/train_camouflage_model.py recorded for it (same split, windows, 8-bit maps)
    recorded = json.loads(CAMOUFLAGE_CHECKPOINT.with_suffix(".json").read_text())["heldout"]
    assert summary["Sm"] > 0.6 and summary["MAE"] < 0.2
    for key in COD_KEYS:
        assert summary[key] == pytest.approx(recorded[key], abs=2e-3), key
    assert strict_json_load(run / "run.json")["metrics"]["task"] == "binary"


def readme_commands() -> list[list[str]]:
    """The arguments of every `segpipe ...` line in the README's sh blocks (continued lines joined,
    comments dropped), but those that name an S3 bucket: those need one."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "segpipe" and not any("s3://" in a or "s3-" in a for a in argv):
                commands.append(argv[1:])
    return commands


def test_every_readme_example_runs_as_written_after_make_demo(ray_session, tmp_path, monkeypatch, capsys):
    """As from a fresh clone: `make demo` (the `segpipe demo --out ./demo-out` program, its own local
    Ray: our lines on the terminal and none of Ray's, which go to the run's log), then each README
    line, from the repository root (here a copy of it: configs/ and jobs/ linked)."""
    for name in ("configs", "jobs"):  # configs/demo.yaml names jobs/assets/demo-segformer.safetensors
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SEGPIPE_VERBOSE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "demo", "--out", "./demo-out"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert any(line.startswith("aAcc") and "mIoU" in line for line in lines), lines
    assert not any(line.startswith("Sm ") for line in lines) and not (tmp_path / "demo-out" / "camouflage-archive").exists()
    assert [line for line in lines if RAY_LINE.search(line)] == []
    log = (tmp_path / "demo-out" / "runs" / "demo" / "logs" / "attempt-0001.log").read_text()
    assert "streaming_executor" in log or "ray" in log.lower()  # Ray's lines went to the run's log

    commands = readme_commands()
    assert {argv[0] for argv in commands} == {"run", "summary", "compare", "export", "convert", "models"}, commands
    for argv in commands:
        code = main(argv)
        assert code == 0, (argv, capsys.readouterr())
    out = capsys.readouterr().out
    runs = tmp_path / "demo-out" / "runs"
    assert strict_json_load(runs / "try1" / "summary.json")["images"] == 16 and (runs / "try2" / "plan.json").exists()
    assert len(list((tmp_path / "demo-out" / "png").rglob("*.png"))) == 16
    assert (tmp_path / "demo-out" / "cmp" / "report.html").exists() and (tmp_path / "demo-out" / "demo.safetensors").exists()
    # the second night of job nightly finds nothing new: one line, nothing written, still one run of the job
    assert out.count("job nightly: 1 runs") == 2 and "nothing new: the 16 images" in out and "is not used" in out


def test_camouflage_archive_is_deterministic(tmp_path):
    first = camouflage_archive.write_archive(tmp_path / "a", "heldout", 16)
    second = camouflage_archive.write_archive(tmp_path / "b", "heldout", 16)
    files = file_bytes(first)
    assert len(files) == 32 and files == file_bytes(second)


def test_camouflage_archive_has_objects_empty_images_and_images_larger_than_the_window(tmp_path):
    root = camouflage_archive.write_archive(tmp_path, "heldout", 16)
    labels = [np.asarray(Image.open(p)) for p in sorted((root / "labels").glob("*.png"))]
    images = [np.asarray(Image.open(p)) for p in sorted((root / "images").glob("*.png"))]
    assert all(set(np.unique(label)) <= {0, 1} for label in labels)
    empty = [label for label in labels if not label.any()]
    assert 0 < len(empty) < len(labels) // 2
    lo, hi = camouflage_archive.SIZE_RANGE
    assert all(lo <= side <= hi for image in images for side in image.shape[:2])
    assert min(images[0].shape[:2]) > camouflage_archive.WINDOW  # slid over on both axes
    # camouflage: inside and outside an object the pixels have about the same statistics
    image, label = images[0].astype(np.float32), labels[0].astype(bool)
    assert label.any()
    assert np.abs(image[label].mean(axis=0) - image[~label].mean(axis=0)).max() < 12
    assert abs(image[label].std() - image[~label].std()) < 8
    # and the held-out split is not the train split
    train_image, _ = camouflage_archive.make_sample("train", 0)
    assert not np.array_equal(train_image, images[0][: train_image.shape[0], : train_image.shape[1]])


def test_every_package_directory_is_in_setuptools_packages_so_installing_warns_of_none_and_ships_the_demo_models():
    """setuptools warns ("Package 'jobs.assets' is absent from the packages configuration", 40 lines
    in `make demo`) about any directory under a listed package that Python could import and that
    `packages` leaves out; the demo's bundled models must be package data of a listed package."""
    import fnmatch
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parent.parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(setuptools["packages"])
    importable = {
        ".".join(d.relative_to(root).parts)
        for top in ("pipeline", "models", "jobs")
        for d in [root / top, *(root / top).rglob("*")]
        if d.is_dir()
        and d.name != "__pycache__"
        and all(p.isidentifier() for p in d.relative_to(root).parts)
        and any(f.is_file() for f in d.iterdir())
    }
    assert importable <= packages, importable - packages
    shipped = {
        f.relative_to(root).as_posix()
        for package, patterns in setuptools["package-data"].items()
        for f in (root / package.replace(".", "/")).iterdir()
        if package in packages and any(fnmatch.fnmatch(f.name, p) for p in patterns)
    }
    assert {"jobs/assets/demo-segformer.safetensors", "jobs/assets/camouflage-segformer.safetensors"} <= shipped
