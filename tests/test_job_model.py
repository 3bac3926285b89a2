"""pipeline.predict.job_model: the model a job names, the hash of its weights, its checks against the task."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import CLASS_NAMES, tiny_checkpoint, tiny_model

from models import build_model
from models.base import CheckpointError, ModelError
from pipeline.config import ModelConfig
from pipeline.predict.job_model import check_task, load_job_model, weights_sha256


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


def test_every_task_refuses_a_clip_model_until_runs_feed_clips():
    with torch.device("meta"):
        model = build_model("vistr-r50", num_classes=41)
    for task in ("semantic", "instance", "panoptic"):
        with pytest.raises(ModelError, match="vistr-r50 is a clip model"):
            check_task(task, model)
