"""Mask2Former with a Swin backbone: parity with transformers' Mask2FormerForUniversalSegmentation,
its masked attention and deformable sampling, and the named variants."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import rel_error, saved_hf_model, tiny_mask2former_config
from PIL import Image
from transformers import Mask2FormerForUniversalSegmentation

from jobs.cli import main
from models import build_model, list_models, load_model, save_native
from models.mask2former import Mask2Former, deformable_sample
from pipeline.results.masks import decode_png as decode_mask

NAMES = [f"mask2former-swin-{size}" for size in ("tiny", "small", "base", "large")]
# the paper's parameter counts (ADE20K, 150 classes), in millions
PUBLISHED_PARAMS = {"tiny": 47, "small": 69, "base": 107, "large": 216}


def saved_reference(path, **overrides):
    return saved_hf_model(Mask2FormerForUniversalSegmentation, tiny_mask2former_config(**overrides), path)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mask2former-hf")
    return saved_reference(path), path


@pytest.mark.parametrize("size", [(64, 96), (70, 90)])  # the second: not a multiple of 32 (nor of 4)
def test_matches_transformers(hf_checkpoint, size):
    reference, path = hf_checkpoint
    model = load_model(path)
    assert isinstance(model, Mask2Former) and model.num_classes == 7
    assert len(model.decoder_layers) == 4  # decoder_layers=5 in the config
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = reference(pixel_values=pixels)
        class_logits, mask_logits = model.forward_queries(pixels)
        scores = model(pixels)
    expected = torch.einsum("nqc,nqhw->nchw", out.class_queries_logits.softmax(-1)[..., :-1], out.masks_queries_logits.sigmoid())
    assert scores.shape == (2, 7, math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert rel_error(scores, expected) <= 1e-4
    # transformers' outputs are the last layer's predictions
    assert class_logits.shape == out.class_queries_logits.shape == (2, 6, 8)
    assert rel_error(class_logits, out.class_queries_logits) <= 1e-4
    assert rel_error(mask_logits, out.masks_queries_logits) <= 1e-4


def test_pre_norm_and_input_projection_configs(tmp_path):
    reference = saved_reference(tmp_path, pre_norm=True, enforce_input_projection=True, decoder_layers=3)
    model = load_model(tmp_path)
    assert model.arch["pre_norm"] and isinstance(model.input_projections[0], torch.nn.Conv2d)
    pixels = torch.randn(1, 3, 52, 76)
    with torch.no_grad():
        out = reference(pixel_values=pixels)
        class_logits, mask_logits = model.forward_queries(pixels)
    assert rel_error(class_logits, out.class_queries_logits) <= 1e-4
    assert rel_error(mask_logits, out.masks_queries_logits) <= 1e-4


def test_attention_mask_follows_the_predicted_masks():
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 0, :2] = 5.0  # query 0: the top half
    logits[0, 1] = 5.0  # query 1: everything; query 2: nothing, so it may attend everywhere
    attend = Mask2Former.attention_mask(logits)
    assert attend.shape == (1, 1, 3, 16) and attend.dtype == torch.bool
    assert attend[0, 0, 0].tolist() == [True] * 8 + [False] * 8
    assert attend[0, 0, 1].all() and attend[0, 0, 2].all()


def test_deformable_sample_at_token_centres_reads_the_values():
    # two levels, one head; each query samples one point at a pixel centre of its level
    shapes = [(2, 3), (4, 5)]
    value = torch.randn(1, 6 + 20, 1, 8)
    level1 = value[0, 6:, 0].view(4, 5, 8)
    locations = torch.zeros(1, 2, 1, 2, 1, 2)
    weights = torch.zeros(1, 2, 1, 2, 1)
    locations[0, 0, 0, 1, 0] = torch.tensor([(3 + 0.5) / 5, (1 + 0.5) / 4])  # x=3, y=1 on level 1
    locations[0, 1, 0, 1, 0] = torch.tensor([(0 + 0.5) / 5, (2 + 0.5) / 4])  # x=0, y=2 on level 1
    weights[:, :, :, 1] = 1.0
    out = deformable_sample(value, shapes, locations, weights)
    assert torch.allclose(out[0, 0], level1[1, 3], atol=1e-6)
    assert torch.allclose(out[0, 1], level1[2, 0], atol=1e-6)


def test_deformable_sample_equals_grid_sample_everywhere_on_and_off_the_maps():
    """The embedding_bag sampling against the reference computation: grid_sample (bilinear, zero
    padding, align_corners=False) per level, weighted and summed; points inside, on the border
    and outside the maps, two images, two heads."""
    shapes = [(3, 5), (6, 4), (7, 7)]
    n, q, heads, d, points = 2, 11, 2, 4, 3
    gen = torch.Generator().manual_seed(3)
    value = torch.randn(n, sum(h * w for h, w in shapes), heads, d, generator=gen)
    locations = torch.rand(n, q, heads, len(shapes), points, 2, generator=gen) * 1.6 - 0.3
    weights = torch.rand(n, q, heads, len(shapes), points, generator=gen)
    expected = torch.zeros(n * heads, d, q)
    for level, (values, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        maps = values.permute(0, 2, 3, 1).reshape(n * heads, d, h, w)
        grid = (2 * locations[:, :, :, level] - 1).transpose(1, 2).reshape(n * heads, q, points, 2)
        sampled = torch.nn.functional.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        expected += (sampled * weights[:, :, :, level].transpose(1, 2).reshape(n * heads, 1, q, points)).sum(-1)
    expected = expected.view(n, heads * d, q).transpose(1, 2)
    assert (deformable_sample(value, shapes, locations, weights) - expected).abs().max().item() <= 1e-5


def test_native_checkpoint_round_trip(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint
    model = load_model(path)
    save_native(model, tmp_path / "mask2former.safetensors")
    again = load_model(tmp_path / "mask2former.safetensors")
    assert type(again) is Mask2Former and again.arch == model.arch
    pixels = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(model(pixels), again(pixels))


def test_every_name_builds():
    assert set(NAMES) <= set(list_models())
    for name in NAMES:
        model = build_model(name, num_classes=150)
        assert isinstance(model, Mask2Former) and model.name == name
        assert len(model.decoder_layers) == 9 and model.query_feat.num_embeddings == 100
        assert model.class_head.out_features == 151
        params = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(params - PUBLISHED_PARAMS[name.rsplit("-", 1)[1]]) < 1.0, (name, params)
        del model


def test_tiny_variant_forward():
    model = build_model("mask2former-swin-tiny", num_classes=5).eval()
    pixels = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        class_logits, mask_logits = model.forward_queries(pixels)
        scores = model(pixels)
    assert class_logits.shape == (1, 100, 6) and mask_logits.shape == (1, 100, 16, 20)
    assert scores.shape == (1, 5, 16, 20) and torch.isfinite(scores).all()
    assert (scores >= 0).all() and (scores.sum(1) <= 100).all()


def test_segpipe_run_with_a_hf_checkpoint(ray_session, hf_checkpoint, tmp_path):
    """A query-based model through the whole job: sliding windows over images larger and smaller
    than the window, scores stitched like any other model's."""
    _, checkpoint = hf_checkpoint
    rng = np.random.default_rng(0)
    sizes = {"big.png": (97, 75), "small.png": (30, 41)}
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
        Image.fromarray(rng.integers(0, 7, (h, w), dtype=np.uint8)).save(tmp_path / "labels" / name)
    config = {
        "run_id": "m2f",
        "input": {"uri": str(tmp_path / "images"), "pattern": "*.png", "labels": {"uri": str(tmp_path / "labels")}},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"mode": "slide", "window": [48, 48], "stride": [32, 32], "batch_size": 4},
        "resources": {"actors": 1},
        "output": {"uri": str(tmp_path / "runs")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    run = tmp_path / "runs" / "m2f"
    rows = pq.read_table([str(f) for f in sorted((run / "masks").glob("*.parquet"))]).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(sizes)
    for row in rows:
        mask = decode_mask(row["mask"])
        assert mask.shape == sizes[row["image_id"]] and mask.max() < 7
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images"] == 2 and summary["errors"] == 0 and len(summary["IoU"]) == 7
