"""What MaskFormer and Mask2Former share (models/mask_classification.py): the position embedding and
attention against their references, the semantic combination, and the HF key handling both use."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerSinePositionEmbedding,
)
from transformers.models.maskformer.modeling_maskformer import (
    MaskFormerSinePositionEmbedding,
)

from models import mask2former, maskformer
from models.base import CheckpointError
from models.mask_classification import (
    HF_BACKBONE,
    Attention,
    MLPHead,
    hf_swin_arch,
    num_labels,
    semantic_scores,
    sine_position_embedding,
    weights_from_hf,
)


def test_the_query_families_build_from_the_same_blocks():
    from models import detr

    for name in ("ConvNorm", "MLPHead", "semantic_scores", "sine_position_embedding"):
        assert getattr(maskformer, name) is getattr(mask2former, name), name
    for name in ("Attention", "Mlp", "MLPHead", "semantic_scores", "sine_position_embedding"):
        assert getattr(detr, name) is getattr(mask2former, name), name
    assert maskformer.DetrDecoderLayer is detr.DetrDecoderLayer  # one DETR decoder layer for both


@pytest.mark.parametrize("reference", [MaskFormerSinePositionEmbedding, Mask2FormerSinePositionEmbedding])
def test_sine_position_embedding_is_transformers_normalised_one(reference):
    expected = reference(num_position_features=16, normalize=True)(torch.Size([1, 32, 5, 7]), "cpu", torch.float32)[0]
    assert torch.equal(sine_position_embedding(5, 7, 32, torch.device("cpu"), torch.float32), expected)


def test_attention_is_torch_multihead_attention_and_its_mask_says_where_a_query_may_look():
    torch.manual_seed(0)
    ours = Attention(16, num_heads=4).eval()
    reference = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        reference.out_proj.load_state_dict(ours.out_proj.state_dict())
    query, key, value = torch.randn(2, 3, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    attend = torch.rand(2, 1, 3, 5) > 0.5
    attend[..., 0] = True  # every query may look somewhere
    with torch.no_grad():
        torch.testing.assert_close(ours(query, key, value), reference(query, key, value, need_weights=False)[0])
        masked = ours(query, key, value, attend)
        # torch's boolean mask is the opposite: True = may not attend; one mask per head
        expected = reference(query, key, value, attn_mask=~attend.expand(2, 4, 3, 5).reshape(8, 3, 5), need_weights=False)[0]
    torch.testing.assert_close(masked, expected)


def test_mlp_head_has_relu_between_its_layers_and_none_after_the_last():
    head = MLPHead(4, 8, 2, num_layers=3)
    assert [layer.out_features for layer in head.layers] == [8, 8, 2]
    with torch.no_grad():
        for layer in head.layers:
            layer.weight.fill_(-1.0)
            layer.bias.zero_()
    # layer 1 gives -4 (relu: 0), so the output is 0; with the last bias at -1 it is -1, not clipped
    assert torch.equal(head(torch.ones(1, 4)), torch.zeros(1, 2))
    with torch.no_grad():
        head.layers[-1].bias.fill_(-1.0)
    assert torch.equal(head(torch.ones(1, 4)), torch.full((1, 2), -1.0))


def test_semantic_scores_sum_class_times_mask_probabilities_over_queries_without_no_object():
    # query 0: sure of class 1, mask on at pixel (0, 0) only; query 1: sure of "no object", mask everywhere
    class_logits = torch.tensor([[[-20.0, 20.0, -20.0], [-20.0, -20.0, 20.0]]])  # 2 classes + no-object
    mask_logits = torch.full((1, 2, 2, 2), 20.0)
    mask_logits[0, 0] = -20.0
    mask_logits[0, 0, 0, 0] = 20.0
    scores = semantic_scores(class_logits, mask_logits)
    assert scores.shape == (1, 2, 2, 2)
    torch.testing.assert_close(scores[0, 1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores[0, 0], torch.zeros(2, 2), atol=1e-6, rtol=0)


def test_hf_weights_fuse_swin_qkv_drop_the_loss_weights_and_keep_uncovered_keys_for_the_strict_load():
    block = HF_BACKBONE + "encoder.layers.0.blocks.1.attention.self."
    q, k, v = torch.full((2, 2), 1.0), torch.full((2, 2), 2.0), torch.full((2, 2), 3.0)
    state_dict = {
        block + "query.weight": q,
        block + "key.weight": k,
        block + "value.weight": v,
        HF_BACKBONE + "hidden_states_norms.stage2.bias": torch.zeros(2),  # Swin counts stages from 1
        "class_predictor.weight": torch.ones(3, 2),
        "criterion.empty_weight": torch.ones(3),
        "something.else": torch.ones(1),
    }
    weights = weights_from_hf(state_dict, [(r"class_predictor\.(.+)", r"class_head.\1")], HF_BACKBONE, "ckpt")
    assert sorted(weights) == [
        "backbone.out_norms.1.bias",
        "backbone.stages.0.blocks.1.attn.qkv.weight",
        "class_head.weight",
        "something.else",
    ]
    assert torch.equal(weights["backbone.stages.0.blocks.1.attn.qkv.weight"], torch.cat([q, k, v]))
    del state_dict[block + "key.weight"]
    with pytest.raises(CheckpointError, match="attn.qkv.weight: the checkpoint lacks one of query / key / value"):
        weights_from_hf(state_dict, [], HF_BACKBONE, "ckpt")


def test_hf_config_parsing_counts_classes_from_the_class_head_and_wants_a_swin_backbone():
    state_dict = {"class_predictor.weight": torch.zeros(8, 4)}  # 7 classes + no-object
    assert num_labels({}, state_dict, "class_predictor.weight") == 7
    assert num_labels({"id2label": {str(i): str(i) for i in range(7)}}, state_dict, "class_predictor.weight") == 7
    with pytest.raises(CheckpointError, match="config.json names 3 classes but the class head has 7"):
        num_labels({"id2label": {"0": "a", "1": "b", "2": "c"}}, state_dict, "class_predictor.weight")
    with pytest.raises(CheckpointError, match="no class_predictor.weight"):
        num_labels({}, {}, "class_predictor.weight")
    with pytest.raises(CheckpointError, match="mask2former config.json without backbone_config"):
        hf_swin_arch({}, "mask2former")
    with pytest.raises(CheckpointError, match="only Swin"):
        hf_swin_arch({"backbone_config": {"model_type": "resnet"}}, "maskformer")
