"""DETR with its panoptic head: parity with transformers' DetrForSegmentation (its own ResNet and
timm's key layout), the refusals, and the named variant."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from helpers import perturbed, rel_error, tiny_detr_config
from safetensors.torch import load_file, save_file
from transformers import DetrForObjectDetection, DetrForSegmentation

from models import build_model, list_models, load_model, save_native
from models.base import CheckpointError
from models.detr import DETR, from_hf

# transformers' DetrForSegmentation(ResNet-50, 250 labels): parameters (frozen norms are buffers)
DETR_R50_PANOPTIC_PARAMS = 42_899_288


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("detr-hf")
    torch.manual_seed(0)
    reference = perturbed(DetrForSegmentation(tiny_detr_config()).eval())
    reference.save_pretrained(path)
    return reference, path


def timm_key(key: str) -> str:
    """transformers' ResNet key -> timm's (the published facebook/detr-resnet-50-panoptic layout)."""
    units = {"0": "1", "1": "2", "2": "3"}
    key = key.replace("embedder.embedder.convolution.", "conv1.").replace("embedder.embedder.normalization.", "bn1.")
    key = re.sub(
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.([012])\.(convolution|normalization)\.",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{'conv' if m[4] == 'convolution' else 'bn'}{units[m[3]]}.",
        key,
    )
    return re.sub(
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.{0 if m[3] == 'convolution' else 1}.",
        key,
    )


@pytest.mark.parametrize("size", [(64, 96), (70, 90)])  # the second: not a multiple of 32 (nor of 4)
def test_matches_transformers(hf_checkpoint, size):
    reference, path = hf_checkpoint
    model = load_model(path)
    assert isinstance(model, DETR) and model.num_classes == 6 and model.score_kind == "probabilities"
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = reference(pixel_values=pixels)
        class_logits, mask_logits, boxes = model.forward_objects(pixels)
        queries = model.forward_queries(pixels)
        scores = model(pixels)
    masks_shape = (2, 5, math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert class_logits.shape == out.logits.shape == (2, 5, 7)
    assert mask_logits.shape == out.pred_masks.shape == masks_shape
    assert rel_error(class_logits, out.logits) <= 1e-4
    assert rel_error(mask_logits, out.pred_masks) <= 1e-4
    assert rel_error(boxes, out.pred_boxes) <= 1e-4
    assert torch.equal(queries[0], class_logits) and torch.equal(queries[1], mask_logits)
    expected = torch.einsum("nqc,nqhw->nchw", out.logits.softmax(-1)[..., :-1], out.pred_masks.sigmoid())
    assert scores.shape == (2, 6, *masks_shape[2:])
    assert rel_error(scores, expected) <= 1e-4


def test_transformers_5_in_memory_key_names_load_the_same_weights(hf_checkpoint):
    reference, path = hf_checkpoint
    in_memory = reference.state_dict()  # backbone.model, o_proj, mlp.fc1, mask_head.fpn_stages...
    assert "mask_head.fpn_stages.0.fpn_adapter.weight" in in_memory and "mask_head.adapter1.weight" not in in_memory
    model = from_hf(json.loads((path / "config.json").read_text()), in_memory)
    saved = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values(), strict=True))


def test_timm_backbone_layout_loads_the_same_weights(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint
    state_dict = {timm_key(k): v for k, v in load_file(str(path / "model.safetensors")).items()}
    body = "detr.model.backbone.conv_encoder.model."
    assert f"{body}layer2.1.bn3.running_var" in state_dict and f"{body}layer1.0.downsample.1.weight" in state_dict
    state_dict[f"{body}layer1.0.downsample.1.num_batches_tracked"] = torch.tensor(0)  # the published checkpoints carry these
    config = json.loads((path / "config.json").read_text())
    config.update(use_timm_backbone=True, backbone="resnet50", backbone_config=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    timm_model, hf_model = load_model(tmp_path), load_model(path)
    assert timm_model.arch == hf_model.arch
    pixels = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        assert torch.equal(timm_model(pixels), hf_model(pixels))


def test_object_detection_checkpoint_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    DetrForObjectDetection(tiny_detr_config()).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as exc_info:
        load_model(tmp_path)
    message = str(exc_info.value)
    assert "\n" not in message and message.startswith(str(tmp_path))
    assert "DetrForObjectDetection has no mask head" in message and "DetrForSegmentation" in message


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(dilation=True), "dilated C5"),
        (dict(position_embedding_type="learned"), "position_embedding_type 'learned'"),
        (dict(activation_function="gelu"), "activation_function 'gelu'"),
        (dict(backbone_config={"model_type": "convnext"}), "backbone 'convnext'"),
    ],
)
def test_unsupported_settings_are_one_line_errors(hf_checkpoint, change, reason):
    _, path = hf_checkpoint
    config = {**json.loads((path / "config.json").read_text()), **change}
    with pytest.raises(CheckpointError) as exc_info:
        from_hf(config, load_file(str(path / "model.safetensors")), origin="ckpt")
    assert "\n" not in str(exc_info.value) and reason in str(exc_info.value)


def test_native_checkpoint_round_trip(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint
    model = load_model(path)
    save_native(model, tmp_path / "detr.safetensors")
    again = load_model(tmp_path / "detr.safetensors")
    assert type(again) is DETR and again.arch == model.arch
    pixels = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(model(pixels), again(pixels))


def test_class_head_that_disagrees_with_config_is_a_one_line_error(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint
    shutil.copytree(path, tmp_path / "copy")
    state_dict = load_file(str(tmp_path / "copy" / "model.safetensors"))
    state_dict["detr.class_labels_classifier.weight"] = state_dict["detr.class_labels_classifier.weight"][:4]
    save_file(state_dict, str(tmp_path / "copy" / "model.safetensors"))
    with pytest.raises(CheckpointError) as exc_info:
        load_model(tmp_path / "copy")
    assert str(exc_info.value).startswith(str(tmp_path / "copy")) and "6 classes but the class head has 3" in str(exc_info.value)


def test_named_variant_builds_and_runs():
    assert "detr-resnet50-panoptic" in list_models()
    model = build_model("detr-resnet50-panoptic", num_classes=250).eval()
    assert isinstance(model, DETR) and model.name == "detr-resnet50-panoptic"
    assert model.class_head.out_features == 251 and model.query_embed.num_embeddings == 100
    assert sum(p.numel() for p in model.parameters()) == DETR_R50_PANOPTIC_PARAMS
    pixels = torch.randn(1, 3, 64, 72)
    with torch.no_grad():
        class_logits, mask_logits, boxes = model.forward_objects(pixels)
        scores = model(pixels)
    assert class_logits.shape == (1, 100, 251) and mask_logits.shape == (1, 100, 16, 18) and boxes.shape == (1, 100, 4)
    assert scores.shape == (1, 250, 16, 18) and torch.isfinite(scores).all()
    # each query contributes at most probability 1 spread over the classes
    assert (scores >= 0).all() and (scores.sum(1) <= 100).all()
