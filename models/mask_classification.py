"""What MaskFormer and Mask2Former share: mask classification's building blocks, its semantic
inference, and the parts of their Hugging Face checkpoints that are alike.

Mask classification: a transformer decoder turns Q learned queries into Q (class distribution,
mask embedding) pairs; each mask is the dot product of its embedding with per-pixel embeddings
from a pixel decoder. `semantic_scores` turns the pairs into one score map per class.

Each family file keeps what is its own (MaskFormer's FPN and DETR decoder, Mask2Former's
deformable pixel decoder and masked-attention decoder, their key tables); this file holds only
what both import.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.base import CheckpointError, Rule, rename_keys
from models.swin import SWIN_SIZES, channels_last_conv, fuse_swin_qkv, in_row_blocks, swin_arch, swin_arch_from_hf, swin_hf_rules

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def sine_position_embedding(
    height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype, temperature: float = 10000.0
) -> torch.Tensor:
    """DETR's normalised 2-D sine embedding, dim x H x W: dim/2 channels for y, then dim/2 for x.

    Coordinates run 1..H (1..W), are normalised to (0, 2*pi] and fed to interleaved sin / cos
    at geometrically spaced frequencies. There is no padding mask: every position is valid.
    """
    half = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, device=device, dtype=dtype)
    x = torch.arange(1, width + 1, device=device, dtype=dtype)
    y = y / (y[-1:] + eps) * scale
    x = x / (x[-1:] + eps) * scale
    freq = torch.arange(half, device=device, dtype=torch.int64).to(dtype)
    freq = temperature ** (2 * torch.div(freq, 2, rounding_mode="floor") / half)

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord[:, None] / freq
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)  # len x half

    pos_y = encode(y)[:, None, :].expand(height, width, half)
    pos_x = encode(x)[None, :, :].expand(height, width, half)
    return torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)


class ConvNorm(nn.Module):
    """Conv (no bias unless asked) + GroupNorm(32) (+ ReLU): the detectron2 FPN unit."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, relu: bool, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias)
        self.norm = nn.GroupNorm(32, out_ch)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the maps here are channels-last (the Swin stages' outputs, and what convs make of them)
        x = self.norm(channels_last_conv(self.conv, x))
        return F.relu(x) if self.relu else x


class Attention(nn.Module):
    """Multi-head attention with separate q / k / v projections (queries and keys may carry
    position embeddings that the values do not)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """query N x Lq x C, key / value N x Lk x C; mask broadcastable to N x heads x Lq x Lk
        (bool: True = may attend)."""
        n, length, dim = query.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, t.shape[1], self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    """Linear, ReLU, Linear: the transformer feed-forward block."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the deformable encoder's thousands of tokens: in cache-sized blocks on CPU (models/swin.py)
        return in_row_blocks(lambda rows: self.fc2(F.relu(self.fc1(rows))), x)


class MLPHead(nn.Module):
    """num_layers linear layers with ReLU between them: the mask-embedding head."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DetrDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer (MaskFormer's and DETR's): self-attention over the queries,
    cross-attention to the image tokens, feed-forward. Query positions go into the queries (and the
    self-attention's keys), memory positions into the cross-attention's keys, never into values."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, ffn_dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor) -> torch.Tensor:
        q = x + query_pos
        x = self.norm1(x + self.self_attn(q, q, x))
        x = self.norm2(x + self.cross_attn(x + query_pos, memory + memory_pos, memory))
        return self.norm3(x + self.mlp(x))


# ---------------------------------------------------------------------------------------------
# Semantic inference
# ---------------------------------------------------------------------------------------------


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """N x Q x (C+1), N x Q x h x w -> N x C x h x w: class probabilities without the no-object
    class, times mask probabilities, summed over the queries."""
    probs = class_logits.softmax(dim=-1)[..., :-1]
    return torch.einsum("nqc,nqhw->nchw", probs, mask_logits.sigmoid())


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints: config.json and the keys both families share
# ---------------------------------------------------------------------------------------------

# both keep the Swin backbone's output norms here (its body under this or a deeper prefix)
HF_BACKBONE = "model.pixel_level_module.encoder."
# the loss's class weights, saved with the model and useless to inference
HF_IGNORED = (r"criterion\.empty_weight",)


def hf_swin_arch(config: dict, family: str) -> dict:
    """SwinBackbone kwargs from config.json's backbone_config: the only backbone supported."""
    backbone_config = config.get("backbone_config") or {}
    if not backbone_config:
        raise CheckpointError(f"{family} config.json without backbone_config: only Swin backbones are supported")
    return swin_arch_from_hf(backbone_config)


def check_activation(config: dict, field: str) -> None:
    activation = config.get(field, "relu")
    if activation != "relu":
        raise CheckpointError(f"{field} {activation!r} is not supported: only relu")


def num_labels(config: dict, state_dict: dict[str, torch.Tensor], class_key: str) -> int:
    """The number of classes: the class head's rows minus the no-object one (config.json's
    id2label may be absent or stale)."""
    if class_key not in state_dict:
        raise CheckpointError(f"the checkpoint has no {class_key}: not a segmentation head")
    classes = int(state_dict[class_key].shape[0]) - 1
    id2label = config.get("id2label")
    if id2label and len(id2label) != classes:
        raise CheckpointError(f"config.json names {len(id2label)} classes but the class head has {classes}")
    return classes


def weights_from_hf(state_dict: dict[str, torch.Tensor], rules: list[Rule], swin_body: str, origin: str) -> dict[str, torch.Tensor]:
    """Our names for a transformers checkpoint's weights: the Swin backbone's (output norms under
    HF_BACKBONE, body under `swin_body`) and the family's `rules` for the rest. A key that no
    rule covers keeps its name, so that the strict load names it as unexpected."""
    swin_rules, swin_ignored = swin_hf_rules(HF_BACKBONE, swin_body)
    weights = rename_keys(state_dict, [*swin_rules, *rules], ignored=[*swin_ignored, *HF_IGNORED], keep_unknown=True, origin=origin)
    return fuse_swin_qkv(weights)


def swin_variants(model_class: type, prefix: str) -> dict:
    """`<prefix>-swin-{tiny,small,base,large}` -> builder(num_classes, **overrides) of `model_class`
    with that Swin backbone and random weights: the named variants of both mask-classification families."""

    def builder(size: str):
        def build(num_classes: int = 150, **overrides):
            return model_class(num_classes=num_classes, **{"swin": swin_arch(size), **overrides})

        build.__doc__ = f"{model_class.__name__} with a Swin-{size[0].upper()} backbone, random weights."
        return build

    return {f"{prefix}-swin-{size}": builder(size) for size in SWIN_SIZES}
