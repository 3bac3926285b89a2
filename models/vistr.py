"""VisTR (Wang et al. 2021, "End-to-End Video Instance Segmentation with Transformers") with its
segmentation head: DETR for clips.

One set of instance sequence queries over a whole clip of T frames; query t * I + i is instance
i's slot in frame t (I = num_instances), so each instance is a sequence of T slots:

    frames (T x 3 x H x W) -> ResNet (frozen batch norm, DETR's) -> C2..C5 per frame
    C5 -> 1x1 projection -> T * h * w tokens with a 3-D (t, y, x) sine position embedding
       -> transformer encoder -> memory (T x d x h x w)
    T * I queries -> transformer decoder over the memory -> class logits (T*I x C+1), boxes (T*I x 4)
    mask head, per frame: each of the frame's I queries' attention maps over that frame's memory
       (DETR's MHAttentionMap), stacked on the memory, upsampled through C4, C3, C2; the last
       stage a deformable 3x3 convolution -> d/16 feature maps per query at stride 4
    instance head: per instance, its T frames' d/16 maps as a 3-D volume -> three dilated 3-D
       convolutions -> mask logits (T*I x H/4 x W/4)

Facts that matter for parity with the original repository (Epiphqny/VisTR):
- the mask head starts from the encoder's memory (DETR's panoptic head from the projected C5);
- positions: d/3 channels each for t, y and x (in that order), each coordinate 1..n normalised to
  (0, 2 pi] with eps 1e-6 as DETR's; there is no padding mask (frames of one size);
- the clip always has `num_frames` frames: the positions, the query layout and the 3-D head were
  trained so. A shorter clip is filled by repeating its frames in order (0, 1, .., T-1, 0, 1, ..),
  as the original inference.py fills a short video, and only its T frames' outputs come back;
- the deformable convolution (detectron2's DCN v1, a CUDA extension there) is here in PyTorch:
  `deform_conv2d`, offsets (dy, dx) per kernel point, bilinear sampling with zeros outside;
- class index = the checkpoint's class id: the YouTube-VIS model has 41 "classes" where 1..40 are
  YouTube-VIS category ids and 0 is never trained (DETR's convention).

`forward(clip)` returns (class_logits T*I x (C+1), boxes T*I x 4, mask_logits T*I x h x w);
`instance_sequences` turns them into I sequences of T masks with one class and score each, as the
original inference.py does.

The file reads top to bottom: the deformable convolution, the 3-D positions, the heads, the
model, the instance sequences, the original repository's key table and its loader, the contract.
The ResNet, the encoder layer, the attention maps and the mask head's units come from
models/detr.py; the decoder layer and the box head from models/mask_classification.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
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
from models.detr import RESNET50, AttentionMaps, ConvGroupNorm, EncoderLayer, FusionStage, ResNet, torchvision_resnet_rules
from models.mask_classification import DetrDecoderLayer, MLPHead, sine_position_embedding

# ---------------------------------------------------------------------------------------------
# The deformable convolution (DCN v1), in PyTorch
# ---------------------------------------------------------------------------------------------


_DEFORM_CHUNK_BYTES = 128 << 20


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    offset_groups: int = 1,
) -> torch.Tensor:
    """Deformable convolution: a convolution whose kernel point k at output pixel p reads the input
    at p * stride - padding + k * dilation + offset[k, p], bilinearly, zero outside the input.

    x N x C x H x W; weight O x C/groups x kh x kw; offset N x (2 * offset_groups * kh * kw) x Ho x Wo,
    channels per offset group, per kernel point (row-major), (dy, dx) (detectron2's and mmcv's
    layout); the channels of x split into `offset_groups` that each follow their own offsets.
    """
    n, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = weight.shape
    points = kh * kw
    out_h = (height + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    if channels != group_channels * groups or channels % offset_groups or out_channels % groups:
        raise ValueError(f"deform_conv2d: {channels} channels, weight {list(weight.shape)}, {groups} groups, {offset_groups} offset groups")
    if offset.shape != (n, 2 * offset_groups * points, out_h, out_w):
        raise ValueError(f"deform_conv2d: offset {list(offset.shape)}, expected {[n, 2 * offset_groups * points, out_h, out_w]}")
    # where each kernel point reads without offsets: points x Ho x Wo, in input pixels
    ky, kx = torch.meshgrid(torch.arange(kh, device=x.device), torch.arange(kw, device=x.device), indexing="ij")
    oy = torch.arange(out_h, device=x.device) * stride - padding
    ox = torch.arange(out_w, device=x.device) * stride - padding
    base_y = (ky.reshape(-1, 1, 1) * dilation + oy.view(1, -1, 1)).to(x.dtype)
    base_x = (kx.reshape(-1, 1, 1) * dilation + ox.view(1, 1, -1)).to(x.dtype)
    kernels = weight.view(groups, out_channels // groups, group_channels * points)
    # the sampled columns are kh * kw times the input (2.8 GB for VisTR's 360 query maps of a
    # 36-frame clip at 224 x 320): in chunks of the batch whose columns stay near the budget
    per_item = channels * points * out_h * out_w * x.element_size()
    step = max(1, _DEFORM_CHUNK_BYTES // per_item)
    out = x.new_empty(n, groups, out_channels // groups, out_h * out_w)
    for i in range(0, n, step):
        chunk = x[i : i + step]
        m = chunk.shape[0]
        shifts = offset[i : i + step].reshape(m * offset_groups, points, 2, out_h, out_w)
        y = base_y + shifts[:, :, 0]
        xs = base_x + shifts[:, :, 1]
        # grid_sample's (align_corners=False) coordinates of pixel centres; zeros padding = DCN's
        # bilinear weights with the corners outside the input counted as zero
        grid = torch.stack(((2 * xs + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1)  # M*G x points x Ho x Wo x 2
        sampled = F.grid_sample(
            chunk.reshape(m * offset_groups, channels // offset_groups, height, width),
            grid.view(m * offset_groups, points * out_h, out_w, 2),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # M*G x C/G x points*Ho x Wo
        columns = sampled.view(m, groups, group_channels * points, out_h * out_w)
        torch.matmul(kernels, columns, out=out[i : i + m])  # (g, O/g, K) @ (m, g, K, P)
    out = out.view(n, out_channels, out_h, out_w)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


class DeformConv2d(nn.Module):
    """A deformable convolution layer: its offsets come with the input (`forward(x, offset)`)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0, bias: bool = False) -> None:
        super().__init__()
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, padding=self.padding)


# ---------------------------------------------------------------------------------------------
# The 3-D (t, y, x) sine position embedding
# ---------------------------------------------------------------------------------------------


def sine_position_embedding_3d(frames: int, height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """VisTR's: dim x T x H x W, dim/3 channels for t, then y, then x, each DETR's normalised sine
    encoding of its coordinate."""
    per_axis = dim // 3
    yx = sine_position_embedding(height, width, 2 * per_axis, device, dtype)  # (y, x)
    # t is encoded as y is: the y half of a T x 1 embedding
    t = sine_position_embedding(frames, 1, 2 * per_axis, device, dtype)[:per_axis, :, 0]  # per_axis x T
    return torch.cat((t[:, :, None, None].expand(-1, -1, height, width), yx[:, None].expand(-1, frames, -1, -1)), dim=0)


# ---------------------------------------------------------------------------------------------
# The heads: the per-frame mask head with its deformable last stage, the 3-D instance head
# ---------------------------------------------------------------------------------------------


class MaskHead(nn.Module):
    """VisTR's MaskHeadSmallConv: [memory, the query's attention maps] -> two convs, fusion with C4
    and C3 (widths d/2 -> d/4 -> d/8), then C2 added through its adapter, a 1x1 conv giving the
    offsets, a deformable 3x3 conv to d/16, GroupNorm(8) and ReLU: d/16 feature maps per query at
    C2's resolution (DETR's head ends in one mask logit instead)."""

    def __init__(self, in_ch: int, skip_channels: list[int], dim: int) -> None:
        super().__init__()
        for width in (in_ch, dim // 2, dim // 4, dim // 8, dim // 16):
            if width % 8:
                raise ValueError(f"the mask head's width {width} (from hidden_dim {dim}) is not a multiple of 8 (its GroupNorm)")
        self.conv1 = ConvGroupNorm(in_ch, in_ch)
        self.conv2 = ConvGroupNorm(in_ch, dim // 2)
        self.stages = nn.ModuleList(FusionStage(skip, dim // 2 ** (i + 1), dim // 2 ** (i + 2)) for i, skip in enumerate(skip_channels[:2]))
        self.adapter = nn.Conv2d(skip_channels[2], dim // 8, 1)
        self.offsets = nn.Conv2d(dim // 8, 2 * 9, 1)  # (dy, dx) for each point of the 3x3 kernel
        self.deform_conv = DeformConv2d(dim // 8, dim // 16, 3, padding=1)
        self.norm = nn.GroupNorm(8, dim // 16)

    def forward(self, features: torch.Tensor, attention_maps: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """features N x d x h x w, attention_maps N x Q x heads x h x w, skips [C4, C3, C2] of the N
        frames -> N x Q x d/16 x H/4 x W/4."""
        n, num_queries = attention_maps.shape[:2]
        x = torch.cat((features.repeat_interleave(num_queries, dim=0), attention_maps.flatten(0, 1)), dim=1)
        x = self.conv2(self.conv1(x))
        for stage, skip in zip(self.stages, skips[:2]):
            x = stage(x, skip, num_queries)
        skip = self.adapter(skips[2]).repeat_interleave(num_queries, dim=0)
        x = skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        x = F.relu(self.norm(self.deform_conv(x, self.offsets(x))))
        return x.view(n, num_queries, *x.shape[1:])


class Conv3dGroupNorm(nn.Module):
    """3x3x3 conv dilated by 2 (the same size out) + GroupNorm(4) + ReLU: the instance head's unit."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 3, padding=2, dilation=2)
        self.norm = nn.GroupNorm(4, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class InstanceHead(nn.Module):
    """Each instance's T frames of d/16 maps as one volume (channels x T x h x w) -> three dilated
    3-D convs to d/32 channels -> a 1x1x1 conv to one mask logit per frame and pixel."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        if in_ch % 8:
            raise ValueError(f"the instance head's width {in_ch} is not a multiple of 8 (its GroupNorm(4) of half of it)")
        self.convs = nn.Sequential(
            Conv3dGroupNorm(in_ch, in_ch // 2), Conv3dGroupNorm(in_ch // 2, in_ch // 2), Conv3dGroupNorm(in_ch // 2, in_ch // 2)
        )
        self.output = nn.Conv3d(in_ch // 2, 1, 1)

    def forward(self, frame_maps: torch.Tensor) -> torch.Tensor:
        """frame_maps T x I x c x h x w -> mask logits T x I x h x w."""
        volumes = frame_maps.permute(1, 2, 0, 3, 4)  # I x c x T x h x w: the instances are the batch
        if volumes.device.type == "cpu" and not torch.compiler.is_compiling():
            # one instance at a time on a CPU: the dilated 3-D conv unfolds its input 27-fold (4 GB
            # for 10 instances of 36 frames at 56 x 80), one instance's share is a tenth of it
            logits = torch.cat([self.output(self.convs(volume[None])) for volume in volumes])
        else:
            logits = self.output(self.convs(volumes))
        return logits[:, 0].transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

RESNET101 = dict(RESNET50, depths=[3, 4, 23, 3])
NUM_FRAMES = 36  # the YouTube-VIS models: 36 frames of 10 instances, 360 queries
NUM_INSTANCES = 10
INPUT_SHORT_SIDE = 300  # inference.py's T.Resize(300): frames scaled so that their shorter side is 300


class VisTR(SegmentationModel):
    """A clip model: `forward(clip)` takes T <= num_frames frames, not a batch of images."""

    family = "vistr"
    input_kind = "clip"  # the pipeline's image models take N images; this one a clip of frames

    def __init__(
        self,
        num_classes: int = 41,
        stem_width: int = RESNET50["stem_width"],
        widths: list[int] | tuple[int, ...] = tuple(RESNET50["widths"]),
        depths: list[int] | tuple[int, ...] = tuple(RESNET50["depths"]),
        hidden_dim: int = 384,
        num_frames: int = NUM_FRAMES,
        num_instances: int = NUM_INSTANCES,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        arch = dict(
            num_classes=num_classes,
            stem_width=stem_width,
            widths=list(widths),
            depths=list(depths),
            hidden_dim=hidden_dim,
            num_frames=num_frames,
            num_instances=num_instances,
            encoder_layers=encoder_layers,
            decoder_layers=decoder_layers,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            pixel_mean=list(pixel_mean),
            pixel_std=list(pixel_std),
        )
        super().__init__(arch=arch, num_classes=num_classes, pixel_mean=pixel_mean, pixel_std=pixel_std)
        if hidden_dim % 6:
            raise ValueError(f"hidden_dim {hidden_dim} is not a multiple of 6: the positions give t, y and x a third each, sin and cos")
        if num_frames < 1 or num_instances < 1:
            raise ValueError(f"num_frames {num_frames} and num_instances {num_instances} must be at least 1")
        self.num_frames = num_frames
        self.num_instances = num_instances
        self.backbone = ResNet(stem_width, list(widths), list(depths))
        self.input_projection = nn.Conv2d(widths[-1], hidden_dim, 1)
        self.encoder_layers = nn.ModuleList(EncoderLayer(hidden_dim, num_heads, ffn_dim) for _ in range(encoder_layers))
        self.query_embed = nn.Embedding(num_frames * num_instances, hidden_dim)
        self.decoder_layers = nn.ModuleList(DetrDecoderLayer(hidden_dim, num_heads, ffn_dim) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)  # + the no-object class
        self.box_head = MLPHead(hidden_dim, hidden_dim, 4)
        self.bbox_attention = AttentionMaps(hidden_dim, num_heads)
        self.mask_head = MaskHead(hidden_dim + num_heads, [widths[2], widths[1], widths[0]], hidden_dim)
        self.instance_head = InstanceHead(hidden_dim // 16)

    def forward(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """clip (1 x) T x 3 x H x W, normalized (`normalize`), 1 <= T <= num_frames ->
        (class_logits T*I x (C+1), boxes T*I x 4 as (cx, cy, w, h) in [0, 1] of the frame,
        mask_logits T*I x ceil(H/4) x ceil(W/4)); row t * I + i is instance i in frame t."""
        if clip.dim() == 5:
            if clip.shape[0] != 1:
                raise ValueError(f"VisTR takes one clip at a time, got a batch of {clip.shape[0]}")
            clip = clip[0]
        if clip.dim() != 4 or not 1 <= clip.shape[0] <= self.num_frames:
            raise ValueError(f"VisTR takes a clip of 1 to {self.num_frames} frames (T x 3 x H x W), got shape {list(clip.shape)}")
        frames = clip.shape[0]
        if frames < self.num_frames:  # repeat the frames in order, as the original inference fills a short video
            clip = clip[torch.arange(self.num_frames, device=clip.device) % frames]
        class_logits, boxes, mask_logits = self._forward_full(clip)
        keep = frames * self.num_instances
        return class_logits[:keep], boxes[:keep], mask_logits[:keep]

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The size a height x width frame is scaled to before the forward, as the original inference.py's
        T.Resize(300) does (torchvision's rule: the shorter side to INPUT_SHORT_SIDE, the longer one
        int(300 * longer / shorter)); its masks are scaled back to the frame (`instance_sequences`' size)."""
        short, long = sorted((height, width))
        scaled = (INPUT_SHORT_SIDE, int(INPUT_SHORT_SIDE * long / short))
        return scaled if height <= width else scaled[::-1]

    def _forward_full(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c2, c3, c4, c5 = self.backbone(clip)
        projected = self.input_projection(c5)
        frames, dim, height, width = projected.shape
        # tokens in (t, y, x) order, one sequence for the clip
        pos = sine_position_embedding_3d(frames, height, width, dim, projected.device, projected.dtype).flatten(1).T[None]
        memory = projected.permute(0, 2, 3, 1).reshape(1, -1, dim)
        for layer in self.encoder_layers:
            memory = layer(memory, pos)
        query_pos = self.query_embed.weight[None]
        x = torch.zeros_like(query_pos)  # the queries start empty: their identity is the position
        for layer in self.decoder_layers:
            x = layer(x, query_pos, memory, pos)
        x = self.decoder_norm(x)[0]  # T*I x d
        # the mask head per frame: the frame's I queries over the frame's memory
        frame_memory = memory[0].view(frames, height, width, dim).permute(0, 3, 1, 2)
        queries = x.view(frames, self.num_instances, dim)
        attention_maps = self.bbox_attention(queries, frame_memory)
        frame_maps = self.mask_head(frame_memory, attention_maps, [c4, c3, c2])  # T x I x d/16 x h x w
        mask_logits = self.instance_head(frame_maps).flatten(0, 1)
        return self.class_head(x), self.box_head(x).sigmoid(), mask_logits


# ---------------------------------------------------------------------------------------------
# Instance sequences: the original inference.py's post-processing
# ---------------------------------------------------------------------------------------------

MIN_FRAME_SCORE = 0.001  # inference.py writes no mask for a frame whose class score is below this


@dataclass
class InstanceSequence:
    """One instance over a clip's T frames.

    instance  its slot (0..I-1); label: the most frequent of its frames' best classes (the smallest
    on a tie); score: the mean over frames of each frame's best class probability; masks T x H x W
    bool (sigmoid > 0.5 after bilinear resizing); frame_scores T; present T: frames whose score
    reaches MIN_FRAME_SCORE (inference.py writes None for the others)."""

    instance: int
    label: int
    score: float
    masks: np.ndarray
    frame_scores: np.ndarray
    present: np.ndarray


def instance_sequences(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, num_instances: int, size: tuple[int, int] | None = None
) -> list[InstanceSequence]:
    """forward's class_logits T*I x (C+1) and mask_logits T*I x h x w -> the instances whose masks
    hold a pixel in some frame, in slot order; masks resized to `size` (H, W) (default: h x w).

    As inference.py: probabilities are the softmax without the no-object class; a frame's score is
    its best class's probability, the sequence's score their mean over the frames and its class
    the most frequent best class (inference.py's np.bincount(...).argmax())."""
    if class_logits.shape[0] != mask_logits.shape[0] or class_logits.shape[0] % num_instances:
        raise ValueError(f"{class_logits.shape[0]} class rows and {mask_logits.shape[0]} masks are not T x {num_instances} instances")
    frames = class_logits.shape[0] // num_instances
    probs = class_logits.float().softmax(-1)[:, :-1].view(frames, num_instances, -1)
    frame_scores, frame_labels = probs.max(-1)
    masks_by_instance = mask_logits.float().view(frames, num_instances, *mask_logits.shape[-2:]).transpose(0, 1)
    sequences = []
    for i in range(num_instances):
        logits = masks_by_instance[i][:, None]  # T x 1 x h x w
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        masks = (logits[:, 0].sigmoid() > 0.5).cpu().numpy()
        if not masks.any():
            continue
        scores = frame_scores[:, i].cpu().numpy()
        sequences.append(
            InstanceSequence(
                instance=i,
                label=int(np.bincount(frame_labels[:, i].cpu().numpy()).argmax()),
                score=float(scores.mean()),
                masks=masks,
                frame_scores=scores,
                present=scores >= MIN_FRAME_SCORE,
            )
        )
    return sequences


# ---------------------------------------------------------------------------------------------
# The original repository's checkpoints (VisTRsegm's state dict under "model" in a .pth)
# ---------------------------------------------------------------------------------------------
#
# V = vistr.; B = vistr.backbone.0.body. (torchvision's ResNet); L = stage + 1; b: block.
# original key                                            ours
# B conv1.weight, B bn1.*                                 backbone.stem.{conv,norm}.*
# B layerL.b.conv{1,2,3}.weight, B layerL.b.bn{1,2,3}.*   backbone.stages.s.b.{reduce,spatial,expand}.{conv,norm}.*
# B layerL.b.downsample.{0,1}.*                           backbone.stages.s.b.shortcut.{conv,norm}.*
# V input_proj.*                                          input_projection.*
# V query_embed.weight                                    query_embed.weight
# V transformer.encoder.layers.i.self_attn.in_proj_*      encoder_layers.i.self_attn.{q,k,v}_proj.* (rows split in 3)
# V transformer.encoder.layers.i.self_attn.out_proj.*     encoder_layers.i.self_attn.out_proj.*
# V transformer.encoder.layers.i.linear{1,2}.*            encoder_layers.i.mlp.fc{1,2}.*
# V transformer.encoder.layers.i.norm{1,2}.*              encoder_layers.i.norm{1,2}.*
# V transformer.decoder.layers.i.self_attn.*              decoder_layers.i.self_attn.* (in_proj split)
# V transformer.decoder.layers.i.multihead_attn.*         decoder_layers.i.cross_attn.* (in_proj split)
# V transformer.decoder.layers.i.{linear,norm}*           decoder_layers.i.{mlp.fc,norm}*
# V transformer.decoder.norm.*                            decoder_norm.*
# V class_embed.*, V bbox_embed.layers.i.*                class_head.*, box_head.layers.i.*
# bbox_attention.{q,k}_linear.*                           bbox_attention.{q,k}_proj.*
# mask_head.{lay1,gn1}.*, mask_head.{lay2,gn2}.*          mask_head.conv{1,2}.{conv,norm}.*
# mask_head.adapter{1,2}.*                                mask_head.stages.{0,1}.adapter.*
# mask_head.{lay,gn}{3,4}.*                               mask_head.stages.{0,1}.refine.{conv,norm}.*
# mask_head.adapter3.*                                    mask_head.adapter.*
# mask_head.conv_offset.*, mask_head.dcn.weight           mask_head.offsets.*, mask_head.deform_conv.weight
# mask_head.gn5.*                                         mask_head.norm.*
# insmask_head.{0,3,6}.*, insmask_head.{1,4,7}.*          instance_head.convs.{0,1,2}.{conv,norm}.*
# insmask_head.9.*                                        instance_head.output.*

_BODY = r"vistr\.backbone\.0\.body\."
_TRANSFORMER = r"vistr\.transformer\.(encoder|decoder)\.layers\.(\d+)\."

_REPOSITORY_RULES: list[Rule] = [
    *torchvision_resnet_rules(_BODY),
    (r"vistr\.input_proj\.(weight|bias)", r"input_projection.\1"),
    (r"vistr\.query_embed\.weight", "query_embed.weight"),
    # in_proj_* are split into q / k / v by _split_in_proj before these rules run
    (_TRANSFORMER + r"self_attn\.(q|k|v|out)_proj\.(weight|bias)", r"\1_layers.\2.self_attn.\3_proj.\4"),
    (_TRANSFORMER + r"multihead_attn\.(q|k|v|out)_proj\.(weight|bias)", r"\1_layers.\2.cross_attn.\3_proj.\4"),
    (_TRANSFORMER + r"linear([12])\.(weight|bias)", r"\1_layers.\2.mlp.fc\3.\4"),
    (_TRANSFORMER + r"norm([123])\.(weight|bias)", r"\1_layers.\2.norm\3.\4"),
    (r"vistr\.transformer\.decoder\.norm\.(weight|bias)", r"decoder_norm.\1"),
    (r"vistr\.class_embed\.(weight|bias)", r"class_head.\1"),
    (r"vistr\.bbox_embed\.layers\.(\d+)\.(weight|bias)", r"box_head.layers.\1.\2"),
    (r"bbox_attention\.(q|k)_linear\.(weight|bias)", r"bbox_attention.\1_proj.\2"),
    (r"mask_head\.lay([12])\.(weight|bias)", r"mask_head.conv\1.conv.\2"),
    (r"mask_head\.gn([12])\.(weight|bias)", r"mask_head.conv\1.norm.\2"),
    (r"mask_head\.adapter([12])\.(weight|bias)", lambda m: f"mask_head.stages.{int(m[1]) - 1}.adapter.{m[2]}"),
    (r"mask_head\.lay([34])\.(weight|bias)", lambda m: f"mask_head.stages.{int(m[1]) - 3}.refine.conv.{m[2]}"),
    (r"mask_head\.gn([34])\.(weight|bias)", lambda m: f"mask_head.stages.{int(m[1]) - 3}.refine.norm.{m[2]}"),
    (r"mask_head\.adapter3\.(weight|bias)", r"mask_head.adapter.\1"),
    (r"mask_head\.conv_offset\.(weight|bias)", r"mask_head.offsets.\1"),
    (r"mask_head\.dcn\.weight", "mask_head.deform_conv.weight"),
    (r"mask_head\.gn5\.(weight|bias)", r"mask_head.norm.\1"),
    (r"insmask_head\.([0369])\.(weight|bias)", lambda m: _instance_head_key(int(m[1]), "conv", m[2])),
    (r"insmask_head\.([147])\.(weight|bias)", lambda m: _instance_head_key(int(m[1]) - 1, "norm", m[2])),
]
# what a training checkpoint may hold beside the model: batch-norm counters torchvision writes
_REPOSITORY_IGNORED = (_BODY + r".+\.num_batches_tracked",)


def _instance_head_key(index: int, part: str, field: str) -> str:
    """insmask_head's Sequential: (conv, norm, relu) x 3 at 0, 3, 6, the output conv at 9."""
    return f"instance_head.output.{field}" if index == 9 else f"instance_head.convs.{index // 3}.{part}.{field}"


def _split_in_proj(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn.MultiheadAttention's in_proj_weight / in_proj_bias (q, k, v stacked by rows) -> q_proj,
    k_proj, v_proj weights and biases, under the same prefix."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(.+)\.in_proj_(weight|bias)", key)
        if m is None:
            out[key] = value
            continue
        if value.shape[0] % 3:
            raise CheckpointError(f"{key}: {value.shape[0]} rows are not q, k and v of one width")
        for name, part in zip("qkv", value.chunk(3, dim=0)):
            out[f"{m[1]}.{name}_proj.{m[2]}"] = part
    return out


def _layer_count(state_dict: dict[str, torch.Tensor], pattern: str) -> int:
    indices = {int(m[1]) for key in state_dict if (m := re.fullmatch(pattern, key))}
    return max(indices) + 1 if indices else 0


def _arch_from_repository(state_dict: dict[str, torch.Tensor], num_frames: int) -> dict:
    """What the keys and shapes of a VisTRsegm state dict say: classes, widths, depths, layers.
    The head count is not in the weights: 8, the repository's only setting."""
    for key in ("vistr.class_embed.weight", "vistr.input_proj.weight", "vistr.query_embed.weight", "vistr.backbone.0.body.conv1.weight"):
        if key not in state_dict:
            raise CheckpointError(f"no {key}: not a VisTR checkpoint (the original repository's VisTRsegm)")
    queries = int(state_dict["vistr.query_embed.weight"].shape[0])
    if queries % num_frames:
        raise CheckpointError(f"{queries} queries are not {num_frames} frames of equal instance counts")
    depths = [_layer_count(state_dict, _BODY + rf"layer{stage}\.(\d+)\.conv1\.weight") for stage in range(1, 5)]
    widths = []
    for stage in range(1, 5):
        key = f"vistr.backbone.0.body.layer{stage}.0.conv3.weight"
        if key not in state_dict:
            raise CheckpointError(f"no {key}: not a bottleneck ResNet of four stages")
        widths.append(int(state_dict[key].shape[0]))
    return dict(
        num_classes=int(state_dict["vistr.class_embed.weight"].shape[0]) - 1,
        stem_width=int(state_dict["vistr.backbone.0.body.conv1.weight"].shape[0]),
        widths=widths,
        depths=depths,
        hidden_dim=int(state_dict["vistr.input_proj.weight"].shape[0]),
        num_frames=num_frames,
        num_instances=queries // num_frames,
        encoder_layers=_layer_count(state_dict, r"vistr\.transformer\.encoder\.layers\.(\d+)\.linear1\.weight"),
        decoder_layers=_layer_count(state_dict, r"vistr\.transformer\.decoder\.layers\.(\d+)\.linear1\.weight"),
        ffn_dim=int(state_dict.get("vistr.transformer.encoder.layers.0.linear1.weight", torch.empty(2048, 0)).shape[0]),
    )


def from_repository(name: str, state_dict: dict[str, torch.Tensor], origin: str = "vistr checkpoint") -> VisTR:
    """The original repository's VisTRsegm state dict (a .pth's "model") loaded as `name`
    (vistr-r50 / vistr-r101): its ResNet depth must be the name's, its classes, queries, widths and
    layers are read off the weights. Any key of no known place, or one missing, is a CheckpointError."""
    default = VARIANTS[name]
    expected_depths = RESNET101["depths"] if name.endswith("r101") else RESNET50["depths"]
    arch = _arch_from_repository(state_dict, NUM_FRAMES)
    if arch["depths"] != expected_depths:
        raise CheckpointError(
            f"{origin}: not a {name} checkpoint: its ResNet stages have {arch['depths']} blocks, {name}'s {expected_depths}"
        )
    with building_from(origin, "its weights' shapes"):
        model = default(**arch)
    weights = rename_keys(_split_in_proj(state_dict), _REPOSITORY_RULES, ignored=_REPOSITORY_IGNORED, keep_unknown=True, origin=origin)
    model = load_weights(model, weights, origin, f"the {name} its weights describe")
    model.name = name
    return model


# ---------------------------------------------------------------------------------------------
# The contract: the named variants (the YouTube-VIS models: ResNet-50 or -101, 6 + 6 layers 384
# wide, 8 heads, 36 frames of 10 instances, 41 classes), the repository loader
# ---------------------------------------------------------------------------------------------


def vistr_r50(num_classes: int = 41, **overrides) -> VisTR:
    """VisTR with a ResNet-50 backbone and the segmentation head, random weights."""
    return VisTR(num_classes=num_classes, **{**RESNET50, **overrides})


def vistr_r101(num_classes: int = 41, **overrides) -> VisTR:
    """VisTR with a ResNet-101 backbone and the segmentation head, random weights."""
    return VisTR(num_classes=num_classes, **{**RESNET101, **overrides})


VARIANTS = {"vistr-r50": vistr_r50, "vistr-r101": vistr_r101}

CONTRACT = FamilyContract(model=VisTR, variants=VARIANTS, from_repository=from_repository)
