"""Segmenter: a ViT encoder with a linear or a mask-transformer decoder.

Strudel et al., "Segmenter: Transformer for Semantic Segmentation" (ICCV 2021). The encoder is
the ViT of models/vit.py with its final norm; the decoder works on the patch tokens of the last
block (output stride 16):
- linear: a per-token linear classifier;
- mask transformer: the tokens are projected, one learnable embedding per class is appended,
  the lot goes through a few transformer blocks and a LayerNorm; patch and class embeddings are
  projected, L2-normalised, and their scalar products are the class masks, normalised over the
  classes by a LayerNorm ("mask norm").

The Segmenter ViTs are the AugReg checkpoints, which normalise pixels with mean = std = 127.5
(0.5 on the 0-1 scale): that is the default here, and it travels in a native checkpoint's
metadata. Two checkpoint layouts load (mappings next to the loaders below): mmsegmentation's
(VisionTransformer + SegmenterMaskTransformerHead, or FCNHead with num_convs=0 for linear) and
the original repository's (rstrudel/segmenter: checkpoint.pth with "model": encoder.*, decoder.*).
They differ in more than names: the original uses LayerNorm eps 1e-5 in the encoder and
bilinear position-embedding resizing, mmseg eps 1e-6 and bicubic; both are kept in the arch.

The file reads top to bottom: the decoders, the model, the key tables of both layouts and the
code that reads them, then the family's contract: the named variants, `from_mmseg` and `CONTRACT`.
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
    CheckpointError,
    FamilyContract,
    SegmentationModel,
    load_weights,
    rename_keys,
)
from models.vit import (
    SIZES,
    Block,
    ViTConfig,
    ViTEncoder,
    config_from_weights,
    encoder_from_mmseg,
    encoder_from_timm,
    mmseg_block_rules,
    strip_prefix,
    vit_config,
)

DECODERS = ("linear", "mask")
AUGREG_MEAN = (127.5, 127.5, 127.5)
AUGREG_STD = (127.5, 127.5, 127.5)


# --------------------------------------------------------------------------------------------
# Decoders
# --------------------------------------------------------------------------------------------


class LinearDecoder(nn.Module):
    """A linear classifier on each patch token."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MaskTransformerDecoder(nn.Module):
    """Class embeddings processed jointly with the patch tokens; masks by cosine similarity."""

    def __init__(self, in_channels: int, num_classes: int, dim: int, depth: int, num_heads: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(in_channels, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, 4.0, True, norm_eps) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.proj_patch = nn.Linear(dim, dim, bias=False)
        self.proj_classes = nn.Linear(dim, dim, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes, eps=norm_eps)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, _, height, width = features.shape
        x = self.proj_dec(features.flatten(2).transpose(1, 2))  # N x hw x dim
        x = torch.cat([x, self.cls_emb.expand(n, -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches = F.normalize(self.proj_patch(x[:, : -self.num_classes]), dim=-1)
        classes = F.normalize(self.proj_classes(x[:, -self.num_classes :]), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # N x hw x C
        return masks.transpose(1, 2).reshape(n, self.num_classes, height, width)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class Segmenter(SegmentationModel):
    """ViT encoder + linear or mask-transformer decoder; scores at stride 16 (the patch grid)."""

    family = "segmenter"

    def __init__(
        self,
        num_classes: int,
        decoder: str = "mask",
        encoder: dict[str, Any] | None = None,
        decoder_depth: int = 2,
        decoder_heads: int | None = None,  # the original: embed_dim // 64, as mmseg's configs
        decoder_norm_eps: float = 1e-5,
        pixel_mean: tuple[float, float, float] = AUGREG_MEAN,
        pixel_std: tuple[float, float, float] = AUGREG_STD,
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"unknown Segmenter decoder {decoder!r}; known: {', '.join(DECODERS)}")
        config = ViTConfig.from_dict(encoder) if encoder is not None else segmenter_encoder("base")
        if decoder_heads is None:
            decoder_heads = max(1, config.embed_dim // 64)
        super().__init__(
            arch=dict(
                num_classes=num_classes,
                decoder=decoder,
                encoder=config.to_dict(),
                decoder_depth=decoder_depth,
                decoder_heads=decoder_heads,
                decoder_norm_eps=decoder_norm_eps,
                pixel_mean=list(pixel_mean),
                pixel_std=list(pixel_std),
            ),
            num_classes=num_classes,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        self.encoder = ViTEncoder(config)
        if decoder == "linear":
            self.decoder = LinearDecoder(config.embed_dim, num_classes)
        else:
            dim = config.embed_dim
            self.decoder = MaskTransformerDecoder(dim, num_classes, dim, decoder_depth, decoder_heads, decoder_norm_eps)
        self.output_stride = config.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        scores = self.decoder(self.encoder(pixels, [-1])[0])
        stride = self.output_stride
        return scores[..., : math.ceil(height / stride), : math.ceil(width / stride)]


def segmenter_encoder(size: str, **overrides: Any) -> ViTConfig:
    """The ViT of mmseg's Segmenter configs: LN eps 1e-6, final norm, bicubic position resizing,
    512x512 training crops (a 32x32 position grid; Seg-L was trained at 640, and its checkpoint's
    own grid is read when it loads)."""
    settings = dict(final_norm=True, pos_interpolation="bicubic", norm_eps=1e-6, pos_grid=(32, 32))
    return vit_config(size, **{**settings, **overrides})


# --------------------------------------------------------------------------------------------
# Checkpoints: mmsegmentation and the original repository
# --------------------------------------------------------------------------------------------
# mmseg (configs/segmenter/*): backbone.* is the ViT (models/vit.py MMSEG_RULES, final norm ln1).
#   SegmenterMaskTransformerHead                 ours
#   decode_head.dec_proj                           decoder.proj_dec
#   decode_head.cls_emb                            decoder.cls_emb
#   decode_head.layers.N.*  (TransformerEncoderLayer, as the backbone's)  decoder.blocks.N.*
#   decode_head.decoder_norm                       decoder.decoder_norm
#   decode_head.patch_proj.weight                  decoder.proj_patch.weight
#   decode_head.classes_proj.weight                decoder.proj_classes.weight
#   decode_head.mask_norm                          decoder.mask_norm
#   decode_head.conv_seg.*                         ignored (BaseDecodeHead builds it; unused)
#   FCNHead(num_convs=0, concat_input=False), the linear decoder:
#   decode_head.conv_seg.weight  C x D x 1 x 1     decoder.head.weight  C x D
#   decode_head.conv_seg.bias                      decoder.head.bias
# original (segm/model/{vit,decoder}.py; checkpoint.pth holds it under "model"):
#   encoder.*  timm's ViT names (models/vit.py TIMM_RULES); encoder.head.* (ImageNet) ignored
#   decoder.head.*  (DecoderLinear)                decoder.head.*
#   decoder.proj_dec, cls_emb, blocks.N.* (timm block names), decoder_norm, mask_norm: same names
#   decoder.proj_patch      a D x D parameter used as x @ P     decoder.proj_patch.weight = P^T
#   decoder.proj_classes    likewise                            decoder.proj_classes.weight = P^T
#   DeiT variants (encoder.dist_token) are not supported.
MMSEG_MASK_RULES = [
    (r"decode_head\.dec_proj\.(weight|bias)", r"decoder.proj_dec.\1"),
    (r"decode_head\.cls_emb", "decoder.cls_emb"),
    *mmseg_block_rules(r"decode_head\.layers", "decoder.blocks"),
    (r"decode_head\.decoder_norm\.(weight|bias)", r"decoder.decoder_norm.\1"),
    (r"decode_head\.patch_proj\.weight", "decoder.proj_patch.weight"),
    (r"decode_head\.classes_proj\.weight", "decoder.proj_classes.weight"),
    (r"decode_head\.mask_norm\.(weight|bias)", r"decoder.mask_norm.\1"),
]
MMSEG_MASK_IGNORED = [r"decode_head\.conv_seg\.(weight|bias)"]
MMSEG_LINEAR_RULES = [(r"decode_head\.conv_seg\.(weight|bias)", r"decoder.head.\1")]

ORIGINAL_MASK_RULES = [
    (r"decoder\.(proj_dec|decoder_norm|mask_norm)\.(weight|bias)", r"decoder.\1.\2"),
    (r"decoder\.cls_emb", "decoder.cls_emb"),
    (r"decoder\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"decoder.blocks.\1.\2.\3"),
    (r"decoder\.(proj_patch|proj_classes)", r"decoder.\1.weight"),  # transposed below
]
ORIGINAL_LINEAR_RULES = [(r"decoder\.head\.(weight|bias)", r"decoder.head.\1")]


def parse_name(name: str) -> tuple[str, str]:
    """'segmenter-mask-vit-small' -> ('mask', 'small')."""
    parts = name.split("-")
    if len(parts) != 4 or parts[0] != "segmenter" or parts[1] not in DECODERS or parts[2] != "vit" or parts[3] not in SIZES:
        raise CheckpointError(f"{name!r} is not a Segmenter name (segmenter-{{{','.join(DECODERS)}}}-vit-{{{','.join(SIZES)}}})")
    return parts[1], parts[3]


def _from_mmseg_layout(name: str, num_classes: int, state_dict: dict[str, torch.Tensor], origin: str | None = None) -> Segmenter:
    decoder, size = parse_name(name)
    origin = origin or f"mmseg checkpoint for {name}"
    encoder_weights = encoder_from_mmseg(strip_prefix(state_dict, "backbone."), origin)
    config = _encoder_config(encoder_weights, size, origin, norm_eps=1e-6, pos_interpolation="bicubic")
    heads = {k: v for k, v in state_dict.items() if not k.startswith(("backbone.", "auxiliary_head."))}
    if decoder == "mask":
        decoder_weights = rename_keys(heads, MMSEG_MASK_RULES, ignored=MMSEG_MASK_IGNORED, origin=origin, layout="Segmenter")
    else:
        decoder_weights = rename_keys(heads, MMSEG_LINEAR_RULES, origin=origin, layout="Segmenter")
        weight = decoder_weights.get("decoder.head.weight")
        if weight is not None and weight.dim() == 4:
            decoder_weights["decoder.head.weight"] = weight.flatten(1)  # a 1x1 conv is a linear layer
    return _build(name, decoder, num_classes, config, encoder_weights, decoder_weights, origin, decoder_norm_eps=1e-5)


def from_original(name: str, num_classes: int, state_dict: dict[str, torch.Tensor], origin: str | None = None) -> Segmenter:
    """A Segmenter from rstrudel/segmenter's state dict (encoder.*, decoder.*)."""
    decoder, size = parse_name(name)
    origin = origin or f"original Segmenter checkpoint for {name}"
    if "encoder.dist_token" in state_dict:
        raise CheckpointError(f"{origin}: DeiT (distilled) encoders are not supported")
    encoder_weights = encoder_from_timm(strip_prefix(state_dict, "encoder."), origin)
    # segm/model/blocks.py uses nn.LayerNorm's default eps and segm/model/utils.py resizes bilinearly
    config = _encoder_config(encoder_weights, size, origin, norm_eps=1e-5, pos_interpolation="bilinear")
    heads = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
    rules = ORIGINAL_MASK_RULES if decoder == "mask" else ORIGINAL_LINEAR_RULES
    decoder_weights = rename_keys(heads, rules, origin=origin, layout="original Segmenter")
    for key in ("decoder.proj_patch.weight", "decoder.proj_classes.weight"):
        if key in decoder_weights:
            decoder_weights[key] = decoder_weights[key].t().contiguous()
    return _build(name, decoder, num_classes, config, encoder_weights, decoder_weights, origin, decoder_norm_eps=1e-5)


def _encoder_config(weights: dict[str, torch.Tensor], size: str, origin: str, **fixed: Any) -> ViTConfig:
    config = config_from_weights(weights, num_heads=SIZES[size]["num_heads"], **fixed)
    if config.embed_dim != SIZES[size]["embed_dim"]:
        raise CheckpointError(f"{origin}: the encoder is {config.embed_dim} wide, ViT-{size} is {SIZES[size]['embed_dim']}")
    if not config.final_norm:
        raise CheckpointError(f"{origin}: the encoder has no final norm; Segmenter's has one")
    return config


def _build(
    name: str,
    decoder: str,
    num_classes: int,
    config: ViTConfig,
    encoder_weights: dict[str, torch.Tensor],
    decoder_weights: dict[str, torch.Tensor],
    origin: str,
    decoder_norm_eps: float,
) -> Segmenter:
    kwargs: dict[str, Any] = {}
    if decoder == "mask":
        if "decoder.cls_emb" not in decoder_weights:
            raise CheckpointError(f"{origin}: no class embeddings: not a mask-transformer decoder")
        classes = decoder_weights["decoder.cls_emb"].shape[1]
        kwargs["decoder_depth"] = len({k.split(".")[2] for k in decoder_weights if k.startswith("decoder.blocks.")})
        dim = decoder_weights["decoder.cls_emb"].shape[2]
        if dim != config.embed_dim:
            raise CheckpointError(f"{origin}: a {dim}-wide decoder on a {config.embed_dim}-wide encoder is not supported")
        kwargs["decoder_heads"] = max(1, dim // 64)
    else:
        if "decoder.head.weight" not in decoder_weights:
            raise CheckpointError(f"{origin}: no linear classifier: not a linear decoder")
        classes = decoder_weights["decoder.head.weight"].shape[0]
    if classes != num_classes:
        raise CheckpointError(f"{origin}: the decoder has {classes} classes, not {num_classes}")
    model = Segmenter(num_classes=num_classes, decoder=decoder, encoder=config.to_dict(), decoder_norm_eps=decoder_norm_eps, **kwargs)
    model.name = name
    return load_weights(model, {**{f"encoder.{k}": v for k, v in encoder_weights.items()}, **decoder_weights}, origin)


# --------------------------------------------------------------------------------------------
# The contract: named variants, the loader of both checkpoint layouts, and what the registry reads
# --------------------------------------------------------------------------------------------

_VIT_FIELDS = {f.name for f in fields(ViTConfig)}


def _variant(decoder: str, size: str) -> Callable[..., Segmenter]:
    def build(num_classes: int = 150, **overrides: Any) -> Segmenter:
        encoder = {k: overrides.pop(k) for k in list(overrides) if k in _VIT_FIELDS}
        return Segmenter(num_classes=num_classes, decoder=decoder, encoder=segmenter_encoder(size, **encoder).to_dict(), **overrides)

    build.__name__ = f"segmenter_{decoder}_vit_{size}"
    return build


VARIANTS: dict[str, Callable[..., Segmenter]] = {
    f"segmenter-{decoder}-vit-{size}": _variant(decoder, size) for decoder in DECODERS for size in SIZES
}


def from_mmseg(name: str, num_classes: int, state_dict: dict[str, torch.Tensor], origin: str | None = None) -> Segmenter:
    """A Segmenter from an mmsegmentation state dict, or from the original repository's checkpoint.

    Both come through `load_model(path.pth, name=..., num_classes=...)`; the keys tell them apart
    (backbone.* for mmseg; encoder.* and decoder.*, possibly under "model", for the original).
    `origin` names the checkpoint in errors.
    """
    if isinstance(state_dict.get("model"), dict):  # the original checkpoint.pth: model, optimizer, epoch...
        state_dict = state_dict["model"]
    if any(k.startswith("backbone.") for k in state_dict):
        return _from_mmseg_layout(name, num_classes, state_dict, origin)
    if any(k.startswith("encoder.") for k in state_dict):
        return from_original(name, num_classes, state_dict, origin)
    raise CheckpointError(f"{origin or f'checkpoint for {name}'}: neither mmseg (backbone.*) nor original Segmenter (encoder.*) keys")


# no HF model_type: transformers has no Segmenter; from_mmseg also reads the original repository's checkpoint.pth
CONTRACT = FamilyContract(model=Segmenter, variants=VARIANTS, from_mmseg=from_mmseg)
