"""DETR (Carion et al. 2020, "End-to-End Object Detection with Transformers") with its panoptic head.

Object queries, each a class distribution, a box and (through the panoptic head) a mask:

    pixels -> ResNet (frozen batch norm) -> C2, C3, C4, C5 (strides 4, 8, 16, 32)
    C5 -> 1x1 projection P -> transformer encoder (sine positions) -> memory M (d x H/32 x W/32)
    Q queries -> transformer decoder over M -> class logits (Q x C+1), boxes (Q x 4: cx, cy, w, h)
    panoptic head: each query's attention maps over M (heads x H/32 x W/32), stacked on P,
                   upsampled through C4, C3, C2 -> mask logits (Q x H/4 x W/4)
    semantic scores = sum_q softmax(class)[:C] * sigmoid(mask), as MaskFormer's

Facts that matter for parity with transformers' DetrForSegmentation:
- batch norm is frozen (statistics and affine terms are buffers), eps 1e-5;
- the stride-2 ResNet blocks stride in their 3x3 conv (torchvision's and timm's ResNet-50);
- the sine positions are normalised over the feature map (every pixel valid: no padding mask, as
  transformers with a pixel_mask of ones), and the mask head's softmax runs over heads and
  positions together; the mask head starts from P (the projected C5), not from M;
- mask logits come at C2's resolution: ceil(H/4) x ceil(W/4) for any H, W (convs pad, nothing
  needs a multiple of 32).

`forward` returns the semantic score map at the mask resolution; `forward_queries` the raw
(class_logits N x Q x (C+1), mask_logits N x Q x h x w), as models/maskformer.py's;
`forward_objects` adds the boxes.

The file reads top to bottom: the ResNet backbone, the transformer layers, the panoptic head, the
model, the HF key table, then the contract: the named variant, `from_hf` and `CONTRACT`. The
position embedding, attention, feed-forward, MLP head and the semantic combination come from
models/mask_classification.py.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckpointError,
    FamilyContract,
    Rule,
    SegmentationModel,
    building_from,
    load_weights,
    rename_keys,
)
from models.mask_classification import (
    Attention,
    DetrDecoderLayer,
    Mlp,
    MLPHead,
    check_activation,
    num_labels,
    semantic_scores,
    sine_position_embedding,
)

# ---------------------------------------------------------------------------------------------
# The backbone: a bottleneck ResNet with frozen batch norm
# ---------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms, all buffers: DETR never trains them."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


class ConvFrozenNorm(nn.Module):
    """Conv (no bias) + frozen batch norm (+ ReLU): the ResNet unit."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.norm = FrozenBatchNorm2d(out_ch)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    """1x1 reduce to a quarter of the width, 3x3 (the stride is here), 1x1 expand, plus the shortcut
    (projected where the width or the stride changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        mid = out_ch // 4
        self.reduce = ConvFrozenNorm(in_ch, mid, 1)
        self.spatial = ConvFrozenNorm(mid, mid, 3, stride=stride)
        self.expand = ConvFrozenNorm(mid, out_ch, 1, relu=False)
        self.shortcut = ConvFrozenNorm(in_ch, out_ch, 1, stride=stride, relu=False) if in_ch != out_ch or stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(self.expand(self.spatial(self.reduce(x))) + shortcut)


class ResNet(nn.Module):
    """7x7 stride-2 stem and 3x3 stride-2 max pool, then four stages of bottleneck blocks (the first
    at stride 1, the others halving the resolution); returns C2..C5 (strides 4, 8, 16, 32)."""

    def __init__(self, stem_width: int, widths: list[int], depths: list[int]) -> None:
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError(f"a ResNet has 4 stages: widths {widths}, depths {depths}")
        self.stem = ConvFrozenNorm(3, stem_width, 7, stride=2)
        self.stages = nn.ModuleList()
        in_ch = stem_width
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            self.stages.append(
                nn.Sequential(*(Bottleneck(in_ch if j == 0 else width, width, stride if j == 0 else 1) for j in range(depth)))
            )
            in_ch = width
        self.channels = list(widths)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(self.stem(pixels), kernel_size=3, stride=2, padding=1)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


# ---------------------------------------------------------------------------------------------
# The transformer: post-norm encoder and decoder layers
# ---------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """Self-attention over the image tokens (positions go into queries and keys, never values),
    then the feed-forward; each followed by its residual and LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, ffn_dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos
        x = self.norm1(x + self.self_attn(q, q, x))
        return self.norm2(x + self.mlp(x))


# ---------------------------------------------------------------------------------------------
# The panoptic head: per-query attention maps, then a small FPN-style conv head to stride 4
# ---------------------------------------------------------------------------------------------


class AttentionMaps(nn.Module):
    """DETR's MHAttentionMap: each query's attention weights over the encoder memory, per head, with
    no values. The softmax runs over heads and positions together, as DETR's does."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """queries N x Q x d, memory N x d x h x w -> N x Q x heads x h x w."""
        n, num_queries, _ = queries.shape
        height, width = memory.shape[-2:]
        q = self.q_proj(queries).view(n, num_queries, self.num_heads, -1)
        k = F.conv2d(memory, self.k_proj.weight[:, :, None, None], self.k_proj.bias).view(n, self.num_heads, -1, height, width)
        logits = torch.einsum("nqmc,nmchw->nqmhw", q * self.scale, k)
        return logits.flatten(2).softmax(dim=-1).view_as(logits)


class ConvGroupNorm(nn.Module):
    """3x3 conv (with bias) + GroupNorm(min(8, channels)) + ReLU: the mask head's unit."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, out_ch), out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class FusionStage(nn.Module):
    """Upsample (nearest) to the next backbone map, add that map through a 1x1 adapter, refine."""

    def __init__(self, skip_ch: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.adapter = nn.Conv2d(skip_ch, in_ch, 1)
        self.refine = ConvGroupNorm(in_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, num_queries: int) -> torch.Tensor:
        # the adapter runs once per image, before the per-query copies: the same numbers, Q times less work
        skip = _per_query(self.adapter(skip), num_queries)
        return self.refine(skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest"))


def _per_query(x: torch.Tensor, num_queries: int) -> torch.Tensor:
    """N x ... -> (N * Q) x ...: each image's map once per query, query-minor."""
    return x.unsqueeze(1).expand(-1, num_queries, *x.shape[1:]).flatten(0, 1)


class MaskHead(nn.Module):
    """DETR's MaskHeadSmallConv: [projected C5, the query's attention maps] -> two convs, then
    fusion with C4, C3, C2 while the width halves (d/2 -> d/4 -> d/8 -> d/16) -> one mask logit
    per pixel at C2's resolution. Every query is a batch item of its own."""

    def __init__(self, in_ch: int, skip_channels: list[int], dim: int) -> None:
        super().__init__()
        if in_ch % 8:
            raise ValueError(f"the mask head's input width {in_ch} (width + heads) is not a multiple of 8")
        self.conv1 = ConvGroupNorm(in_ch, in_ch)
        self.conv2 = ConvGroupNorm(in_ch, dim // 2)
        self.stages = nn.ModuleList(FusionStage(skip, dim // 2 ** (i + 1), dim // 2 ** (i + 2)) for i, skip in enumerate(skip_channels))
        self.output = nn.Conv2d(dim // 16, 1, 3, padding=1)

    def forward(self, features: torch.Tensor, attention_maps: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """features N x d x h x w, attention_maps N x Q x heads x h x w, skips [C4, C3, C2]
        -> mask logits N x Q x H/4 x W/4."""
        n = attention_maps.shape[0]
        if n > 1 and features.device.type == "cpu" and not torch.compiler.is_compiling():
            # on a CPU one image's queries at a time: N * Q maps at stride 4 at once (840 MB for 8
            # images at 512 x 512) ran 1.8x slower per image than one image's 100
            return torch.cat(
                [self.forward(features[i : i + 1], attention_maps[i : i + 1], [s[i : i + 1] for s in skips]) for i in range(n)]
            )
        num_queries = attention_maps.shape[1]
        x = torch.cat((_per_query(features, num_queries), attention_maps.flatten(0, 1)), dim=1)
        x = self.conv2(self.conv1(x))
        for stage, skip in zip(self.stages, skips):
            x = stage(x, skip, num_queries)
        x = self.output(x)
        return x.view(n, num_queries, *x.shape[-2:])


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

RESNET50 = dict(stem_width=64, widths=[256, 512, 1024, 2048], depths=[3, 4, 6, 3])


class DETR(SegmentationModel):
    family = "detr"
    score_kind = "probabilities"  # softmax over classes x sigmoid masks, summed over queries

    def __init__(
        self,
        num_classes: int = 250,
        stem_width: int = RESNET50["stem_width"],
        widths: list[int] | tuple[int, ...] = tuple(RESNET50["widths"]),
        depths: list[int] | tuple[int, ...] = tuple(RESNET50["depths"]),
        hidden_dim: int = 256,
        num_queries: int = 100,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        encoder_heads: int = 8,
        decoder_heads: int = 8,
        encoder_ffn_dim: int = 2048,
        decoder_ffn_dim: int = 2048,
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        arch = dict(
            num_classes=num_classes,
            stem_width=stem_width,
            widths=list(widths),
            depths=list(depths),
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            encoder_layers=encoder_layers,
            decoder_layers=decoder_layers,
            encoder_heads=encoder_heads,
            decoder_heads=decoder_heads,
            encoder_ffn_dim=encoder_ffn_dim,
            decoder_ffn_dim=decoder_ffn_dim,
            pixel_mean=list(pixel_mean),
            pixel_std=list(pixel_std),
        )
        super().__init__(arch=arch, num_classes=num_classes, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.backbone = ResNet(stem_width, list(widths), list(depths))
        self.input_projection = nn.Conv2d(widths[-1], hidden_dim, 1)
        self.encoder_layers = nn.ModuleList(EncoderLayer(hidden_dim, encoder_heads, encoder_ffn_dim) for _ in range(encoder_layers))
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.decoder_layers = nn.ModuleList(DetrDecoderLayer(hidden_dim, decoder_heads, decoder_ffn_dim) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)  # + the no-object class
        self.box_head = MLPHead(hidden_dim, hidden_dim, 4)
        # the panoptic head: attention maps with the encoder's head count, skips from C4 down to C2
        self.bbox_attention = AttentionMaps(hidden_dim, encoder_heads)
        self.mask_head = MaskHead(hidden_dim + encoder_heads, [widths[2], widths[1], widths[0]], hidden_dim)

    def forward_objects(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class_logits N x Q x (C+1), mask_logits N x Q x h x w, boxes N x Q x 4): the boxes are
        (cx, cy, w, h) in [0, 1], relative to the input."""
        c2, c3, c4, c5 = self.backbone(pixels)
        projected = self.input_projection(c5)
        n, dim, height, width = projected.shape
        pos = sine_position_embedding(height, width, dim, projected.device, projected.dtype).flatten(1).T[None]
        memory = projected.flatten(2).transpose(1, 2)
        for layer in self.encoder_layers:
            memory = layer(memory, pos)
        query_pos = self.query_embed.weight[None].expand(n, -1, -1)
        x = torch.zeros_like(query_pos)  # the queries start empty: their identity is the position
        for layer in self.decoder_layers:
            x = layer(x, query_pos, memory, pos)
        x = self.decoder_norm(x)
        attention_maps = self.bbox_attention(x, memory.transpose(1, 2).reshape(n, dim, height, width))
        mask_logits = self.mask_head(projected, attention_maps, [c4, c3, c2])
        return self.class_head(x), mask_logits, self.box_head(x).sigmoid()

    def forward_queries(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        class_logits, mask_logits, _ = self.forward_objects(pixels)
        return class_logits, mask_logits

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return semantic_scores(*self.forward_queries(pixels))


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints (DetrForSegmentation, model_type "detr")
# ---------------------------------------------------------------------------------------------
#
# B = detr.model.backbone.conv_encoder.model. (transformers 5 in memory: detr.model.backbone.model.)
# Two backbone layouts: transformers' ResNet (use_timm_backbone=False) and timm's (facebook/detr-
# resnet-50-panoptic as published); s, b: stage and block, 0-based; L = s + 1.
# backbone: transformers' ResNet key (B + ...)           timm's key (B + ...)       ours
# embedder.embedder.{convolution,normalization}.*        {conv1,bn1}.*              backbone.stem.{conv,norm}.*
# encoder.stages.s.layers.b.layer.{0,1,2}.convolution.*  layerL.b.conv{1,2,3}.*     backbone.stages.s.b.{reduce,spatial,expand}.conv.*
# encoder.stages.s.layers.b.layer.{0,1,2}.normalization.*  layerL.b.bn{1,2,3}.*     backbone.stages.s.b.{reduce,spatial,expand}.norm.*
# encoder.stages.s.layers.b.shortcut.convolution.*       layerL.b.downsample.0.*    backbone.stages.s.b.shortcut.conv.*
# encoder.stages.s.layers.b.shortcut.normalization.*     layerL.b.downsample.1.*    backbone.stages.s.b.shortcut.norm.*
# the rest: HF key                                                       ours
# detr.model.input_projection.*                                          input_projection.*
# detr.model.query_position_embeddings.weight                            query_embed.weight
# detr.model.{encoder,decoder}.layers.i.self_attn.{q,k,v,out}_proj.*     {encoder,decoder}_layers.i.self_attn.{q,k,v,out}_proj.*
# detr.model.{encoder,decoder}.layers.i.fc{1,2}.*                        {encoder,decoder}_layers.i.mlp.fc{1,2}.*
# detr.model.encoder.layers.i.{self_attn_layer_norm,final_layer_norm}.*  encoder_layers.i.{norm1,norm2}.*
# detr.model.decoder.layers.i.encoder_attn.*                             decoder_layers.i.cross_attn.*
# detr.model.decoder.layers.i.{self_attn,encoder_attn,final}_layer_norm.*  decoder_layers.i.{norm1,norm2,norm3}.*
# detr.model.decoder.layernorm.*                                         decoder_norm.*
# detr.class_labels_classifier.*                                         class_head.*
# detr.bbox_predictor.layers.i.*                                         box_head.layers.i.*
# bbox_attention.{q,k}_linear.*                                          bbox_attention.{q,k}_proj.*
# mask_head.{lay1,gn1}.*, mask_head.{lay2,gn2}.*                         mask_head.conv{1,2}.{conv,norm}.*
# mask_head.adapter{1,2,3}.*                                             mask_head.stages.{0,1,2}.adapter.*
# mask_head.{lay,gn}{3,4,5}.*                                            mask_head.stages.{0,1,2}.refine.{conv,norm}.*
# mask_head.out_lay.*                                                    mask_head.output.*
# dropped: the backbone norms' num_batches_tracked (timm's downsample norms carry one).
# transformers 5's in-memory names are accepted too: o_proj for out_proj, mlp.fc1 for fc1,
# bbox_attention.{q,k}_proj, mask_head.conv{1,2}.{conv,norm}, mask_head.fpn_stages.i.{fpn_adapter,
# refine.conv, refine.norm}, mask_head.output_conv.

_BACKBONE = r"detr\.model\.backbone\.(?:conv_encoder\.)?model\."
_NORM_FIELD = r"(weight|bias|running_mean|running_var)"
_BOTTLENECK = ("reduce", "spatial", "expand")
_LAYER = r"detr\.model\.(encoder|decoder)\.layers\.(\d+)\."
_DECODER = r"detr\.model\.decoder\.layers\.(\d+)\."


def _block(stage: int, block: str, unit: str, part: str, field: str) -> str:
    return f"backbone.stages.{stage}.{block}.{unit}.{part}.{field}"


_HF_RESNET_RULES: list[Rule] = [
    (_BACKBONE + r"embedder\.embedder\.convolution\.(weight)", r"backbone.stem.conv.\1"),
    (_BACKBONE + r"embedder\.embedder\.normalization\." + _NORM_FIELD, r"backbone.stem.norm.\1"),
    (
        _BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.([012])\.convolution\.(weight)",
        lambda m: _block(int(m[1]), m[2], _BOTTLENECK[int(m[3])], "conv", m[4]),
    ),
    (
        _BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.([012])\.normalization\." + _NORM_FIELD,
        lambda m: _block(int(m[1]), m[2], _BOTTLENECK[int(m[3])], "norm", m[4]),
    ),
    (_BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.(weight)", r"backbone.stages.\1.\2.shortcut.conv.\3"),
    (
        _BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\." + _NORM_FIELD,
        r"backbone.stages.\1.\2.shortcut.norm.\3",
    ),
]


def torchvision_resnet_rules(prefix: str) -> list[Rule]:
    """torchvision's (and timm's) ResNet layout under `prefix` (conv1, bn1, layerN.i.{conv,bn}{1,2,3},
    downsample) -> ResNet's names; DETR's timm backbone and VisTR's repository share it."""
    return [
        (prefix + r"conv1\.(weight)", r"backbone.stem.conv.\1"),
        (prefix + r"bn1\." + _NORM_FIELD, r"backbone.stem.norm.\1"),
        (
            prefix + r"layer([1-4])\.(\d+)\.conv([123])\.(weight)",
            lambda m: _block(int(m[1]) - 1, m[2], _BOTTLENECK[int(m[3]) - 1], "conv", m[4]),
        ),
        (
            prefix + r"layer([1-4])\.(\d+)\.bn([123])\." + _NORM_FIELD,
            lambda m: _block(int(m[1]) - 1, m[2], _BOTTLENECK[int(m[3]) - 1], "norm", m[4]),
        ),
        (prefix + r"layer([1-4])\.(\d+)\.downsample\.0\.(weight)", lambda m: _block(int(m[1]) - 1, m[2], "shortcut", "conv", m[3])),
        (prefix + r"layer([1-4])\.(\d+)\.downsample\.1\." + _NORM_FIELD, lambda m: _block(int(m[1]) - 1, m[2], "shortcut", "norm", m[3])),
    ]


_TIMM_RESNET_RULES = torchvision_resnet_rules(_BACKBONE)
_HF_RULES: list[Rule] = [
    *_HF_RESNET_RULES,
    *_TIMM_RESNET_RULES,
    (r"detr\.model\.input_projection\.(.+)", r"input_projection.\1"),
    (r"detr\.model\.query_position_embeddings\.(.+)", r"query_embed.\1"),
    (_LAYER + r"self_attn\.(q|k|v)_proj\.(.+)", r"\1_layers.\2.self_attn.\3_proj.\4"),
    (_LAYER + r"self_attn\.(?:out|o)_proj\.(.+)", r"\1_layers.\2.self_attn.out_proj.\3"),
    (_LAYER + r"(?:mlp\.)?fc(1|2)\.(.+)", r"\1_layers.\2.mlp.fc\3.\4"),
    (_LAYER + r"self_attn_layer_norm\.(.+)", r"\1_layers.\2.norm1.\3"),
    (r"detr\.model\.encoder\.layers\.(\d+)\.final_layer_norm\.(.+)", r"encoder_layers.\1.norm2.\2"),
    (_DECODER + r"encoder_attn\.(q|k|v)_proj\.(.+)", r"decoder_layers.\1.cross_attn.\2_proj.\3"),
    (_DECODER + r"encoder_attn\.(?:out|o)_proj\.(.+)", r"decoder_layers.\1.cross_attn.out_proj.\2"),
    (_DECODER + r"encoder_attn_layer_norm\.(.+)", r"decoder_layers.\1.norm2.\2"),
    (_DECODER + r"final_layer_norm\.(.+)", r"decoder_layers.\1.norm3.\2"),
    (r"detr\.model\.decoder\.layernorm\.(.+)", r"decoder_norm.\1"),
    (r"detr\.class_labels_classifier\.(.+)", r"class_head.\1"),
    (r"detr\.bbox_predictor\.layers\.(\d+)\.(.+)", r"box_head.layers.\1.\2"),
    (r"bbox_attention\.(q|k)_(?:linear|proj)\.(.+)", r"bbox_attention.\1_proj.\2"),
    (r"mask_head\.(?:lay([12])|conv([12])\.conv)\.(.+)", lambda m: f"mask_head.conv{m[1] or m[2]}.conv.{m[3]}"),
    (r"mask_head\.(?:gn([12])|conv([12])\.norm)\.(.+)", lambda m: f"mask_head.conv{m[1] or m[2]}.norm.{m[3]}"),
    (r"mask_head\.adapter([123])\.(.+)", lambda m: f"mask_head.stages.{int(m[1]) - 1}.adapter.{m[2]}"),
    (r"mask_head\.lay([345])\.(.+)", lambda m: f"mask_head.stages.{int(m[1]) - 3}.refine.conv.{m[2]}"),
    (r"mask_head\.gn([345])\.(.+)", lambda m: f"mask_head.stages.{int(m[1]) - 3}.refine.norm.{m[2]}"),
    (r"mask_head\.fpn_stages\.(\d+)\.fpn_adapter\.(.+)", r"mask_head.stages.\1.adapter.\2"),
    (r"mask_head\.fpn_stages\.(\d+)\.refine\.(conv|norm)\.(.+)", r"mask_head.stages.\1.refine.\2.\3"),
    (r"mask_head\.(?:out_lay|output_conv)\.(.+)", r"mask_head.output.\1"),
]
_HF_IGNORED = (_BACKBONE + r".+\.num_batches_tracked",)


# ---------------------------------------------------------------------------------------------
# The contract: the named variant (the COCO panoptic model: ResNet-50, 6 + 6 layers 256 wide,
# 8 heads, 100 queries, 250 classes), the HF loader, and what the registry reads
# ---------------------------------------------------------------------------------------------


def detr_resnet50_panoptic(num_classes: int = 250, **overrides) -> DETR:
    """DETR with a ResNet-50 backbone and the panoptic head, random weights."""
    return DETR(num_classes=num_classes, **{**RESNET50, **overrides})


VARIANTS = {"detr-resnet50-panoptic": detr_resnet50_panoptic}


def from_hf(config: dict, state_dict: dict[str, torch.Tensor], origin: str = "detr checkpoint") -> DETR:
    """DetrForSegmentation (config.json + weights; transformers' or timm's ResNet) -> DETR; `origin`
    names the checkpoint in errors."""
    if not any(key.startswith(("mask_head.", "bbox_attention.")) for key in state_dict):
        architectures = config.get("architectures")
        held = architectures[0] if isinstance(architectures, list) and architectures else "a DETR model"
        raise CheckpointError(f"{origin}: {held} has no mask head (bbox_attention, mask_head): only DetrForSegmentation segments")
    backbone = {m[1]: v for key, v in state_dict.items() if (m := re.fullmatch(_BACKBONE + "(.+)", key))}
    with building_from(origin, "config.json"):
        resnet = _timm_resnet_arch(backbone) if "conv1.weight" in backbone else _hf_resnet_arch(config)
        check_activation(config, "activation_function")
        # DC5: the last stage dilates instead of striding; same keys, other features
        if config.get("dilation") or (config.get("backbone_config") or {}).get("output_stride") not in (None, 32):
            raise CheckpointError("a dilated C5 (DC5) backbone is not supported")
        if config.get("position_embedding_type", "sine") != "sine":
            raise CheckpointError(f"position_embedding_type {config.get('position_embedding_type')!r} is not supported: only sine")
        model = DETR(
            num_classes=num_labels(config, state_dict, "detr.class_labels_classifier.weight"),
            **resnet,
            hidden_dim=int(config.get("d_model", 256)),
            num_queries=int(config.get("num_queries", 100)),
            encoder_layers=int(config.get("encoder_layers", 6)),
            decoder_layers=int(config.get("decoder_layers", 6)),
            encoder_heads=int(config.get("encoder_attention_heads", 8)),
            decoder_heads=int(config.get("decoder_attention_heads", 8)),
            encoder_ffn_dim=int(config.get("encoder_ffn_dim", 2048)),
            decoder_ffn_dim=int(config.get("decoder_ffn_dim", 2048)),
        )
    weights = rename_keys(state_dict, _HF_RULES, ignored=_HF_IGNORED, keep_unknown=True, origin=origin)
    return load_weights(model, weights, origin, "the DETR that config.json describes")


def _hf_resnet_arch(config: dict) -> dict:
    """ResNet kwargs from config.json's backbone_config (transformers' ResNet)."""
    backbone = config.get("backbone_config") or {}
    if backbone.get("model_type") != "resnet":
        raise CheckpointError(f"backbone {backbone.get('model_type')!r} is not supported: only ResNet (transformers' or timm's)")
    if backbone.get("layer_type", "bottleneck") != "bottleneck":
        raise CheckpointError(f"ResNet layer_type {backbone.get('layer_type')!r} is not supported: only bottleneck")
    if backbone.get("downsample_in_bottleneck") or backbone.get("downsample_in_first_stage"):
        raise CheckpointError("ResNet downsample_in_bottleneck / downsample_in_first_stage are not supported")
    check_activation(backbone, "hidden_act")
    return dict(
        stem_width=int(backbone.get("embedding_size", 64)),
        widths=[int(v) for v in backbone.get("hidden_sizes", RESNET50["widths"])],
        depths=[int(v) for v in backbone.get("depths", RESNET50["depths"])],
    )


def _timm_resnet_arch(backbone: dict[str, torch.Tensor]) -> dict:
    """ResNet kwargs read off timm-layout weights (`backbone` without its prefix): config.json
    only names it ("resnet50", "resnet101")."""
    if "layer1.0.conv3.weight" not in backbone:
        raise CheckpointError("a timm ResNet of basic blocks (no conv3) is not supported: only bottleneck ResNets")
    depths = []
    for stage in range(1, 5):
        blocks = {int(m[1]) for key in backbone if (m := re.fullmatch(rf"layer{stage}\.(\d+)\.conv1\.weight", key))}
        depths.append(max(blocks) + 1 if blocks else 0)
    return dict(
        stem_width=int(backbone["conv1.weight"].shape[0]),
        widths=[int(backbone[f"layer{stage}.0.conv3.weight"].shape[0]) for stage in range(1, 5)],
        depths=depths,
    )


# no mmsegmentation layout: DETR checkpoints come from transformers (or the DETR repository, not supported)
CONTRACT = FamilyContract(model=DETR, variants=VARIANTS, hf_model_types=("detr",), from_hf=from_hf)
