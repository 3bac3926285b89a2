"""The plain Vision Transformer encoder that SETR and Segmenter share.

ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words"): non-overlapping 16x16 patches
embedded by a strided conv, a class token, learned absolute position embeddings, pre-norm
transformer blocks (LayerNorm -> multi-head self-attention -> residual, LayerNorm -> GELU MLP
-> residual), an optional final LayerNorm. For dense prediction the patch tokens of chosen
blocks come back as N x D x h x w feature maps at stride 16.

Any input size: the input is zero-padded at the bottom and right to a multiple of the patch
size (as mmseg's PatchEmbed(padding="corner") and Segmenter do), and the position embeddings,
learned for one grid (`pos_grid`), are resized to the input's grid (bicubic by default, as
mmseg's Segmenter configs, timm and transformers do; bilinear where the checkpoint's own code did,
mmseg's SETR configs and the original Segmenter; align_corners=False, no antialias).

The file reads top to bottom: configuration and sizes, building blocks, the encoder, then the
checkpoint layouts (timm, transformers' ViTModel, mmsegmentation) mapped to ours.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import CheckpointError, load_weights, rename_keys

# embed_dim, depth, num_heads of the named sizes (ViT-Ti/S/B/L with 16x16 patches)
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


@dataclass(frozen=True)
class ViTConfig:
    """Everything that shapes a ViT encoder; stored as a plain dict in a model's `arch`."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    pos_grid: tuple[int, int] = (32, 32)  # the patch grid the position embeddings were learned for
    qkv_bias: bool = True
    patch_bias: bool = True  # mmseg >= 1.1 defaults to none; its released checkpoints, timm, transformers have one
    norm_eps: float = 1e-6  # timm and mmseg: 1e-6; the original Segmenter: 1e-5; transformers: its config
    final_norm: bool = True  # a LayerNorm after the last block (mmseg's SETR has none)
    pos_interpolation: str = "bicubic"  # how position embeddings follow the input grid
    cls_token_in_blocks: bool = True  # mmseg's SETR-MLA drops the class token before the blocks

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"pos_interpolation must be bicubic or bilinear, not {self.pos_interpolation!r}")
        object.__setattr__(self, "pos_grid", tuple(int(v) for v in self.pos_grid))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["pos_grid"] = list(self.pos_grid)  # JSON has no tuples
        return values

    def evenly_spaced_layers(self, count: int = 4) -> list[int]:
        """`count` block indices spread over the depth, ending at the last (24 deep: 5, 11, 17, 23)."""
        if self.depth < count:
            raise ValueError(f"{count} evenly spaced layers need depth >= {count}, not {self.depth}")
        return [(i + 1) * self.depth // count - 1 for i in range(count)]


def vit_config(size: str, **overrides: Any) -> ViTConfig:
    """The named size with any field overridden (depth=2 for a quick test, say)."""
    if size not in SIZES:
        raise ValueError(f"unknown ViT size {size!r}; known: {', '.join(SIZES)}")
    return ViTConfig(**{**SIZES[size], **overrides})


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Cuts the image into patch_size x patch_size patches and embeds each (a strided conv)."""

    def __init__(self, patch_size: int, embed_dim: int, bias: bool = True, in_channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels)


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (rows ordered q, k, v)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each N x heads x L x head_dim
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(n, length, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # the exact (erf) GELU, as in timm, mmseg and transformers' "gelu"
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


class ViTEncoder(nn.Module):
    """ViT that returns the patch-token feature maps of the requested blocks.

    forward(pixels, layers): pixels N x 3 x H x W (any H, W); layers: block indices (0-based,
    negative counts from the end). Returns one N x embed_dim x ceil(H/16) x ceil(W/16) map per
    requested index, in the order asked. The final norm, where there is one, applies to the
    last block's output only (as in mmseg and timm).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, dim, config.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid_h, grid_w = config.pos_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid_h * grid_w, dim))  # slot 0: the class token's
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.qkv_bias, config.norm_eps) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps) if config.final_norm else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """1 x (1 + h*w) x D position embeddings for a patch grid of h x w."""
        if tuple(grid) == self.config.pos_grid:
            return self.pos_embed
        # Resize from the learned grid even when the token count happens to match: mmseg skips the
        # resize whenever the counts are equal, which misplaces embeddings for e.g. 16x64 vs 32x32.
        grid_h, grid_w = self.config.pos_grid
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, grid_h, grid_w, -1).permute(0, 3, 1, 2)
        low_precision = patch_pos.dtype in (torch.float16, torch.bfloat16)  # resize those in fp32
        patch_pos = F.interpolate(
            patch_pos.float() if low_precision else patch_pos,
            size=tuple(grid),
            mode=self.config.pos_interpolation,
            align_corners=False,
        ).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, pixels: torch.Tensor, layers: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        depth = self.config.depth
        if any(not -depth <= i < depth for i in layers):
            raise IndexError(f"layers {list(layers)}: a ViT of depth {depth} has blocks 0..{depth - 1}")
        wanted = [i % depth for i in layers]
        n, _, height, width = pixels.shape
        patch = self.config.patch_size
        pad_h, pad_w = (-height) % patch, (-width) % patch
        if pad_h or pad_w:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h))  # zeros at the bottom and right
        x = self.patch_embed(pixels)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # N x h*w x D
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1) + self.position_embeddings(grid)
        if not self.config.cls_token_in_blocks:
            x = x[:, 1:]
        first_patch = 1 if self.config.cls_token_in_blocks else 0

        features: dict[int, torch.Tensor] = {}
        last_wanted = max(wanted)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index == depth - 1:
                x = self.norm(x)
            if index in wanted:
                features[index] = x[:, first_patch:].transpose(1, 2).reshape(n, -1, *grid)
            if index == last_wanted:
                break  # the blocks after the last requested one change nothing we return
        return [features[i] for i in wanted]


# --------------------------------------------------------------------------------------------
# Checkpoint layouts -> ours
#
# Ours is timm's naming (see the table below), so timm and the original Segmenter encoder load
# by name; mmseg renames and fuses nothing; transformers splits q, k and v, which we concatenate
# in the order q, k, v (the row order of timm's qkv and of torch's in_proj_weight alike).
# --------------------------------------------------------------------------------------------

# timm VisionTransformer (timm/models/vision_transformer.py) -> ours: the same names.
#   patch_embed.proj.{weight,bias}            patch_embed.proj.{weight,bias}
#   cls_token, pos_embed                      cls_token, pos_embed
#   blocks.N.norm1.{weight,bias}              blocks.N.norm1
#   blocks.N.attn.qkv.{weight,bias}           blocks.N.attn.qkv       (3D x D, rows q, k, v)
#   blocks.N.attn.proj.{weight,bias}          blocks.N.attn.proj
#   blocks.N.norm2.{weight,bias}              blocks.N.norm2
#   blocks.N.mlp.fc1 / mlp.fc2                blocks.N.mlp.fc1 / mlp.fc2
#   norm.{weight,bias}                        norm                    (final norm)
#   head.*, head_dist.*, pre_logits.*         ignored (classification heads)
# Not supported (an error names them): reg_token, dist_token, layer scale (blocks.N.ls1.gamma),
# fc_norm, q/k norms.
_BLOCK_PARTS = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
TIMM_RULES: list[tuple[str, str]] = [
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(cls_token|pos_embed)", r"\1"),
    (rf"blocks\.(\d+)\.{_BLOCK_PARTS}", r"blocks.\1.\2.\3"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]
TIMM_IGNORED = [r"head\..*", r"head_dist\..*", r"pre_logits\..*"]

# mmseg VisionTransformer (mmseg/models/backbones/vit.py, TransformerEncoderLayer with mmcv's
# MultiheadAttention = torch nn.MultiheadAttention, and mmcv's FFN) -> ours:
#   patch_embed.projection.{weight,bias}      patch_embed.proj
#   cls_token, pos_embed                      cls_token, pos_embed
#   layers.N.ln1                              blocks.N.norm1
#   layers.N.attn.attn.in_proj_{weight,bias}  blocks.N.attn.qkv       (rows q, k, v, as timm)
#   layers.N.attn.attn.out_proj               blocks.N.attn.proj
#   layers.N.ln2                              blocks.N.norm2
#   layers.N.ffn.layers.0.0                   blocks.N.mlp.fc1        (Sequential(Linear, GELU, Dropout))
#   layers.N.ffn.layers.1                     blocks.N.mlp.fc2
#   ln1                                       norm                    (final_norm=True only)
# mmseg's pre_norm (ln_pre), patch_norm and out_origin options are not used by SETR or
# Segmenter configs and are not supported.


def mmseg_block_rules(src: str, dst: str) -> list[tuple[str, str]]:
    """Rules for mmseg TransformerEncoderLayers under `src` (e.g. r"layers") -> our Blocks under `dst`."""
    return [
        (rf"{src}\.(\d+)\.ln1\.(weight|bias)", rf"{dst}.\1.norm1.\2"),
        (rf"{src}\.(\d+)\.ln2\.(weight|bias)", rf"{dst}.\1.norm2.\2"),
        (rf"{src}\.(\d+)\.attn\.attn\.in_proj_(weight|bias)", rf"{dst}.\1.attn.qkv.\2"),
        (rf"{src}\.(\d+)\.attn\.attn\.out_proj\.(weight|bias)", rf"{dst}.\1.attn.proj.\2"),
        (rf"{src}\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", rf"{dst}.\1.mlp.fc1.\2"),
        (rf"{src}\.(\d+)\.ffn\.layers\.1\.(weight|bias)", rf"{dst}.\1.mlp.fc2.\2"),
    ]


MMSEG_RULES: list[tuple[str, str]] = [
    (r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(cls_token|pos_embed)", r"\1"),
    *mmseg_block_rules("layers", "blocks"),
    (r"ln1\.(weight|bias)", r"norm.\1"),
]

# transformers ViTModel (models/vit/modeling_vit.py; ViTForImageClassification adds "vit.") -> ours:
#   embeddings.cls_token                                   cls_token
#   embeddings.position_embeddings                         pos_embed
#   embeddings.patch_embeddings.projection                 patch_embed.proj
#   encoder.layer.N.layernorm_before                       blocks.N.norm1
#   encoder.layer.N.attention.attention.{query,key,value}  blocks.N.attn.qkv   (concatenated q, k, v)
#   encoder.layer.N.attention.output.dense                 blocks.N.attn.proj
#   encoder.layer.N.layernorm_after                        blocks.N.norm2
#   encoder.layer.N.intermediate.dense                     blocks.N.mlp.fc1
#   encoder.layer.N.output.dense                           blocks.N.mlp.fc2
#   layernorm                                              norm
#   pooler.*, classifier.*                                 ignored
# Its LayerNorm eps is config.layer_norm_eps (1e-12 by default): see vit_config_from_hf.
HF_RULES: list[tuple[str, str]] = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
HF_IGNORED = [r"pooler\..*", r"classifier\..*"]


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with it removed."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# A key that no rule covers is an error (rename_keys), so that an unsupported feature (layer
# scale, register tokens...) never loads silently.


def encoder_from_timm(state_dict: dict[str, torch.Tensor], origin: str = "timm ViT") -> dict[str, torch.Tensor]:
    return rename_keys(state_dict, TIMM_RULES, ignored=TIMM_IGNORED, origin=origin, layout="timm ViT")


def encoder_from_mmseg(state_dict: dict[str, torch.Tensor], origin: str = "mmseg ViT") -> dict[str, torch.Tensor]:
    return rename_keys(state_dict, MMSEG_RULES, origin=origin, layout="mmseg ViT")


def encoder_from_hf(state_dict: dict[str, torch.Tensor], origin: str = "transformers ViT") -> dict[str, torch.Tensor]:
    if any(k.startswith("vit.") for k in state_dict):  # ViTForImageClassification and friends
        state_dict = {k.removeprefix("vit."): v for k, v in state_dict.items() if not k.startswith("classifier.")}
    split = rename_keys(state_dict, HF_RULES, ignored=HF_IGNORED, origin=origin, layout="transformers ViT")
    out: dict[str, torch.Tensor] = {}
    for key, value in split.items():
        match = re.fullmatch(r"blocks\.(\d+)\.attn\.(query|key|value)\.(weight|bias)", key)
        if match is None:
            out[key] = value
        elif match.group(2) == "query":
            layer, kind = match.group(1), match.group(3)
            parts = [split.get(f"blocks.{layer}.attn.{name}.{kind}") for name in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise CheckpointError(f"{origin}: layer {layer} lacks one of query/key/value {kind}")
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """'timm', 'mmseg' or 'hf' for a bare ViT encoder state dict."""
    keys = set(state_dict)
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if "patch_embed.projection.weight" in keys:
        return "mmseg"
    if "embeddings.patch_embeddings.projection.weight" in keys or "vit.embeddings.patch_embeddings.projection.weight" in keys:
        return "hf"
    raise CheckpointError("not a ViT encoder state dict in the timm, mmseg or transformers layout")


CONVERTERS = {"timm": encoder_from_timm, "mmseg": encoder_from_mmseg, "hf": encoder_from_hf}


def config_from_weights(ours: dict[str, torch.Tensor], num_heads: int, **fixed: Any) -> ViTConfig:
    """The ViTConfig that a state dict in our layout implies (the head count is not in the weights).

    `fixed` sets what weights cannot say: norm_eps, pos_interpolation, cls_token_in_blocks.
    The position grid is taken to be square unless `pos_grid` is given.
    """
    try:
        embed_dim, _, patch, _ = ours["patch_embed.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("blocks."))
        hidden = ours["blocks.0.mlp.fc1.weight"].shape[0]
        positions = ours["pos_embed"].shape[1] - 1
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"not a complete ViT encoder: {exc}") from exc
    if "pos_grid" not in fixed:
        side = math.isqrt(positions)
        if side * side != positions:
            raise CheckpointError(f"{positions} position embeddings are not a square grid: give pos_grid")
        fixed["pos_grid"] = (side, side)
    return ViTConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=hidden / embed_dim,
        patch_size=patch,
        qkv_bias="blocks.0.attn.qkv.bias" in ours,
        patch_bias="patch_embed.proj.bias" in ours,
        final_norm="norm.weight" in ours,
        **fixed,
    )


def vit_config_from_hf(config: dict[str, Any]) -> ViTConfig:
    """Our ViTConfig for a transformers ViTConfig (config.json as a dict)."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"hidden_act {config['hidden_act']!r} is not supported (only gelu)")
    if config.get("num_channels", 3) != 3:
        raise CheckpointError("only 3-channel ViTs are supported")
    grid = int(config.get("image_size", 224)) // int(config.get("patch_size", 16))
    hidden = int(config.get("hidden_size", 768))
    return ViTConfig(
        embed_dim=hidden,
        depth=int(config.get("num_hidden_layers", 12)),
        num_heads=int(config.get("num_attention_heads", 12)),
        mlp_ratio=int(config.get("intermediate_size", 4 * hidden)) / hidden,
        patch_size=int(config.get("patch_size", 16)),
        pos_grid=(grid, grid),
        qkv_bias=bool(config.get("qkv_bias", True)),
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        final_norm=True,
        pos_interpolation="bicubic",
    )


def load_encoder_weights(encoder: ViTEncoder, state_dict: dict[str, torch.Tensor], layout: str | None = None) -> ViTEncoder:
    """Load a bare encoder state dict in any known layout (detected when not given) into `encoder`.

    Strict: every weight of the encoder must come from the checkpoint, and shapes must agree.
    """
    layout = layout or detect_layout(state_dict)
    ours = CONVERTERS[layout](state_dict)
    return load_weights(encoder, ours, f"{layout} ViT checkpoint", "the encoder")


__all__ = [
    "SIZES",
    "Block",
    "ViTConfig",
    "ViTEncoder",
    "config_from_weights",
    "detect_layout",
    "encoder_from_hf",
    "encoder_from_mmseg",
    "encoder_from_timm",
    "load_encoder_weights",
    "mmseg_block_rules",
    "strip_prefix",
    "vit_config",
    "vit_config_from_hf",
]
