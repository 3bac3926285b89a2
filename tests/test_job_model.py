"""pipeline.predict.job_model: the model a job names, the hash of its weights, its checks against the task."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import CLASS_NAMES, tiny_checkpoint, tiny_model

from models import build_model
from models.base import CheckpointError, ModelError
from pipeline.config import ModelConfig, load_config
from pipeline.predict.job_model import check_clip_job, check_task, load_job_model, weights_sha256


def test_weights_hash_follows_the_weights_not_the_file(tmp_path):
    first = tiny_checkpoint(tmp_path / "a" / "model.safetensors", num_classes=3, class_names=CLASS_NAMES)
    moved = tmp_path / "b" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    other = tiny_checkpoint(tmp_path / "c" / "model.safetensors", num_classes=3, seed=1)
    model = load_job_model(ModelConfig(checkpoint=str(first)))
    assert model.class_names == CLASS_NAMES and not model.training
    digest = weights_sha256(model)
    assert len(digest) == 64
    assert weights_sha256(load_job_model(ModelConfig(checkpoint=str(moved)))) == digest
    assert weights_sha256(load_job_model(ModelConfig(checkpoint=str(other)))) != digest


def test_a_missing_checkpoint_is_a_checkpoint_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(CheckpointError, match="nowhere.safetensors"):
        load_job_model(ModelConfig(checkpoint=str(missing)))


def test_object_tasks_refuse_a_model_without_queries():
    model = tiny_model("segformer-b0", num_classes=3)
    check_task("semantic", model)
    for task in ("instance", "panoptic"):
        with pytest.raises(ModelError, match=f"inference.task {task} needs a query-based model"):
            check_task(task, model)


def test_a_clip_model_takes_the_instance_task_only():
    with torch.device("meta"):
        model = build_model("vistr-r50", num_classes=41)
    check_task("instance", model)  # video instance segmentation: tracks
    for task in ("semantic", "panoptic"):
        with pytest.raises(ModelError, match=f"vistr-r50 is a clip model .*: inference.task must be instance, not {task}"):
            check_task(task, model)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"input": {"uri": "/data", "format": "images"}},
            "vistr-r50 is a clip model: it segments videos (input.format: video), not input.format images",
        ),
        (
            {"inference": {"task": "instance", "clip_length": 37, "clip_stride": 18}},
            "inference.clip_length 37 is more than the 36 frames vistr-r50 takes",
        ),
        (
            {"input": {"uri": "/v", "format": "video", "labels": {"uri": "/l.json", "required": True}}},
            "its labels are one YouTube-VIS JSON (input.labels.uri) and a video it does not list is counted, not failed: "
            "remove input.labels.required",
        ),
        ({"inference": {"task": "semantic"}}, "inference.task must be instance, not semantic"),
    ],
)
def test_a_clip_models_job_needs_videos_clips_it_can_take_and_the_instance_task(overrides, message):
    with torch.device("meta"):
        model = build_model("vistr-r50", num_classes=41)
    base = {"input": {"uri": "/v", "format": "video"}, "model": {"name": "vistr-r50"}, "inference": {"task": "instance"}}
    check_clip_job(load_config(base), model)  # videos, clips of 36 frames at most, the instance task: fine
    # YouTube-VIS labels (read by the plan): fine
    check_clip_job(load_config({**base, "input": {"uri": "/v", "format": "video", "labels": {"uri": "/l.json"}}}), model)
    with pytest.raises(ModelError) as err:
        check_clip_job(load_config({**base, **overrides}), model)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_clip_settings_are_not_checked_against_an_image_model():
    model = tiny_model("segformer-b0", num_classes=3)
    check_clip_job(load_config({"input": {"uri": "/i"}, "model": {"name": "segformer-b0"}, "inference": {"clip_length": 99}}), model)


def test_class_names_of_another_length_than_the_models_classes_are_refused_without_num_classes(tmp_path):
    """model.class_names of 2 for a checkpoint of 3 classes, num_classes left out: a config error
    (exit 2). Before: accepted, and every table named 2 of the 3 classes (the terminal's mean over 3,
    summary.json's names 2 beside 3 IoUs)."""
    from pipeline.config import ConfigError

    checkpoint = tiny_checkpoint(tmp_path / "c.safetensors", 3)
    with pytest.raises(ConfigError, match="model.class_names: 2 names, but .* has 3 classes"):
        load_job_model(ModelConfig(checkpoint=str(checkpoint), class_names=["sky", "road"]))
    assert load_job_model(ModelConfig(checkpoint=str(checkpoint), class_names=["a", "b", "c"])).class_names == ["a", "b", "c"]
