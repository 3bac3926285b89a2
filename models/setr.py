"""SETR: segmentation with a plain ViT encoder and a convolutional decoder.

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers" (CVPR 2021). Three decoders on the ViT of models/vit.py:
- Naive: LayerNorm on the last block's tokens, 1x1 conv + BN + ReLU, x4 bilinear upsampling,
  1x1 classifier (output stride 4);
- PUP (progressive upsampling): LayerNorm, then four stages of 3x3 conv + BN + ReLU + x2
  bilinear upsampling, 1x1 classifier (output stride 1);
- MLA (multi-level aggregation): four evenly spaced blocks' tokens, each LayerNorm + 1x1 conv;
  a top-down running sum from the deepest level; per level a 3x3 conv, then two 3x3 convs and
  x4 upsampling; the four concatenated; 1x1 classifier (output stride 4).

These are the graphs mmsegmentation builds (SETRUPHead, MLANeck + SETRMLAHead, with the settings
of its configs/_base_/models/setr_{naive,pup,mla}.py), so that its released checkpoints load
exactly: BN after bias-free convs, align_corners=False everywhere, position embeddings resized
bilinearly, no final norm in the encoder, and for MLA the class token dropped before the blocks.
The original SETR code differs (conv bias before BN, align_corners=True and a 3x3 classifier in
MLA) and its checkpoints are not supported.

The file reads top to bottom: the decoders' blocks, the model, mmsegmentation's key tables, then
the family's contract: the named variants, `from_mmseg` and `CONTRACT`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckpointError,
    FamilyContract,
    SegmentationModel,
    load_weights,
    rename_keys,
)
from models.vit import (
    SIZES,
    ViTConfig,
    ViTEncoder,
    config_from_weights,
    encoder_from_mmseg,
    strip_prefix,
    vit_config,
)

DECODERS = ("naive", "pup", "mla")

# mmseg's settings (configs/_base_/models/setr_*.py): decoder -> SETRUPHead / SETRMLAHead arguments
UP_HEADS = {
    "naive": dict(num_convs=1, kernel_size=1, up_scale=4),
    "pup": dict(num_convs=4, kernel_size=3, up_scale=2),
}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule as SETR uses it: a bias-free conv, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(conv(self.conv, x)))


def conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for the channels-last maps of the decoders (the encoder's maps are channels-last
    views of its tokens): with the weights channels-last oneDNN takes them as they are (NCHW
    weights cost a copy of the input), rearranged per call so that state dicts keep torch's layout.
    A 1x1 conv runs as a linear layer over the channels: on one CPU thread torch sends a
    small-batch 1x1 conv to a slow path (a copy to NCHW, then a GEMM)."""
    if layer.kernel_size == (1, 1):
        return F.linear(x.permute(0, 2, 3, 1), layer.weight.flatten(1), layer.bias).permute(0, 3, 1, 2)
    weight = layer.weight.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def channel_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of an N x C x H x W map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


class UpsamplingDecoder(nn.Module):
    """Naive and PUP (mmseg's SETRUPHead): norm, then (conv-BN-ReLU, upsample) x num_convs, classifier."""

    def __init__(
        self, in_channels: int, channels: int, num_classes: int, num_convs: int, kernel_size: int, up_scale: int, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_channels, eps=norm_eps)
        self.stages = nn.ModuleList(ConvBNReLU(in_channels if i == 0 else channels, channels, kernel_size) for i in range(num_convs))
        self.up_scale = up_scale
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = channel_layer_norm(self.norm, features[-1])
        for stage in self.stages[:-1]:
            x = upsample(stage(x), self.up_scale)
        # The 1x1 classifier and the last bilinear upsampling commute (a per-pixel affine map;
        # interpolation weights sum to 1): classifying first works on 1/up_scale^2 of the pixels
        # and upsamples num_classes maps instead of `channels`.
        return upsample(conv(self.classifier, self.stages[-1](x)), self.up_scale)

    def forward_reference(self, features: list[torch.Tensor]) -> torch.Tensor:
        """mmseg's order: upsample, then classify (the same scores, more work)."""
        x = channel_layer_norm(self.norm, features[-1])
        for stage in self.stages:
            x = upsample(stage(x), self.up_scale)
        return self.classifier(x)


class MLADecoder(nn.Module):
    """Multi-level aggregation: mmseg's MLANeck followed by its SETRMLAHead.

    Level i (shallowest first) is normalised and projected by `lateral[i]`. Then, deepest first,
    a running sum of the projections is smoothed: smooth[0] sees the deepest level alone,
    smooth[1] deepest + next, ... smooth[3] all four (mmseg pairs its feat_extract convs with
    the running sums in that order). heads[j] (two conv-BN-ReLU, x4 upsampling) takes the j-th
    smoothed map; the four are concatenated in j order and classified.
    """

    def __init__(
        self, in_channels: int, neck_channels: int, head_channels: int, num_classes: int, levels: int = 4, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(in_channels, eps=norm_eps) for _ in range(levels))
        self.lateral = nn.ModuleList(ConvBNReLU(in_channels, neck_channels, 1) for _ in range(levels))
        self.smooth = nn.ModuleList(ConvBNReLU(neck_channels, neck_channels, 3) for _ in range(levels))
        self.heads = nn.ModuleList(
            nn.Sequential(ConvBNReLU(neck_channels, head_channels, 3), ConvBNReLU(head_channels, head_channels, 3)) for _ in range(levels)
        )
        self.up_scale = 4
        self.classifier = nn.Conv2d(levels * head_channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # As in UpsamplingDecoder: the 1x1 classifier goes before the (common) x4 upsampling of
        # the concatenated heads, which commutes with it.
        return upsample(conv(self.classifier, torch.cat(self.head_outputs(features), dim=1)), self.up_scale)

    def forward_reference(self, features: list[torch.Tensor]) -> torch.Tensor:
        """mmseg's order: upsample each head, concatenate, then classify (the same scores, more work)."""
        return self.classifier(torch.cat([upsample(out, self.up_scale) for out in self.head_outputs(features)], dim=1))

    def head_outputs(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        projected = [lateral(channel_layer_norm(norm, x)) for x, norm, lateral in zip(features, self.norms, self.lateral)]
        running, sums = None, []
        for x in reversed(projected):  # deepest first
            running = x if running is None else running + x
            sums.append(running)
        return [head(smooth(s)) for s, smooth, head in zip(sums, self.smooth, self.heads)]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class SETR(SegmentationModel):
    """ViT encoder + Naive / PUP / MLA decoder; forward returns scores at the decoder's stride."""

    family = "setr"

    def __init__(
        self,
        num_classes: int,
        decoder: str = "naive",
        encoder: dict[str, Any] | None = None,
        channels: int = 256,  # Naive / PUP conv width
        mla_neck_channels: int = 256,
        mla_head_channels: int = 128,
        mla_layers: list[int] | None = None,  # MLA's four blocks; evenly spaced by default
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"unknown SETR decoder {decoder!r}; known: {', '.join(DECODERS)}")
        config = ViTConfig.from_dict(encoder) if encoder is not None else setr_encoder("base", decoder)
        if decoder == "mla":
            mla_layers = list(mla_layers) if mla_layers is not None else config.evenly_spaced_layers(4)
        super().__init__(
            arch=dict(
                num_classes=num_classes,
                decoder=decoder,
                encoder=config.to_dict(),
                channels=channels,
                mla_neck_channels=mla_neck_channels,
                mla_head_channels=mla_head_channels,
                mla_layers=mla_layers,
                pixel_mean=list(pixel_mean),
                pixel_std=list(pixel_std),
            ),
            num_classes=num_classes,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        self.encoder = ViTEncoder(config)
        if decoder == "mla":
            self.feature_layers = mla_layers
            self.decoder = MLADecoder(config.embed_dim, mla_neck_channels, mla_head_channels, num_classes)
            self.output_stride = config.patch_size // self.decoder.up_scale
        else:
            head = UP_HEADS[decoder]
            self.feature_layers = [config.depth - 1]
            self.decoder = UpsamplingDecoder(config.embed_dim, channels, num_classes, **head)
            self.output_stride = config.patch_size // head["up_scale"] ** head["num_convs"]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        scores = self.decoder(self.encoder(pixels, self.feature_layers))
        stride = self.output_stride  # crop the padding back off, at the output's resolution
        return scores[..., : math.ceil(height / stride), : math.ceil(width / stride)]


def setr_encoder(size: str, decoder: str, **overrides: Any) -> ViTConfig:
    """The ViT of mmseg's SETR configs: LN eps 1e-6, no final norm, bilinear position resizing,
    512x512 training crops (a 32x32 position grid); MLA keeps the class token out of the blocks."""
    settings = dict(final_norm=False, pos_interpolation="bilinear", cls_token_in_blocks=decoder != "mla", pos_grid=(32, 32))
    return vit_config(size, **{**settings, **overrides})


# --------------------------------------------------------------------------------------------
# mmsegmentation checkpoints
# --------------------------------------------------------------------------------------------
# backbone.*        the ViT: models/vit.py MMSEG_RULES (patch_embed.projection, layers.N.ln1, ...)
# auxiliary_head.*  training-only heads: ignored
# Naive / PUP (SETRUPHead)                       ours
#   decode_head.norm.{weight,bias}                 decoder.norm
#   decode_head.up_convs.N.0.conv.weight           decoder.stages.N.conv.weight
#   decode_head.up_convs.N.0.bn.*                  decoder.stages.N.bn.*
#   decode_head.conv_seg.{weight,bias}             decoder.classifier
# MLA (MLANeck + SETRMLAHead)
#   neck.norm.N.{weight,bias}                      decoder.norms.N
#   neck.mla.channel_proj.N.{conv,bn}.*            decoder.lateral.N.{conv,bn}
#   neck.mla.feat_extract.N.{conv,bn}.*            decoder.smooth.N.{conv,bn}
#   decode_head.up_convs.N.{0,1}.{conv,bn}.*       decoder.heads.N.{0,1}.{conv,bn}
#   decode_head.conv_seg.{weight,bias}             decoder.classifier
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
MMSEG_UP_HEAD_RULES = [
    (r"decode_head\.norm\.(weight|bias)", r"decoder.norm.\1"),
    (r"decode_head\.up_convs\.(\d+)\.0\.conv\.weight", r"decoder.stages.\1.conv.weight"),
    (rf"decode_head\.up_convs\.(\d+)\.0\.bn\.{_BN}", r"decoder.stages.\1.bn.\2"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"decoder.classifier.\1"),
]
MMSEG_MLA_RULES = [
    (r"neck\.norm\.(\d+)\.(weight|bias)", r"decoder.norms.\1.\2"),
    (r"neck\.mla\.channel_proj\.(\d+)\.conv\.weight", r"decoder.lateral.\1.conv.weight"),
    (rf"neck\.mla\.channel_proj\.(\d+)\.bn\.{_BN}", r"decoder.lateral.\1.bn.\2"),
    (r"neck\.mla\.feat_extract\.(\d+)\.conv\.weight", r"decoder.smooth.\1.conv.weight"),
    (rf"neck\.mla\.feat_extract\.(\d+)\.bn\.{_BN}", r"decoder.smooth.\1.bn.\2"),
    (r"decode_head\.up_convs\.(\d+)\.([01])\.conv\.weight", r"decoder.heads.\1.\2.conv.weight"),
    (rf"decode_head\.up_convs\.(\d+)\.([01])\.bn\.{_BN}", r"decoder.heads.\1.\2.bn.\3"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"decoder.classifier.\1"),
]


def parse_name(name: str) -> tuple[str, str]:
    """'setr-pup-vit-large' -> ('pup', 'large')."""
    parts = name.split("-")
    if len(parts) != 4 or parts[0] != "setr" or parts[1] not in DECODERS or parts[2] != "vit" or parts[3] not in SIZES:
        raise CheckpointError(f"{name!r} is not a SETR name (setr-{{{','.join(DECODERS)}}}-vit-{{{','.join(SIZES)}}})")
    return parts[1], parts[3]


def fill_bn_counters(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older checkpoints lack BatchNorm's num_batches_tracked (unused at inference): add zeros."""
    out = dict(state_dict)
    for key in state_dict:
        if key.endswith(".running_mean"):
            out.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return out


# --------------------------------------------------------------------------------------------
# The contract: named variants, the mmsegmentation loader, and what the registry reads
# --------------------------------------------------------------------------------------------

_VIT_FIELDS = {f.name for f in fields(ViTConfig)}


def _variant(decoder: str, size: str) -> Callable[..., SETR]:
    def build(num_classes: int = 150, **overrides: Any) -> SETR:
        encoder = {k: overrides.pop(k) for k in list(overrides) if k in _VIT_FIELDS}
        return SETR(num_classes=num_classes, decoder=decoder, encoder=setr_encoder(size, decoder, **encoder).to_dict(), **overrides)

    build.__name__ = f"setr_{decoder}_vit_{size}"
    return build


VARIANTS: dict[str, Callable[..., SETR]] = {f"setr-{decoder}-vit-{size}": _variant(decoder, size) for decoder in DECODERS for size in SIZES}


def from_mmseg(name: str, num_classes: int, state_dict: dict[str, torch.Tensor], origin: str | None = None) -> SETR:
    """A SETR from an mmsegmentation state dict (backbone.*, neck.*, decode_head.*).

    The encoder's depth and position grid come from the weights (the name gives width and heads,
    and must agree with the weights' width); the decoder's widths too. `origin` names the
    checkpoint in errors.
    """
    decoder, size = parse_name(name)
    origin = origin or f"mmseg checkpoint for {name}"
    backbone = strip_prefix(state_dict, "backbone.")
    heads = {k: v for k, v in state_dict.items() if not k.startswith(("backbone.", "auxiliary_head."))}
    encoder_weights = encoder_from_mmseg(backbone, origin)
    config = config_from_weights(
        encoder_weights,
        num_heads=SIZES[size]["num_heads"],
        norm_eps=1e-6,
        pos_interpolation="bilinear",
        cls_token_in_blocks=decoder != "mla",
    )
    if config.embed_dim != SIZES[size]["embed_dim"]:
        raise CheckpointError(f"{origin}: the backbone is {config.embed_dim} wide, ViT-{size} is {SIZES[size]['embed_dim']}")
    rules = MMSEG_MLA_RULES if decoder == "mla" else MMSEG_UP_HEAD_RULES
    decoder_weights = fill_bn_counters(rename_keys(heads, rules, origin=origin, layout=f"SETR-{decoder} head"))
    kwargs: dict[str, Any] = {}
    try:
        classes = decoder_weights["decoder.classifier.weight"].shape[0]
        if decoder == "mla":
            kwargs["mla_neck_channels"] = decoder_weights["decoder.lateral.0.conv.weight"].shape[0]
            kwargs["mla_head_channels"] = decoder_weights["decoder.heads.0.0.conv.weight"].shape[0]
        else:
            first = decoder_weights["decoder.stages.0.conv.weight"]
            kwargs["channels"] = first.shape[0]
            convs = len({k.split(".")[2] for k in decoder_weights if k.startswith("decoder.stages.")})
            expected = UP_HEADS[decoder]
            if convs != expected["num_convs"] or first.shape[-1] != expected["kernel_size"]:
                raise CheckpointError(
                    f"{origin}: the head has {convs} convs of {first.shape[-1]}x{first.shape[-1]}; "
                    f"SETR-{decoder} has {expected['num_convs']} of {expected['kernel_size']}x{expected['kernel_size']}"
                )
    except KeyError as exc:
        raise CheckpointError(f"{origin}: no {exc} in the decode head: not a SETR-{decoder} checkpoint?") from exc
    if classes != num_classes:
        raise CheckpointError(f"{origin}: the classifier has {classes} classes, not {num_classes}")
    model = SETR(num_classes=num_classes, decoder=decoder, encoder=config.to_dict(), **kwargs)
    model.name = name
    return load_weights(model, {**{f"encoder.{k}": v for k, v in encoder_weights.items()}, **decoder_weights}, origin)


# no HF model_type: transformers has no SETR
CONTRACT = FamilyContract(model=SETR, variants=VARIANTS, from_mmseg=from_mmseg)
