"""Swin Transformer backbone (Liu et al. 2021) for the query-based segmentation models.

Window self-attention with a learned relative position bias, shifted windows (every second block
rolls the map by half a window and masks attention across the wrapped-around seams), patch merging
between stages, and a LayerNorm on each stage's output: the four feature maps at strides 4, 8, 16,
32 that MaskFormer's and Mask2Former's pixel decoders read.

Any input size works: the patch embedding pads the image to a multiple of the patch size, each
block pads its map to a multiple of the window (padded tokens take part in the attention of their
window, as in the original and in transformers) and crops back, and patch merging pads odd sides
by one. A stage's output is therefore ceil(H / stride) x ceil(W / stride).

The HF key mapping (both `MaskFormerSwinBackbone` and `SwinBackbone` layouts) is `swin_hf_rules`
at the bottom of this file.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import CheckpointError, Rule

# The published ImageNet Swin sizes; base and large are the 384-pixel, window-12 models that the
# MaskFormer / Mask2Former ADE20K checkpoints start from.
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}

# The shifted-window mask value: large and negative, not -inf, as the reference implementations use.
_SHIFT_MASK_VALUE = -100.0

# On CPU the widest intermediates (a stage-1 MLP's 4x hidden layer, the windows' q/k/v) are tens
# of megabytes at 512x512: computed for a block of rows (windows) at a time they stay in cache,
# which makes those layers up to 2x faster on one core (measured: stage-1 MLP 55 -> 29 ms). Each
# row's arithmetic is the same, so results agree to float rounding; GPUs and torch.compile get the
# whole tensor.
ROW_BLOCK = 512
WINDOW_BLOCK = 16


def channels_last_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` with the weights channels-last, for maps that are channels-last (views of tokens,
    like the stages' outputs): oneDNN takes those as they are (NCHW weights cost a copy of the
    input) and returns channels-last maps. A 1x1 conv runs as a linear layer over the channels:
    on one CPU thread torch sends a small-batch 1x1 conv to a slow path (a copy to NCHW and a
    GEMM). The weights are rearranged per call, so that parameters and state dicts keep torch's
    layout."""
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1:
        return F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)
    weight = conv.weight.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def blockwise_on_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def in_row_blocks(fn, x: torch.Tensor, rows: int = ROW_BLOCK) -> torch.Tensor:
    """fn(x) for a row-wise fn (a feed-forward block), on CPU computed `rows` rows at a time."""
    flat = x.reshape(-1, x.shape[-1])
    if not blockwise_on_cpu(x) or flat.shape[0] <= 2 * rows:
        return fn(x)
    return torch.cat([fn(flat[i : i + rows]) for i in range(0, flat.shape[0], rows)]).view(*x.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """N x H x W x C (H, W multiples of the window) -> (N * windows) x window_size**2 x C."""
    n, h, w, c = x.shape
    x = x.view(n, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_merge(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `window_partition`: (N * windows) x window_size**2 x C -> N x H x W x C."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def shifted_window_mask(height: int, width: int, window_size: int, shift: int, device, dtype) -> torch.Tensor:
    """windows x L x L additive mask for a map rolled by -shift: tokens that come from different
    regions of the unrolled map (the wrapped-around strips) must not attend to each other."""

    def regions(size: int) -> torch.Tensor:
        idx = torch.arange(size, device=device)
        return (idx >= size - window_size).long() + (idx >= size - shift).long()

    region = (regions(height)[:, None] * 3 + regions(width)[None, :]).to(dtype)
    region = window_partition(region[None, :, :, None], window_size).squeeze(-1)  # windows x L
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, _SHIFT_MASK_VALUE)


def relative_position_index(window_size: int) -> torch.Tensor:
    """L x L index into the (2w-1)^2 bias table: the relative (dy, dx) of every token pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # fully determined by the window size: rebuilt, never stored in checkpoints
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """heads x L x L"""
        length = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.view(length, length, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """windows: (N * nW) x L x C; shift_mask: nW x L x L or None."""
        num_windows = windows.shape[0] if shift_mask is None else shift_mask.shape[0]
        if not blockwise_on_cpu(windows) or num_windows <= 2 * WINDOW_BLOCK:
            return self.attend(windows, shift_mask)
        # WINDOW_BLOCK windows of every image at a time (their slice of the shift mask with them)
        per_image = windows.view(-1, num_windows, *windows.shape[1:])
        out = torch.empty_like(per_image)
        for start in range(0, num_windows, WINDOW_BLOCK):
            part = per_image[:, start : start + WINDOW_BLOCK]
            mask = None if shift_mask is None else shift_mask[start : start + WINDOW_BLOCK]
            out[:, start : start + WINDOW_BLOCK] = self.attend(part.reshape(-1, *part.shape[2:]), mask).view(part.shape)
        return out.view(windows.shape)

    def attend(self, windows: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        batch_windows, length, dim = windows.shape
        q, k, v = self.qkv(windows).view(batch_windows, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.position_bias().to(q.dtype)  # heads x L x L
        if shift_mask is None:
            # a 4-D mask: torch's CPU flash kernel takes it (2.4x faster than the math path that a
            # 3-D one sends the call to, with its all-masked-rows checks); traced (torch.compile,
            # ONNX export) the 3-D one: the flash kernel's decomposition fails torch.onnx's export
            mask = bias if torch.compiler.is_compiling() else bias[None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # fold windows into the head axis so that one nW x heads mask broadcasts over the batch
            num_windows = shift_mask.shape[0]
            mask = (bias[None] + shift_mask[:, None].to(q.dtype)).flatten(0, 1)[None]  # 1 x (nW*heads) x L x L
            q, k, v = (t.reshape(-1, num_windows * self.num_heads, length, t.shape[-1]) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = out.view(batch_windows, self.num_heads, length, -1)
        return self.proj(out.transpose(1, 2).reshape(batch_windows, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_blocks(lambda rows: self.fc2(self.act(self.fc1(rows))), x)


class SwinBlock(nn.Module):
    """Pre-norm block: (shifted) window attention, then an MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, size: tuple[int, int], shift_mask: torch.Tensor | None) -> torch.Tensor:
        """x: N x (H*W) x C tokens of an H x W map."""
        height, width = size
        n, _, c = x.shape
        ws = self.window_size
        y = self.norm1(x).view(n, height, width, c)
        # pad after the norm: padded tokens are zeros inside the attention, as in the reference
        y = F.pad(y, (0, 0, 0, -width % ws, 0, -height % ws))
        padded_h, padded_w = y.shape[1], y.shape[2]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), shift_mask if self.shift else None)
        y = window_merge(y, ws, padded_h, padded_w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :height, :width].reshape(n, height * width, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4C), normalised and projected to 2C: halves the resolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        height, width = size
        n, _, c = x.shape
        x = x.view(n, height, width, c)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # the order (row, col) = (0,0), (1,0), (0,1), (1,1) is what the pretrained reduction expects
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(n, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        eps: float,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift, mlp_ratio, qkv_bias, eps) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """-> (this stage's output tokens, the next stage's input tokens, the next stage's size)."""
        ws = self.window_size
        height, width = size
        shift_mask = None
        if len(self.blocks) > 1:  # one mask serves every shifted block of the stage
            padded = (height + (-height % ws), width + (-width % ws))
            shift_mask = shifted_window_mask(*padded, ws, self.shift, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, size, shift_mask)
        if self.downsample is None:
            return x, x, size
        return x, self.downsample(x, size), ((height + 1) // 2, (width + 1) // 2)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> tokens, normalised."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        pixels = F.pad(pixels, (0, -pixels.shape[-1] % p, 0, -pixels.shape[-2] % p))
        x = channels_last_conv(self.proj, pixels)  # channels-last out: tokens without a copy
        size = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), size


# ---------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------


class SwinBackbone(nn.Module):
    """pixels N x 3 x H x W -> four maps N x C_i x ceil(H / 4 * 2^-i) x ceil(W / 4 * 2^-i), C_i = embed_dim * 2^i."""

    def __init__(
        self,
        embed_dim: int = 96,
        depths: tuple[int, ...] | list[int] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] | list[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 4,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        self.channels = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.stages = nn.ModuleList(
            SwinStage(dim, depth, heads, window_size, mlp_ratio, qkv_bias, layer_norm_eps, downsample=i < len(depths) - 1)
            for i, (dim, depth, heads) in enumerate(zip(self.channels, depths, num_heads))
        )
        # the per-stage output norms of the segmentation backbones (not the classifier's final norm)
        self.out_norms = nn.ModuleList(nn.LayerNorm(dim) for dim in self.channels)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x, size = self.patch_embed(pixels)
        features = []
        for stage, norm in zip(self.stages, self.out_norms):
            out, x, next_size = stage(x, size)
            n, _, c = out.shape
            features.append(norm(out).transpose(1, 2).reshape(n, c, *size))
            size = next_size
        return features


def swin_arch(size: str) -> dict[str, Any]:
    """The keyword arguments of SwinBackbone for a named size, JSON-friendly."""
    spec = SWIN_SIZES[size]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}


def swin_arch_from_hf(backbone_config: dict) -> dict[str, Any]:
    """SwinBackbone kwargs from a HF `backbone_config` (model_type "swin" or "maskformer-swin")."""
    if backbone_config.get("model_type") not in ("swin", "maskformer-swin"):
        raise CheckpointError(f"backbone {backbone_config.get('model_type')!r} is not supported: only Swin is")
    if backbone_config.get("use_absolute_embeddings"):
        raise CheckpointError("Swin with absolute position embeddings is not supported")
    if backbone_config.get("num_channels", 3) != 3:
        raise CheckpointError("only 3-channel Swin backbones are supported")
    if backbone_config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"Swin activation {backbone_config['hidden_act']!r} is not supported")
    patch = backbone_config.get("patch_size", 4)
    out_features = backbone_config.get("out_features") or ["stage1", "stage2", "stage3", "stage4"]
    depths = list(backbone_config.get("depths", (2, 2, 6, 2)))
    if list(out_features) != [f"stage{i + 1}" for i in range(len(depths))]:
        raise CheckpointError(f"Swin out_features {out_features}: every stage is needed")
    return dict(
        embed_dim=int(backbone_config.get("embed_dim", 96)),
        depths=depths,
        num_heads=list(backbone_config.get("num_heads", (3, 6, 12, 24))),
        window_size=int(backbone_config.get("window_size", 7)),
        patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
        mlp_ratio=float(backbone_config.get("mlp_ratio", 4.0)),
        qkv_bias=bool(backbone_config.get("qkv_bias", True)),
        layer_norm_eps=float(backbone_config.get("layer_norm_eps", 1e-5)),
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face key mapping
# ---------------------------------------------------------------------------------------------
#
# HF key (after the backbone's prefix, see below)                ours (under `backbone.`)
# embeddings.patch_embeddings.projection.{weight,bias}            patch_embed.proj.*
# embeddings.norm.*                                               patch_embed.norm.*
# encoder.layers.S.blocks.B.layernorm_before.*                    stages.S.blocks.B.norm1.*
# encoder.layers.S.blocks.B.attention.self.{query,key,value}.*    stages.S.blocks.B.attn.qkv.*  (concatenated q, k, v)
# encoder.layers.S.blocks.B.attention.self.relative_position_bias_table
#                                                                 stages.S.blocks.B.attn.relative_position_bias_table
# encoder.layers.S.blocks.B.attention.output.dense.*              stages.S.blocks.B.attn.proj.*
# encoder.layers.S.blocks.B.layernorm_after.*                     stages.S.blocks.B.norm2.*
# encoder.layers.S.blocks.B.intermediate.dense.*                  stages.S.blocks.B.mlp.fc1.*
# encoder.layers.S.blocks.B.output.dense.*                        stages.S.blocks.B.mlp.fc2.*
# encoder.layers.S.downsample.{norm,reduction}.*                  stages.S.downsample.{norm,reduction}.*
# hidden_states_norms.S (MaskFormerSwin) / .stage{S+1} (Swin)     out_norms.S.*
# dropped: *.relative_position_index (rebuilt from the window size), layernorm.* (the classifier's
# final norm, which the segmentation backbones do not use).
# transformers 5 renames Swin's modules in memory (attention.q_proj, attention.o_proj, mlp.fc1,
# attention.relative_position_bias.relative_position_bias_table); those names are accepted too.
#
# Prefixes: MaskFormer's backbone is `model.pixel_level_module.encoder.` with the Swin body under
# `model.` (MaskFormerSwinBackbone.model); Mask2Former's is `model.pixel_level_module.encoder.` with
# the body directly under it, or under `swin.` in the in-memory layout of transformers 5.


def swin_hf_rules(prefix: str, body_prefix: str) -> tuple[list[Rule], list[str]]:
    """(rules, ignored patterns) for `rename_keys`: the HF keys of a Swin backbone whose output norms
    sit under `prefix` and whose body under `body_prefix` -> ours under `backbone.`.

    q, k and v come out apart (`....attn.q.weight`...): `fuse_swin_qkv` concatenates them.
    """
    body = re.escape(body_prefix) + r"(?:swin\.)?"
    blocks, ours = body + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.", r"backbone.stages.\1.blocks.\2."

    def out_norm(match: re.Match) -> str:
        stage = int(match[2]) - (1 if match[1] else 0)  # Swin counts stage1..4, MaskFormerSwin 0..3
        return f"backbone.out_norms.{stage}.{match[3]}"

    rules: list[Rule] = [
        (re.escape(prefix) + r"hidden_states_norms\.(stage)?(\d+)\.(weight|bias)", out_norm),
        (body + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"backbone.patch_embed.proj.\1"),
        (body + r"embeddings\.norm\.(weight|bias)", r"backbone.patch_embed.norm.\1"),
        (body + r"encoder\.layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)", r"backbone.stages.\1.downsample.\2.\3"),
        *[
            (blocks + rf"attention\.(?:self\.)?(?:{hf}|{part}_proj)\.(weight|bias)", ours + rf"attn.{part}.\3")
            for part, hf in (("q", "query"), ("k", "key"), ("v", "value"))
        ],
        (blocks + r"layernorm_before\.(.+)", ours + r"norm1.\3"),
        (blocks + r"layernorm_after\.(.+)", ours + r"norm2.\3"),
        (
            blocks + r"attention\.(?:self\.|relative_position_bias\.)relative_position_bias_table",
            ours + "attn.relative_position_bias_table",
        ),
        (blocks + r"attention\.(?:output\.dense|o_proj)\.(.+)", ours + r"attn.proj.\3"),
        (blocks + r"(?:intermediate\.dense|mlp\.fc1)\.(.+)", ours + r"mlp.fc1.\3"),
        (blocks + r"(?:output\.dense|mlp\.fc2)\.(.+)", ours + r"mlp.fc2.\3"),
    ]
    # relative_position_index is rebuilt from the window size; layernorm is the classifier's final norm
    ignored = [body + r".*relative_position_index", body + r"layernorm\..*"]
    return rules, ignored


def fuse_swin_qkv(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with each block's q, k, v (as `swin_hf_rules` names them) concatenated into our
    fused `attn.qkv`, rows q, k, v."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        match = re.fullmatch(r"(backbone\.stages\.\d+\.blocks\.\d+\.attn)\.([qkv])\.(weight|bias)", key)
        if match is None:
            out[key] = value
        else:
            parts.setdefault(f"{match[1]}.qkv.{match[3]}", {})[match[2]] = value
    for name, found in parts.items():
        if set(found) != {"q", "k", "v"}:
            raise CheckpointError(f"{name}: the checkpoint lacks one of query / key / value")
        out[name] = torch.cat([found[part] for part in "qkv"], dim=0)
    return out
