"""MaskFormer with a Swin backbone: parity with transformers' MaskFormerForInstanceSegmentation, and
the named variants."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_error, saved_hf_model, tiny_maskformer_config
from transformers import MaskFormerForInstanceSegmentation

from models import build_model, list_models, load_model, save_native
from models.maskformer import MaskFormer

NAMES = [f"maskformer-swin-{size}" for size in ("tiny", "small", "base", "large")]
# the paper's parameter counts (ADE20K, 150 classes), in millions
PUBLISHED_PARAMS = {"tiny": 42, "small": 63, "base": 102, "large": 212}


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("maskformer-hf")
    return saved_hf_model(MaskFormerForInstanceSegmentation, tiny_maskformer_config(), path), path


# the second: not a multiple of 32 (nor of 4); the third: enough windows and tokens for the Swin's
# CPU block-wise paths (models/swin.py WINDOW_BLOCK, ROW_BLOCK)
@pytest.mark.parametrize("size", [(64, 96), (70, 90), (140, 132)])
def test_matches_transformers(hf_checkpoint, size):
    reference, path = hf_checkpoint
    model = load_model(path)
    assert isinstance(model, MaskFormer) and model.num_classes == 7
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = reference(pixel_values=pixels)
        class_logits, mask_logits = model.forward_queries(pixels)
        scores = model(pixels)
    expected = torch.einsum("nqc,nqhw->nchw", out.class_queries_logits.softmax(-1)[..., :-1], out.masks_queries_logits.sigmoid())
    assert scores.shape == (2, 7, math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert rel_error(scores, expected) <= 1e-4
    assert class_logits.shape == out.class_queries_logits.shape == (2, 5, 8)
    assert rel_error(class_logits, out.class_queries_logits) <= 1e-4
    assert rel_error(mask_logits, out.masks_queries_logits) <= 1e-4


def test_native_checkpoint_round_trip(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint
    model = load_model(path)
    save_native(model, tmp_path / "maskformer.safetensors")
    again = load_model(tmp_path / "maskformer.safetensors")
    assert type(again) is MaskFormer and again.arch == model.arch
    pixels = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(model(pixels), again(pixels))


def test_every_name_builds():
    assert set(NAMES) <= set(list_models())
    for name in NAMES:
        model = build_model(name, num_classes=150)
        assert isinstance(model, MaskFormer) and model.name == name
        assert model.class_head.out_features == 151 and model.query_embed.num_embeddings == 100
        params = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(params - PUBLISHED_PARAMS[name.rsplit("-", 1)[1]]) < 1.0, (name, params)
        del model


def test_tiny_variant_forward():
    model = build_model("maskformer-swin-tiny", num_classes=5).eval()
    pixels = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        class_logits, mask_logits = model.forward_queries(pixels)
        scores = model(pixels)
    assert class_logits.shape == (1, 100, 6) and mask_logits.shape == (1, 100, 16, 20)
    assert scores.shape == (1, 5, 16, 20) and torch.isfinite(scores).all()
    # each query contributes at most probability 1 spread over the classes
    assert (scores >= 0).all() and (scores.sum(1) <= 100).all()
