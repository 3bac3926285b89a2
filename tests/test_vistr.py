"""VisTR: the deformable convolution against a direct per-pixel loop, the original repository's
checkpoint layout (key names of the real model, a save / load round trip, refusals), the clip
contract and the instance sequences of inference.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import perturbed, rel_error

from models import build_model, list_models, load_model, save_native, vistr
from models.base import CheckpointError, describe_misfit, rename_keys
from models.vistr import _REPOSITORY_IGNORED, _REPOSITORY_RULES, VisTR, _split_in_proj, deform_conv2d, instance_sequences

# ---------------------------------------------------------------------------------------------
# The deformable convolution
# ---------------------------------------------------------------------------------------------


def bilinear_at(image: np.ndarray, y: float, x: float) -> np.ndarray:
    """C x H x W at the real point (y, x): the four neighbours weighted by nearness, a neighbour
    outside the image counting as zero (detectron2's deformable_im2col_bilinear)."""
    _, height, width = image.shape
    y0, x0 = math.floor(y), math.floor(x)
    out = np.zeros(image.shape[0])
    for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yi < height and 0 <= xi < width:
                out += wy * wx * image[:, yi, xi]
    return out


def deform_conv_loop(x, offset, weight, bias, stride, padding, dilation, groups, offset_groups) -> np.ndarray:
    """DCN v1 from its definition, one output pixel, kernel point and offset group at a time: kernel
    point (i, j) at output (p, q) reads at (p*stride - padding + i*dilation + dy, ... + dx), with
    (dy, dx) at offset channels 2k, 2k+1 of its offset group (k = i * kw + j)."""
    x, offset, weight = (t.double().numpy() for t in (x, offset, weight))
    n, channels, _, _ = x.shape
    out_channels, group_channels, kh, kw = weight.shape
    out_h, out_w = offset.shape[-2:]
    per_offset_group = channels // offset_groups
    out = np.zeros((n, out_channels, out_h, out_w))
    for b in range(n):
        for p in range(out_h):
            for q in range(out_w):
                columns = np.zeros((channels, kh, kw))
                for g in range(offset_groups):
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            dy, dx = offset[b, 2 * (g * kh * kw + k), p, q], offset[b, 2 * (g * kh * kw + k) + 1, p, q]
                            y = p * stride - padding + i * dilation + dy
                            xx = q * stride - padding + j * dilation + dx
                            channels_g = slice(g * per_offset_group, (g + 1) * per_offset_group)
                            columns[channels_g, i, j] = bilinear_at(x[b, channels_g], y, xx)
                for o in range(out_channels):
                    group = o // (out_channels // groups)
                    out[b, o, p, q] = (weight[o] * columns[group * group_channels : (group + 1) * group_channels]).sum()
    if bias is not None:
        out += bias.double().numpy()[None, :, None, None]
    return out


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups", "offset_groups", "with_bias"),
    [(1, 1, 1, 1, 1, False), (1, 1, 1, 2, 1, True), (2, 2, 2, 1, 2, False), (1, 0, 1, 2, 2, True)],
)
def test_deformable_convolution_equals_a_per_pixel_bilinear_sampling_loop(stride, padding, dilation, groups, offset_groups, with_bias):
    generator = torch.Generator().manual_seed(stride * 7 + groups * 3 + offset_groups)
    x = torch.randn(2, 4, 5, 6, generator=generator)
    weight = torch.randn(6, 4 // groups, 3, 3, generator=generator)
    bias = torch.randn(6, generator=generator) if with_bias else None
    out_h = (5 + 2 * padding - dilation * 2 - 1) // stride + 1
    out_w = (6 + 2 * padding - dilation * 2 - 1) // stride + 1
    # fractional offsets of a few pixels (many reads straddle the border), some far outside, some whole
    offset = 2.5 * torch.randn(2, 2 * offset_groups * 9, out_h, out_w, generator=generator)
    offset[:, :4, 0, 0] = torch.tensor([9.0, -7.5, -12.0, 3.25])
    offset[:, 4:6] = offset[:, 4:6].round()
    out = deform_conv2d(
        x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups, offset_groups=offset_groups
    )
    expected = deform_conv_loop(x, offset, weight, bias, stride, padding, dilation, groups, offset_groups)
    assert out.shape == expected.shape == (2, 6, out_h, out_w)
    assert rel_error(out, expected) <= 1e-5


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"), [(1, 1, 1, 1), (2, 1, 1, 2), (1, 2, 2, 1)])
def test_deformable_convolution_with_zero_offsets_is_a_convolution(stride, padding, dilation, groups):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 9, 7, generator=generator)
    weight = torch.randn(6, 4 // groups, 3, 3, generator=generator)
    bias = torch.randn(6, generator=generator)
    expected = F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    offset = torch.zeros(2, 18, *expected.shape[-2:])
    out = deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert rel_error(out, expected) <= 1e-5


def test_deformable_convolution_in_chunks_of_the_batch_equals_it_whole(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(7, 4, 6, 5, generator=generator)
    offset = 2 * torch.randn(7, 36, 6, 5, generator=generator)
    weight, bias = torch.randn(6, 2, 3, 3, generator=generator), torch.randn(6, generator=generator)
    whole = deform_conv2d(x, offset, weight, bias, padding=1, groups=2, offset_groups=2)
    monkeypatch.setattr(vistr, "_DEFORM_CHUNK_BYTES", 3 * 4 * 9 * 30 * 4)  # 3 inputs' columns: chunks of 3, 3, 1
    assert torch.equal(deform_conv2d(x, offset, weight, bias, padding=1, groups=2, offset_groups=2), whole)


def test_deformable_convolution_refuses_offsets_of_another_shape():
    with pytest.raises(ValueError, match="offset"):
        deform_conv2d(torch.zeros(1, 4, 5, 5), torch.zeros(1, 9, 5, 5), torch.zeros(4, 4, 3, 3), padding=1)


# ---------------------------------------------------------------------------------------------
# The original repository's checkpoint layout
# ---------------------------------------------------------------------------------------------

WB = ("weight", "bias")
BN = ("weight", "bias", "running_mean", "running_var")


def original_keys(depths=(3, 4, 6, 3), encoder_layers=6, decoder_layers=6) -> list[str]:
    """The state dict keys of the repository's VisTRsegm (models/segmentation.py, vistr.py,
    transformer.py, backbone.py: torchvision's ResNet under Joiner / IntermediateLayerGetter,
    nn.MultiheadAttention, MaskHeadSmallConv with its DeformConv, the insmask_head Sequential)."""
    body = "vistr.backbone.0.body."
    keys = [f"{body}conv1.weight", *(f"{body}bn1.{f}" for f in BN)]
    for stage, depth in enumerate(depths, 1):
        for block in range(depth):
            for unit in (1, 2, 3):
                keys += [f"{body}layer{stage}.{block}.conv{unit}.weight", *(f"{body}layer{stage}.{block}.bn{unit}.{f}" for f in BN)]
            if block == 0:
                keys += [f"{body}layer{stage}.0.downsample.0.weight", *(f"{body}layer{stage}.0.downsample.1.{f}" for f in BN)]
    keys += [f"vistr.{m}.{f}" for m in ("input_proj", "class_embed", *(f"bbox_embed.layers.{i}" for i in range(3))) for f in WB]
    keys += ["vistr.query_embed.weight"]
    attention = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    for i in range(encoder_layers):
        layer = f"vistr.transformer.encoder.layers.{i}."
        keys += [f"{layer}self_attn.{a}" for a in attention] + [
            f"{layer}{m}.{f}" for m in ("linear1", "linear2", "norm1", "norm2") for f in WB
        ]
    for i in range(decoder_layers):
        layer = f"vistr.transformer.decoder.layers.{i}."
        keys += [f"{layer}{a}.{p}" for a in ("self_attn", "multihead_attn") for p in attention]
        keys += [f"{layer}{m}.{f}" for m in ("linear1", "linear2", "norm1", "norm2", "norm3") for f in WB]
    keys += [f"vistr.transformer.decoder.norm.{f}" for f in WB]
    keys += [f"bbox_attention.{m}.{f}" for m in ("q_linear", "k_linear") for f in WB]
    mask_head = [f"lay{i}" for i in range(1, 5)] + [f"gn{i}" for i in range(1, 6)] + [f"adapter{i}" for i in range(1, 4)] + ["conv_offset"]
    keys += [f"mask_head.{m}.{f}" for m in mask_head for f in WB] + ["mask_head.dcn.weight"]
    keys += [f"insmask_head.{i}.{f}" for i in (0, 1, 3, 4, 6, 7, 9) for f in WB]
    return keys


# our key -> the original's: the inverse of models/vistr.py's table, written from the repository
_TO_ORIGINAL = [
    (r"backbone\.stem\.conv\.(.+)", r"vistr.backbone.0.body.conv1.\1"),
    (r"backbone\.stem\.norm\.(.+)", r"vistr.backbone.0.body.bn1.\1"),
    (
        r"backbone\.stages\.(\d)\.(\d+)\.(reduce|spatial|expand)\.(conv|norm)\.(.+)",
        lambda m: (
            f"vistr.backbone.0.body.layer{int(m[1]) + 1}.{m[2]}.{'conv' if m[4] == 'conv' else 'bn'}"
            f"{('reduce', 'spatial', 'expand').index(m[3]) + 1}.{m[5]}"
        ),
    ),
    (
        r"backbone\.stages\.(\d)\.(\d+)\.shortcut\.(conv|norm)\.(.+)",
        lambda m: f"vistr.backbone.0.body.layer{int(m[1]) + 1}.{m[2]}.downsample.{0 if m[3] == 'conv' else 1}.{m[4]}",
    ),
    (r"input_projection\.(.+)", r"vistr.input_proj.\1"),
    (r"query_embed\.(.+)", r"vistr.query_embed.\1"),
    (r"(encoder|decoder)_layers\.(\d+)\.self_attn\.([qkv]|out)_proj\.(.+)", r"vistr.transformer.\1.layers.\2.self_attn.\3_proj.\4"),
    (r"decoder_layers\.(\d+)\.cross_attn\.([qkv]|out)_proj\.(.+)", r"vistr.transformer.decoder.layers.\1.multihead_attn.\2_proj.\3"),
    (r"(encoder|decoder)_layers\.(\d+)\.mlp\.fc([12])\.(.+)", r"vistr.transformer.\1.layers.\2.linear\3.\4"),
    (r"(encoder|decoder)_layers\.(\d+)\.norm([123])\.(.+)", r"vistr.transformer.\1.layers.\2.norm\3.\4"),
    (r"decoder_norm\.(.+)", r"vistr.transformer.decoder.norm.\1"),
    (r"class_head\.(.+)", r"vistr.class_embed.\1"),
    (r"box_head\.(.+)", r"vistr.bbox_embed.\1"),
    (r"bbox_attention\.([qk])_proj\.(.+)", r"bbox_attention.\1_linear.\2"),
    (r"mask_head\.conv([12])\.conv\.(.+)", r"mask_head.lay\1.\2"),
    (r"mask_head\.conv([12])\.norm\.(.+)", r"mask_head.gn\1.\2"),
    (r"mask_head\.stages\.([01])\.adapter\.(.+)", lambda m: f"mask_head.adapter{int(m[1]) + 1}.{m[2]}"),
    (r"mask_head\.stages\.([01])\.refine\.conv\.(.+)", lambda m: f"mask_head.lay{int(m[1]) + 3}.{m[2]}"),
    (r"mask_head\.stages\.([01])\.refine\.norm\.(.+)", lambda m: f"mask_head.gn{int(m[1]) + 3}.{m[2]}"),
    (r"mask_head\.adapter\.(.+)", r"mask_head.adapter3.\1"),
    (r"mask_head\.offsets\.(.+)", r"mask_head.conv_offset.\1"),
    (r"mask_head\.deform_conv\.weight", "mask_head.dcn.weight"),
    (r"mask_head\.norm\.(.+)", r"mask_head.gn5.\1"),
    (r"instance_head\.convs\.(\d)\.conv\.(.+)", lambda m: f"insmask_head.{3 * int(m[1])}.{m[2]}"),
    (r"instance_head\.convs\.(\d)\.norm\.(.+)", lambda m: f"insmask_head.{3 * int(m[1]) + 1}.{m[2]}"),
    (r"instance_head\.output\.(.+)", r"insmask_head.9.\1"),
]


def original_state_dict(model: VisTR) -> dict[str, torch.Tensor]:
    """`model`'s weights as the repository's VisTRsegm names them (q, k, v fused into in_proj)."""
    out = rename_keys(model.state_dict(), _TO_ORIGINAL, origin="test")
    for key in [k for k in out if k.endswith(".q_proj.weight") or k.endswith(".q_proj.bias")]:
        prefix, field = key.rsplit(".q_proj.", 1)
        out[f"{prefix}.in_proj_{field}"] = torch.cat([out.pop(f"{prefix}.{p}_proj.{field}") for p in "qkv"])
    return out


# ResNet-50's block counts (the name's check) with small widths, the real hidden width (the mask head's
# GroupNorm(8) of d/16 and the thirds of the positions need 384), one layer each; the repository's 36
# frames (the weights do not say the frame count: the loader takes 36), 2 instances
TINY = dict(stem_width=8, widths=[16, 32, 64, 128], ffn_dim=32, encoder_layers=1, decoder_layers=1, num_instances=2)


@pytest.fixture(scope="module")
def tiny_vistr():
    torch.manual_seed(0)
    return perturbed(build_model("vistr-r50", num_classes=5, **TINY), scale=0.05).eval()


def test_the_real_r50_layout_has_the_original_repositorys_key_names_and_shapes():
    with torch.device("meta"):  # 57 M parameters: shapes only
        model = build_model("vistr-r50", num_classes=41)
    weights = original_state_dict(model)
    assert sorted(weights) == sorted(original_keys())
    shapes = {k: list(v.shape) for k, v in weights.items()}
    assert shapes["vistr.query_embed.weight"] == [360, 384] and shapes["vistr.class_embed.weight"] == [42, 384]
    assert shapes["vistr.transformer.encoder.layers.0.self_attn.in_proj_weight"] == [1152, 384]
    assert shapes["vistr.backbone.0.body.layer3.5.conv2.weight"] == [256, 256, 3, 3]
    assert shapes["mask_head.lay1.weight"] == [392, 392, 3, 3] and shapes["mask_head.adapter1.weight"] == [192, 1024, 1, 1]
    assert shapes["mask_head.adapter3.weight"] == [48, 256, 1, 1] and shapes["mask_head.conv_offset.weight"] == [18, 48, 1, 1]
    assert shapes["mask_head.dcn.weight"] == [24, 48, 3, 3] and shapes["mask_head.gn5.weight"] == [24]
    assert shapes["insmask_head.0.weight"] == [12, 24, 3, 3, 3] and shapes["insmask_head.1.weight"] == [12]
    assert shapes["insmask_head.9.weight"] == [1, 12, 1, 1, 1]
    # the loader's table maps exactly the original keys onto ours
    renamed = rename_keys(_split_in_proj(weights), _REPOSITORY_RULES, ignored=_REPOSITORY_IGNORED, origin="test")
    assert describe_misfit(model.state_dict(), renamed) is None
    # the paper's count: VisTR-R50 57.2 M parameters
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 57.1


def test_r101_has_23_blocks_in_its_third_stage():
    assert {"vistr-r50", "vistr-r101"} <= set(list_models())
    with torch.device("meta"):
        model = build_model("vistr-r101", num_classes=41)
    assert sorted(original_state_dict(model)) == sorted(original_keys(depths=(3, 4, 23, 3)))


def clip(frames: int = 3, size: tuple[int, int] = (64, 72), seed: int = 1) -> torch.Tensor:
    return torch.randn(frames, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_a_checkpoint_in_the_original_layout_loads_and_gives_the_same_outputs(tiny_vistr, tmp_path):
    path = tmp_path / "vistr_r50.pth"
    torch.save({"model": original_state_dict(tiny_vistr), "epoch": 17}, path)
    loaded = load_model(path, name="vistr-r50")
    assert type(loaded) is VisTR and loaded.name == "vistr-r50" and loaded.num_classes == 5
    assert loaded.arch == tiny_vistr.arch
    with torch.no_grad():
        for a, b in zip(loaded(clip(36)), tiny_vistr(clip(36))):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda sd: sd.pop("mask_head.dcn.weight"), "1 missing (mask_head.deform_conv.weight)"),
        (lambda sd: sd.update({"mask_head.dcn2.weight": sd.pop("mask_head.dcn.weight")}), "1 unexpected (mask_head.dcn2.weight)"),
        (lambda sd: sd.pop("vistr.class_embed.weight"), "no vistr.class_embed.weight: not a VisTR checkpoint"),
        (lambda sd: sd.clear() or sd.update({"state_dict": {}}), 'vistr-r50 loads a .pth whose "model" is a flat dict'),
    ],
)
def test_a_missing_or_renamed_key_is_a_one_line_error_naming_it(tiny_vistr, tmp_path, change, named):
    state_dict = original_state_dict(tiny_vistr)
    change(state_dict)
    torch.save({"model": state_dict}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as exc_info:
        load_model(tmp_path / "bad.pth", name="vistr-r50")
    message = str(exc_info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "bad.pth")) and named in message, message


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("vistr-r101", "not a vistr-r101 checkpoint: its ResNet stages have [3, 4, 6, 3] blocks"),
        (None, "needs the model name"),
    ],
)
def test_a_repository_checkpoint_under_another_name_is_refused(tiny_vistr, tmp_path, name, reason):
    torch.save({"model": original_state_dict(tiny_vistr)}, tmp_path / "vistr.pth")
    with pytest.raises(CheckpointError) as exc_info:
        load_model(tmp_path / "vistr.pth", name=name)
    assert "\n" not in str(exc_info.value) and reason in str(exc_info.value)


# ---------------------------------------------------------------------------------------------
# The clip: its shapes, a short clip filled as inference.py fills a short video
# ---------------------------------------------------------------------------------------------


def test_forward_gives_frame_major_rows_at_stride_4(tiny_vistr):
    with torch.no_grad():
        class_logits, boxes, mask_logits = tiny_vistr(clip(36, size=(70, 90))[None])  # 1 x T x 3 x H x W too
    assert class_logits.shape == (72, 6) and boxes.shape == (72, 4) and mask_logits.shape == (72, 18, 23)
    assert ((boxes >= 0) & (boxes <= 1)).all()


def test_a_short_clip_is_its_frames_repeated_in_order_and_returns_its_own_frames_only(tiny_vistr):
    frames = clip(5)
    filled = frames[torch.arange(36) % 5]  # inference.py: file_names * ceil(36 / length), cut to 36
    with torch.no_grad():
        short, full = tiny_vistr(frames), tiny_vistr(filled)
    for a, b in zip(short, full):
        assert a.shape[0] == 5 * 2 and torch.equal(a, b[:10])
    with pytest.raises(ValueError, match="a clip of 1 to 36 frames"):
        tiny_vistr(clip(37, size=(32, 32)))


# ---------------------------------------------------------------------------------------------
# Instance sequences: inference.py's post-processing
# ---------------------------------------------------------------------------------------------


def test_instance_sequences_follow_the_original_inference():
    frames, instances, classes = 4, 3, 3
    probs = torch.full((frames, instances, classes + 1), 0.01)
    # instance 0: class 2 in three frames, class 1 (more probable) in one -> class 2, the mean of the best
    best = [(2, 0.6), (2, 0.5), (1, 0.9), (2, 0.7)]
    for t, (c, p) in enumerate(best):
        probs[t, 0, c] = p
    probs[:, 1, 0] = 0.8  # instance 1: no mask pixel anywhere -> left out
    probs[:, 2, classes] = 0.99  # instance 2: no-object, a frame score below 0.001 in frame 3
    probs[3, 2, :classes] = 0.0001
    class_logits = probs.log().view(frames * instances, -1)
    mask_logits = torch.full((frames, instances, 4, 6), -5.0)
    mask_logits[:, 0, 1:3, 2:4] = 5.0
    mask_logits[:, 2, 0, 0] = 5.0
    sequences = instance_sequences(class_logits, mask_logits.view(frames * instances, 4, 6), instances, size=(8, 12))
    assert [s.instance for s in sequences] == [0, 2]
    first, last = sequences
    softmax = (probs / probs.sum(-1, keepdim=True))[..., :-1]  # softmax of log-probabilities
    assert first.label == 2 and first.score == pytest.approx(float(softmax[:, 0].max(-1).values.mean()))
    assert first.masks.shape == (4, 8, 12) and first.masks[:, 2:6, 4:8].all() and first.masks.sum() == 4 * 16
    assert first.present.all() and not last.present[3] and last.present[:3].all()


def test_a_native_checkpoint_keeps_the_clip_layout(tiny_vistr, tmp_path):
    save_native(tiny_vistr, tmp_path / "vistr.safetensors")
    again = load_model(tmp_path / "vistr.safetensors", name="vistr-r50")
    assert type(again) is VisTR and again.arch == tiny_vistr.arch and (again.num_frames, again.num_instances) == (36, 2)
    with torch.no_grad():
        for a, b in zip(again(clip(4)), tiny_vistr(clip(4))):
            assert torch.equal(a, b)
