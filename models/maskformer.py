"""MaskFormer (Cheng et al. 2021, "Per-Pixel Classification is Not All You Need") with a Swin backbone.

Mask classification: a transformer decoder turns Q learned queries into Q (class distribution, mask
embedding) pairs; each mask is the dot product of its embedding with per-pixel embeddings from an
FPN pixel decoder at 1/4 of the input resolution.

    pixels -> Swin (strides 4..32) -> FPN -> per-pixel embeddings  E   (mask_dim x H/4 x W/4)
                          \\-> stride-32 map -> DETR decoder over Q queries -> class logits (Q x C+1)
                                                                           -> mask embeddings (Q x mask_dim)
    mask logits = <mask embedding, E>;  semantic scores = sum_q softmax(class)[:C] * sigmoid(mask)

`forward` returns the semantic score map at the mask resolution (ceil(H/4) x ceil(W/4));
`forward_queries` the raw (class_logits N x Q x (C+1), mask_logits N x Q x h x w).

The file reads top to bottom: MaskFormer's own parts (the FPN pixel decoder, the DETR decoder
layer), the model, the HF key table, then its contract: the named variants, `from_hf` and
`CONTRACT`. What it shares with Mask2Former (position embedding, conv + GroupNorm, attention, the
MLP head, the semantic combination, HF config parsing) is in models/mask_classification.py.
"""

from __future__ import annotations

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
    building_from,
    load_weights,
)
from models.mask_classification import (
    HF_BACKBONE,
    ConvNorm,
    DetrDecoderLayer,
    MLPHead,
    check_activation,
    hf_swin_arch,
    num_labels,
    semantic_scores,
    sine_position_embedding,
    swin_variants,
    weights_from_hf,
)
from models.swin import SwinBackbone, channels_last_conv, swin_arch

# ---------------------------------------------------------------------------------------------
# MaskFormer's parts
# ---------------------------------------------------------------------------------------------


class FPNPixelDecoder(nn.Module):
    """Top-down FPN over the backbone maps, then a 3x3 projection to the per-pixel mask embeddings."""

    def __init__(self, in_channels: list[int], dim: int, mask_dim: int) -> None:
        super().__init__()
        self.stem = ConvNorm(in_channels[-1], dim, 3, relu=True)
        # from the stride-16 map down to the stride-4 map
        self.laterals = nn.ModuleList(ConvNorm(ch, dim, 1, relu=False) for ch in reversed(in_channels[:-1]))
        self.outputs = nn.ModuleList(ConvNorm(dim, dim, 3, relu=True) for _ in in_channels[:-1])
        self.mask_projection = nn.Conv2d(dim, mask_dim, kernel_size=3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """-> the FPN's stride-4 map, before `mask_projection` (which MaskFormer.predict_masks
        applies, folded into the mask embeddings)."""
        x = self.stem(features[-1])
        for lateral, output, feature in zip(self.laterals, self.outputs, reversed(features[:-1])):
            skip = lateral(feature)
            x = output(skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest"))
        return x


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class MaskFormer(SegmentationModel):
    family = "maskformer"
    score_kind = "probabilities"  # softmax over classes x sigmoid masks, summed over queries

    def __init__(
        self,
        num_classes: int = 150,
        swin: dict[str, Any] | None = None,
        fpn_dim: int = 256,
        mask_dim: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        num_layers: int = 6,
        ffn_dim: int = 2048,
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        swin = dict(swin) if swin is not None else swin_arch("tiny")
        arch = dict(
            num_classes=num_classes,
            swin=swin,
            fpn_dim=fpn_dim,
            mask_dim=mask_dim,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            num_layers=num_layers,
            ffn_dim=ffn_dim,
            pixel_mean=list(pixel_mean),
            pixel_std=list(pixel_std),
        )
        super().__init__(arch=arch, num_classes=num_classes, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.backbone = SwinBackbone(**swin)
        channels = self.backbone.channels
        self.pixel_decoder = FPNPixelDecoder(channels, fpn_dim, mask_dim)
        # the stride-32 map enters the decoder projected to its width (when the widths differ)
        self.input_projection = nn.Conv2d(channels[-1], hidden_dim, 1) if channels[-1] != hidden_dim else nn.Identity()
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.decoder_layers = nn.ModuleList(DetrDecoderLayer(hidden_dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)  # + the no-object class
        self.mask_embed = MLPHead(hidden_dim, hidden_dim, mask_dim)

    def predict_masks(self, mask_embeddings: torch.Tensor, fpn_map: torch.Tensor) -> torch.Tensor:
        """mask logits N x Q x h x w: <mask embedding, mask_projection(fpn_map)> at every pixel.

        The 3x3 projection and the dot product are both linear: per image they are one 3x3 conv
        with Q outputs, weights mask_embedding @ projection weights (computed in fp32). That conv
        does Q/mask_dim of the projection's work and leaves out its mask_dim x h x w map.
        """
        projection = self.pixel_decoder.mask_projection
        with torch.autocast(fpn_map.device.type, enabled=False):
            embeddings = mask_embeddings.float()
            weights = torch.einsum("nqc,cikl->nqikl", embeddings, projection.weight.float())
            biases = embeddings @ projection.bias.float()
        # channels-last weights for the channels-last map (see models/swin.py channels_last_conv)
        masks = [
            F.conv2d(
                fpn_map[i : i + 1],
                weight.to(fpn_map.dtype).contiguous(memory_format=torch.channels_last),
                bias.to(fpn_map.dtype),
                padding=projection.padding,
            )
            for i, (weight, bias) in enumerate(zip(weights, biases))
        ]
        return torch.cat(masks)

    def forward_queries(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(pixels)
        fpn_map = self.pixel_decoder(features)
        memory = features[-1] if isinstance(self.input_projection, nn.Identity) else channels_last_conv(self.input_projection, features[-1])
        n, dim, height, width = memory.shape
        memory_pos = sine_position_embedding(height, width, dim, memory.device, memory.dtype).flatten(1).T[None]
        memory = memory.flatten(2).transpose(1, 2)
        query_pos = self.query_embed.weight[None].expand(n, -1, -1)
        x = torch.zeros_like(query_pos)  # the queries start empty: their identity is the position
        for layer in self.decoder_layers:
            x = layer(x, query_pos, memory, memory_pos)
        x = self.decoder_norm(x)
        return self.class_head(x), self.predict_masks(self.mask_embed(x), fpn_map)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return semantic_scores(*self.forward_queries(pixels))


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints (MaskFormerForInstanceSegmentation, model_type "maskformer")
# ---------------------------------------------------------------------------------------------
#
# The Swin backbone: see models/swin.py (prefix model.pixel_level_module.encoder., body under .model.).
# HF key                                                                   ours
# model.pixel_level_module.decoder.fpn.stem.{0,1}.*                        pixel_decoder.stem.{conv,norm}.*
# model.pixel_level_module.decoder.fpn.layers.i.proj.{0,1}.*               pixel_decoder.laterals.i.{conv,norm}.*
# model.pixel_level_module.decoder.fpn.layers.i.block.{0,1}.*              pixel_decoder.outputs.i.{conv,norm}.*
# model.pixel_level_module.decoder.mask_projection.*                       pixel_decoder.mask_projection.*
# model.transformer_module.input_projection.*                              input_projection.*
# model.transformer_module.queries_embedder.weight                         query_embed.weight
# model.transformer_module.decoder.layers.i.self_attn.{q,k,v}_proj.*       decoder_layers.i.self_attn.{q,k,v}_proj.*
# model.transformer_module.decoder.layers.i.self_attn.out_proj.*           decoder_layers.i.self_attn.out_proj.*
# model.transformer_module.decoder.layers.i.encoder_attn.*                 decoder_layers.i.cross_attn.*
# model.transformer_module.decoder.layers.i.self_attn_layer_norm.*         decoder_layers.i.norm1.*
# model.transformer_module.decoder.layers.i.encoder_attn_layer_norm.*      decoder_layers.i.norm2.*
# model.transformer_module.decoder.layers.i.fc{1,2}.*                      decoder_layers.i.mlp.fc{1,2}.*
# model.transformer_module.decoder.layers.i.final_layer_norm.*             decoder_layers.i.norm3.*
# model.transformer_module.decoder.layernorm.*                             decoder_norm.*
# class_predictor.*                                                        class_head.*
# mask_embedder.i.0.*                                                      mask_embed.layers.i.*
# dropped: criterion.empty_weight (the loss's class weights).
# transformers 5's in-memory names (o_proj for out_proj, mlp.fc1 for fc1) are accepted too.

_PIXEL = r"model\.pixel_level_module\.decoder\."
_DECODER = r"model\.transformer_module\.decoder\."
_HF_RULES: list[tuple[str, str]] = [
    (_PIXEL + r"fpn\.stem\.0\.(.+)", r"pixel_decoder.stem.conv.\1"),
    (_PIXEL + r"fpn\.stem\.1\.(.+)", r"pixel_decoder.stem.norm.\1"),
    (_PIXEL + r"fpn\.layers\.(\d+)\.proj\.0\.(.+)", r"pixel_decoder.laterals.\1.conv.\2"),
    (_PIXEL + r"fpn\.layers\.(\d+)\.proj\.1\.(.+)", r"pixel_decoder.laterals.\1.norm.\2"),
    (_PIXEL + r"fpn\.layers\.(\d+)\.block\.0\.(.+)", r"pixel_decoder.outputs.\1.conv.\2"),
    (_PIXEL + r"fpn\.layers\.(\d+)\.block\.1\.(.+)", r"pixel_decoder.outputs.\1.norm.\2"),
    (_PIXEL + r"mask_projection\.(.+)", r"pixel_decoder.mask_projection.\1"),
    (r"model\.transformer_module\.input_projection\.(.+)", r"input_projection.\1"),
    (r"model\.transformer_module\.queries_embedder\.(.+)", r"query_embed.\1"),
    (_DECODER + r"layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(.+)", r"decoder_layers.\1.self_attn.\2_proj.\3"),
    (_DECODER + r"layers\.(\d+)\.self_attn\.(?:out|o)_proj\.(.+)", r"decoder_layers.\1.self_attn.out_proj.\2"),
    (_DECODER + r"layers\.(\d+)\.encoder_attn\.(q|k|v)_proj\.(.+)", r"decoder_layers.\1.cross_attn.\2_proj.\3"),
    (_DECODER + r"layers\.(\d+)\.encoder_attn\.(?:out|o)_proj\.(.+)", r"decoder_layers.\1.cross_attn.out_proj.\2"),
    (_DECODER + r"layers\.(\d+)\.self_attn_layer_norm\.(.+)", r"decoder_layers.\1.norm1.\2"),
    (_DECODER + r"layers\.(\d+)\.encoder_attn_layer_norm\.(.+)", r"decoder_layers.\1.norm2.\2"),
    (_DECODER + r"layers\.(\d+)\.(?:mlp\.)?fc(1|2)\.(.+)", r"decoder_layers.\1.mlp.fc\2.\3"),
    (_DECODER + r"layers\.(\d+)\.final_layer_norm\.(.+)", r"decoder_layers.\1.norm3.\2"),
    (_DECODER + r"layernorm\.(.+)", r"decoder_norm.\1"),
    (r"class_predictor\.(.+)", r"class_head.\1"),
    (r"mask_embedder\.(\d+)\.0\.(.+)", r"mask_embed.layers.\1.\2"),
]


# ---------------------------------------------------------------------------------------------
# The contract: named variants (the ADE20K models of the MaskFormer paper: 150 classes, 100 queries,
# 256 wide, 6 decoder layers), the HF loader, and what the registry reads
# ---------------------------------------------------------------------------------------------


VARIANTS = swin_variants(MaskFormer, "maskformer")


def from_hf(config: dict, state_dict: dict[str, torch.Tensor], origin: str = "maskformer checkpoint") -> MaskFormer:
    """MaskFormerForInstanceSegmentation (config.json + weights) -> MaskFormer; `origin` names the
    checkpoint in errors."""
    with building_from(origin, "config.json"):
        swin = hf_swin_arch(config, "maskformer")
        decoder = config.get("decoder_config") or {}
        if decoder.get("model_type", "detr") != "detr":
            raise CheckpointError(f"MaskFormer decoder {decoder.get('model_type')!r} is not supported: only detr")
        check_activation(decoder, "activation_function")
        model = MaskFormer(
            num_classes=num_labels(config, state_dict, "class_predictor.weight"),
            swin=swin,
            fpn_dim=int(config.get("fpn_feature_size", 256)),
            mask_dim=int(config.get("mask_feature_size", 256)),
            hidden_dim=int(decoder.get("d_model", 256)),
            num_queries=int(decoder.get("num_queries", 100)),
            num_heads=int(decoder.get("decoder_attention_heads", 8)),
            num_layers=int(decoder.get("decoder_layers", 6)),
            ffn_dim=int(decoder.get("decoder_ffn_dim", 2048)),
        )
    weights = weights_from_hf(state_dict, _HF_RULES, swin_body=HF_BACKBONE + "model.", origin=origin)
    return load_weights(model, weights, origin, "the MaskFormer that config.json describes")


# no mmsegmentation layout: MaskFormer checkpoints come from transformers (or detectron2, not supported)
CONTRACT = FamilyContract(model=MaskFormer, variants=VARIANTS, hf_model_types=("maskformer",), from_hf=from_hf)
