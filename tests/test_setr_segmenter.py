"""SETR and Segmenter: every name builds; mmseg and original Segmenter checkpoints load and convert.

mmsegmentation is not a dependency, so this file writes checkpoints in its key names itself
(written down from mmseg/models/backbones/vit.py, decode_heads/setr_up_head.py, setr_mla_head.py,
segmenter_mask_head.py, fcn_head.py and necks/mla_neck.py, with mmcv's ConvModule = conv + bn),
and computes what mmseg computes from those tensors with a few lines of functional torch
(torch's own nn.MultiheadAttention for mmcv's attention). The loaded models must agree with that
reference, and again after save_native -> load_model, exactly. The original Segmenter layout is
checked the same way, and one model of each family runs through `segpipe run`.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from jobs.cli import main
from models import build_model, list_models, load_model, save_native
from models.base import CheckpointError
from pipeline.results.masks import decode_png as decode_mask

D, HEADS, DEPTH, GRID, CLASSES = 192, 3, 4, (4, 4), 5  # ViT-tiny, 4 blocks, 64 x 64 crops


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# --------------------------------------------------------------------------------------------
# Checkpoints in mmseg's key names, with random weights
# --------------------------------------------------------------------------------------------


def rand(*shape: int, scale: float | None = None) -> torch.Tensor:
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return torch.randn(*shape) * (scale if scale is not None else fan_in**-0.5)


def norm_weights(prefix: str, dim: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + rand(dim, scale=0.1), f"{prefix}.bias": rand(dim, scale=0.1)}


def mmseg_layer(prefix: str, dim: int) -> dict[str, torch.Tensor]:
    """TransformerEncoderLayer: ln1, attn.attn (torch MultiheadAttention), ln2, ffn (mmcv FFN)."""
    return {
        **norm_weights(f"{prefix}.ln1", dim),
        f"{prefix}.attn.attn.in_proj_weight": rand(3 * dim, dim),
        f"{prefix}.attn.attn.in_proj_bias": rand(3 * dim, scale=0.1),
        f"{prefix}.attn.attn.out_proj.weight": rand(dim, dim),
        f"{prefix}.attn.attn.out_proj.bias": rand(dim, scale=0.1),
        **norm_weights(f"{prefix}.ln2", dim),
        f"{prefix}.ffn.layers.0.0.weight": rand(4 * dim, dim),
        f"{prefix}.ffn.layers.0.0.bias": rand(4 * dim, scale=0.1),
        f"{prefix}.ffn.layers.1.weight": rand(dim, 4 * dim),
        f"{prefix}.ffn.layers.1.bias": rand(dim, scale=0.1),
    }


def mmseg_vit(final_norm: bool) -> dict[str, torch.Tensor]:
    weights = {
        "backbone.patch_embed.projection.weight": rand(D, 3, 16, 16),
        "backbone.patch_embed.projection.bias": rand(D, scale=0.1),
        "backbone.cls_token": rand(1, 1, D, scale=0.5),
        "backbone.pos_embed": rand(1, 1 + GRID[0] * GRID[1], D, scale=0.5),
    }
    for i in range(DEPTH):
        weights.update(mmseg_layer(f"backbone.layers.{i}", D))
    if final_norm:
        weights.update(norm_weights("backbone.ln1", D))
    return weights


def conv_module(prefix: str, cin: int, cout: int, kernel: int) -> dict[str, torch.Tensor]:
    """mmcv ConvModule with a BN: a bias-free conv and a BatchNorm with running statistics."""
    return {
        f"{prefix}.conv.weight": rand(cout, cin, kernel, kernel),
        **norm_weights(f"{prefix}.bn", cout),
        f"{prefix}.bn.running_mean": rand(cout, scale=0.1),
        f"{prefix}.bn.running_var": 0.5 + torch.rand(cout),
        f"{prefix}.bn.num_batches_tracked": torch.tensor(1000),
    }


def conv_seg(prefix: str, cin: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.conv_seg.weight": rand(CLASSES, cin, 1, 1), f"{prefix}.conv_seg.bias": rand(CLASSES, scale=0.1)}


def mmseg_checkpoint(variant: str) -> dict[str, torch.Tensor]:
    """The state dict of mmseg's model for `variant` (configs/_base_/models/setr_*.py, segmenter_*)."""
    if variant in ("naive", "pup"):
        convs, kernel = (1, 1) if variant == "naive" else (4, 3)
        weights = {**mmseg_vit(final_norm=False), **norm_weights("decode_head.norm", D), **conv_seg("decode_head", 32)}
        for i in range(convs):
            weights.update(conv_module(f"decode_head.up_convs.{i}.0", D if i == 0 else 32, 32, kernel))
        weights.update(conv_module("auxiliary_head.0.up_convs.0.0", D, 32, 1))  # training-only: ignored
        return weights
    if variant == "mla":  # MLANeck(out_channels=24) + SETRMLAHead(mla_channels=16)
        weights = {**mmseg_vit(final_norm=False), **conv_seg("decode_head", 64), **conv_seg("auxiliary_head.0", 24)}
        for i in range(4):
            weights.update(norm_weights(f"neck.norm.{i}", D))
            weights.update(conv_module(f"neck.mla.channel_proj.{i}", D, 24, 1))
            weights.update(conv_module(f"neck.mla.feat_extract.{i}", 24, 24, 3))
            weights.update(conv_module(f"decode_head.up_convs.{i}.0", 24, 16, 3))
            weights.update(conv_module(f"decode_head.up_convs.{i}.1", 16, 16, 3))
        return weights
    if variant == "linear":  # FCNHead(num_convs=0, concat_input=False)
        return {**mmseg_vit(final_norm=True), **conv_seg("decode_head", D)}
    weights = {  # SegmenterMaskTransformerHead(num_layers=2, embed_dims=D, num_heads=HEADS)
        **mmseg_vit(final_norm=True),
        "decode_head.dec_proj.weight": rand(D, D),
        "decode_head.dec_proj.bias": rand(D, scale=0.1),
        "decode_head.cls_emb": rand(1, CLASSES, D, scale=1.0),
        **norm_weights("decode_head.decoder_norm", D),
        "decode_head.patch_proj.weight": rand(D, D),
        "decode_head.classes_proj.weight": rand(D, D),
        **norm_weights("decode_head.mask_norm", CLASSES),
        **conv_seg("decode_head", D),  # BaseDecodeHead builds conv_seg; the mask head never uses it
    }
    for i in range(2):
        weights.update(mmseg_layer(f"decode_head.layers.{i}", D))
    return weights


# --------------------------------------------------------------------------------------------
# What mmseg computes from those tensors
# --------------------------------------------------------------------------------------------


def layer_norm(w: dict, prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps)


def channel_norm(w: dict, prefix: str, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return layer_norm(w, prefix, x.permute(0, 2, 3, 1), eps).permute(0, 3, 1, 2)


def ref_layer(w: dict, prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    attention = nn.MultiheadAttention(x.shape[-1], HEADS, batch_first=True)
    attention.load_state_dict({k.removeprefix(f"{prefix}.attn.attn."): v for k, v in w.items() if k.startswith(f"{prefix}.attn.attn.")})
    y = layer_norm(w, f"{prefix}.ln1", x, eps)
    x = x + attention(y, y, y, need_weights=False)[0]
    y = layer_norm(w, f"{prefix}.ln2", x, eps)
    hidden = F.gelu(F.linear(y, w[f"{prefix}.ffn.layers.0.0.weight"], w[f"{prefix}.ffn.layers.0.0.bias"]))
    return x + F.linear(hidden, w[f"{prefix}.ffn.layers.1.weight"], w[f"{prefix}.ffn.layers.1.bias"])


def ref_vit(w, pixels, out_indices, with_cls_token=True, final_norm=False, mode="bicubic", eps=1e-6):
    """mmseg VisionTransformer.forward: corner padding, class token, resized pos_embed, layers."""
    n, _, height, width = pixels.shape
    x = F.pad(pixels, (0, (-width) % 16, 0, (-height) % 16))
    x = F.conv2d(x, w["backbone.patch_embed.projection.weight"], w["backbone.patch_embed.projection.bias"], stride=16)
    grid = x.shape[2:]
    x = torch.cat([w["backbone.cls_token"].expand(n, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = w["backbone.pos_embed"]
    if tuple(grid) != GRID:
        patch_pos = pos[:, 1:].reshape(1, *GRID, D).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode=mode, align_corners=False)
        pos = torch.cat([pos[:, :1], patch_pos.flatten(2).transpose(1, 2)], dim=1)
    x = x + pos
    if not with_cls_token:
        x = x[:, 1:]
    outs = []
    for i in range(DEPTH):
        x = ref_layer(w, f"backbone.layers.{i}", x, eps)
        if i == DEPTH - 1 and final_norm:
            x = layer_norm(w, "backbone.ln1", x, eps)
        if i in out_indices:
            tokens = x[:, 1:] if with_cls_token else x
            outs.append(tokens.transpose(1, 2).reshape(n, D, *grid))
    return outs


def ref_conv_module(w: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    weight = w[f"{prefix}.conv.weight"]
    x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
    bn = {k: w[f"{prefix}.bn.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
    return F.relu(F.batch_norm(x, **bn, training=False, eps=1e-5))


def ref_conv_seg(w: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w[f"{prefix}.conv_seg.weight"], w[f"{prefix}.conv_seg.bias"])


def up(x: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def ref_setr_up(w, pixels, convs, scale):  # SETRUPHead
    x = channel_norm(w, "decode_head.norm", ref_vit(w, pixels, [DEPTH - 1], mode="bilinear")[0])
    for i in range(convs):
        x = up(ref_conv_module(w, f"decode_head.up_convs.{i}.0", x), scale)
    return ref_conv_seg(w, "decode_head", x)


def ref_setr_mla(w, pixels):  # MLANeck + SETRMLAHead
    features = ref_vit(w, pixels, [0, 1, 2, 3], with_cls_token=False, mode="bilinear")
    lateral = [ref_conv_module(w, f"neck.mla.channel_proj.{i}", channel_norm(w, f"neck.norm.{i}", x)) for i, x in enumerate(features)]
    mids = []
    for x in lateral[::-1]:
        mids.append(x if not mids else mids[-1] + x)
    outs = [ref_conv_module(w, f"neck.mla.feat_extract.{i}", m) for i, m in enumerate(mids)]
    heads = [
        up(ref_conv_module(w, f"decode_head.up_convs.{i}.1", ref_conv_module(w, f"decode_head.up_convs.{i}.0", x)), 4)
        for i, x in enumerate(outs)
    ]
    return ref_conv_seg(w, "decode_head", torch.cat(heads, dim=1))


def ref_segmenter(w, pixels, decoder, encoder_eps=1e-6, mode="bicubic"):
    x = ref_vit(w, pixels, [DEPTH - 1], final_norm=True, mode=mode, eps=encoder_eps)[0]
    if decoder == "linear":  # FCNHead, num_convs=0
        return ref_conv_seg(w, "decode_head", x)
    n, _, height, width = x.shape  # SegmenterMaskTransformerHead.forward
    x = F.linear(x.flatten(2).transpose(1, 2), w["decode_head.dec_proj.weight"], w["decode_head.dec_proj.bias"])
    x = torch.cat([x, w["decode_head.cls_emb"].expand(n, -1, -1)], dim=1)
    for i in range(2):
        x = ref_layer(w, f"decode_head.layers.{i}", x, eps=1e-5)
    x = layer_norm(w, "decode_head.decoder_norm", x, 1e-5)
    patches = F.linear(x[:, :-CLASSES], w["decode_head.patch_proj.weight"])
    classes = F.linear(x[:, -CLASSES:], w["decode_head.classes_proj.weight"])
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    masks = layer_norm(w, "decode_head.mask_norm", patches @ classes.transpose(1, 2), 1e-5)
    return masks.permute(0, 2, 1).reshape(n, CLASSES, height, width)


REFERENCES = {
    "setr-naive-vit-tiny": lambda w, x: ref_setr_up(w, x, convs=1, scale=4),
    "setr-pup-vit-tiny": lambda w, x: ref_setr_up(w, x, convs=4, scale=2),
    "setr-mla-vit-tiny": ref_setr_mla,
    "segmenter-linear-vit-tiny": lambda w, x: ref_segmenter(w, x, "linear"),
    "segmenter-mask-vit-tiny": lambda w, x: ref_segmenter(w, x, "mask"),
}
INPUTS = [(64, 64), (80, 48), (72, 50)]  # the training grid; another grid; sides not multiples of 16


def check_against(model, reference, weights, stride_cropped=True):
    torch.manual_seed(3)
    for height, width in INPUTS:
        pixels = torch.randn(1, 3, height, width)
        with torch.no_grad():
            ours = model(pixels)
            ref = reference(weights, pixels)
        stride = model.output_stride
        ref = ref[..., : math.ceil(height / stride), : math.ceil(width / stride)]  # mmseg keeps the padding
        assert ours.shape == ref.shape == (1, CLASSES, math.ceil(height / stride), math.ceil(width / stride))
        assert rel_diff(ours, ref) <= 1e-4, (model.name, height, width)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_mmseg_checkpoint_loads_converts_and_reloads(name, tmp_path):
    torch.manual_seed(0)
    weights = mmseg_checkpoint(name.split("-")[1])
    checkpoint = tmp_path / "iter_160000.pth"
    classes = [f"class{i}" for i in range(CLASSES)]
    torch.save({"state_dict": weights, "meta": {"dataset_meta": {"classes": classes}}}, checkpoint)

    model = load_model(checkpoint, name=name)  # the class count comes from meta
    assert model.name == name and model.num_classes == CLASSES
    assert model.encoder.config.depth == DEPTH and model.encoder.config.pos_grid == GRID
    check_against(model, REFERENCES[name], weights)

    native = tmp_path / "model.safetensors"
    save_native(model, native, source=str(checkpoint))
    again = load_model(native)
    assert type(again) is type(model) and again.name == name and again.arch == model.arch
    assert again.pixel_mean == model.pixel_mean and again.pixel_std == model.pixel_std
    pixels = torch.randn(2, 3, 72, 50)
    with torch.no_grad():
        assert torch.equal(again(pixels), model(pixels))


def test_normalization_defaults():
    assert build_model("segmenter-mask-vit-tiny", num_classes=2, depth=1).pixel_mean == (127.5, 127.5, 127.5)
    assert build_model("segmenter-linear-vit-tiny", num_classes=2, depth=1).pixel_std == (127.5, 127.5, 127.5)
    assert build_model("setr-naive-vit-tiny", num_classes=2, depth=1).pixel_mean == (123.675, 116.28, 103.53)


def to_original_segmenter(weights: dict[str, torch.Tensor], decoder: str) -> dict[str, torch.Tensor]:
    """The same tensors in rstrudel/segmenter's names (segm/model/{vit,blocks,decoder}.py)."""
    block = {"ln1": "norm1", "ln2": "norm2", "attn.attn.in_proj_": "attn.qkv.", "attn.attn.out_proj": "attn.proj",
             "ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"}  # fmt: skip

    def rename_block(key: str) -> str:
        for old, new in block.items():
            key = key.replace(f".{old}", f".{new}")
        return key

    original = {
        "encoder.patch_embed.proj.weight": weights["backbone.patch_embed.projection.weight"],
        "encoder.patch_embed.proj.bias": weights["backbone.patch_embed.projection.bias"],
        "encoder.cls_token": weights["backbone.cls_token"],
        "encoder.pos_embed": weights["backbone.pos_embed"],
        "encoder.norm.weight": weights["backbone.ln1.weight"],
        "encoder.norm.bias": weights["backbone.ln1.bias"],
        "encoder.head.weight": torch.zeros(1000, D),  # the ImageNet classifier, unused
        "encoder.head.bias": torch.zeros(1000),
    }
    for key, value in weights.items():
        if key.startswith("backbone.layers."):
            original[rename_block(key.replace("backbone.layers.", "encoder.blocks."))] = value
    if decoder == "linear":
        original["decoder.head.weight"] = weights["decode_head.conv_seg.weight"].flatten(1)
        original["decoder.head.bias"] = weights["decode_head.conv_seg.bias"]
        return original
    for key, value in weights.items():
        if key.startswith("decode_head.layers."):
            original[rename_block(key.replace("decode_head.layers.", "decoder.blocks."))] = value
    for name in ("dec_proj", "decoder_norm", "mask_norm"):
        for kind in ("weight", "bias"):
            original[f"decoder.{'proj_dec' if name == 'dec_proj' else name}.{kind}"] = weights[f"decode_head.{name}.{kind}"]
    original["decoder.cls_emb"] = weights["decode_head.cls_emb"]
    original["decoder.proj_patch"] = weights["decode_head.patch_proj.weight"].t()  # used as x @ P
    original["decoder.proj_classes"] = weights["decode_head.classes_proj.weight"].t()
    return original


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_original_segmenter_checkpoint(decoder, tmp_path):
    """checkpoint.pth of rstrudel/segmenter: {"model": ..., "epoch": ...}; LN eps 1e-5, bilinear positions."""
    torch.manual_seed(0)
    weights = mmseg_checkpoint(decoder)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"model": to_original_segmenter(weights, decoder), "epoch": 64}, checkpoint)
    name = f"segmenter-{decoder}-vit-tiny"
    model = load_model(checkpoint, name=name, num_classes=CLASSES)
    assert model.encoder.config.norm_eps == 1e-5 and model.encoder.config.pos_interpolation == "bilinear"
    check_against(model, lambda w, x: ref_segmenter(w, x, decoder, encoder_eps=1e-5, mode="bilinear"), weights)


def test_checkpoints_that_do_not_fit(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "pup.pth"
    torch.save({"state_dict": mmseg_checkpoint("pup")}, checkpoint)
    with pytest.raises(CheckpointError, match="SETR-naive has 1"):  # a PUP head is not a Naive one
        load_model(checkpoint, name="setr-naive-vit-tiny", num_classes=CLASSES)
    with pytest.raises(CheckpointError, match="ViT-small is 384"):
        load_model(checkpoint, name="setr-pup-vit-small", num_classes=CLASSES)
    with pytest.raises(CheckpointError, match="not 7"):
        load_model(checkpoint, name="setr-pup-vit-tiny", num_classes=7)


SETR_SEGMENTER = [n for n in list_models() if n.startswith(("setr-", "segmenter-"))]


def test_every_name_is_registered():
    expected = {f"setr-{d}-vit-{s}" for d in ("naive", "pup", "mla") for s in ("tiny", "small", "base", "large")}
    expected |= {f"segmenter-{d}-vit-{s}" for d in ("linear", "mask") for s in ("tiny", "small", "base", "large")}
    assert set(SETR_SEGMENTER) == expected


@pytest.mark.parametrize("name", SETR_SEGMENTER)
def test_every_name_builds_and_returns_class_scores(name):
    """Full-size names are built on the meta device (shapes without memory or compute); tiny ones run."""
    size = name.rsplit("-", 1)[1]
    expected_width = {"tiny": 192, "small": 384, "base": 768, "large": 1024}[size]
    tiny = size == "tiny"
    with torch.device("cpu" if tiny else "meta"):
        model = build_model(name, num_classes=3, **({"depth": 4} if tiny else {})).eval()
        pixels = torch.randn(2, 3, 72, 40)
        with torch.no_grad():
            scores = model(pixels)
    assert model.name == name and model.encoder.config.embed_dim == expected_width
    assert model.encoder.config.depth == (4 if tiny else 24 if size == "large" else 12)
    stride = model.output_stride
    assert scores.shape == (2, 3, math.ceil(72 / stride), math.ceil(40 / stride))
    if tiny:
        assert torch.isfinite(scores).all()
        rebuilt = type(model)(**model.arch)  # arch rebuilds the same architecture
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["setr-mla-vit-tiny", "segmenter-mask-vit-tiny"])
def test_segpipe_run_end_to_end(name, ray_session, tmp_path):
    """One model of each family through `segpipe run` from a native checkpoint: one mask per image."""
    rng = np.random.default_rng(0)
    sizes = {"a.png": (40, 56), "b.png": (97, 75)}  # smaller and larger than the window
    (tmp_path / "images").mkdir()
    for file, shape in sizes.items():
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(tmp_path / "images" / file)
    checkpoint = tmp_path / "model.safetensors"
    save_native(build_model(name, num_classes=3, depth=4), checkpoint)
    config = {
        "run_id": "zoo",
        "input": {"uri": str(tmp_path / "images"), "pattern": "*.png"},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"mode": "slide", "window": [48, 48], "stride": [32, 32], "batch_size": 4},
        "resources": {"actors": 1},
        "output": {"uri": str(tmp_path / "runs")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    rows = pq.read_table([str(p) for p in sorted((tmp_path / "runs" / "zoo" / "masks").glob("*.parquet"))]).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(sizes)
    for row in rows:
        mask = decode_mask(row["mask"])
        assert mask.shape == sizes[row["image_id"]] and mask.max() < 3
