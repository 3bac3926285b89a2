"""SegFormer: a Mix Transformer (MiT-B0..B5) encoder and an all-MLP decoder.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers"
(NeurIPS 2021). The encoder has four stages; each starts with an overlapping patch embedding
(a strided conv: 7x7 stride 4, then 3x3 stride 2), runs transformer blocks whose self-attention
shrinks keys and values by a strided conv (the spatial-reduction ratios 8, 4, 2, 1), and whose
feed-forward network (Mix-FFN) has a 3x3 depth-wise conv in place of position embeddings. The
decoder projects the four stage outputs to one width, upsamples them to 1/4 resolution, fuses
them with a 1x1 conv and classifies every pixel. Output: N x C x ceil(H/4) x ceil(W/4).

Two decoders exist in the wild and give different numbers for the same weights, so the arch
kwarg `head` picks one:
- "mlp": the paper's and transformers' graph: per-level linear (with bias), upsample, concat
  deepest level first, 1x1 conv + BN + ReLU, classifier;
- "mmseg": mmsegmentation's SegformerHead: per-level 1x1 conv + BN + ReLU *before* upsampling,
  concat shallowest level first, 1x1 conv + BN + ReLU, classifier.

LayerNorm eps is an arch kwarg (`layer_norm_eps`) because the references disagree and it shows
in the logits: transformers builds every LayerNorm with torch's default 1e-5 (its config's
`layer_norm_eps` = 1e-6 is read nowhere in modeling_segformer.py), mmsegmentation's MiT uses 1e-6
for every LayerNorm. (NVlabs' original code mixes them: 1e-6 in blocks and stage norms, 1e-5 in
the patch embeddings and the spatial-reduction norm.) Each loader sets the value of its origin.

The file reads top to bottom: the encoder's blocks, the decoders, the model, the checkpoint key
tables, then the family's contract: the named variants, the loaders `from_hf` (transformers'
SegformerForSemanticSegmentation, both its Hub key names and its 5.x module names) and
`from_mmseg` (mmsegmentation's MixVisionTransformer + SegformerHead), and `CONTRACT`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    UnknownModelError,
    building_from,
    load_weights,
    rename_keys,
)

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


# ---------------------------------------------------------------------------------------------
# Building blocks of the encoder
# ---------------------------------------------------------------------------------------------


def channels_last_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` with the weights channels-last: the strided convs (patch embeddings, spatial
    reductions) read maps that are channels-last views of tokens, which oneDNN then takes as they
    are (NCHW weights cost a copy of the input), and return channels-last maps, which are tokens
    again for free. (Not the depth-wise convs: those are fastest on NCHW, see MixFFN.) The copy of
    the small weights is made per call, so that parameters and state dicts keep torch's layout."""
    weight = conv.weight.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class OverlapPatchEmbed(nn.Module):
    """A strided conv whose kernel is larger than its stride (so patches overlap), then LayerNorm.

    Padding kernel // 2 makes the output ceil(H / stride) for odd kernels.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = channels_last_conv(self.proj, x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a map shrunk sr_ratio times per side."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, eps: float, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, length, dim = x.shape
        kv = x
        if self.sr_ratio > 1:
            kv = x.transpose(1, 2).reshape(batch, dim, height, width)
            kv = self.sr_norm(channels_last_conv(self.sr, kv).flatten(2).transpose(1, 2))
        q = self.q(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
        k = self.k(kv).view(batch, kv.shape[1], self.num_heads, -1).transpose(1, 2)
        v = self.v(kv).view(batch, kv.shape[1], self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class MixFFN(nn.Module):
    """fc1 -> 3x3 depth-wise conv -> activation -> fc2; the conv carries the positional information.

    fc1 writes its output as N x hidden x (h*w), the NCHW layout the depth-wise conv runs fastest
    on (a channels-last map costs the conv a copy in and a layout change out), and fc2 reads that
    map transposed, which the matrix product does without a copy.
    """

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch = x.shape[0]
        x = torch.baddbmm(self.fc1.bias[:, None], self.fc1.weight.expand(batch, -1, -1), x.transpose(1, 2))
        x = self.act(self.dwconv(x.unflatten(2, (height, width))))
        return torch.baddbmm(self.fc2.bias, x.flatten(2).transpose(1, 2), self.fc2.weight.T.expand(batch, -1, -1))


class Block(nn.Module):
    """Pre-norm transformer block. (Stochastic depth is a training-only identity and is left out.)"""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float, act: str, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), act)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), height, width)
        return x + self.mlp(self.norm2(x), height, width)


class Stage(nn.Module):
    """Patch embedding, blocks, LayerNorm; returns an N x C x h x w map."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        depth: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        patch_size: int,
        stride: int,
        act: str,
        eps: float,
    ) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, patch_size, stride, eps)
        self.blocks = nn.ModuleList(Block(dim, num_heads, sr_ratio, mlp_ratio, act, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, height, width = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, height, width)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, height, width)


# ---------------------------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """1x1 conv without bias (BN has one), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight out x in, bias) of the conv with the eval-mode BatchNorm folded in: the layer
        before its ReLU as one affine map, computed in fp32 (also under autocast)."""
        with torch.autocast(self.conv.weight.device.type, enabled=False):
            bn = self.bn
            scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
            weight = self.conv.weight.float().flatten(1) * scale[:, None]
            return weight, bn.bias.float() - bn.running_mean.float() * scale


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """N x C x h x w -> N x (h*w) x C; free for the channels-last maps the stages return."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def _as_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x (h*w) x C -> N x C x h x w, a channels-last view (no copy)."""
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def _fused_levels(features: list[torch.Tensor], weights: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """sum_i upsample(weights[i] @ features[i]) at `size`, N x D x H x W channels-last.

    Both decoders end in a 1x1 conv over the concatenation of upsampled levels. Bilinear
    resizing (weights summing to 1) commutes with a per-pixel affine map, so the fuse conv's
    slice for each level is applied at that level's own resolution, before upsampling: 1/4 of
    the fuse conv's work at 1/4 scale, none of the concatenation.
    """
    out = None
    for x, weight in zip(features, weights):
        y = _upsample(_as_map(F.linear(_tokens(x), weight.to(x.dtype)), *x.shape[-2:]), size)
        out = y if out is None else out.add_(y)
    return out


def _classify(classifier: nn.Conv2d, fused: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ReLU(fused + bias), then the 1x1 classifier, on the channels-last map as a linear layer
    (a 1x1 conv on a channels-last map takes a slow path)."""
    x = fused.permute(0, 2, 3, 1)  # N x H x W x D, contiguous
    x = F.relu_(x.add_(bias.to(x.dtype)))
    return F.linear(x, classifier.weight.flatten(1), classifier.bias).permute(0, 3, 1, 2)


class MLPDecoder(nn.Module):
    """The paper's all-MLP decoder (transformers' SegformerDecodeHead).

    In eval mode the per-level linear layers, the fuse conv and its BatchNorm are one affine map
    per level (`_fused_levels`), applied before upsampling; in training the graph is the
    reference's, so that BatchNorm sees its batch statistics.
    """

    def __init__(self, in_channels: Sequence[int], dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(c, dim) for c in in_channels)
        self.fuse = ConvBNReLU(dim * len(in_channels), dim)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.training:
            return self.forward_reference(features)
        fuse_weight, fuse_bias = self.fuse.folded()
        # the fuse conv's input slices, one per level: deepest level first in the concatenation
        slices = fuse_weight.split(fuse_weight.shape[1] // len(self.proj), dim=1)[::-1]
        with torch.autocast(fuse_weight.device.type, enabled=False):
            weights = [part @ proj.weight.float() for part, proj in zip(slices, self.proj)]
            bias = fuse_bias + sum(part @ proj.bias.float() for part, proj in zip(slices, self.proj))
        x = _fused_levels(features, weights, features[0].shape[-2:])
        return _classify(self.classifier, x, bias)

    def forward_reference(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The reference graph: project, upsample, concatenate, fuse, classify."""
        size = features[0].shape[-2:]
        levels = []
        for x, proj in zip(features, self.proj):
            levels.append(_upsample(_as_map(proj(_tokens(x)), *x.shape[-2:]), size))
        # deepest level first, as in the paper's code and transformers
        x = self.fuse(torch.cat(levels[::-1], dim=1))
        return self.classifier(self.dropout(x))


class MMSegDecoder(nn.Module):
    """mmsegmentation's SegformerHead: per-level conv + BN + ReLU before upsampling.

    In eval mode the fuse conv (and its BatchNorm) is applied to each level before upsampling
    (`_fused_levels`); in training the graph is the reference's.
    """

    def __init__(self, in_channels: Sequence[int], dim: int, num_classes: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(ConvBNReLU(c, dim) for c in in_channels)
        self.fuse = ConvBNReLU(dim * len(in_channels), dim)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.training:
            return self.forward_reference(features)
        fuse_weight, fuse_bias = self.fuse.folded()
        # the fuse conv's input slices, one per level: shallowest level first in the concatenation
        slices = fuse_weight.split(fuse_weight.shape[1] // len(self.levels), dim=1)
        levels = []
        for x, level in zip(features, self.levels):
            weight, bias = level.folded()
            levels.append(F.relu(_as_map(F.linear(_tokens(x), weight.to(x.dtype), bias.to(x.dtype)), *x.shape[-2:])))
        x = _fused_levels(levels, list(slices), features[0].shape[-2:])
        return _classify(self.classifier, x, fuse_bias)

    def forward_reference(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        levels = [_upsample(conv(x), size) for x, conv in zip(features, self.levels)]
        # shallowest level first (mmseg's torch.cat(outs) in input order)
        x = self.fuse(torch.cat(levels, dim=1))
        return self.classifier(self.dropout(x))


DECODERS = {"mlp": MLPDecoder, "mmseg": MMSegDecoder}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


# the arch kwargs with one entry per stage, in Stage's argument order
PER_STAGE = ("hidden_sizes", "depths", "num_heads", "sr_ratios", "mlp_ratios", "patch_sizes", "strides")


class SegFormer(SegmentationModel):
    """MiT encoder + all-MLP decoder; class scores at 1/4 resolution (ceil(H/4) x ceil(W/4))."""

    family = "segformer"

    def __init__(
        self,
        num_classes: int,
        hidden_sizes: Sequence[int] = (32, 64, 160, 256),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        decoder_dim: int = 256,
        head: str = "mlp",
        act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        in_channels: int = 3,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        arch = dict(
            num_classes=int(num_classes),
            hidden_sizes=[int(v) for v in hidden_sizes],
            depths=[int(v) for v in depths],
            num_heads=[int(v) for v in num_heads],
            sr_ratios=[int(v) for v in sr_ratios],
            mlp_ratios=[float(v) for v in mlp_ratios],
            patch_sizes=[int(v) for v in patch_sizes],
            strides=[int(v) for v in strides],
            decoder_dim=int(decoder_dim),
            head=str(head),
            act=str(act),
            layer_norm_eps=float(layer_norm_eps),
            in_channels=int(in_channels),
            pixel_mean=[float(v) for v in pixel_mean],
            pixel_std=[float(v) for v in pixel_std],
        )
        super().__init__(arch=arch, num_classes=num_classes, pixel_mean=tuple(pixel_mean), pixel_std=tuple(pixel_std))
        lengths = {k: len(arch[k]) for k in PER_STAGE}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"per-stage settings differ in length: {lengths}")
        for dim, heads in zip(arch["hidden_sizes"], arch["num_heads"]):
            if dim % heads:
                raise ValueError(f"hidden size {dim} is not divisible by {heads} heads: override num_heads as well")
        if head not in DECODERS:
            raise ValueError(f"unknown head {head!r}; known: {sorted(DECODERS)}")
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")

        stage_inputs = [arch["in_channels"], *arch["hidden_sizes"][:-1]]
        self.stages = nn.ModuleList(
            Stage(c_in, dim, depth, heads, sr, mlp, patch, stride, act, layer_norm_eps)
            for c_in, dim, depth, heads, sr, mlp, patch, stride in zip(stage_inputs, *(arch[k] for k in PER_STAGE))
        )
        self.head = DECODERS[head](arch["hidden_sizes"], arch["decoder_dim"], num_classes)
        self.min_size = self._min_input_size()

    def _min_input_size(self) -> int:
        """The smallest side every stage can take: each spatial-reduction conv needs >= sr_ratio pixels."""
        size = 1
        while True:
            side, fits = size, True
            for patch, stride, sr in zip(self.arch["patch_sizes"], self.arch["strides"], self.arch["sr_ratios"]):
                side = (side + 2 * (patch // 2) - patch) // stride + 1
                fits = fits and side >= sr
            if fits:
                return size
            size += 1

    def forward_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The stage outputs, N x C_i x h_i x w_i, at strides 4, 8, 16, 32."""
        features = []
        x = pixels
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.training and pixels.shape[0] > 1 and pixels.device.type == "cpu" and not torch.compiler.is_compiling():
            # Inference on CPU, one image at a time: an image's largest maps (Mix-FFN's hidden
            # layer, the decoder's 1/4-scale levels: 8-16 MB for B0 at 512x512) stay in cache, a
            # batch's do not, and a core gains nothing from a batch. Measured on one core, B0 at
            # 512x512: a batch of 8 takes 1.7x as long in one piece as image by image. (Training
            # keeps the batch: BatchNorm's statistics are the batch's.)
            return torch.cat([self(image[None]) for image in pixels])
        height, width = pixels.shape[-2:]
        out_h, out_w = self._output_side(height), self._output_side(width)
        # Only inputs too small for the reduction convs are padded (bottom/right, zeros = the mean
        # colour); every other size runs as the references run it, so logits match theirs.
        pad_h, pad_w = max(0, self.min_size - height), max(0, self.min_size - width)
        if pad_h or pad_w:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
        logits = self.head(self.forward_features(pixels))
        return logits[..., :out_h, :out_w]

    def _output_side(self, side: int) -> int:
        patch, stride = self.arch["patch_sizes"][0], self.arch["strides"][0]
        return (side + 2 * (patch // 2) - patch) // stride + 1


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts: each key table with the code that reads it
# ---------------------------------------------------------------------------------------------


def _load(model: SegFormer, state_dict: dict[str, torch.Tensor], origin: str, target: str | None = None) -> SegFormer:
    return load_weights(model, state_dict, origin, target).eval()


# transformers SegformerForSemanticSegmentation -> ours. Two spellings: the one on the Hub and
# written by save_pretrained (left), and transformers 5.x module names (right, `model.state_dict()`).
#   segformer.encoder.patch_embeddings.{i}.proj          | segformer.stages.{i}.patch_embeddings.proj        -> stages.{i}.patch_embed.proj
#   segformer.encoder.patch_embeddings.{i}.layer_norm    | segformer.stages.{i}.patch_embeddings.layer_norm  -> stages.{i}.patch_embed.norm
#   segformer.encoder.block.{i}.{j}.layer_norm_1         | segformer.stages.{i}.blocks.{j}.layernorm_before  -> stages.{i}.blocks.{j}.norm1
#   ....attention.self.query / key / value              | ....attention.q_proj / k_proj / v_proj            -> ....attn.q / k / v
#   ....attention.self.sr                               | ....attention.sequence_reduction.sequence_reduction -> ....attn.sr
#   ....attention.self.layer_norm                       | ....attention.sequence_reduction.layer_norm       -> ....attn.sr_norm
#   ....attention.output.dense                          | ....attention.o_proj                              -> ....attn.proj
#   ....layer_norm_2                                    | ....layernorm_after                               -> ....norm2
#   ....mlp.dense1 / mlp.dwconv.dwconv / mlp.dense2     | ....mlp.fc1 / mlp.dwconv.dwconv / mlp.fc2         -> ....mlp.fc1 / dwconv / fc2
#   segformer.encoder.layer_norm.{i}                     | segformer.stages.{i}.layer_norm                   -> stages.{i}.norm
#   decode_head.linear_c.{i}.proj                        | decode_head.linear_projections.{i}.proj           -> head.proj.{i}
#   decode_head.linear_fuse / batch_norm / classifier                                                         -> head.fuse.conv / fuse.bn / classifier
_P = r"(weight|bias)"
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_HF_BLOCK = {
    r"(?:layer_norm_1|layernorm_before)": "norm1",
    r"attention\.(?:self\.query|q_proj)": "attn.q",
    r"attention\.(?:self\.key|k_proj)": "attn.k",
    r"attention\.(?:self\.value|v_proj)": "attn.v",
    r"attention\.(?:self\.sr|sequence_reduction\.sequence_reduction)": "attn.sr",
    r"attention\.(?:self\.layer_norm|sequence_reduction\.layer_norm)": "attn.sr_norm",
    r"attention\.(?:output\.dense|o_proj)": "attn.proj",
    r"(?:layer_norm_2|layernorm_after)": "norm2",
    r"mlp\.(?:dense1|fc1)": "mlp.fc1",
    r"mlp\.dwconv\.dwconv": "mlp.dwconv",
    r"mlp\.(?:dense2|fc2)": "mlp.fc2",
}
HF_KEYS: list[tuple[str, str]] = [
    (rf"segformer\.(?:encoder\.patch_embeddings\.(\d+)|stages\.(\d+)\.patch_embeddings)\.proj\.{_P}", r"stages.\1\2.patch_embed.proj.\3"),
    (
        rf"segformer\.(?:encoder\.patch_embeddings\.(\d+)|stages\.(\d+)\.patch_embeddings)\.layer_norm\.{_P}",
        r"stages.\1\2.patch_embed.norm.\3",
    ),
    *[
        (rf"segformer\.(?:encoder\.block\.(\d+)\.(\d+)|stages\.(\d+)\.blocks\.(\d+))\.{src}\.{_P}", rf"stages.\1\3.blocks.\2\4.{dst}.\5")
        for src, dst in _HF_BLOCK.items()
    ],
    (rf"segformer\.(?:encoder\.layer_norm\.(\d+)|stages\.(\d+)\.layer_norm)\.{_P}", r"stages.\1\2.norm.\3"),
    (rf"decode_head\.(?:linear_c|linear_projections)\.(\d+)\.proj\.{_P}", r"head.proj.\1.\2"),
    (r"decode_head\.linear_fuse\.weight", "head.fuse.conv.weight"),
    (rf"decode_head\.batch_norm\.{_BN}", r"head.fuse.bn.\1"),
    (rf"decode_head\.classifier\.{_P}", r"head.classifier.\1"),
]


def _from_hf_config(config: dict[str, Any], origin: str) -> SegFormer:
    """The model (random weights, class names) that config.json describes."""
    defaults = dict(
        num_channels=3,
        num_encoder_blocks=4,
        depths=[2, 2, 2, 2],
        sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[32, 64, 160, 256],
        patch_sizes=[7, 3, 3, 3],
        strides=[4, 2, 2, 2],
        num_attention_heads=[1, 2, 5, 8],
        mlp_ratios=[4, 4, 4, 4],
        hidden_act="gelu",
        decoder_hidden_size=256,
    )
    cfg = {**defaults, **{k: v for k, v in config.items() if v is not None}}
    id2label = config.get("id2label") or {}
    num_classes = len(id2label) if id2label else int(config.get("num_labels", 2))
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(f"{origin}: hidden_act {cfg['hidden_act']!r} is not supported; known: {sorted(ACTIVATIONS)}")
    stages = int(cfg["num_encoder_blocks"])
    per_stage = ("depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides", "num_attention_heads", "mlp_ratios")
    if any(len(cfg[k]) != stages for k in per_stage):
        raise CheckpointError(f"{origin}: num_encoder_blocks={stages} but per-stage lists of lengths {[len(cfg[k]) for k in per_stage]}")
    model = SegFormer(
        num_classes=num_classes,
        hidden_sizes=cfg["hidden_sizes"],
        depths=cfg["depths"],
        num_heads=cfg["num_attention_heads"],
        sr_ratios=cfg["sr_ratios"],
        mlp_ratios=cfg["mlp_ratios"],
        patch_sizes=cfg["patch_sizes"],
        strides=cfg["strides"],
        decoder_dim=cfg["decoder_hidden_size"],
        head="mlp",
        act=cfg["hidden_act"],
        layer_norm_eps=1e-5,  # transformers' nn.LayerNorm default everywhere; config.layer_norm_eps is unused
        in_channels=cfg["num_channels"],
    )
    if id2label:
        model.class_names = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(num_classes)]
    return model


# mmsegmentation (MixVisionTransformer backbone + SegformerHead) -> ours, checked against
# mmseg/models/backbones/mit.py and mmseg/models/decode_heads/segformer_head.py:
#   backbone.layers.{i}.0.projection / .0.norm             (PatchEmbed)          -> stages.{i}.patch_embed.proj / norm
#   backbone.layers.{i}.1.{j}.norm1 / norm2                                     -> stages.{i}.blocks.{j}.norm1 / norm2
#   backbone.layers.{i}.1.{j}.attn.attn.in_proj_weight|bias (nn.MultiheadAttention,
#                                            rows q, k, v stacked)             -> ....attn.q / k / v  (split in 3)
#   backbone.layers.{i}.1.{j}.attn.attn.out_proj                                -> ....attn.proj
#   backbone.layers.{i}.1.{j}.attn.sr / attn.norm                               -> ....attn.sr / sr_norm
#   backbone.layers.{i}.1.{j}.ffn.layers.0 / .1 / .4  (1x1 conv, 3x3 dw conv, 1x1 conv;
#                                            .2 is GELU, .3/.5 dropout)         -> ....mlp.fc1 / dwconv / fc2  (1x1 convs squeezed to linear)
#   backbone.layers.{i}.2                    (stage LayerNorm)                  -> stages.{i}.norm
#   decode_head.convs.{i}.conv / .bn         (ConvModule 1x1, no bias, BN, ReLU) -> head.levels.{i}.conv / bn
#   decode_head.fusion_conv.conv / .bn                                          -> head.fuse.conv / bn
#   decode_head.conv_seg                                                        -> head.classifier
# The head concatenates levels in input order (stride 4 first), unlike the paper's head.
_MMSEG_BLOCK = r"backbone\.layers\.(\d+)\.1\.(\d+)"
MMSEG_KEYS: list[tuple[str, str]] = [
    (rf"backbone\.layers\.(\d+)\.0\.projection\.{_P}", r"stages.\1.patch_embed.proj.\2"),
    (rf"backbone\.layers\.(\d+)\.0\.norm\.{_P}", r"stages.\1.patch_embed.norm.\2"),
    (rf"{_MMSEG_BLOCK}\.norm1\.{_P}", r"stages.\1.blocks.\2.norm1.\3"),
    (rf"{_MMSEG_BLOCK}\.attn\.attn\.in_proj_(weight|bias)", r"stages.\1.blocks.\2.attn.qkv.\3"),  # split below
    (rf"{_MMSEG_BLOCK}\.attn\.attn\.out_proj\.{_P}", r"stages.\1.blocks.\2.attn.proj.\3"),
    (rf"{_MMSEG_BLOCK}\.attn\.sr\.{_P}", r"stages.\1.blocks.\2.attn.sr.\3"),
    (rf"{_MMSEG_BLOCK}\.attn\.norm\.{_P}", r"stages.\1.blocks.\2.attn.sr_norm.\3"),
    (rf"{_MMSEG_BLOCK}\.norm2\.{_P}", r"stages.\1.blocks.\2.norm2.\3"),
    (rf"{_MMSEG_BLOCK}\.ffn\.layers\.0\.{_P}", r"stages.\1.blocks.\2.mlp.fc1.\3"),
    (rf"{_MMSEG_BLOCK}\.ffn\.layers\.1\.{_P}", r"stages.\1.blocks.\2.mlp.dwconv.\3"),
    (rf"{_MMSEG_BLOCK}\.ffn\.layers\.4\.{_P}", r"stages.\1.blocks.\2.mlp.fc2.\3"),
    (rf"backbone\.layers\.(\d+)\.2\.{_P}", r"stages.\1.norm.\2"),
    (r"decode_head\.convs\.(\d+)\.conv\.weight", r"head.levels.\1.conv.weight"),
    (rf"decode_head\.convs\.(\d+)\.bn\.{_BN}", r"head.levels.\1.bn.\2"),
    (r"decode_head\.fusion_conv\.conv\.weight", "head.fuse.conv.weight"),
    (rf"decode_head\.fusion_conv\.bn\.{_BN}", r"head.fuse.bn.\1"),
    (rf"decode_head\.conv_seg\.{_P}", r"head.classifier.\1"),
]


# ---------------------------------------------------------------------------------------------
# The contract: named variants, the loaders of the two checkpoint layouts, and what the
# registry reads
# ---------------------------------------------------------------------------------------------

# The published MiT widths and depths; heads 1, 2, 5, 8 and sr ratios 8, 4, 2, 1 for all.
_MIT = {
    "b0": dict(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256),
    "b1": dict(hidden_sizes=(64, 128, 320, 512), depths=(2, 2, 2, 2), decoder_dim=256),
    "b2": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder_dim=768),
    "b3": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 18, 3), decoder_dim=768),
    "b4": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder_dim=768),
    "b5": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder_dim=768),
}


# what a builder may override (num_classes is its own argument)
_ARCH_KWARGS = (
    "hidden_sizes",
    "depths",
    "num_heads",
    "sr_ratios",
    "mlp_ratios",
    "patch_sizes",
    "strides",
    "decoder_dim",
    "head",
    "act",
    "layer_norm_eps",
    "in_channels",
    "pixel_mean",
    "pixel_std",
)


def _builder(size: str) -> Callable[..., SegFormer]:
    def build(num_classes: int = 150, **overrides: Any) -> SegFormer:
        unknown = set(overrides) - set(_ARCH_KWARGS)
        if unknown:
            raise TypeError(f"segformer-{size}: unknown overrides {sorted(unknown)}; known: {sorted(_ARCH_KWARGS)}")
        return SegFormer(num_classes=num_classes, **{**_MIT[size], **overrides})

    build.__name__ = f"segformer_{size}"
    build.__doc__ = f"SegFormer-{size.upper()} with random weights; keyword overrides replace its arch kwargs."
    return build


VARIANTS: dict[str, Callable[..., SegFormer]] = {f"segformer-{size}": _builder(size) for size in _MIT}
"""`VARIANTS[name](num_classes=K, **overrides)` builds SegFormer-B0..B5 with random weights.

Overrides (any SegFormer arch kwarg, per-stage lists have one entry per stage):
  hidden_sizes  stage widths, e.g. [16, 32, 64, 128] for a reduced-width MiT
  depths        blocks per stage
  num_heads     attention heads per stage (default 1, 2, 5, 8: widths must divide by them,
                so pass num_heads with hidden_sizes that are not multiples of these)
  sr_ratios     key/value spatial-reduction ratios (8, 4, 2, 1)
  mlp_ratios    Mix-FFN hidden width / stage width (4, 4, 4, 4)
  patch_sizes, strides   the overlapping patch embeddings ((7, 3, 3, 3), (4, 2, 2, 2))
  decoder_dim   the decoder's width (256 for B0/B1, 768 for B2..B5)
  head          "mlp" (paper / transformers) or "mmseg" (mmsegmentation's SegformerHead)
  act           "gelu" (default), "gelu_new", "relu"
  layer_norm_eps  1e-6 (the original / mmseg MiT); transformers checkpoints load with 1e-5
  in_channels, pixel_mean, pixel_std
Example: build_model("segformer-b0", num_classes=2, hidden_sizes=[16, 32, 64, 128],
                     num_heads=[1, 2, 4, 8], decoder_dim=64)
"""


def from_hf(
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    origin: str = "transformers SegformerForSemanticSegmentation checkpoint",
) -> SegFormer:
    """A SegFormer from a transformers SegformerConfig dict and a SegformerForSemanticSegmentation state dict.

    Classes come from id2label (else num_labels). `reshape_last_stage` is ignored: our stages always
    return maps, which is what the semantic-segmentation head consumes either way. `origin` names
    the checkpoint in errors.
    """
    with building_from(origin, "config.json"):
        model = _from_hf_config(config, origin)
    weights = rename_keys(state_dict, HF_KEYS, origin=origin, layout="SegFormer")
    return _load(model, weights, origin, "the SegFormer that config.json describes")


def from_mmseg(name: str, num_classes: int, state_dict: dict[str, torch.Tensor], origin: str | None = None) -> SegFormer:
    """A SegFormer (mmseg head, LayerNorm eps 1e-6) from an mmsegmentation checkpoint's state dict.

    `name` picks the variant, whose widths and depths the weights must have; `origin` names the
    checkpoint in errors.
    """
    origin = origin or f"mmsegmentation {name} checkpoint"
    if name not in VARIANTS:
        raise UnknownModelError(f"unknown SegFormer variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
    if any(k.startswith("backbone.patch_embed1.") or k.startswith("backbone.block1.") for k in state_dict):
        raise CheckpointError(f"{origin}: this is an NVlabs SegFormer checkpoint (backbone.block1...), not mmsegmentation's layout")
    renamed = rename_keys(state_dict, MMSEG_KEYS, origin=origin, layout="SegFormer")
    weights: dict[str, torch.Tensor] = {}
    for key, value in renamed.items():
        if ".attn.qkv." in key:  # nn.MultiheadAttention's fused in-projection: q, k, v rows
            if value.shape[0] % 3:
                raise CheckpointError(f"{origin}: {key} has {value.shape[0]} rows, not 3 x width")
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                weights[key.replace(".attn.qkv.", f".attn.{part}.")] = chunk
        elif (".mlp.fc1.weight" in key or ".mlp.fc2.weight" in key) and value.ndim == 4:
            weights[key] = value.flatten(1)  # 1x1 conv -> linear
        else:
            weights[key] = value
    classifier = weights.get("head.classifier.weight")
    if classifier is not None and classifier.shape[0] != num_classes:  # said apart from the other misfits
        raise CheckpointError(f"{origin}: the classifier has {classifier.shape[0]} classes, not {num_classes}")
    model = VARIANTS[name](num_classes=num_classes, head="mmseg", layer_norm_eps=1e-6)
    model.name = name  # so that a misfit says which variant the weights were loaded as
    return _load(model, weights, origin)


CONTRACT = FamilyContract(
    model=SegFormer,
    variants=VARIANTS,
    hf_model_types=("segformer",),
    from_hf=from_hf,
    from_mmseg=from_mmseg,
)
