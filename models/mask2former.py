"""Mask2Former (Cheng et al. 2022, "Masked-attention Mask Transformer") with a Swin backbone.

    pixels -> Swin (strides 4..32)
           -> pixel decoder: multi-scale deformable-attention encoder over the 1/32, 1/16, 1/8 maps,
              then an FPN step to 1/4 -> per-pixel mask embeddings E (mask_dim x H/4 x W/4)
           -> masked-attention decoder: Q learned queries; layer l cross-attends to one level
              (1/32, 1/16, 1/8, 1/32, ...) only where the previous prediction's mask is on
           -> class logits (Q x C+1) and mask logits <mask embedding, E> of the last layer

Facts that matter for parity with the published models:
- the config's `decoder_layers` (10 for the published models) counts the prediction made from the
  learnable queries before any layer: 9 layers are built (our `num_layers` is that 9);
- a query attends where sigmoid(mask) >= 0.5 at the level's resolution (bilinear resize of the
  1/4 mask logits), and a query whose mask is empty everywhere attends everywhere;
- deformable attention samples with `grid_sample` (bilinear, zero padding, align_corners=False):
  pure PyTorch, no compiled op.

`forward` returns the semantic score map at the mask resolution (ceil(H/4) x ceil(W/4));
`forward_queries` the last layer's (class_logits N x Q x (C+1), mask_logits N x Q x h x w).

The file reads top to bottom: multi-scale deformable attention and the pixel decoder, the
masked-attention decoder, the model, the HF key table, then its contract: the named variants,
`from_hf` and `CONTRACT`. What it shares with MaskFormer (position embedding, conv + GroupNorm,
attention, the MLP head, the semantic combination, HF config parsing) is in
models/mask_classification.py.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

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
)
from models.mask_classification import (
    HF_BACKBONE,
    Attention,
    ConvNorm,
    Mlp,
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

NUM_LEVELS = 3  # the deformable encoder and the decoder read the 1/32, 1/16 and 1/8 maps


# ---------------------------------------------------------------------------------------------
# Multi-scale deformable attention (Deformable DETR), in pure PyTorch
# ---------------------------------------------------------------------------------------------


def deformable_sample(
    value: torch.Tensor,
    shapes: list[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of each head's values at each query's sampling points.

    value:     N x S x heads x d          (S = sum of H_l * W_l over the levels)
    locations: N x Q x heads x levels x points x 2   (x, y in [0, 1] of each level's map)
    weights:   N x Q x heads x levels x points       (softmax over levels x points per head)
    returns    N x Q x (heads * d)

    What `grid_sample` (bilinear, zero padding, align_corners=False) per level, times the weights,
    summed, gives (see `sample_at_pixels`).
    """
    size = torch.tensor([[w, h] for h, w in shapes], device=locations.device, dtype=torch.float32)
    return sample_at_pixels(value, shapes, locations.float() * size[:, None, :] - 0.5, weights)


def sample_at_pixels(
    value: torch.Tensor,
    shapes: list[tuple[int, int]],
    xy: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """`deformable_sample` with the sampling points in pixel coordinates of their level
    (grid_sample's with align_corners=False: pixel centres at 0, 1, ..., fp32).

    Computed as one `embedding_bag`: each (query, head) is a bag of its levels x points x 4
    bilinear corners, rows of `value` seen as an (N*S*heads) x d table, each row weighted by
    attention weight x bilinear weight (0 for a corner outside the map). This reads each sampled
    row once, in the layout value_proj writes, and returns the rows in the layout output_proj
    reads, where grid_sample needs a copy of the values as maps per level (5x faster on CPU).
    """
    n, s, heads, d = value.shape
    q, levels, points = xy.shape[1], xy.shape[3], xy.shape[4]
    device = value.device
    # Constants per (head, level, point, axis), materialised: the elementwise ops below then run
    # over contiguous rows of heads * levels * points * 2 instead of broadcasting over the
    # short inner dimensions (several times faster on CPU).
    layout = (heads, levels, points, 2)
    size = torch.tensor([[w, h] for h, w in shapes], device=device, dtype=torch.float32)  # levels x (x, y)
    limit = size.view(1, levels, 1, 2).expand(layout).contiguous()
    # the bilinear corners: c0 and c0 + 1 along each axis
    c0 = xy.floor()
    c1 = c0 + 1
    frac = xy - c0
    w0 = (1 - frac) * ((c0 >= 0) & (c0 < limit))  # zero padding: a corner off the map weighs 0
    w1 = frac * ((c1 >= 0) & (c1 < limit))
    last = limit - 1
    # table row of a corner: ((n * S + level start + y * W + x) * heads + head
    stride = torch.stack([torch.full_like(size[:, 0], heads), size[:, 0] * heads], dim=-1)
    stride = stride.view(1, levels, 1, 2).expand(layout).int()
    x0y0 = torch.minimum(c0.clamp_(min=0), last).int().mul_(stride)
    x1y1 = torch.minimum(c1.clamp_(min=0), last).int().mul_(stride)
    starts = torch.tensor([0, *itertools.accumulate(h * w for h, w in shapes[:-1])], device=device, dtype=torch.int32)
    base = torch.arange(n, device=device, dtype=torch.int32).view(n, 1, 1, 1, 1) * s + starts.view(1, 1, 1, levels, 1)
    base = (base * heads + torch.arange(heads, device=device, dtype=torch.int32).view(1, 1, heads, 1, 1)).expand(
        n, 1, heads, levels, points
    )
    (x0, y0), (x1, y1) = x0y0.unbind(-1), x1y1.unbind(-1)
    top, bottom = y0 + base.contiguous(), y1 + base.contiguous()
    rows = torch.stack((top + x0, top + x1, bottom + x0, bottom + x1), dim=-1)
    (wx0, wy0), (wx1, wy1) = w0.unbind(-1), w1.unbind(-1)
    top_w, bottom_w = weights.float() * wy0, weights.float() * wy1
    corner_w = torch.stack((top_w * wx0, top_w * wx1, bottom_w * wx0, bottom_w * wx1), dim=-1)
    bags = n * q * heads
    out = F.embedding_bag(rows.view(bags, -1), value.reshape(-1, d), per_sample_weights=corner_w.view(bags, -1).to(value.dtype), mode="sum")
    return out.view(n, q, heads * d)


class DeformableAttention(nn.Module):
    """Each query looks at `points` learned offsets around its reference point on every level."""

    def __init__(self, dim: int, num_heads: int, levels: int = NUM_LEVELS, points: int = 4) -> None:
        super().__init__()
        self.num_heads, self.levels, self.points = num_heads, levels, points
        self.sampling_offsets = nn.Linear(dim, num_heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query N x Q x C (with positions), reference 1 x Q x 2 (x, y in [0, 1]), value N x S x C."""
        n, q, _ = query.shape
        heads, levels, points = self.num_heads, self.levels, self.points
        value = self.value_proj(value).view(n, value.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(n, q, heads, levels, points, 2)
        logits = self.attention_weights(query).view(n, q, heads, levels * points)
        # softmax written out: torch's softmax over a last dimension of 12 is 5x slower on CPU
        weights = (logits - logits.amax(-1, keepdim=True)).exp_()
        weights = weights.div_(weights.sum(-1, keepdim=True)).view(n, q, heads, levels, points)
        # offsets are in pixels of each level; reference points (fp32) are in [0, 1]: as pixel
        # coordinates (grid_sample's, align_corners=False) the sample points are their sum
        size = torch.tensor([[w, h] for h, w in shapes], device=query.device, dtype=torch.float32)  # levels x (x, y)
        reference_xy = reference.float()[:, :, None, :] * size - 0.5  # 1 x Q x levels x 2
        xy = offsets.float() + reference_xy[:, :, None, :, None, :]
        return self.output_proj(sample_at_pixels(value, shapes, xy, weights))


class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels' tokens, then a feed-forward block."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = DeformableAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, ffn_dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, shapes) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x + pos, reference, x, shapes))
        return self.norm2(x + self.mlp(x))


def reference_points(shapes: list[tuple[int, int]], device, dtype) -> torch.Tensor:
    """1 x S x 2: every token's own centre (x, y), normalised to [0, 1] on its level."""
    points = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, device=device, dtype=dtype),
            torch.linspace(0.5, w - 0.5, w, device=device, dtype=dtype),
            indexing="ij",
        )
        points.append(torch.stack((xs.reshape(-1) / w, ys.reshape(-1) / h), dim=-1))
    return torch.cat(points)[None]


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder over the three coarsest maps, then FPN steps down to stride 4."""

    def __init__(
        self,
        in_channels: list[int],
        dim: int,
        mask_dim: int,
        num_heads: int,
        num_layers: int,
        ffn_dim: int,
        common_stride: int = 4,
    ) -> None:
        super().__init__()
        # level 0 is the coarsest (stride 32) map
        self.input_projections = nn.ModuleList(ConvNorm(ch, dim, 1, relu=False, bias=True) for ch in reversed(in_channels[-NUM_LEVELS:]))
        self.level_embed = nn.Parameter(torch.zeros(NUM_LEVELS, dim))
        nn.init.normal_(self.level_embed)
        self.encoder_layers = nn.ModuleList(DeformableEncoderLayer(dim, num_heads, ffn_dim) for _ in range(num_layers))
        # FPN steps for the maps finer than the encoder's (stride 8 -> 4 for the standard strides)
        strides = [4 * 2**i for i in range(len(in_channels))]
        num_fpn = int(math.log2(strides[-NUM_LEVELS]) - math.log2(common_stride))
        self.fpn_laterals = nn.ModuleList(ConvNorm(ch, dim, 1, relu=False) for ch in in_channels[:num_fpn])
        self.fpn_outputs = nn.ModuleList(ConvNorm(dim, dim, 3, relu=True) for _ in range(num_fpn))
        self.mask_projection = nn.Conv2d(dim, mask_dim, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (the FPN's stride-4 map before `mask_projection`, which Mask2Former folds into its mask
        embeddings, [the 1/32, 1/16, 1/8 maps])"""
        coarse = features[::-1][:NUM_LEVELS]
        maps = [proj(x) for proj, x in zip(self.input_projections, coarse)]
        shapes = [(m.shape[-2], m.shape[-1]) for m in maps]
        n, dim = maps[0].shape[:2]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        pos = torch.cat(
            [
                sine_position_embedding(h, w, dim, tokens.device, tokens.dtype).flatten(1).T + self.level_embed[i]
                for i, (h, w) in enumerate(shapes)
            ]
        )[None]
        reference = reference_points(shapes, tokens.device, tokens.dtype)
        for layer in self.encoder_layers:
            tokens = layer(tokens, pos, reference, shapes)
        outputs = [t.transpose(1, 2).reshape(n, dim, h, w) for t, (h, w) in zip(tokens.split([h * w for h, w in shapes], 1), shapes)]
        # finer maps, coarse to fine; bilinear (not nearest) upsampling, as the reference does
        for lateral, output, feature in zip(
            reversed(self.fpn_laterals), reversed(self.fpn_outputs), reversed(features[: len(self.fpn_laterals)])
        ):
            skip = lateral(feature)
            up = F.interpolate(outputs[-1], size=skip.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(output(skip + up))
        return outputs[-1], outputs[:NUM_LEVELS]


# ---------------------------------------------------------------------------------------------
# The masked-attention decoder
# ---------------------------------------------------------------------------------------------


class MaskedAttentionDecoderLayer(nn.Module):
    """Masked cross-attention to one level, then self-attention over the queries, then a
    feed-forward block (post-norm by default, pre-norm as an option of the config)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, pre_norm: bool = False) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.cross_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, ffn_dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        attend: torch.Tensor,
    ) -> torch.Tensor:
        if self.pre_norm:
            y = self.norm1(x)
            x = x + self.cross_attn(y + query_pos, memory + memory_pos, memory, attend)
            y = self.norm2(x)
            q = y + query_pos
            x = x + self.self_attn(q, q, y)
            return x + self.mlp(self.norm3(x))
        x = self.norm1(x + self.cross_attn(x + query_pos, memory + memory_pos, memory, attend))
        q = x + query_pos
        x = self.norm2(x + self.self_attn(q, q, x))
        return self.norm3(x + self.mlp(x))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Mask2Former(SegmentationModel):
    family = "mask2former"
    score_kind = "probabilities"  # softmax over classes x sigmoid masks, summed over queries

    def __init__(
        self,
        num_classes: int = 150,
        swin: dict[str, Any] | None = None,
        feature_dim: int = 256,
        mask_dim: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        encoder_layers: int = 6,
        encoder_ffn_dim: int = 1024,
        num_layers: int = 9,
        ffn_dim: int = 2048,
        pre_norm: bool = False,
        enforce_input_projection: bool = False,
        common_stride: int = 4,
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        swin = dict(swin) if swin is not None else swin_arch("tiny")
        arch = dict(
            num_classes=num_classes,
            swin=swin,
            feature_dim=feature_dim,
            mask_dim=mask_dim,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            encoder_layers=encoder_layers,
            encoder_ffn_dim=encoder_ffn_dim,
            num_layers=num_layers,
            ffn_dim=ffn_dim,
            pre_norm=pre_norm,
            enforce_input_projection=enforce_input_projection,
            common_stride=common_stride,
            pixel_mean=list(pixel_mean),
            pixel_std=list(pixel_std),
        )
        super().__init__(arch=arch, num_classes=num_classes, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.num_heads = num_heads
        self.backbone = SwinBackbone(**swin)
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            self.backbone.channels, feature_dim, mask_dim, num_heads, encoder_layers, encoder_ffn_dim, common_stride
        )
        project = feature_dim != hidden_dim or enforce_input_projection
        self.input_projections = nn.ModuleList(
            nn.Conv2d(feature_dim, hidden_dim, 1) if project else nn.Identity() for _ in range(NUM_LEVELS)
        )
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # the queries' starting content
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # their positions
        self.decoder_layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(hidden_dim, num_heads, ffn_dim, pre_norm) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)  # + the no-object class
        self.mask_embed = MLPHead(hidden_dim, hidden_dim, mask_dim)

    def predict_masks(self, x: torch.Tensor, fpn_map: torch.Tensor) -> torch.Tensor:
        """normalised queries N x Q x C, the FPN's map (at any size) -> mask logits N x Q x h x w.

        The mask logits are <mask embedding, mask_projection(fpn_map)>: the 1x1 projection is
        folded into the embeddings (E W, E b), which leaves out its mask_dim x H/4 x W/4 map.
        Resizing commutes with it too, so a level's masks come from the resized FPN map.
        """
        projection = self.pixel_decoder.mask_projection
        embeddings = self.mask_embed(x)
        weight = embeddings @ projection.weight.flatten(1).to(embeddings.dtype)  # N x Q x C_fpn
        bias = embeddings @ projection.bias.to(embeddings.dtype)
        return torch.einsum("nqc,nchw->nqhw", weight, fpn_map.to(weight.dtype)) + bias[..., None, None]

    @staticmethod
    def attention_mask(level_mask_logits: torch.Tensor) -> torch.Tensor:
        """mask logits N x Q x h x w at a level's size -> N x 1 x Q x (h*w) bool, True where a query
        may attend: where its mask is on (sigmoid >= 0.5); a query whose mask is empty everywhere
        attends everywhere."""
        attend = level_mask_logits.sigmoid().flatten(2) >= 0.5
        attend = attend | ~attend.any(dim=-1, keepdim=True)
        return attend[:, None]

    def forward_queries(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(pixels)
        fpn_map, levels = self.pixel_decoder(features)
        memories, memory_pos, level_fpn_maps = [], [], []
        for i, level in enumerate(levels):
            h, w = level.shape[-2:]
            projection = self.input_projections[i]
            if isinstance(projection, nn.Conv2d):
                level = channels_last_conv(projection, level)
            memories.append(level.flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            memory_pos.append(sine_position_embedding(h, w, memories[-1].shape[-1], level.device, level.dtype).flatten(1).T[None])
            # The reference resizes every intermediate 1/4 mask prediction to the level's size for
            # the attention mask. Bilinear resizing is linear, so resizing the FPN map once per
            # level and predicting there gives the same logits, without the full-size masks.
            level_fpn_maps.append(F.interpolate(fpn_map, size=(h, w), mode="bilinear", align_corners=False))
        n = pixels.shape[0]
        query_pos = self.query_embed.weight[None].expand(n, -1, -1)
        x = self.query_feat.weight[None].expand(n, -1, -1)
        for i, layer in enumerate(self.decoder_layers):
            level = i % NUM_LEVELS
            # layer 0's mask comes from the learnable queries themselves, layer i's from layer i-1's output
            attend = self.attention_mask(self.predict_masks(self.decoder_norm(x), level_fpn_maps[level]))
            x = layer(x, query_pos, memories[level], memory_pos[level], attend)
        x = self.decoder_norm(x)
        return self.class_head(x), self.predict_masks(x, fpn_map)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return semantic_scores(*self.forward_queries(pixels))


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints (Mask2FormerForUniversalSegmentation, model_type "mask2former")
# ---------------------------------------------------------------------------------------------
#
# The Swin backbone: see models/swin.py (prefix model.pixel_level_module.encoder., body directly under it).
# HF key (P = model.pixel_level_module.decoder., T = model.transformer_module.)   ours
# P input_projections.i.{0,1}.*                                   pixel_decoder.input_projections.i.{conv,norm}.*
# P level_embed                                                   pixel_decoder.level_embed
# P encoder.layers.i.self_attn.{sampling_offsets,attention_weights,value_proj,output_proj}.*
#                                                                 pixel_decoder.encoder_layers.i.self_attn.(same).*
# P encoder.layers.i.self_attn_layer_norm.*                       pixel_decoder.encoder_layers.i.norm1.*
# P encoder.layers.i.fc{1,2}.*                                    pixel_decoder.encoder_layers.i.mlp.fc{1,2}.*
# P encoder.layers.i.final_layer_norm.*                           pixel_decoder.encoder_layers.i.norm2.*
# P adapter_{k}.{0,1}.*   (k = i + 1)                             pixel_decoder.fpn_laterals.i.{conv,norm}.*
# P layer_{k}.{0,1}.*     (k = i + 1)                             pixel_decoder.fpn_outputs.i.{conv,norm}.*
# P mask_projection.*                                             pixel_decoder.mask_projection.*
# T input_projections.i.*  (only when projecting)                 input_projections.i.*
# T level_embed.weight                                            level_embed.weight
# T queries_features.weight                                       query_feat.weight
# T queries_embedder.weight                                       query_embed.weight
# T decoder.layers.i.cross_attn.in_proj_{weight,bias}             decoder_layers.i.cross_attn.{q,k,v}_proj.*  (split in 3)
# T decoder.layers.i.cross_attn.out_proj.*                        decoder_layers.i.cross_attn.out_proj.*
# T decoder.layers.i.cross_attn_layer_norm.*                      decoder_layers.i.norm1.*
# T decoder.layers.i.self_attn.{q,k,v,out}_proj.*                 decoder_layers.i.self_attn.{q,k,v,out}_proj.*
# T decoder.layers.i.self_attn_layer_norm.*                       decoder_layers.i.norm2.*
# T decoder.layers.i.fc{1,2}.*                                    decoder_layers.i.mlp.fc{1,2}.*
# T decoder.layers.i.final_layer_norm.*                           decoder_layers.i.norm3.*
# T decoder.layernorm.*                                           decoder_norm.*
# T decoder.mask_predictor.mask_embedder.i.0.*                    mask_embed.layers.i.*
# class_predictor.*                                               class_head.*
# dropped: criterion.empty_weight (the loss's class weights).

_P = r"model\.pixel_level_module\.decoder\."
_T = r"model\.transformer_module\."


def _fpn_key(match: re.Match) -> str:
    """adapter_k / layer_k (1-based) -> fpn_laterals / fpn_outputs (0-based)."""
    kind = "fpn_laterals" if match[1] == "adapter" else "fpn_outputs"
    part = "conv" if match[3] == "0" else "norm"
    return f"pixel_decoder.{kind}.{int(match[2]) - 1}.{part}.{match[4]}"


_HF_RULES: list[Rule] = [
    (_P + r"input_projections\.(\d+)\.0\.(.+)", r"pixel_decoder.input_projections.\1.conv.\2"),
    (_P + r"input_projections\.(\d+)\.1\.(.+)", r"pixel_decoder.input_projections.\1.norm.\2"),
    (_P + r"level_embed", "pixel_decoder.level_embed"),
    (_P + r"encoder\.layers\.(\d+)\.self_attn\.(.+)", r"pixel_decoder.encoder_layers.\1.self_attn.\2"),
    (_P + r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(.+)", r"pixel_decoder.encoder_layers.\1.norm1.\2"),
    (_P + r"encoder\.layers\.(\d+)\.fc(1|2)\.(.+)", r"pixel_decoder.encoder_layers.\1.mlp.fc\2.\3"),
    (_P + r"encoder\.layers\.(\d+)\.final_layer_norm\.(.+)", r"pixel_decoder.encoder_layers.\1.norm2.\2"),
    (_P + r"(adapter|layer)_(\d+)\.([01])\.(weight|bias)", _fpn_key),
    (_P + r"mask_projection\.(.+)", r"pixel_decoder.mask_projection.\1"),
    (_T + r"input_projections\.(.+)", r"input_projections.\1"),
    (_T + r"level_embed\.(.+)", r"level_embed.\1"),
    (_T + r"queries_features\.(.+)", r"query_feat.\1"),
    (_T + r"queries_embedder\.(.+)", r"query_embed.\1"),
    (_T + r"decoder\.layers\.(\d+)\.cross_attn\.in_proj_(weight|bias)", r"decoder_layers.\1.cross_attn.in_proj.\2"),  # split below
    (_T + r"decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(.+)", r"decoder_layers.\1.cross_attn.out_proj.\2"),
    (_T + r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(.+)", r"decoder_layers.\1.norm1.\2"),
    (_T + r"decoder\.layers\.(\d+)\.self_attn\.(.+)", r"decoder_layers.\1.self_attn.\2"),
    (_T + r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(.+)", r"decoder_layers.\1.norm2.\2"),
    (_T + r"decoder\.layers\.(\d+)\.fc(1|2)\.(.+)", r"decoder_layers.\1.mlp.fc\2.\3"),
    (_T + r"decoder\.layers\.(\d+)\.final_layer_norm\.(.+)", r"decoder_layers.\1.norm3.\2"),
    (_T + r"decoder\.layernorm\.(.+)", r"decoder_norm.\1"),
    (_T + r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(.+)", r"mask_embed.layers.\1.\2"),
    (r"class_predictor\.(.+)", r"class_head.\1"),
]


def _split_in_proj(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn.MultiheadAttention's packed in_proj (q; k; v rows) -> our three projections."""
    out = {}
    for key, value in weights.items():
        match = re.fullmatch(r"(decoder_layers\.\d+\.cross_attn)\.in_proj\.(weight|bias)", key)
        if match is None:
            out[key] = value
            continue
        for name, part in zip("qkv", value.chunk(3, dim=0)):
            out[f"{match[1]}.{name}_proj.{match[2]}"] = part
    return out


# ---------------------------------------------------------------------------------------------
# The contract: named variants (the ADE20K semantic models of the Mask2Former paper: 150 classes,
# 100 queries, 256 wide, 6 deformable encoder layers, 9 decoder layers), the HF loader, and what
# the registry reads
# ---------------------------------------------------------------------------------------------


VARIANTS = swin_variants(Mask2Former, "mask2former")


def from_hf(config: dict, state_dict: dict[str, torch.Tensor], origin: str = "mask2former checkpoint") -> Mask2Former:
    """Mask2FormerForUniversalSegmentation (config.json + weights) -> Mask2Former; `origin` names the
    checkpoint in errors."""
    with building_from(origin, "config.json"):
        swin = hf_swin_arch(config, "mask2former")
        check_activation(config, "activation_function")
        strides = list(config.get("feature_strides", (4, 8, 16, 32)))
        if strides != [4, 8, 16, 32]:
            raise CheckpointError(f"feature_strides {strides} are not supported: Swin's are [4, 8, 16, 32]")
        decoder_layers = int(config.get("decoder_layers", 10))
        if decoder_layers < 1:
            raise CheckpointError(f"decoder_layers {decoder_layers}: at least 1 is needed")
        model = Mask2Former(
            num_classes=num_labels(config, state_dict, "class_predictor.weight"),
            swin=swin,
            feature_dim=int(config.get("feature_size", 256)),
            mask_dim=int(config.get("mask_feature_size", 256)),
            hidden_dim=int(config.get("hidden_dim", 256)),
            num_queries=int(config.get("num_queries", 100)),
            num_heads=int(config.get("num_attention_heads", 8)),
            encoder_layers=int(config.get("encoder_layers", 6)),
            encoder_ffn_dim=int(config.get("encoder_feedforward_dim", 1024)),
            num_layers=decoder_layers - 1,  # the first "layer" is the prediction from the bare queries
            ffn_dim=int(config.get("dim_feedforward", 2048)),
            pre_norm=bool(config.get("pre_norm", False)),
            enforce_input_projection=bool(config.get("enforce_input_projection", False)),
            common_stride=int(config.get("common_stride", 4)),
        )
    weights = _split_in_proj(weights_from_hf(state_dict, _HF_RULES, swin_body=HF_BACKBONE, origin=origin))
    return load_weights(model, weights, origin, "the Mask2Former that config.json describes")


# no mmsegmentation layout: Mask2Former checkpoints come from transformers (or detectron2, not supported)
CONTRACT = FamilyContract(model=Mask2Former, variants=VARIANTS, hf_model_types=("mask2former",), from_hf=from_hf)
