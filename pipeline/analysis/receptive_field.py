"""The effective receptive field (ERF) of a segmentation model, measured on real images.

Luo et al., "Understanding the Effective Receptive Field in Deep Convolutional Neural Networks"
(NIPS 2016): the ERF of an output unit is the gradient of its score with respect to the input
pixels. Here, for one model and a sample of images:

1. each image (H x W x 3 uint8) is brought to `size` x `size` by a centre crop. A crop, not a
   resize, because the pipeline feeds the model windows cut from images at their own resolution
   (pipeline/predict/tiling.py): a resize would change the scale of what the model sees and so the field
   measured in pixels. An image whose short side is under `size` is first scaled up (bilinear,
   aspect kept) until the short side is `size`, then cropped;
2. the pixels (float, 0-255 scale, requiring grad) go through `model.normalize` and the model
   (in eval mode) to N x C x h x w scores; the output stride is size / h (and size / w);
3. the centre pixel of the input is (size // 2, size // 2); the centre output pixel is the output
   location that covers it, (size // 2) * h // size (same for x): the pixel size // 2 lies in
   that output cell whether one counts cells as blocks [i*s, (i+1)*s) or, as a padded strided
   conv does, centred on i*s;
4. its score is the score of the class the model predicts there (`score="predicted"`, the argmax
   at that location, per image) or the sum of all class scores (`score="sum"`);
5. autograd gives d score / d pixels (w.r.t. the 0-255 pixels, through the normalization); the
   absolute values are summed over the 3 channels, summed over the images, divided by the image
   count, and normalised to sum 1 (float64).

Distances from the centre are Chebyshev (square) distances: "within radius r" means inside the
(2r + 1) x (2r + 1) square centred on the centre pixel. A conv stack's field is a square, so a
field of extent 2r + 1 holds all its mass exactly at radius r; and radius size / 2 covers the whole
input, so the shares reach 1 there.

The theoretical receptive field (`theoretical_extent`) is read from the model's modules, without
hooks or a forward pass: when every leaf module is a conv, a pooling layer or a pointwise layer
(batch norm, activations, dropout, identity), the leaves are taken as one chain in the order they
are registered, and the usual rule gives the extent: start at 1 pixel with jump 1; each conv or
pool adds (kernel - 1) * dilation * jump and multiplies the jump by its stride. The extent is the
side of the square (the larger of the two axes for non-square kernels), in input pixels, and may
be larger than the input. For a branching graph of such layers (residual or parallel paths) the
rule sums every branch, so it is an upper bound. Any other leaf (attention, Linear, LayerNorm,
GroupNorm, global or adaptive pooling, upsampling, transposed convs, anything unknown) gives None:
the transformer models of segpipe (SegFormer, SETR, Segmenter, MaskFormer, Mask2Former) attend
across the whole input, so their theoretical field is the whole input, whatever its size. The rule
cannot see what a forward does with functional calls (F.interpolate, a mean over space, a matmul):
when the measured field is wider than the extent it states, the extent is dropped (None) with a
warning.

`erf_figure_png` draws the result (matplotlib, Agg, imported only there).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import SegmentationModel

SCORES = ("predicted", "sum")

# leaves that act on each pixel alone (in eval mode): they leave the field as it is
_POINTWISE: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
)

# leaves that mix a kernel's neighbourhood: they widen the field by the rule
_LOCAL: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass
class ErfResult:
    """An effective receptive field.

    grad         size x size float64, non-negative, sums to 1: the mean |d score / d pixel|
                 (summed over channels) of the centre output pixel, normalised
    images       how many images it averages
    theoretical  the theoretical field's extent in input pixels (the side of its square) when
                 finite and knowable from the model's modules; None otherwise (attention models:
                 their theoretical field is the whole input)
    """

    grad: np.ndarray
    images: int
    theoretical: int | None

    @property
    def size(self) -> int:
        return int(self.grad.shape[0])

    @property
    def centre(self) -> tuple[int, int]:
        """The centre input pixel (row, column)."""
        return self.grad.shape[0] // 2, self.grad.shape[1] // 2

    def _cumulative(self) -> np.ndarray:
        """Share of the mass within Chebyshev radius r, for r = 0 .. the largest distance."""
        rows, cols = np.indices(self.grad.shape)
        cy, cx = self.centre
        distance = np.maximum(np.abs(rows - cy), np.abs(cols - cx))
        mass = np.cumsum(np.bincount(distance.ravel(), weights=self.grad.ravel()))
        return mass / mass[-1]  # the last is exactly 1.0

    def radius_share(self, r: float) -> float:
        """Share of the gradient mass within radius r pixels of the centre (Chebyshev distance:
        inside the (2r + 1)-pixel square around the centre pixel)."""
        if r < 0:
            return 0.0
        cumulative = self._cumulative()
        return float(cumulative[min(math.floor(r), len(cumulative) - 1)])

    @property
    def shares(self) -> list[tuple[int, float]]:
        """(radius, share) for radii 1, 2, 4, ... and size / 2 (where the share is 1)."""
        cumulative = self._cumulative()
        last = self.size // 2
        radii = [1 << k for k in range(max(last, 1).bit_length()) if (1 << k) < last] + [last]
        return [(r, float(cumulative[min(r, len(cumulative) - 1)])) for r in radii]

    def effective_radius(self, q: float = 0.9) -> int:
        """The smallest radius (in pixels, Chebyshev) holding at least q of the mass."""
        if not 0 < q <= 1:
            raise ValueError(f"q must be in (0, 1], got {q}")
        cumulative = self._cumulative()
        return int(np.argmax(cumulative >= q - 1e-12))


def theoretical_extent(model: nn.Module) -> int | None:
    """The theoretical receptive field's extent in input pixels, or None when it is not finite or
    not knowable from the model's leaf modules (the rule: see the module's docstring)."""
    extent = [1, 1]
    jump = [1, 1]
    for module in model.modules():
        if next(module.children(), None) is not None:
            continue  # a container: its leaves come by themselves
        if module is model and not isinstance(module, _POINTWISE + _LOCAL):
            continue  # a model without submodules: nothing it registers mixes pixels
        if isinstance(module, _POINTWISE):
            continue
        if isinstance(module, _LOCAL):
            kernel = _pair(module.kernel_size)
            stride = _pair(module.stride if module.stride is not None else module.kernel_size)
            dilation = _pair(getattr(module, "dilation", 1))
            for axis in (0, 1):
                extent[axis] += (kernel[axis] - 1) * dilation[axis] * jump[axis]
                jump[axis] *= stride[axis]
            continue
        return None  # attention, Linear, LayerNorm, upsampling, ... or something unknown
    return max(extent)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def prepare_image(image: np.ndarray, size: int) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x size x size float (0-255 scale): a centre crop, after scaling the
    image up (aspect kept) when its short side is under `size`."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be H x W x 3 arrays, got shape {array.shape}")
    pixels = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float()
    height, width = pixels.shape[1:]
    short = min(height, width)
    if short < size:
        scale = size / short
        new = (max(size, round(height * scale)), max(size, round(width * scale)))
        pixels = F.interpolate(pixels[None], size=new, mode="bilinear", align_corners=False)[0].clamp(0, 255)
        height, width = new
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[:, top : top + size, left : left + size]


def effective_receptive_field(
    model: SegmentationModel,
    images: Sequence[np.ndarray],
    *,
    size: int = 256,
    device: str | torch.device | None = None,
    score: str = "predicted",
) -> ErfResult:
    """The ERF of the centre output pixel of `model` over `images` (see the module's docstring).

    The model runs in eval mode, one image at a time, on `device` (default: where its parameters
    are); its training flag and device are restored afterwards. Parameter gradients are neither
    computed nor touched (torch.autograd.grad w.r.t. the pixels only).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}")
    if len(images) == 0:
        raise ValueError("no images: the ERF averages over at least one")
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    target = torch.device(device) if device is not None else home
    training = model.training
    model.to(target).eval()
    total = torch.zeros(size, size, dtype=torch.float64, device=target)
    try:
        for image in images:
            pixels = prepare_image(image, size).to(target)[None].requires_grad_(True)
            scores = model(model.normalize(pixels))
            if scores.ndim != 4 or scores.shape[0] != 1:
                raise ValueError(f"the model returned scores of shape {tuple(scores.shape)}, not 1 x C x h x w")
            h, w = scores.shape[-2:]
            iy, ix = (size // 2) * h // size, (size // 2) * w // size
            centre = scores[0, :, iy, ix]
            value = centre[centre.detach().argmax()] if score == "predicted" else centre.sum()
            (grad,) = torch.autograd.grad(value, pixels)
            total += grad[0].abs().sum(0).double()
    finally:
        model.to(home).train(training)
    mean = (total / len(images)).cpu().numpy()
    mass = mean.sum()
    if not np.isfinite(mass):
        raise ValueError("the gradient is not finite: the model's scores overflow or are NaN")
    if mass <= 0:
        raise ValueError("the gradient is zero everywhere: the centre score does not depend on the input")
    grad = mean / mass
    theoretical = theoretical_extent(model)
    if theoretical is not None:
        rows, cols = np.nonzero(grad)
        measured = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        if measured > theoretical:
            warnings.warn(
                f"the measured field spans {measured} pixels, more than the {theoretical} read from the model's modules: "
                "its forward mixes pixels in ways the modules do not show; theoretical extent dropped",
                stacklevel=2,
            )
            theoretical = None
    return ErfResult(grad=grad, images=len(images), theoretical=theoretical)


def erf_figure_png(result: ErfResult, title: str) -> bytes:
    """A PNG (matplotlib, Agg): the ERF as a heat map on a log colour scale with a colour bar, the
    theoretical extent as a dashed square where known, and the share of mass against radius."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    grad = result.grad
    size = result.size
    cy, cx = result.centre
    positive = grad[grad > 0]
    vmax = float(positive.max())
    vmin = max(float(positive.min()), vmax * 1e-6)
    if vmin >= vmax:
        vmin = vmax / 10
    figure = Figure(figsize=(10, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    heat, curve = figure.subplots(1, 2, width_ratios=[1.15, 1])
    cmap = colormaps["magma"]
    cmap = cmap.with_extremes(bad=cmap(0.0))
    shown = np.where(grad > 0, grad, np.nan)  # zeros: below the scale, drawn in the lowest colour
    image = heat.imshow(shown, norm=LogNorm(vmin=vmin, vmax=vmax, clip=True), cmap=cmap, interpolation="nearest")
    figure.colorbar(image, ax=heat, label="share of gradient mass per pixel (log)")
    heat.plot([cx], [cy], marker="+", color="cyan", markersize=8)
    if result.theoretical is not None:
        half = result.theoretical / 2
        heat.add_patch(
            Rectangle(
                (cx - half, cy - half), result.theoretical, result.theoretical, fill=False, linestyle="--", edgecolor="cyan", linewidth=1.2
            )
        )
        extent = f"theoretical extent {result.theoretical} px (dashed)"
    else:
        extent = "theoretical field: the whole input"
    heat.set_title(f"ERF, {result.images} image{'s' if result.images != 1 else ''}, {size}x{size}; {extent}", fontsize=9)
    heat.set_xlabel("x (px)")
    heat.set_ylabel("y (px)")

    cumulative = result._cumulative()
    radii = np.arange(len(cumulative))
    curve.plot(radii[1:], cumulative[1:], color="tab:blue", label="share within radius")
    listed = result.shares
    curve.plot([r for r, _ in listed], [s for _, s in listed], "o", color="tab:blue", markersize=4)
    r90 = result.effective_radius(0.9)
    curve.axhline(0.9, color="grey", linewidth=0.8, linestyle=":")
    curve.axvline(max(r90, 1), color="tab:red", linewidth=1, linestyle="--", label=f"90% radius: {r90} px")
    if result.theoretical is not None:
        curve.axvline(max((result.theoretical - 1) / 2, 1), color="cyan", linewidth=1, linestyle="--", label="theoretical half-extent")
    curve.set_xscale("log", base=2)
    curve.set_xlim(1, max(size // 2, 2))
    curve.set_ylim(0, 1.02)
    curve.set_xlabel("radius (px, square around the centre)")
    curve.set_ylabel("share of gradient mass")
    curve.grid(True, alpha=0.3)
    curve.legend(loc="lower right", fontsize=8)
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
