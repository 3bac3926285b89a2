"""The ViT encoder against transformers' ViTModel, and the timm / mmseg encoder layouts.

transformers is the oracle: a randomly initialised ViTModel is saved with save_pretrained and its
weights are loaded directly (transformers layout), or first rewritten by this file in timm's and
in mmsegmentation's key names (written down from timm/models/vision_transformer.py and
mmseg/models/backbones/vit.py). Our features must match its hidden states in every case.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from models.base import CheckpointError
from models.vit import ViTConfig, ViTEncoder, detect_layout, load_encoder_weights, vit_config_from_hf

DEPTH = 3


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    """A ViT-tiny (3 blocks) for 64x64 inputs with random weights, as save_pretrained writes it."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=DEPTH, num_attention_heads=3, intermediate_size=768, image_size=64, patch_size=16
    )
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # make the embeddings non-trivial (the class token starts at zero)
        model.embeddings.cls_token.normal_(std=0.5)
        model.embeddings.position_embeddings.normal_(std=0.5)
    out = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(out)
    return model, json.loads((out / "config.json").read_text()), load_file(str(out / "model.safetensors"))


def hf_features(model, pixels: torch.Tensor) -> list[torch.Tensor]:
    """transformers' per-block patch tokens as N x D x h x w; the last one after the final norm."""
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
    n, _, height, width = pixels.shape
    tokens = [*out.hidden_states[1:-1], out.last_hidden_state]
    return [t[:, 1:].transpose(1, 2).reshape(n, -1, height // 16, width // 16) for t in tokens]


def hf_to_timm(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ViTModel -> timm VisionTransformer key names (qkv rows ordered q, k, v)."""
    timm = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
        "head.weight": torch.randn(1000, 192),  # a classifier, which the encoder ignores
        "head.bias": torch.randn(1000),
    }
    for i in range(DEPTH):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            timm[dst + "attn.qkv." + kind] = torch.cat(
                [hf[f"{src}attention.attention.{name}.{kind}"] for name in ("query", "key", "value")]
            )
            timm[dst + "norm1." + kind] = hf[src + "layernorm_before." + kind]
            timm[dst + "attn.proj." + kind] = hf[src + "attention.output.dense." + kind]
            timm[dst + "norm2." + kind] = hf[src + "layernorm_after." + kind]
            timm[dst + "mlp.fc1." + kind] = hf[src + "intermediate.dense." + kind]
            timm[dst + "mlp.fc2." + kind] = hf[src + "output.dense." + kind]
    return timm


def hf_to_mmseg(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ViTModel -> mmseg VisionTransformer(final_norm=True) key names."""
    timm = hf_to_timm(hf)
    mmseg = {
        "cls_token": timm["cls_token"],
        "pos_embed": timm["pos_embed"],
        "patch_embed.projection.weight": timm["patch_embed.proj.weight"],
        "patch_embed.projection.bias": timm["patch_embed.proj.bias"],
        "ln1.weight": timm["norm.weight"],  # the final norm is mmseg's `ln1`
        "ln1.bias": timm["norm.bias"],
    }
    for i in range(DEPTH):
        src, dst = f"blocks.{i}.", f"layers.{i}."
        mmseg[dst + "attn.attn.in_proj_weight"] = timm[src + "attn.qkv.weight"]
        mmseg[dst + "attn.attn.in_proj_bias"] = timm[src + "attn.qkv.bias"]
        for kind in ("weight", "bias"):
            mmseg[dst + "ln1." + kind] = timm[src + "norm1." + kind]
            mmseg[dst + "attn.attn.out_proj." + kind] = timm[src + "attn.proj." + kind]
            mmseg[dst + "ln2." + kind] = timm[src + "norm2." + kind]
            mmseg[dst + "ffn.layers.0.0." + kind] = timm[src + "mlp.fc1." + kind]
            mmseg[dst + "ffn.layers.1." + kind] = timm[src + "mlp.fc2." + kind]
    return mmseg


# 64x64 is the grid the position embeddings were made for; the others resize them (bicubic)
SIZES = [(64, 64), (96, 48), (48, 112)]


@pytest.mark.parametrize("layout", ["hf", "timm", "mmseg"])
def test_features_match_transformers(hf_vit, layout):
    model, config, hf_weights = hf_vit
    weights = {"hf": dict, "timm": hf_to_timm, "mmseg": hf_to_mmseg}[layout](hf_weights)
    assert detect_layout(weights) == layout
    encoder = ViTEncoder(vit_config_from_hf(config)).eval()
    assert encoder.config.norm_eps == config["layer_norm_eps"]  # 1e-12 in transformers, not our 1e-6
    load_encoder_weights(encoder, weights)
    torch.manual_seed(1)
    for height, width in SIZES:
        pixels = torch.randn(2, 3, height, width)
        reference = hf_features(model, pixels)
        with torch.no_grad():
            ours = encoder(pixels, layers=range(DEPTH))
        for layer, (mine, theirs) in enumerate(zip(ours, reference)):
            assert mine.shape == theirs.shape
            assert rel_diff(mine, theirs) <= 1e-5, (layout, height, width, layer)


def test_classification_checkpoint_prefix(hf_vit):
    """ViTForImageClassification's weights sit under vit.* beside a classifier: both are handled."""
    model, config, hf_weights = hf_vit
    weights = {f"vit.{k}": v for k, v in hf_weights.items()}
    weights.update({"classifier.weight": torch.zeros(10, 192), "classifier.bias": torch.zeros(10)})
    encoder = load_encoder_weights(ViTEncoder(vit_config_from_hf(config)).eval(), weights)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(encoder(pixels)[0], hf_features(model, pixels)[-1]) <= 1e-5


def test_unsupported_keys_are_named(hf_vit):
    _, config, hf_weights = hf_vit
    weights = hf_to_timm(hf_weights)
    weights["blocks.0.ls1.gamma"] = torch.ones(192)  # layer scale: not in our ViT
    with pytest.raises(CheckpointError, match="ls1.gamma"):
        load_encoder_weights(ViTEncoder(vit_config_from_hf(config)), weights)
    with pytest.raises(CheckpointError, match="do not fit"):  # a checkpoint for another width
        load_encoder_weights(ViTEncoder(ViTConfig(embed_dim=96, depth=DEPTH, num_heads=3, pos_grid=(4, 4))), hf_to_timm(hf_weights))


def test_any_input_size_is_zero_padded():
    """Sides that are not multiples of 16 give the features of the zero-padded image."""
    torch.manual_seed(0)
    encoder = ViTEncoder(ViTConfig(embed_dim=64, depth=2, num_heads=2, pos_grid=(4, 4))).eval()
    pixels = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        ours = encoder(pixels, layers=[0, -1])
        padded = encoder(F.pad(pixels, (0, 3, 0, 10)), layers=[0, -1])
    for mine, theirs in zip(ours, padded):
        assert mine.shape == (1, 64, 5, 3)
        assert torch.equal(mine, theirs)


def test_position_embeddings_follow_the_grid():
    encoder = ViTEncoder(ViTConfig(embed_dim=32, depth=1, num_heads=2, pos_grid=(4, 4)))
    assert encoder.position_embeddings((4, 4)) is encoder.pos_embed
    # 2 x 8 has as many positions as 4 x 4 but is another grid: resized, not reused as it is
    resized = encoder.position_embeddings((2, 8))
    assert resized.shape == (1, 17, 32)
    assert not torch.allclose(resized, encoder.pos_embed)
    assert torch.equal(resized[:, 0], encoder.pos_embed[:, 0])  # the class token's slot is kept
