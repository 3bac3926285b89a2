"""SegFormer: parity with transformers, mmsegmentation's layout, the named variants."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from torch import nn

from models import build_model, load_model, save_native
from models.base import CheckpointError, load_weights
from models.segformer import VARIANTS, SegFormer, from_hf

TOL = 1e-4


def _randomize(module: nn.Module, seed: int) -> None:
    """Perturb every parameter and BN statistic, so that a swapped or dropped weight shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# transformers parity
# ---------------------------------------------------------------------------------------------

HF_CONFIGS = [
    # (config kwargs, input H x W, weights file)
    (
        dict(
            hidden_sizes=[8, 16, 24, 32],
            depths=[1, 2, 1, 1],
            num_attention_heads=[1, 2, 3, 4],
            decoder_hidden_size=16,
            id2label={0: "sky", 1: "road", 2: "car"},
        ),
        (45, 70),
        "safetensors",
    ),
    (
        dict(
            hidden_sizes=[16, 16, 32, 32],
            depths=[2, 1, 1, 1],
            num_attention_heads=[2, 2, 4, 4],
            sr_ratios=[4, 2, 1, 1],
            mlp_ratios=[2, 2, 4, 4],
            decoder_hidden_size=24,
            id2label={i: f"class{i}" for i in range(5)},
        ),
        (37, 50),
        "bin",
    ),
    (
        dict(
            num_encoder_blocks=3,
            hidden_sizes=[8, 16, 32],
            depths=[1, 1, 2],
            num_attention_heads=[1, 2, 4],
            sr_ratios=[4, 2, 1],
            patch_sizes=[7, 3, 3],
            strides=[4, 2, 2],
            mlp_ratios=[4, 4, 4],
            hidden_act="gelu_new",
            decoder_hidden_size=8,
            id2label={0: "object"},
        ),
        (61, 33),
        "safetensors",
    ),
]


def _hf_model(config_kwargs: dict, seed: int):
    torch.manual_seed(seed)
    config = transformers.SegformerConfig(**config_kwargs)
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    _randomize(model, seed)
    return model


@pytest.mark.parametrize("index", range(len(HF_CONFIGS)))
def test_hf_checkpoint_gives_transformers_logits(tmp_path, index):
    config_kwargs, (height, width), weights = HF_CONFIGS[index]
    reference = _hf_model(config_kwargs, seed=index)
    reference.save_pretrained(tmp_path)
    if weights == "bin":
        # transformers 5 always writes safetensors; a pytorch_model.bin holds the same (Hub) key names
        state_dict = load_file(str(tmp_path / "model.safetensors"))
        os.remove(tmp_path / "model.safetensors")
        torch.save(state_dict, tmp_path / "pytorch_model.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["config.json", "model.safetensors" if weights == "safetensors" else "pytorch_model.bin"]
    )

    model = load_model(tmp_path)
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits
        got = model(pixels)
    assert got.shape == expected.shape == (2, len(config_kwargs["id2label"]), -(-height // 4), -(-width // 4))
    assert _rel_diff(expected, got) <= TOL
    assert model.class_names == [config_kwargs["id2label"][i] for i in range(len(config_kwargs["id2label"]))]
    assert model.arch["head"] == "mlp" and model.arch["layer_norm_eps"] == 1e-5


def test_hf_module_names_of_transformers_5_load_too():
    """`model.state_dict()` in transformers 5 uses other names (segformer.stages...) than the Hub."""
    config_kwargs = HF_CONFIGS[0][0]
    reference = _hf_model(config_kwargs, seed=3)
    assert any(k.startswith("segformer.stages.") for k in reference.state_dict())
    model = from_hf(reference.config.to_dict(), reference.state_dict())
    pixels = torch.randn(1, 3, 50, 41)
    with torch.no_grad():
        assert _rel_diff(reference(pixel_values=pixels).logits, model(pixels)) <= TOL


def test_transformers_layer_norm_eps_is_1e5_whatever_the_config_says():
    """transformers' SegFormer builds nn.LayerNorm(dim) everywhere; config.layer_norm_eps (1e-6) is unused.

    With small patch-embedding weights the LayerNorm inputs have a variance near eps, so the
    value shows in the logits: 1e-5 matches, the config's 1e-6 does not.
    """
    config_kwargs = dict(HF_CONFIGS[0][0], layer_norm_eps=1e-6)
    reference = _hf_model(config_kwargs, seed=5)
    with torch.no_grad():
        for stage in reference.segformer.stages:
            stage.patch_embeddings.proj.weight.mul_(3e-3)
            stage.patch_embeddings.proj.bias.mul_(3e-3)
    model = from_hf(reference.config.to_dict(), reference.state_dict())
    assert model.arch["layer_norm_eps"] == 1e-5
    wrong_eps = SegFormer(**{**model.arch, "layer_norm_eps": 1e-6}).eval()
    wrong_eps.load_state_dict(model.state_dict())
    pixels = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits
        assert _rel_diff(expected, model(pixels)) <= TOL
        assert _rel_diff(expected, wrong_eps(pixels)) > 100 * TOL


def test_hf_checkpoint_that_does_not_fit_is_refused():
    reference = _hf_model(HF_CONFIGS[0][0], seed=1)
    config = reference.config.to_dict()
    state_dict = dict(reference.state_dict())
    with pytest.raises(CheckpointError, match="missing"):
        from_hf(config, {k: v for k, v in state_dict.items() if not k.startswith("decode_head.")})
    with pytest.raises(CheckpointError, match="no known SegFormer layout"):
        from_hf(config, {**state_dict, "segformer.pooler.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError):
        from_hf({**config, "hidden_sizes": [8, 16, 24, 40], "num_attention_heads": [1, 2, 3, 4]}, state_dict)


# ---------------------------------------------------------------------------------------------
# mmsegmentation layout
# ---------------------------------------------------------------------------------------------


def _to_mmseg(model: SegFormer) -> dict[str, torch.Tensor]:
    """Our state dict in mmsegmentation's key names, written from mmseg's mit.py and segformer_head.py:
    MixVisionTransformer.layers[i] = ModuleList([PatchEmbed(projection, norm), ModuleList(blocks), norm]);
    a block has norm1, attn (EfficientMultiheadAttention: attn = nn.MultiheadAttention, sr, norm),
    norm2, ffn.layers = [1x1 conv, 3x3 dw conv, GELU, Dropout, 1x1 conv, Dropout];
    SegformerHead has convs[i] and fusion_conv (ConvModule: conv, bn) and conv_seg."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for i, depth in enumerate(model.arch["depths"]):
        s, m = f"stages.{i}.", f"backbone.layers.{i}."
        for p in ("weight", "bias"):
            out[f"{m}0.projection.{p}"] = ours[f"{s}patch_embed.proj.{p}"]
            out[f"{m}0.norm.{p}"] = ours[f"{s}patch_embed.norm.{p}"]
            out[f"{m}2.{p}"] = ours[f"{s}norm.{p}"]
        for j in range(depth):
            b, mb = f"{s}blocks.{j}.", f"{m}1.{j}."
            for p in ("weight", "bias"):
                out[f"{mb}norm1.{p}"] = ours[f"{b}norm1.{p}"]
                out[f"{mb}norm2.{p}"] = ours[f"{b}norm2.{p}"]
                out[f"{mb}attn.attn.in_proj_{p}"] = torch.cat([ours[f"{b}attn.{x}.{p}"] for x in "qkv"])
                out[f"{mb}attn.attn.out_proj.{p}"] = ours[f"{b}attn.proj.{p}"]
                if f"{b}attn.sr.{p}" in ours:
                    out[f"{mb}attn.sr.{p}"] = ours[f"{b}attn.sr.{p}"]
                    out[f"{mb}attn.norm.{p}"] = ours[f"{b}attn.sr_norm.{p}"]
                out[f"{mb}ffn.layers.1.{p}"] = ours[f"{b}mlp.dwconv.{p}"]
            out[f"{mb}ffn.layers.0.weight"] = ours[f"{b}mlp.fc1.weight"][:, :, None, None]
            out[f"{mb}ffn.layers.0.bias"] = ours[f"{b}mlp.fc1.bias"]
            out[f"{mb}ffn.layers.4.weight"] = ours[f"{b}mlp.fc2.weight"][:, :, None, None]
            out[f"{mb}ffn.layers.4.bias"] = ours[f"{b}mlp.fc2.bias"]
    for key, value in ours.items():
        if key.startswith("head."):
            key = re.sub(r"^head\.levels\.(\d+)\.", r"decode_head.convs.\1.", key)
            key = key.replace("head.fuse.", "decode_head.fusion_conv.").replace("head.classifier.", "decode_head.conv_seg.")
            out[key] = value
    assert len(out) == len(ours) - 4 * sum(model.arch["depths"])  # q, k, v weights and biases fused in 2
    return out


def _mmseg_reference(sd: dict[str, torch.Tensor], pixels: torch.Tensor, arch: dict) -> torch.Tensor:
    """mmsegmentation's forward, written independently of models/segformer.py from mit.py and
    segformer_head.py (nn.MultiheadAttention is the oracle for the fused q/k/v layout)."""
    eps, x, features = 1e-6, pixels, []

    def ln(t, key):
        return F.layer_norm(t, t.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)

    def conv_bn_relu(t, key):
        t = F.conv2d(t, sd[key + ".conv.weight"])
        t = F.batch_norm(
            t, sd[key + ".bn.running_mean"], sd[key + ".bn.running_var"], sd[key + ".bn.weight"], sd[key + ".bn.bias"], eps=1e-5
        )
        return F.relu(t)

    for i, depth in enumerate(arch["depths"]):
        m = f"backbone.layers.{i}."
        weight = sd[m + "0.projection.weight"]
        x = F.conv2d(x, weight, sd[m + "0.projection.bias"], stride=arch["strides"][i], padding=weight.shape[-1] // 2)
        n, c, h, w = x.shape
        t = ln(x.flatten(2).transpose(1, 2), m + "0.norm")
        for j in range(depth):
            b = f"{m}1.{j}."
            y = ln(t, b + "norm1")
            kv = y
            sr = arch["sr_ratios"][i]
            if sr > 1:
                kv = F.conv2d(y.transpose(1, 2).reshape(n, c, h, w), sd[b + "attn.sr.weight"], sd[b + "attn.sr.bias"], stride=sr)
                kv = ln(kv.flatten(2).transpose(1, 2), b + "attn.norm")
            mha = nn.MultiheadAttention(c, arch["num_heads"][i], batch_first=True)
            mha.load_state_dict({k[len(b + "attn.attn.") :]: v for k, v in sd.items() if k.startswith(b + "attn.attn.")})
            t = t + mha.eval()(y, kv, kv, need_weights=False)[0]
            y = ln(t, b + "norm2").transpose(1, 2).reshape(n, c, h, w)
            y = F.conv2d(y, sd[b + "ffn.layers.0.weight"], sd[b + "ffn.layers.0.bias"])
            y = F.conv2d(y, sd[b + "ffn.layers.1.weight"], sd[b + "ffn.layers.1.bias"], padding=1, groups=y.shape[1])
            y = F.conv2d(F.gelu(y), sd[b + "ffn.layers.4.weight"], sd[b + "ffn.layers.4.bias"])
            t = t + y.flatten(2).transpose(1, 2)
        x = ln(t, m + "2").transpose(1, 2).reshape(n, c, h, w)
        features.append(x)
    size = features[0].shape[-2:]
    outs = [
        F.interpolate(conv_bn_relu(f, f"decode_head.convs.{i}"), size=size, mode="bilinear", align_corners=False)
        for i, f in enumerate(features)
    ]
    fused = conv_bn_relu(torch.cat(outs, dim=1), "decode_head.fusion_conv")
    return F.conv2d(fused, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])


@pytest.fixture(scope="module")
def mmseg_checkpoint(tmp_path_factory):
    source = VARIANTS["segformer-b0"](num_classes=4, head="mmseg").eval()
    _randomize(source, seed=11)
    state_dict = _to_mmseg(source)
    path = tmp_path_factory.mktemp("mmseg") / "iter_160000.pth"
    torch.save({"state_dict": state_dict, "meta": {"CLASSES": ["a", "b", "c", "d"], "iter": 160000}}, path)
    return path, source, state_dict


def test_mmseg_checkpoint_gives_mmseg_logits(mmseg_checkpoint, tmp_path):
    path, source, state_dict = mmseg_checkpoint
    model = load_model(path, name="segformer-b0", num_classes=4)
    assert model.name == "segformer-b0"
    assert model.arch["head"] == "mmseg" and model.arch["layer_norm_eps"] == 1e-6
    pixels = torch.randn(1, 3, 70, 45, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(pixels)
        expected = _mmseg_reference(state_dict, pixels, model.arch)
        assert got.shape == expected.shape == (1, 4, 18, 12)
        assert _rel_diff(expected, got) <= TOL
        assert torch.allclose(source(pixels), got, rtol=0, atol=1e-6)

    # mmseg's graph is not the paper's: the same weights under head="mlp" do not even fit
    with pytest.raises(CheckpointError, match="head.proj"):
        load_weights(SegFormer(**{**model.arch, "head": "mlp"}), model.state_dict(), "test")

    # converted to native and loaded again: identical outputs, same architecture
    native = tmp_path / "segformer-b0.safetensors"
    save_native(model, native, source=str(path))
    again = load_model(native)
    assert type(again) is SegFormer and again.arch == model.arch and again.name == "segformer-b0"
    with torch.no_grad():
        assert torch.equal(again(pixels), got)


def test_mmseg_classes_from_meta_and_bad_checkpoints(mmseg_checkpoint, tmp_path):
    path, _, state_dict = mmseg_checkpoint
    model = load_model(path, name="segformer-b0")
    assert model.num_classes == 4 and model.class_names == ["a", "b", "c", "d"]  # from meta CLASSES, names kept (were dropped)
    native = tmp_path / "converted.safetensors"
    save_native(model, native)
    assert load_model(native).class_names == ["a", "b", "c", "d"]  # what segpipe convert writes
    with pytest.raises(CheckpointError):  # conv_seg has 4 rows
        load_model(path, name="segformer-b0", num_classes=7)
    with pytest.raises(CheckpointError):  # b1 is wider than this b0 checkpoint
        load_model(path, name="segformer-b1", num_classes=4)
    renamed = tmp_path / "renamed.pth"
    torch.save({"state_dict": {k.replace("ffn.layers.4", "ffn.layers.3"): v for k, v in state_dict.items()}}, renamed)
    with pytest.raises(CheckpointError, match="no known SegFormer layout"):
        load_model(renamed, name="segformer-b0", num_classes=4)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pth_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"backbone.layers.0.2.weight": _RunsCodeWhenUnpickled(str(marker))}}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(path, name="segformer-b0", num_classes=4)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Named variants
# ---------------------------------------------------------------------------------------------

# SegFormer parameter counts (millions) with a 150-class head: Xie et al. 2021, Table 1/2.
PUBLISHED_PARAMS = {
    "segformer-b0": 3.8,
    "segformer-b1": 13.7,
    "segformer-b2": 27.5,
    "segformer-b3": 47.3,
    "segformer-b4": 64.1,
    "segformer-b5": 84.7,
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_build_with_published_sizes(name):
    with torch.device("meta"):  # counts parameters without allocating B5's 85M
        big = build_model(name, num_classes=150)
    assert round(sum(p.numel() for p in big.parameters()) / 1e6, 1) == PUBLISHED_PARAMS[name]
    # b2..b5 are built on the meta device as well: random init of 27-85M weights is slow on 2 cores
    with torch.device("cpu" if name in ("segformer-b0", "segformer-b1") else "meta"):
        model = build_model(name, num_classes=3)
    assert model.name == name and model.family == "segformer" and model.num_classes == 3
    with torch.device("meta"):
        rebuilt = type(model)(**json.loads(json.dumps(model.arch)))
    assert [tuple(p.shape) for p in rebuilt.parameters()] == [tuple(p.shape) for p in model.parameters()]
    if name in ("segformer-b0", "segformer-b1"):
        with torch.no_grad():
            assert model.eval()(torch.randn(2, 3, 64, 96)).shape == (2, 3, 16, 24)


def test_reduced_width_override_and_any_input_size():
    model = build_model(
        "segformer-b0", num_classes=2, hidden_sizes=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1], decoder_dim=32
    ).eval()
    assert model.arch["hidden_sizes"] == [16, 32, 64, 128] and model.arch["decoder_dim"] == 32
    with torch.no_grad():
        for height, width in [(33, 47), (20, 13), (1, 1), (100, 31)]:
            assert model(torch.randn(1, 3, height, width)).shape == (1, 2, -(-height // 4), -(-width // 4))
    with pytest.raises(ValueError, match="num_heads"):
        build_model("segformer-b0", num_classes=2, hidden_sizes=[16, 32, 64, 128])  # 64 heads-of-5 do not divide
    with pytest.raises(TypeError, match="unknown overrides"):
        build_model("segformer-b0", num_classes=2, hidden_size=[16, 32, 64, 128])


@pytest.mark.parametrize("head", ["mlp", "mmseg"])
def test_eval_decoder_folds_to_the_reference_graph_and_training_runs_it(head):
    """In eval mode the decoders fold the fuse conv and BatchNorm into per-level maps applied before
    upsampling; training runs the reference graph (BatchNorm on batch statistics) and backpropagates."""
    model = build_model(
        "segformer-b0", num_classes=3, head=head, hidden_sizes=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1], decoder_dim=16
    )
    _randomize(model, seed=5)
    model.eval()
    features = model.forward_features(torch.randn(2, 3, 45, 61))
    with torch.no_grad():
        assert _rel_diff(model.head.forward_reference(features), model.head(features)) <= 1e-5
    model.train()
    pixels = torch.randn(2, 3, 32, 32)
    model(pixels).square().mean().backward()
    assert model.head.fuse.bn.num_batches_tracked.item() == 1
    assert all(p.grad is not None for p in model.parameters())
