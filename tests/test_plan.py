"""pipeline.plan: the actors sized so that read and write tasks keep a CPU, and `run_job` (through
`segpipe run`, on local Ray, real files in and out): masks, metrics, summary and run.json written,
a rerun that writes only what is missing, bad images as error rows within the error budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import CLASS_NAMES, job_config, read_run_table, segpipe_run, tiny_checkpoint, write_png
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.metrics.semantic import ClassAreas, class_areas, summarize
from pipeline.plan import build_dataset, plan_actors, progress_line, ray_lines_to
from pipeline.results.masks import decode_png
from pipeline.results.runstore import read_confidence, read_mask
from pipeline.rows import SourceUnit
from pipeline.telemetry import STAGES

NUM_CLASSES = len(CLASS_NAMES)
SIZES = [(40, 56), (64, 64), (97, 75), (33, 130), (70, 41)]
OUTSIDE = 5  # label pixels of img0 whose value is no class
ROOT = Path(__file__).resolve().parents[1]


def test_processes_that_run_no_model_import_no_torch():
    """What a read task and the writer import (their stage modules), and the CLI before its Ray
    starts, in a fresh interpreter: no torch (about 1.2 s of CPU a process on this machine)."""
    modules = ["pipeline.io.source", "pipeline.io.decode", "pipeline.io.storage", "pipeline.rows", "pipeline.results.sink",
               "pipeline.results.runstore", "pipeline.local_ray", "jobs.cli"]  # fmt: skip
    code = f"import sys; import {', '.join(modules)}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'models')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "cluster, resources, expect",
    [
        ({"CPU": 2}, {"actors": 1}, (1, 1.0, 0.0)),
        ({"CPU": 2}, {"actors": 2}, (2, 0.5, 0.0)),
        ({"CPU": 2}, {"actors": 1, "cpus_per_actor": 2}, (1, 1.0, 0.0)),  # lowered: tasks keep a CPU
        ({"CPU": 2}, {"actors": 8}, (4, 0.25, 0.0)),
        ({"CPU": 16, "GPU": 2}, {"actors": 4, "gpus_per_actor": 1}, (2, 1.0, 1.0)),
    ],
)
def test_actor_sizing_leaves_a_cpu_to_tasks(cluster, resources, expect):
    cfg = load_config({"input": {"uri": "/x"}, "model": {"name": "segformer-b0"}, "resources": resources})
    plan = plan_actors(cfg, cluster)
    assert (plan.actors, plan.num_cpus, plan.num_gpus) == expect
    if not plan.num_gpus:
        assert plan.actors * plan.num_cpus <= cluster["CPU"] - 1 + 1e-9
        assert plan.threads == max(1, int(cluster["CPU"] // plan.actors))  # torch threads: the machine's share
    # the read tasks that fit beside the actors: the GPU case keeps 14 CPUs of 16 for decoding
    assert plan.read_tasks == max(1, int((cluster["CPU"] - plan.actors * plan.num_cpus) // plan.task_cpus))
    assert plan.read_tasks >= (14 if cluster.get("GPU") else 1)


def test_a_gpu_request_on_a_cluster_without_gpus_is_refused_never_run_on_cpu():
    """Before, plan_actors printed a note and sized CPU actors: a silent CPU run of a GPU job."""
    cfg = load_config({"input": {"uri": "/x"}, "model": {"name": "segformer-b0"}, "resources": {"actors": 2, "gpus_per_actor": 1}})
    with pytest.raises(ConfigError, match=r"resources.gpus_per_actor: 1, but the cluster has 0 GPUs.*gpus_per_actor: 0 for a CPU run"):
        plan_actors(cfg, {"CPU": 2})


@pytest.mark.parametrize(
    "cluster, resources, expect",
    [
        ({"CPU": 2}, {"actors": {"min": 1, "max": 2}}, (1, 2, 0.5, 0.0)),  # the largest pool leaves tasks a CPU
        ({"CPU": 2}, {"actors": {"min": 3, "max": 8}}, (3, 4, 0.25, 0.0)),  # the max capped as a number is
        ({"CPU": 2}, {"actors": {"min": 6, "max": 8}}, (4, 4, 0.25, 0.0)),  # and the min with it
        ({"CPU": 9}, {"actors": {"min": 2, "max": 2}}, (2, 2, 4.0, 0.0)),
        # GPUs: the min is what the GPUs there are hold now; the max stays for the autoscaler's GPUs
        ({"CPU": 16, "GPU": 2}, {"actors": {"min": 3, "max": 6}, "gpus_per_actor": 1}, (2, 6, 1.0, 1.0)),
        ({"CPU": 16, "GPU": 4}, {"actors": {"min": 1, "max": 3}, "gpus_per_actor": 0.5}, (1, 3, 1.0, 0.5)),
    ],
)
def test_an_elastic_pool_keeps_its_bounds_within_what_the_cluster_holds(cluster, resources, expect):
    cfg = load_config({"input": {"uri": "/x"}, "model": {"name": "segformer-b0"}, "resources": resources})
    plan = plan_actors(cfg, cluster)
    assert (plan.min_actors, plan.actors, plan.num_cpus, plan.num_gpus) == expect
    if not plan.num_gpus:  # at its largest, the pool leaves the read and write tasks a CPU
        assert plan.actors * plan.num_cpus <= cluster["CPU"] - 1 + 1e-9
    pool = plan.pool()
    assert (pool.min_size, pool.max_size) == expect[:2]
    fixed = plan_actors(load_config({**cfg.model_dump(), "resources": {"actors": 2}}), cluster)
    assert fixed.min_actors is None and (fixed.pool().min_size, fixed.pool().max_size) == (2, 2)


def test_the_plan_gives_ray_data_the_elastic_pools_min_and_max(ray_session):
    """build_dataset's predictor map: Ray Data's ActorPoolStrategy with the pool's bounds (before:
    size=resources.actors, a number only)."""
    cfg = load_config({"input": {"uri": "/x"}, "model": {"name": "segformer-b0"}, "resources": {"actors": {"min": 1, "max": 3}}})
    plan = plan_actors(cfg, {"CPU": 8})
    ds = build_dataset(cfg, [SourceUnit(0, "images", ("/x/a.png",), (None,), ("a.png",))], plan, attempt=1, binary=False)
    predict = ds._logical_plan.dag.input_dependencies[0]
    assert predict.name == "MapBatches(Predictor)"
    assert (predict.compute.min_size, predict.compute.max_size) == (1, 3)
    assert predict.ray_remote_args["num_cpus"] == plan.num_cpus == 2.333


# --------------------------------------------------------------------------- run_job through `segpipe run`


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """images/{a,b}/img<i>.png (img1 a .jpg whose label is a .png) with labels (3 ignored rows each;
    img0's has OUTSIDE pixels of value 7, no class of the model), and images/unlabeled.png."""
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        sub = "a" if i % 2 else "b"
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
        label[:3] = 255  # ignored rows
        if i == 0:
            label[3, :OUTSIDE] = 7  # no class of the model's 3
        ext = ".jpg" if i == 1 else ".png"  # a .jpg image whose label is a .png
        write_png(root / "images" / sub / f"img{i}{ext}", image)
        write_png(root / "labels" / sub / f"img{i}.png", label)
    write_png(root / "images" / "unlabeled.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    return root


def archive_job(tmp_path: Path, archive: Path, checkpoint: Path, *, labels: bool = True, **sections) -> dict:
    """A job over `archive` in units of 2 images, slide windows of 48."""
    defaults = {
        "input": {"images_per_unit": 2},
        "inference": {"window": [48, 48], "stride": [32, 32], "batch_size": 4},
        "metrics": {"ignore_index": 255},
    }
    for key, value in sections.items():
        defaults[key] = {**defaults[key], **value} if isinstance(value, dict) and key in defaults else value
    return job_config(tmp_path, archive / "images", checkpoint, labels=archive / "labels" if labels else None, **defaults)


def test_run_writes_masks_metrics_and_summary_and_a_rerun_writes_only_what_is_missing(ray_session, tmp_path, archive, checkpoint, capsys):
    job = tmp_path / "job.yaml"
    cfg = archive_job(tmp_path, archive, checkpoint)
    assert segpipe_run(job, cfg) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "images/s" in out
    # label values outside the classes: counted in no class, and said once, with how many pixels
    assert out.count(f"labels: {OUTSIDE} pixels in 1 images hold values outside the model's 3 classes") == 1
    run = tmp_path / "runs" / "t1"
    masks = read_run_table(run, "masks").to_pylist()
    ids = sorted(m["image_id"] for m in masks)
    expected_ids = sorted([f"{'a' if i % 2 else 'b'}/img{i}{'.jpg' if i == 1 else '.png'}" for i in range(len(SIZES))] + ["unlabeled.png"])
    assert ids == expected_ids  # one mask per image, ids relative to input.uri with the extension
    total = ClassAreas.zeros(NUM_CLASSES)
    for row in masks:
        mask = decode_png(row["mask"])
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
    assert summary["class_names"] == CLASS_NAMES
    metrics = read_run_table(run, "metrics")
    assert metrics.num_rows == 5
    assert set(metrics.column_names) == {"image_id", "intersection", "union", "pred_area", "label_area", "label_outside_pixels"}
    outside = dict(zip(metrics.column("image_id").to_pylist(), metrics.column("label_outside_pixels").to_pylist()))
    assert outside == {i: (OUTSIDE if i == "b/img0.png" else 0) for i in outside}
    assert summary["label_values_outside_classes"] == {"pixels": OUTSIDE, "images": 1, "unknown_images": 0}
    info = json.loads((run / "run.json").read_text())
    assert info["metrics"]["label_values_outside_classes"] == summary["label_values_outside_classes"]
    assert info["status"] == "succeeded" and info["counts"]["segmented"] == 6
    assert info["model"]["num_classes"] == NUM_CLASSES and "torch" in info["versions"]
    stages = info["attempts"][0]["stages"]  # where the time went, summed over the tasks and actors
    assert all(stages[k] > 0 for k in ("read", "decode", "forward", "stitch", "encode", "write")), stages
    assert set(stages) == set(STAGES) and stages["transfer"] < stages["forward"], stages  # no device to copy to on a CPU
    assert info["identity"]["output.confidence"] is False  # off by default: no confidence column
    assert read_run_table(run, "masks").column_names == [
        "image_id",
        "height",
        "width",
        "chunk_y",
        "chunk_x",
        "chunk_height",
        "chunk_width",
        "mask",
    ]
    actors = info["attempts"][0]["actors"]  # the pool as planned; no actor ran out of memory
    assert actors["actors"] == 1 and actors["min_actors"] is None and actors["lowered_batch_sizes"] == {}
    # the seconds of the predictor's calls, and the share of them its forward ran (the pipelined
    # actor encodes while the model runs: its stages sum to more than its calls)
    assert 0 < actors["call_seconds"] <= info["attempts"][0]["seconds"], actors
    assert 0 < actors["forward_busy_share"] <= 1 and actors["forward_busy_share"] == pytest.approx(
        stages["forward"] / actors["call_seconds"], rel=0.02, abs=5e-3
    ), actors
    # the pool as it ran: one predictor actor started and served; alive from its start (model loaded)
    # within the plan's seconds until Ray Data let it go
    assert (actors["started"], actors["most_serving"]) == (1, 1), actors
    assert actors["timeline"][0][1] == 1 and 0 < actors["timeline"][0][0] < info["attempts"][0]["seconds"], actors
    assert [alive for _, alive in actors["timeline"]] in ([1], [1, 0]), actors

    # resume: the same run_id again writes nothing new and counts every image once
    parts = sorted(p.name for p in (run / "masks").iterdir())
    assert segpipe_run(job, cfg) == 0
    assert sorted(p.name for p in (run / "masks").iterdir()) == parts
    # lose one part: the rerun segments just its images
    lost = run / "masks" / parts[0]
    lost_ids = pq.read_table(lost).column("image_id").to_pylist()
    lost.unlink()
    assert segpipe_run(job, cfg) == 0
    again = read_run_table(run, "masks").column("image_id").to_pylist()
    assert sorted(again) == expected_ids and set(lost_ids) <= set(again)
    summary2 = json.loads((run / "summary.json").read_text())
    assert summary2["mIoU"] == pytest.approx(summary["mIoU"]) and summary2["images"] == 6


def test_an_archive_larger_than_a_listing_batch_runs_batch_by_batch_every_image_once(ray_session, tmp_path, archive, checkpoint, capsys):
    """input.listing_batch: 2 of 6 images -> three plans, each batch listed while the one before
    runs; the run's counts and labels cover every batch, and a rerun finds everything done."""
    job = tmp_path / "job.yaml"
    cfg = archive_job(tmp_path, archive, checkpoint, input={"images_per_unit": 1, "listing_batch": 2})
    assert segpipe_run(job, cfg) == 0
    out = capsys.readouterr().out
    assert "2 of the first 2 images (listed in batches of 2) to segment" in out
    run = tmp_path / "runs" / "t1"
    ids = read_run_table(run, "masks").column("image_id").to_pylist()
    assert len(ids) == 6 and len(set(ids)) == 6
    info = json.loads((run / "run.json").read_text())
    assert info["counts"]["listed"] == 6 and info["attempts"][0]["counts"]["to_do"] == 6
    assert info["labels"]["images_with_label"] == 5 and info["labels"]["images_without_label"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images"] == 6 and summary["labeled_images"] == 5
    parts = sorted(p.name for p in (run / "masks").iterdir())
    assert segpipe_run(job, cfg) == 0
    assert "0 of the first 2 images (listed in batches of 2) to segment, 2 done earlier" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "masks").iterdir()) == parts
    assert json.loads((run / "run.json").read_text())["attempts"][1]["counts"]["done_earlier"] == 6


def test_bad_images_become_error_rows_and_over_the_error_budget_the_run_fails_with_1(ray_session, tmp_path, archive, checkpoint):
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    for f in (archive / "images").rglob("*.png"):
        (bad / "images" / f.name).write_bytes(f.read_bytes())
    (bad / "images" / "empty.png").write_bytes(b"")
    good = (archive / "images" / "b" / "img0.png").read_bytes()
    (bad / "images" / "corrupt.png").write_bytes(good[: len(good) // 3])
    cfg = archive_job(tmp_path, bad, checkpoint, labels=False, run_id="bad", max_error_fraction=0.5)
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run = tmp_path / "runs" / "bad"
    errors = {r["image_id"]: r for r in read_run_table(run, "errors").to_pylist()}
    assert set(errors) == {"empty.png", "corrupt.png"}
    assert all(r["stage"] == "decode" for r in errors.values())
    assert "empty" in errors["empty.png"]["error"]
    masks = read_run_table(run, "masks").column("image_id").to_pylist()
    assert len(masks) == len(list((bad / "images").glob("*.png"))) - 2
    # a rerun with a tighter error budget: the two images fail again, over the run's budget: exit code 1
    cfg = archive_job(tmp_path, bad, checkpoint, labels=False, run_id="bad", max_error_fraction=0.1)
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 1
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and [a["status"] for a in info["attempts"]] == ["succeeded", "failed"]
    assert f"2 of {len(masks) + 2} images failed" in info["attempts"][-1]["message"]


@pytest.mark.parametrize(
    "metrics, num_classes, message",
    [
        ({"task": "binary", "positive_class": 255}, 2, "metrics.positive_class: 255 is no class of segformer-b0, which has 2 (0 and 1)"),
        ({"positive_class": 2}, 2, "metrics.positive_class: 2 is no class"),  # a 2-class model's probability uses it
        ({"task": "binary", "positive_class": 0}, 1, "metrics.positive_class: 0, but segformer-b0 has one logit"),
        ({"task": "binary"}, 3, "metrics.task: binary needs a model of 2 classes (background, foreground) or one logit"),
    ],
)
def test_metrics_that_do_not_fit_the_models_classes_exit_2_before_anything_runs(tmp_path, archive, metrics, num_classes, message, capsys):
    """Before, positive_class 255 passed the config check and every image failed with IndexError.
    The model's classes are known before Ray starts (no ray_session here: nothing of Ray is needed)."""
    model = tiny_checkpoint(tmp_path / "m.safetensors", num_classes)
    cfg = archive_job(tmp_path, archive, model, run_id="misfit", metrics={"ignore_index": 100, **metrics})
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs" / "misfit").exists()


def test_a_gpu_job_on_a_cluster_without_gpus_waits_then_exits_2_writing_nothing(ray_session, tmp_path, archive, checkpoint, capsys):
    """resources.wait_for_gpus_s: 1 on the session's Ray (no GPU): `segpipe run` polls for the
    autoscaler's GPUs for a second, then one line, exit 2, no run directory (before: a note and a CPU run)."""
    cfg = archive_job(tmp_path, archive, checkpoint, run_id="nogpu", resources={"gpus_per_actor": 1, "wait_for_gpus_s": 1})
    started = time.monotonic()
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 2
    assert time.monotonic() - started >= 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "resources.gpus_per_actor: 1, but the cluster has 0 GPUs after waiting 1 s" in err[0], err
    assert "waiting up to 1 s for GPUs" in captured.out
    assert not (tmp_path / "runs" / "nogpu").exists()


def test_output_confidence_for_a_two_class_model_exits_2_before_anything_runs(tmp_path, archive, capsys):
    model = tiny_checkpoint(tmp_path / "m.safetensors", 2)
    cfg = archive_job(tmp_path, archive, model, run_id="two", metrics={"ignore_index": 100}, output={"confidence": True})
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output.confidence is for multi-class runs: segformer-b0 has 2 classes" in err[0], err
    assert not (tmp_path / "runs" / "two").exists()


def test_whole_mode_writes_one_mask_per_image_and_output_confidence_its_max_softmax_chunked_like_it(
    ray_session, tmp_path, archive, checkpoint
):
    """output.confidence (a 3-class model): a confidence column beside the mask, chunked as the mask
    is (chunk_size 16), read back by read_confidence: round(255 x the max of a softmax computed here
    from the model's scores resized to the image), within 1."""
    from models import load_model

    cfg = archive_job(
        tmp_path, archive, checkpoint, run_id="whole", inference={"mode": "whole"}, output={"confidence": True, "chunk_size": 16}
    )
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run = tmp_path / "runs" / "whole"
    masks = read_run_table(run, "masks")
    assert len(set(masks.column("image_id").to_pylist())) == 6 and masks.num_rows > 6  # every image, in chunks
    assert "confidence" in masks.column_names and "probability" not in masks.column_names
    assert json.loads((run / "run.json").read_text())["identity"]["output.confidence"] is True
    image = np.array(Image.open(archive / "images" / "b" / "img0.png").convert("RGB"))
    model = load_model(str(checkpoint)).eval()
    with torch.inference_mode():
        scores = model(model.normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float()))
        scores = torch.nn.functional.interpolate(scores, size=image.shape[:2], mode="bilinear", align_corners=False)[0]
        expected = np.rint(255 * torch.softmax(scores, 0).amax(0).numpy())
    confidence = read_confidence(str(run), "b/img0.png")
    assert confidence.dtype == np.uint8 and confidence.shape == image.shape[:2]
    assert np.abs(confidence.astype(int) - expected).max() <= 1 and confidence.min() >= 255 // NUM_CLASSES
    assert (read_mask(str(run), "b/img0.png") == scores.argmax(0).numpy()).mean() > 0.999  # the labels as before


@pytest.mark.parametrize(
    "nodes, actors, expect",
    [
        ([1, 1], 2, (2, 0.5, 0.5)),  # two 1-CPU nodes: half a CPU for each actor, half for a read task on each node
        ([1, 1], 1, (1, 1.0, 0.5)),  # one actor fills a node; the other node runs the tasks
        ([4, 4], 2, (2, 3.0, 1.0)),  # big nodes: whole CPUs for tasks on each node
        ([2], 1, (1, 1.0, 1.0)),  # one node as before
    ],
)
def test_actors_on_several_nodes_leave_every_node_room_for_a_read_task(nodes, actors, expect):
    cfg = load_config({"input": {"uri": "/x"}, "model": {"name": "segformer-b0"}, "resources": {"actors": actors}})
    plan = plan_actors(cfg, {"CPU": float(sum(nodes))}, [float(n) for n in nodes])
    assert (plan.actors, plan.num_cpus, plan.task_cpus) == expect
    # an actor fits a node, and the actors leave at least a read task's CPUs on every node but those they fill
    assert plan.num_cpus <= max(nodes) and sum(nodes) - plan.actors * plan.num_cpus >= plan.task_cpus


# benchmarks/listing_memory.py: listing 1M keys in batches of 50 000 peaks at about 60 MiB above the
# driver's starting RSS (two batches of about 200 bytes a key, plus the listing's pages); holding the
# whole listing peaks at about 190 MiB. The bound sits between the two.
LISTING_PEAK_BOUND_MIB = 110


def test_driver_memory_listing_a_million_keys_stays_under_the_bound_of_two_batches():
    """The driver's listing of 1M keys (s3fs's own paging code over generated pages: no store holds
    a million objects here) in batches of 50 000, in a fresh process: its peak RSS stays under the
    bound that holds for any archive size, well under what holding the listing takes."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "benchmarks" / "listing_memory.py"), "--worker", "1000000", "1024", "segpipe", "50000", ""]
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["images"] == 1_000_000 and result["pages"] == 1000
    assert result["peak_mib"] < LISTING_PEAK_BOUND_MIB, result


@pytest.fixture(scope="module")
def maskformer(tmp_path_factory) -> Path:
    from helpers import tiny_hf_checkpoint

    path = tmp_path_factory.mktemp("maskformer") / "maskformer"
    tiny_hf_checkpoint("maskformer", path, seed=3)  # seed 3: its queries name classes, not "no object"
    return path


CATEGORY_IDS = [11, 12, 13, 14, 15, 16, 17]  # the tiny MaskFormer's 7 classes, as a COCO file numbers them


def test_instance_task_writes_rows_coco_tools_read_and_its_mask_ap_equals_cocoeval(
    ray_session, tmp_path, archive, maskformer, checkpoint, capsys
):
    """The instance task through `segpipe run`: rows decode with pycocotools to their area and box;
    against a COCO instances file (made from a first run's objects, every other one kept), summary.json's
    mask AP equals pycocotools' COCOeval of the run's rows; a class-map model is refused with one line."""
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    objects = {"threshold": 0.0, "top_k": 4}
    cfg = archive_job(tmp_path, archive, maskformer, labels=False, run_id="inst", inference={"task": "instance", "objects": objects})
    assert segpipe_run(tmp_path / "inst.yaml", cfg) == 0
    run = tmp_path / "runs" / "inst"
    instances = read_run_table(run, "instances").to_pylist()
    assert instances and {r["image_id"] for r in instances} == set(read_run_table(run, "masks").column("image_id").to_pylist())
    for r in instances:
        rle = {"size": [r["height"], r["width"]], "counts": r["rle"]}
        assert int(coco_mask.area(rle)) == r["area"] > 0
        assert coco_mask.toBbox(rle).tolist() == r["bbox"]
    by_image: dict[str, list[int]] = {}
    for r in instances:
        by_image.setdefault(r["image_id"], []).append(r["instance_id"])
    assert all(sorted(ids) == list(range(1, len(ids) + 1)) for ids in by_image.values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objects"]["rows"] == len(instances) and summary["objects"]["table"] == "instances"

    # ground truth: every other object of the first run, as a COCO instances file
    names = sorted(by_image)
    images = [{"id": k + 1, "file_name": Path(n).name, "height": 0, "width": 0} for k, n in enumerate(names)]
    annotations = []
    for r in instances[::2]:
        image = images[names.index(r["image_id"])]
        image["height"], image["width"] = r["height"], r["width"]
        segmentation = {"size": [r["height"], r["width"]], "counts": r["rle"]}
        annotations.append(
            {"id": len(annotations) + 1, "image_id": image["id"], "category_id": CATEGORY_IDS[r["class_id"]], "segmentation": segmentation,
             "area": r["area"], "bbox": r["bbox"], "iscrowd": 0}
        )  # fmt: skip
    for image in images:  # an image left without ground truth still has its size
        image["height"] = image["height"] or next(r["height"] for r in instances if r["image_id"] == names[image["id"] - 1])
        image["width"] = image["width"] or next(r["width"] for r in instances if r["image_id"] == names[image["id"] - 1])
    truth = {"images": images, "annotations": annotations, "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]}
    (tmp_path / "instances.json").write_text(json.dumps(truth))
    cfg = archive_job(tmp_path, archive, maskformer, labels=False, run_id="inst2", inference={"task": "instance", "objects": objects})
    cfg["metrics"]["instance_labels"] = str(tmp_path / "instances.json")
    capsys.readouterr()
    assert segpipe_run(tmp_path / "inst2.yaml", cfg) == 0
    ours = json.loads((tmp_path / "runs" / "inst2" / "summary.json").read_text())["mask_ap"]
    printed = capsys.readouterr().out.splitlines()  # the terminal shows the task's own metric, not `labeled 0`
    assert any(line.startswith(f"mask AP {100 * ours['AP']:.2f}   AP50 {100 * ours['AP50']:.2f}") for line in printed), printed
    assert any(line.startswith(f"images {len(names)}   errors 0   labeled {len(names)}   instances ") for line in printed), printed
    rows = read_run_table(tmp_path / "runs" / "inst2", "instances").to_pylist()
    results = [
        {"image_id": names.index(r["image_id"]) + 1, "category_id": CATEGORY_IDS[r["class_id"]], "score": r["score"],
         "segmentation": {"size": [r["height"], r["width"]], "counts": r["rle"]}}
        for r in rows
    ]  # fmt: skip
    gt = COCO()
    gt.dataset = truth
    gt.createIndex()
    evaluation = COCOeval(gt, gt.loadRes(results), "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert 0 < ours["AP"] < 1 and ours["images"] == len(names)
    for k, key in enumerate(("AP", "AP50", "AP75")):
        assert ours[key] == pytest.approx(evaluation.stats[k], abs=1e-9)

    capsys.readouterr()
    cfg = archive_job(tmp_path, archive, checkpoint, labels=False, run_id="refused", inference={"task": "instance"})
    assert segpipe_run(tmp_path / "refused.yaml", cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "query-based model" in err[0]
    assert not (tmp_path / "runs" / "refused").exists()


def test_panoptic_task_writes_segment_maps_and_scores_pq_one_against_its_own_segments(ray_session, tmp_path, archive, maskformer, capsys):
    """The panoptic task through `segpipe run`: the segment-id masks hold exactly the segments of
    its table with their areas; a second run scored against the first run's output written as COCO
    panoptic labels (PNGs + JSON) has PQ = SQ = RQ = 1 and the per-class values of the classes seen."""
    from pipeline.io.coco_codec import id_to_rgb

    panoptic = {"task": "panoptic", "objects": {"threshold": 0.0, "mask_threshold": 0.01, "overlap_threshold": 0.0}}
    cfg = archive_job(tmp_path, archive, maskformer, labels=False, run_id="pan", inference=panoptic)
    assert segpipe_run(tmp_path / "pan.yaml", cfg) == 0
    run = tmp_path / "runs" / "pan"
    segments = read_run_table(run, "segments").to_pylist()
    assert segments
    annotations = []
    for image_id in sorted(set(read_run_table(run, "masks").column("image_id").to_pylist())):
        ids = read_mask(str(run), image_id)
        rows = {r["segment_id"]: r for r in segments if r["image_id"] == image_id}
        present = np.unique(ids[ids > 0])
        assert sorted(rows) == present.tolist()
        assert all(int((ids == s).sum()) == rows[s]["area"] for s in present)
        label = tmp_path / "panoptic" / (image_id.rsplit(".", 1)[0] + ".png")
        label.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(id_to_rgb(ids)).save(label)
        info = [{"id": s, "category_id": CATEGORY_IDS[r["class_id"]], "iscrowd": 0} for s, r in rows.items()]
        annotations.append({"file_name": label.name, "segments_info": info})
    categories = [{"id": c, "name": f"c{c}", "isthing": int(k < 4)} for k, c in enumerate(CATEGORY_IDS)]
    (tmp_path / "panoptic.json").write_text(json.dumps({"annotations": annotations, "categories": categories}))

    cfg = archive_job(tmp_path, archive, maskformer, labels=False, run_id="pan2", inference=panoptic)
    cfg["input"]["labels"] = {"uri": str(tmp_path / "panoptic")}
    cfg["metrics"]["panoptic_labels"] = str(tmp_path / "panoptic.json")
    capsys.readouterr()
    assert segpipe_run(tmp_path / "pan2.yaml", cfg) == 0
    summary = json.loads((tmp_path / "runs" / "pan2" / "summary.json").read_text())["panoptic"]
    assert "PQ 100.00   SQ 100.00   RQ 100.00" in capsys.readouterr().out
    assert summary["PQ"] == summary["SQ"] == summary["RQ"] == 1.0 and summary["panoptic_images"] == len(annotations)
    seen = {CATEGORY_IDS.index(s["category_id"]) for a in annotations for s in a["segments_info"]}
    assert {k for k, c in enumerate(CATEGORY_IDS) if summary["per_class"][f"c{c}"]["PQ"] == 1.0} == seen


def test_sigterm_stops_a_run_as_ctrl_c_does_and_while_it_finishes_is_only_remembered():
    import os
    import signal
    import time

    from pipeline.plan import Stopped, stop_signals

    before = signal.getsignal(signal.SIGTERM)
    for signum in (signal.SIGTERM, signal.SIGINT):
        with pytest.raises(Stopped) as stopped, stop_signals():
            os.kill(os.getpid(), signum)  # the handler runs as the call returns
            time.sleep(1)  # never reached
        assert stopped.value.signum == signum and isinstance(stopped.value, KeyboardInterrupt)
    with stop_signals() as stop:
        stop.finishing = True  # summary.json and run.json are being written: never half way
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.is_set() and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_the_run_remembered_before_a_batch_stops_that_batch_at_its_first_rows(ray_session):
    """run_batch checks the run's own flag (run_job's stop_signals), not one of its own: a SIGTERM whose
    Stopped was swallowed on its way (as Ray's waits can) while the next batch was being listed still
    stops that batch, before it counts a row."""
    import contextlib
    import signal
    from types import SimpleNamespace

    from pipeline.plan import Execution, Stopped, run_batch, stop_signals

    rows = ray_session.data.from_items([{"unit_done": -1, "ok": True}] * 4)
    result = Execution()
    with stop_signals() as stop:
        with contextlib.suppress(Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # never reached
        with pytest.raises(Stopped) as stopped:
            run_batch(rows, result, lambda _: None, SimpleNamespace(to_do=4), time.time(), True, stop)
    assert stopped.value.signum == signal.SIGTERM and result.processed == 0


def test_rays_lines_go_to_the_attempt_log_and_with_verbose_to_the_terminal_too_never_to_stdout(tmp_path, capfd):
    """Ray writes to fd 2 (its C++ core worker, its loggers, the processes it starts) and prints its
    copies of worker lines and raylet/GCS errors from its own threads to sys.stdout
    (print_to_stdstream: a "(raylet) ... killed by ray.kill" line at Ctrl-C)."""
    import ray._private.worker as ray_worker

    def raylet_error(line: str) -> None:  # what Ray's driver thread listen_error_messages does
        ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)

    child = [sys.executable, "-c", "import sys; sys.stderr.write('a child process line\\n')"]  # as Ray's processes
    verbose, quiet = tmp_path / "verbose.log", tmp_path / "quiet.log"
    capfd.readouterr()
    with ray_lines_to(str(verbose), echo=True):
        os.write(2, b"a core worker line\n")
        subprocess.run(child, check=True)
        raylet_error("the verbose monitor was killed by ray.kill")
    out, err = capfd.readouterr()
    for line in ("a core worker line", "a child process line", "the verbose monitor was killed by ray.kill"):
        assert line in verbose.read_text() and line in err, (line, err)
    assert "ray.kill" not in out

    with ray_lines_to(str(quiet)):
        os.write(2, b"a quiet core worker line\n")
        subprocess.run(child, check=True)
        raylet_error("the quiet writer was killed by ray.kill")
    raylet_error("the late predictor was killed by ray.kill")  # after the job let go of fd 2: the monitor's, at Ctrl-C
    assert capfd.readouterr() == ("", "")
    log = quiet.read_text()
    assert "a quiet core worker line" in log and "a child process line" in log and "the quiet writer was killed by ray.kill" in log


def test_the_eta_comes_from_the_rate_since_the_first_committed_images_not_from_the_start_up():
    # 60 s of actors' start and model load, then the first 10 images, then 8 more in 2 s: 12 left at 4/s
    assert progress_line(18, 0, 30, 62.0, steady=(8, 2.0)) == "  18/30 images, 0 errors, 4.00 images/s, ETA 3 s"
    # only the first images so far: no rate to tell the rest by, so no ETA (the whole attempt's would say 2 min)
    assert "ETA" not in progress_line(10, 0, 30, 60.0, steady=(0, 0.0))
    assert progress_line(30, 1, 30, 70.0, steady=(20, 5.0)) == "  30/30 images, 1 errors, 4.00 images/s"


def test_an_hf_checkpoint_stating_do_reduce_labels_has_its_labels_read_as_mmsegmentation_reduces_them(tmp_path):
    """The driver's preparation (prepare_job, no Ray) over an HF SegFormer directory whose image
    processor states do_reduce_labels (as ADE20K fine-tunes do), with labels of ADE20K's kind (0:
    other, 1..C: the classes): metrics.reduce_zero_label null is decided true in the config that
    run.json and the actors get and in the run's identity, with one terminal line; the predictor (as
    a plain class) with that config counts each image's areas against mmsegmentation's reduction of its
    label (tests/helpers.py writes it out). An explicit false is kept (the line says what the
    checkpoint states); no statement and no setting read labels as they are; a binary task refuses true. Before: the labels read as they were, every
    class off by one and the metrics of nothing, with only the count of values outside the classes."""
    import transformers
    from helpers import labeled_folder, mmseg_reduce_zero_label, tiny_hf_checkpoint

    from pipeline.plan import prepare_job, reduce_zero_label_note
    from pipeline.predict.predictor import Predictor
    from pipeline.rows import DecodedImage, Prediction, to_columns

    checkpoint = tmp_path / "ade-finetune"
    tiny_hf_checkpoint("segformer", checkpoint)  # 3 classes
    transformers.SegformerImageProcessor(do_reduce_labels=True).save_pretrained(checkpoint)
    folder = labeled_folder(tmp_path / "data", [(40, 44), (37, 50)], num_classes=4)  # label values 0..3
    base = job_config(tmp_path, folder / "images", checkpoint, labels=folder / "labels")
    job = prepare_job(load_config(base))
    assert job.cfg.metrics.reduce_zero_label is True and job.record.identity["metrics.reduce_zero_label"] is True
    assert job.model_info["reduce_labels"] is True
    assert "0 counts nowhere" in reduce_zero_label_note(job.cfg, True) and "image processor" in reduce_zero_label_note(job.cfg, True)
    assert job.notes == [f"labels: {reduce_zero_label_note(job.cfg, True)}"]  # the run's terminal says it as it starts

    images = []
    for name in ("img000", "img001"):
        image = np.asarray(Image.open(folder / "images" / f"{name}.png"))
        label = np.asarray(Image.open(folder / "labels" / f"{name}.png"))
        images.append(DecodedImage(unit=0, image_id=f"{name}.png", image=image, label=label, height=image.shape[0], width=image.shape[1]))
    out = Predictor(job.cfg)(to_columns([image.to_record() for image in images]))
    for i, image in enumerate(images):
        row = Prediction.from_batch(out, i)
        expected = class_areas(decode_png(row.chunks[0].mask), mmseg_reduce_zero_label(image.label), 3, 255)
        for name in ClassAreas.FIELDS:
            assert np.array_equal(getattr(row.areas, name), getattr(expected, name)), name
        assert row.areas.outside == 0

    kept = prepare_job(load_config({**base, "run_id": "t2", "metrics": {"reduce_zero_label": False}}))
    assert kept.cfg.metrics.reduce_zero_label is False and kept.record.identity["metrics.reduce_zero_label"] is False
    assert "labels are read as they are" in reduce_zero_label_note(kept.cfg, True)
    (checkpoint / "preprocessor_config.json").unlink()
    plain = prepare_job(load_config({**base, "run_id": "t3"}))
    assert plain.cfg.metrics.reduce_zero_label is False and plain.model_info["reduce_labels"] is None
    assert plain.record.identity["metrics.reduce_zero_label"] is False and reduce_zero_label_note(plain.cfg, None) == ""
    with pytest.raises(ConfigError, match="reduce_zero_label"):
        load_config({**base, "metrics": {"task": "binary", "reduce_zero_label": True}})
