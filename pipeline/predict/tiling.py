"""Tiling and stitching: plan windows over images of any size, batch them through a model, blend.

Read top to bottom:
  settings and results    `TilingSettings`, `Segmentation`
  the window planner      `window_starts`, `plan_windows` -> `WindowPlan`
  blending weights        `importance_map` (mean: ones; gaussian: MONAI's map)
  stitchers               `stitch_windows` (reference, whole image in memory) and
                          `StreamingStitcher` (a band of rows; what the pipeline uses)
  entry points            `segment_images` (in-memory images; `segmentations`: one at a time as
                          each is done, the predictor actor's call) and
                          `segment_streaming` (huge images read window by window, yields row bands),
                          their batches halved where the device runs out of memory (`BatchSizes`;
                          the stitcher on the device gives way to the CPU there)
  test-time augmentation  `TTAScoreFn`: a score_fn that averages flipped and rescaled views

Conventions, shared with MONAI's `sliding_window_inference` and mmseg's `slide_inference` so that
results can be checked against them:
- Windows start every `stride` pixels along each axis; the last window of an axis is moved back to
  end exactly at the image's edge. An axis shorter than the window is padded to the window with 0
  (on the 0-255 scale, before normalization), split as MONAI does (`diff // 2` before, the rest
  after), and the padding is cropped away from the result.
- `score_fn` gets windows N x 3 x h x w float32 on the 0-255 scale and returns N x C x h' x w' class
  scores (float32, CPU) at the model's output stride. Scores are resized to the window (bilinear,
  align_corners=False) only where h' x w' differs, window by window.
- Blending is a weighted mean: sum(w * scores) / sum(w) over the windows covering a pixel, with w = 1
  (`mean`) or MONAI's gaussian importance map (`gaussian`).
- Labels are the argmax over classes of the blended scores (ties go to the lower class index).
  For binary tasks (`settings.binary`) `probability` is the foreground probability (`Foreground`):
  softmax(blended)[positive] for logits; blended[positive] / blended.sum() for scores that are
  probabilities already (the query models' semantic map); sigmoid(blended) for a one-logit head,
  whose labels are then probability > 0.5. Multi-class runs with output.confidence (`settings.confidence`)
  get, in the same place, each pixel's confidence (`Confidence`): its largest class probability,
  max softmax(blended) for logits, the largest score over their sum for probability-like scores.

Stitching resolution: the stitchers blend at the image's full resolution, after each window's scores
are resized to the window. Windows at an image's edge start at offsets that are not multiples of the
model's output stride, so blending at the output stride would put those windows up to stride - 1
pixels off (MONAI truncates `int(start * zoom)`); at full resolution every window lands exactly where
it was read and the result is the same as mmseg's resize-then-paste. What it costs is kept small by
never holding the image's scores at full resolution: the streaming stitcher holds the windows'
scores as the model gave them (at its output stride) and, when rows are final, resizes and blends
them a few rows at a time (`StreamingStitcher`). Huge images (pipeline.io.tiff, read by
pipeline.predict.predictor) are stitched the same way, band by band.

Resizing: `BilinearRows` computes any rows of F.interpolate(bilinear, align_corners=False) of a
window's scores, the same float32 numbers as F.interpolate, several times faster (ATen's kernel for
the channels-last scores of the SegFormer head takes 0.17 s a window for 40 classes, 65 x 65 to
512 x 512, on one thread; these rows 0.02 s). The numbers are the same because each output is computed with
the same operations in the same order as ATen's compiled kernel, fused multiply-adds included
(`torch.addcmul`): which of its two kernels F.interpolate runs depends on the scores' layout, and
`bilinear_formula` finds, once per shape and layout, the formula that reproduces it exactly on
this machine, or none (then the stitcher resizes with F.interpolate itself, as `resize_scores` does).

Test-time augmentation (`TTAScoreFn`, config `inference.tta: {flip, scales}`) sits inside score_fn:
each window (each image in whole mode) is scored once per scale (the window resized by the scale,
bilinear) and, with flip, once more mirrored left-right (its scores mirrored back). The views are
averaged in score space, i.e. the model's raw class scores (logits for SegFormer and SETR; the
semantic score map for the query-based models), not in softmax probabilities as mmseg's aug_test
does. That keeps one space throughout: the stitcher blends windows as a weighted mean of scores,
TTA views are one more mean of the same scores, and a binary task's probability is still
softmax(blended scores)[1], so whole, slide and streamed images, with or without TTA, get their
labels and probabilities the same way. The views are averaged at the finest resolution any of them
produced (the largest scale's output, capped at the window size), so that an upscaled view keeps
its detail and a batch's scores stay at most N x C x window; the stitcher then resizes to the
window as for any score_fn.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import InferenceConfig

log = logging.getLogger(__name__)
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
# read_window(y0, x0, height, width) -> height x width x 3 uint8, a region inside the image
ReadWindow = Callable[[int, int, int, int], np.ndarray]

MODES = ("whole", "slide")
BLENDS = ("mean", "gaussian")
GAUSSIAN_SIGMA_SCALE = 0.125  # sigma = 0.125 x window, per axis, as MONAI's default
GAUSSIAN_FLOOR = 1e-3  # MONAI clamps its importance map below at max(min, 1e-3)


# --------------------------------------------------------------------------- settings and results


def _pair(value: object, name: str) -> tuple[int, int]:
    """An int or a (height, width) pair of positive ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a [height, width] pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {list(pair)}")
    return pair


@dataclass(frozen=True)
class TilingSettings:
    mode: str = "slide"  # "whole" | "slide"
    window: tuple[int, int] = (512, 512)  # (height, width)
    stride: tuple[int, int] = (341, 341)
    blend: str = "mean"  # "mean" | "gaussian"
    batch_size: int = 8  # windows per forward pass
    binary: bool = False  # also return the foreground probability (2-class or one-logit heads)
    positive_class: int = 1  # the foreground class of a binary task
    score_kind: str = "logits"  # "logits" | "probabilities": what the model's scores are (model.score_kind)
    confidence: bool = False  # multi-class: also return each pixel's largest class probability (output.confidence)

    @classmethod
    def from_config(
        cls,
        inference: InferenceConfig,
        *,
        binary: bool = False,
        positive_class: int = 1,
        score_kind: str = "logits",
        confidence: bool = False,
    ) -> TilingSettings:
        """The job's tiling (inference: mode, window, stride, blend, batch_size); what the model, the
        metrics and the output decide (a binary task, its foreground class, the scores' kind, the
        confidence map) the actor adds."""
        return cls(
            mode=inference.mode,
            window=tuple(inference.window),
            stride=tuple(inference.stride),
            blend=inference.blend,
            batch_size=inference.batch_size,
            binary=binary,
            positive_class=positive_class,
            score_kind=score_kind,
            confidence=confidence,
        )

    @property
    def foreground(self) -> Foreground | None:
        return Foreground(self.positive_class, self.score_kind) if self.binary else None

    @property
    def beside(self) -> Foreground | Confidence | None:
        """What the stitchers compute beside the labels: the foreground probability (binary tasks),
        the confidence (output.confidence), or nothing."""
        return self.foreground or (Confidence(self.score_kind) if self.confidence else None)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {self.blend!r}")
        window, stride = _pair(self.window, "window"), _pair(self.stride, "stride")
        if stride[0] > window[0] or stride[1] > window[1]:
            # a stride beyond the window would leave pixels that no window covers
            raise ValueError(f"stride {list(stride)} must not exceed window {list(window)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.binary and self.confidence:
            raise ValueError("a binary task's probability is its confidence: ask for one of them")
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "stride", stride)


@dataclass
class Segmentation:
    labels: np.ndarray  # H x W, uint8 when num_classes <= 256 else uint16
    probability: np.ndarray | None  # H x W float32 in [0, 1] (binary tasks; confidence where asked), else None


@dataclass
class Band:
    """Finished rows of one image, as a stitcher emits them."""

    y0: int  # the first row, in image coordinates
    labels: np.ndarray  # rows x W
    probability: np.ndarray | None  # rows x W float32 (binary tasks; confidence where asked), else None
    scores: torch.Tensor | None = None  # C x rows x W blended scores, where the stitcher was asked to keep them


def label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


def argmax_classes(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(dim=0) of C x h x w scores (ties to the lower class), as a running maximum.

    torch's CPU argmax over the leading dimension is slow: 1.4 s for 2 x 500 x 12000 (a band of a
    12000-wide image) where this loop takes 0.09 s; 2.0 s against 0.6 s for 19 classes, 0.6
    against 0.5 for 150; it also needs no int64 result. uint8 labels up to 256 classes, int32 above.
    """
    return argmax_and_max(scores)[0]


def argmax_and_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`argmax_classes` and the maximum it kept (h x w): the top class's score."""
    num_classes = scores.shape[0]
    labels = torch.zeros(scores.shape[1:], dtype=torch.uint8 if num_classes <= 256 else torch.int32, device=scores.device)
    best = scores[0].clone()
    for c in range(1, num_classes):
        better = scores[c] > best  # strictly: a tie keeps the lower class, as argmax does
        labels.masked_fill_(better, c)
        torch.maximum(best, scores[c], out=best)
    return labels, best


def largest_probability(scores: torch.Tensor, best: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """Each pixel's largest class probability from C x h x w scores and their maximum `best`:
    max softmax = 1 / sum_c exp(s_c - max) for logits, summed a class at a time (one h x w
    temporary, never a C x h x w softmax); max / sum for scores that are probabilities already."""
    if kind == "probabilities":
        return best / scores.sum(dim=0).clamp_min(torch.finfo(scores.dtype).tiny)
    total, term = torch.zeros_like(best), torch.empty_like(best)
    for c in range(scores.shape[0]):
        total.add_(torch.sub(scores[c], best, out=term).exp_())
    return total.reciprocal_()


@dataclass(frozen=True)
class Foreground:
    """How a binary task's foreground probability comes from blended scores (see the module doc)."""

    positive: int = 1  # the foreground class
    scores: str = "logits"  # "logits" | "probabilities"


@dataclass(frozen=True)
class Confidence:
    """A multi-class run's confidence map (output.confidence): each pixel's largest class probability."""

    scores: str = "logits"  # "logits" | "probabilities"


def _foreground(binary: bool | Foreground | Confidence | None) -> Foreground | Confidence | None:
    if binary is True:
        return Foreground()
    return binary or None


def labels_and_probability(scores: torch.Tensor, binary: bool | Foreground | Confidence | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Blended scores C x h x w -> labels (argmax over classes) and, for binary tasks, the foreground
    probability; a one-logit head (C == 1) gives labels probability > 0.5 (0 background, 1 foreground).
    With `Confidence`: the labels and each pixel's largest class probability (`largest_probability`)."""
    foreground = _foreground(binary)
    num_classes = scores.shape[0]
    if isinstance(foreground, Confidence):
        labels, best = argmax_and_max(scores)
        confidence = largest_probability(scores, best, foreground.scores)
        return labels.cpu().numpy().astype(label_dtype(num_classes), copy=False), confidence.cpu().numpy().astype(np.float32, copy=False)
    if foreground is not None and num_classes == 1:
        probability = torch.sigmoid(scores[0])
        return (probability > 0.5).cpu().numpy().astype(np.uint8), probability.cpu().numpy().astype(np.float32, copy=False)
    # scores on a device (the stitcher where the model runs): only these rows cross back to the CPU
    labels = argmax_classes(scores).cpu().numpy().astype(label_dtype(num_classes), copy=False)
    if foreground is None:
        return labels, None
    if num_classes != 2:
        raise ValueError(f"binary output needs 2 classes (background, foreground) or one logit, the model gives {num_classes}")
    if foreground.scores == "probabilities":
        probability = scores[foreground.positive] / scores.sum(dim=0).clamp_min(torch.finfo(scores.dtype).tiny)
    else:
        probability = torch.softmax(scores, dim=0)[foreground.positive]
    return labels, probability.cpu().numpy().astype(np.float32, copy=False)


# --------------------------------------------------------------------------- the window planner


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis of `size` pixels (already padded to >= window).

    Every `stride` pixels, as many as it takes to reach the edge, the last one moved back so that it
    ends exactly at the edge: ceil((size - window) / stride) + 1 windows, as MONAI's
    `dense_patch_slices` and mmseg's `slide_inference` place them.
    """
    if size <= window:
        return [0]
    count = math.ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(count)]


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of one image go. Window coordinates are in the padded image."""

    height: int  # the image
    width: int
    window: tuple[int, int]
    pad_top: int  # padding of an axis shorter than the window: diff // 2 before, the rest after
    pad_left: int
    padded_height: int
    padded_width: int
    ys: tuple[int, ...]  # window starts per axis; windows are every (y, x) pair, row-major
    xs: tuple[int, ...]

    @property
    def windows(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)


def plan_windows(height: int, width: int, window: tuple[int, int], stride: tuple[int, int]) -> WindowPlan:
    if height < 1 or width < 1:
        raise ValueError(f"cannot tile an empty image ({height} x {width})")
    window, stride = _pair(window, "window"), _pair(stride, "stride")
    padded_height, padded_width = max(height, window[0]), max(width, window[1])
    return WindowPlan(
        height=height,
        width=width,
        window=window,
        pad_top=(padded_height - height) // 2,
        pad_left=(padded_width - width) // 2,
        padded_height=padded_height,
        padded_width=padded_width,
        ys=tuple(window_starts(padded_height, window[0], stride[0])),
        xs=tuple(window_starts(padded_width, window[1], stride[1])),
    )


def model_inputs(height: int, width: int, settings: TilingSettings, views: int = 1) -> int:
    """How many model inputs one image takes: its sliding windows (slide mode) or one pass (whole
    mode), times the test-time augmentation views."""
    if settings.mode == "whole":
        return views
    return len(plan_windows(height, width, settings.window, settings.stride)) * views


# --------------------------------------------------------------------------- blending weights


def importance_map(window: tuple[int, int], blend: str) -> torch.Tensor:
    """The weight of each pixel of a window's scores, window_h x window_w float32.

    mean: ones. gaussian: MONAI's `compute_importance_map`: a separable gaussian with
    sigma = 0.125 x window per axis centred at (size - 1) / 2, then clamped below at
    max(min, 1e-3) so that the window's corners keep a small weight (the clamp makes the 2-D map
    not exactly separable, so it is built in 2-D).
    """
    if blend == "mean":
        return torch.ones(window, dtype=torch.float32)
    if blend != "gaussian":
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    axes = []
    for size in window:
        sigma = GAUSSIAN_SIGMA_SCALE * size
        offsets = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float32)
        axes.append(torch.exp(offsets**2 / (-2 * sigma**2)))
    weights = axes[0].unsqueeze(-1) * axes[1][None]
    floor = max(weights.min().item(), GAUSSIAN_FLOOR)
    return weights.clamp(min=floor)


# --------------------------------------------------------------------------- resizing window scores

BILINEAR_KINDS = ("separable", "four_point")


@dataclass(frozen=True)
class BilinearFormula:
    """How ATen's compiled CPU kernel computes each output of a bilinear resize (see `BilinearRows`)."""

    kind: str  # "separable" | "four_point"
    scalar_from: int = 0  # four_point: the channels from here on are summed in its scalar code's order
    fused_source: bool = True  # the source coordinate scale * (i + 0.5) - 0.5 as one fused multiply-add

    def __post_init__(self) -> None:
        if self.kind not in BILINEAR_KINDS:
            raise ValueError(f"kind must be one of {BILINEAR_KINDS}, got {self.kind!r}")


_FORMULAS: dict[tuple, BilinearFormula | None] = {}  # (shape, strides, size, threads) -> what F.interpolate computes
PROBE_ROWS = 32  # a candidate formula is compared this many rows at a time: a wrong one is turned down early


def _axis_taps(in_size: int, out_size: int, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATen's taps along one axis (bilinear, align_corners=False, sizes given): per output index the
    source indices i0, i1 (int64) and weights l0, l1 (float32), computed as ATen computes them."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    centres = torch.arange(out_size, dtype=torch.float32) + 0.5
    if fused:  # in float64 the product and the difference are exact: one rounding, as a fused multiply-add
        source = (scale.double() * centres.double() - 0.5).float().clamp_min(0)
    else:
        source = (scale * centres - 0.5).clamp_min(0)
    i0 = source.floor().to(torch.int64).clamp_max(in_size - 1)
    l1 = (source - i0).clamp(0, 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, 1 - l1, l1


class BilinearRows:
    """Rows of F.interpolate(scores[None], size, mode="bilinear", align_corners=False)[0] for C x h x w
    scores, the same float32 numbers, computed a run of output rows at a time (the rows that share
    their two source rows), so that a window is never resized whole.

    The formula is what ATen's kernel computes for each output, with a the scores at (y0, x0), b at
    (y0, x1), c at (y1, x0), d at (y1, x1), and fma(p, q, r) = p * q + r rounded once:
      separable   (its generic kernel: NCHW scores) the width, then the height:
                  t(y) = fma(s(y, x0), l0x, s(y, x1) * l1x); out = fma(t(y0), l0y, t(y1) * l1y)
      four_point  (its vectorised kernel: channels-last scores) the four taps with weights
                  w00 = l0y * l0x, ...: out = fma(a, w00, fma(b, w01, fma(d, w11, c * w10))), and
                  for the channels past its last whole vector (`scalar_from`), its scalar code's
                  order: fma(d, w11, fma(c, w10, fma(a, w00, b * w01)))
    and the source coordinate of an output index i, scale * (i + 0.5) - 0.5, one fused
    multiply-add where ATen's compiled code makes it one (`fused_source`).
    """

    def __init__(self, in_size: tuple[int, int], size: tuple[int, int], formula: BilinearFormula) -> None:
        self.in_size, self.size, self.formula = tuple(in_size), tuple(size), formula
        self.y0, self.y1, h0, h1 = _axis_taps(in_size[0], size[0], formula.fused_source)
        self.x0, self.x1, self.l0x, self.l1x = _axis_taps(in_size[1], size[1], formula.fused_source)
        self.l0y, self.l1y = h0[:, None], h1[:, None]  # columns: one weight per output row
        # runs of output rows that share their source rows (y0, y1): one set of operations each
        y0, y1 = self.y0.numpy(), self.y1.numpy()
        starts = np.flatnonzero(np.r_[True, (y0[1:] != y0[:-1]) | (y1[1:] != y1[:-1])])
        self.runs = [(int(a), int(b), int(y0[a]), int(y1[a])) for a, b in zip(starts, np.r_[starts[1:], len(y0)])]
        self._run_starts = [run[0] for run in self.runs]

    def rows(self, scores: torch.Tensor, top: int, bottom: int, out: torch.Tensor) -> torch.Tensor:
        """Output rows [top, bottom) into out (C x (bottom - top) x W, any strides); returns out.
        Fastest from contiguous scores (the width gather reads along rows)."""
        first, last = int(self.y0[top]), int(self.y1[bottom - 1]) + 1  # the source rows these need
        source = scores[:, first:last]
        columns = (source.shape[0], last - first, self.size[1])
        s0 = torch.gather(source, 2, self.x0.expand(columns))  # C x rows x W; 4x faster than index_select
        s1 = torch.gather(source, 2, self.x1.expand(columns))
        l0y, l1y = self.l0y[top:bottom], self.l1y[top:bottom]
        if self.formula.kind == "separable":
            across = s1.mul_(self.l1x).addcmul_(s0, self.l0x)  # t(y) of every source row
        else:  # the four taps' weights of these rows: rounded products, as ATen's
            w00, w01, w10, w11 = l0y * self.l0x, l0y * self.l1x, l1y * self.l0x, l1y * self.l1x
            vector, scalar = slice(0, self.formula.scalar_from), slice(self.formula.scalar_from, None)
        for start, end, i0, i1 in self.runs[bisect.bisect_right(self._run_starts, top) - 1 :]:
            if start >= bottom:
                break
            a, b = max(start, top) - top, min(end, bottom) - top  # rows of out
            i0, i1 = i0 - first, i1 - first
            if self.formula.kind == "separable":
                rows = out[:, a:b]
                torch.mul(across[:, i1 : i1 + 1], l1y[a:b], out=rows)
                rows.addcmul_(across[:, i0 : i0 + 1], l0y[a:b])
                continue
            if vector.stop:
                rows = out[vector, a:b]
                torch.mul(s0[vector, i1 : i1 + 1], w10[a:b], out=rows)
                rows.addcmul_(s1[vector, i1 : i1 + 1], w11[a:b])
                rows.addcmul_(s1[vector, i0 : i0 + 1], w01[a:b])
                rows.addcmul_(s0[vector, i0 : i0 + 1], w00[a:b])
            if vector.stop < out.shape[0]:
                rows = out[scalar, a:b]
                torch.mul(s1[scalar, i0 : i0 + 1], w01[a:b], out=rows)
                rows.addcmul_(s0[scalar, i0 : i0 + 1], w00[a:b])
                rows.addcmul_(s0[scalar, i1 : i1 + 1], w10[a:b])
                rows.addcmul_(s1[scalar, i1 : i1 + 1], w11[a:b])
        return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread meanwhile (its thread count restored after)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _interpolate(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


def _resize_on_device(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The stitcher on the model's device: F.interpolate where the scores are (the CPU path's resizes go
    through resize_scores and BilinearRows instead)."""
    return _interpolate(scores, size)


def bilinear_formula(scores: torch.Tensor, size: tuple[int, int]) -> BilinearFormula | None:
    """The formula of `BilinearRows` that gives F.interpolate's numbers for float32 scores of this
    shape and layout resized to `size`, or None where none does.

    ATen picks its kernel by the layout (channels-last or not), the number of channels, the output
    size and the number of threads; its vectorised kernel leaves the channels past its last whole
    vector (of 8 or 16 floats, by the CPU) to scalar code; and its compiled code decides where
    multiply-adds are fused. Rather than restate those rules, each candidate is tried once per
    shape, layout and thread count on random scores of that layout and kept only if every output is
    bit for bit the same.
    """
    key = (tuple(scores.shape), scores.stride(), tuple(size), torch.get_num_threads())
    if key not in _FORMULAS:
        probe = torch.empty_strided(scores.shape, scores.stride(), dtype=torch.float32)
        probe.copy_(torch.randn(scores.shape, generator=torch.Generator().manual_seed(0)) * 4)
        expected = _interpolate(probe, size)
        channels = scores.shape[0]
        # the channels in whole vectors: all of them, those in vectors of 16, 8 or 4 floats, none
        vectors = dict.fromkeys([channels] + [channels - channels % width for width in (16, 8, 4)] + [0])
        candidates = [
            BilinearFormula(kind, n, fused)
            for fused in (True, False)
            for kind, n in [("separable", 0)] + [("four_point", n) for n in vectors]
        ]
        out = torch.empty(channels, PROBE_ROWS, size[1])
        _FORMULAS[key] = None
        for formula in candidates:
            if _same_rows(BilinearRows(probe.shape[1:], size, formula), probe, expected, out):
                _FORMULAS[key] = formula
                break
    return _FORMULAS[key]


def _same_rows(rows: BilinearRows, scores: torch.Tensor, expected: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `rows` gives `expected` bit for bit, compared a block of rows (out) at a time."""
    for top in range(0, expected.shape[1], out.shape[1]):
        bottom = min(top + out.shape[1], expected.shape[1])
        if not torch.equal(rows.rows(scores, top, bottom, out[:, : bottom - top]), expected[:, top:bottom]):
            return False
    return True


def bilinear_rows(scores: torch.Tensor, size: tuple[int, int]) -> BilinearRows | None:
    """A `BilinearRows` that resizes these scores exactly as F.interpolate does, or None."""
    formula = bilinear_formula(scores, size)
    return None if formula is None else _bilinear_rows(tuple(scores.shape[1:]), tuple(size), formula)


@functools.lru_cache(maxsize=64)
def _bilinear_rows(in_size: tuple[int, int], size: tuple[int, int], formula: BilinearFormula) -> BilinearRows:
    return BilinearRows(in_size, size, formula)


def resize_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """C x h' x w' -> C x size, bilinear with align_corners=False, only where the size differs."""
    scores = scores.to("cpu", torch.float32)
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return _interpolate(scores, size)


# --------------------------------------------------------------------------- stitchers


def stitch_windows(plan: WindowPlan, window_scores: Iterable[torch.Tensor], blend: str = "mean") -> torch.Tensor:
    """Reference stitcher: blends all windows in a buffer over the whole padded image.

    window_scores: C x window_h x window_w per window (at window resolution), in `plan.windows` order.
    Returns the blended scores C x H x W, padding cropped. Holds C x padded H x padded W float32: fine
    for tests and small images, which is what it is for; the pipeline uses `StreamingStitcher`.
    """
    weights = importance_map(plan.window, blend)
    wh, ww = plan.window
    total: torch.Tensor | None = None
    weight_sum = torch.zeros(plan.padded_height, plan.padded_width)
    count = 0
    for (y0, x0), scores in zip(plan.windows, window_scores, strict=True):
        if total is None:
            total = torch.zeros(scores.shape[0], plan.padded_height, plan.padded_width)
        total[:, y0 : y0 + wh, x0 : x0 + ww] += scores * weights
        weight_sum[y0 : y0 + wh, x0 : x0 + ww] += weights
        count += 1
    assert total is not None and count == len(plan)
    blended = total / weight_sum
    return blended[:, plan.pad_top : plan.pad_top + plan.height, plan.pad_left : plan.pad_left + plan.width]


BLOCK_BYTES = 16 * 2**20  # held windows are blended into C x rows x padded W float32 of about this size at a time


@dataclass
class _HeldWindow:
    y0: int  # its top left corner, in the padded image
    x0: int
    scores: torch.Tensor  # C x h' x w', as the model gave them
    resize: BilinearRows | None  # to the window; None: the scores are at window resolution


class StreamingStitcher:
    """Blends the windows of one image, emitting finished rows while it goes.

    Windows come in plan order (row-major: all windows of a row of windows, then the next row), one
    `add` each, with scores C x h' x w': at window resolution, or smaller (the model's output
    stride), resized to the window as F.interpolate does (bilinear, align_corners=False).

    When rows are final: windows arrive top to bottom, so once every window starting at row y has
    been added, no later window touches a row above the next window row's start. Those rows are
    divided by their weight sum, turned into labels (and probabilities) and emitted as a `Band`.

    What it holds, one of two ways, chosen at the first window:
    - held windows (scores smaller than the window, as models give them, wherever `BilinearRows`
      reproduces F.interpolate for them): the scores of every window whose rows are not all emitted
      yet, as the model gave them, about (window rows that overlap) x (windows per row) x C x h' x w'
      float32 (16 MB for 40 classes at output stride 8, windows of 512 on a 4096-wide image, where
      a band would take 335 MB). Final rows are blended a block at a time (BLOCK_BYTES): the rows of
      each window that covers them resized and added, in plan order, into a C x block x padded W
      sum, so that every pixel gets the same additions in the same order as in a band, and the same
      float32 result. Weights are added the same way into a block x padded W weight sum.
    - a band (scores at window resolution, or a layout no formula reproduces): `scores` C x window_h
      x padded W (the weighted sum) and `weight_sum` window_h x padded W, both float32 (the gaussian
      map's clamp makes the weight sum non-separable, so it is a 2-D band too). Each window is added
      as it comes; final rows are divided in place and emitted, then the band shifts up and the rows
      it frees are zeroed. Peak about (C + 1) x window height x image width x 4 bytes.
    Either way memory grows with the image's width, never with its height.

    `device` (the model's, e.g. CUDA): the band lives there, windows' scores are resized (F.interpolate)
    and blended where the model left them, and only the label rows (and probability rows where
    asked) cross back to the CPU. On the CPU it gives the same float32 numbers as the other two ways.
    Where the device runs out of memory (the band, a window's resize, the rows' reduction), the band
    moves to the CPU and the image goes on there (`memory`, the actor's `BatchSizes`, remembers how much
    that stitch needed: an image needing as much starts on the CPU); the labels are the same.

    Skipped windows (a raster's windows without valid data, a slide's without tissue: see
    `segment_streaming`): `skip()` takes the window's place in the plan and adds nothing; pixels that
    no window run covers (weight sum 0) get `skipped_label` (probability 0), and rows before the
    first window run are emitted as such without any scores.
    """

    def __init__(
        self,
        plan: WindowPlan,
        blend: str = "mean",
        binary: bool | Foreground | Confidence | None = False,
        keep_scores: bool = False,
        device: torch.device | None = None,
        skipped_label: int = 255,
        memory: BatchSizes | None = None,
    ):
        self.plan = plan
        self.memory = memory  # where the device stitch ran out of memory before (None: nothing remembered)
        self.left_device = False  # the device ran out of memory: the band went on on the CPU
        self.skipped_label = skipped_label
        self._skipped = False  # a window was skipped: rows may be covered by none
        self.binary = _foreground(binary)
        self.keep_scores = keep_scores  # also hand out the blended scores in each Band (tests, TTA)
        self.device = device  # None: the CPU, held windows where they can be
        self.weights = importance_map(plan.window, blend).to(device or "cpu")
        self._uniform = blend == "mean"  # weights of 1: skip the multiplication
        self._windows = plan.windows
        self._next = 0  # index of the next window to add
        self._band_top = 0  # padded row of the first row not emitted yet (band mode: held in band row 0)
        self._classes: int | None = None  # known at the first window
        self._held: list[_HeldWindow] | None = None  # held windows, or None: the band
        self._scores: torch.Tensor | None = None  # the band, allocated at the first window
        self._weight_sum: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self._next == len(self._windows)

    def add(self, scores: torch.Tensor | None) -> list[Band]:
        """Add the next window's scores (None: the window is skipped); returns the bands (0 or 1)
        that this window finished."""
        if self.finished:
            raise RuntimeError("all windows of this image have been added already")
        if scores is None:
            return self._skip()
        if scores.ndim != 3:
            raise ValueError(f"window scores must be C x h x w, got {tuple(scores.shape)}")
        first_on_device = self._classes is None and self.device is not None and self.memory is not None
        if first_on_device and not self.memory.stitch_fits(self.device_bytes(scores.shape[0])):
            self.device = None  # as large a stitch ran out of device memory before: the CPU's from the start
            self.weights = self.weights.cpu()
        failed = False
        try:
            self._add_window(scores)
        except torch.OutOfMemoryError:
            if self.device is None:
                raise
            failed = True
        if failed:  # outside the except block: its traceback held the failed step's tensors
            self._leave_device(scores.shape[0])
            self._add_window(scores)
        return self._advance()

    def device_bytes(self, num_classes: int) -> int:
        """Device memory the band takes: C + 1 float32 planes of window height x padded width."""
        return (num_classes + 1) * self.plan.window[0] * self.plan.padded_width * 4

    def _leave_device(self, num_classes: int) -> None:
        """The device ran out of memory: the band (if any) moves to the CPU, where the image goes on
        (band mode there: the same float32 numbers), and the actor remembers what it needed."""
        need = self.device_bytes(num_classes)
        self.device, self.left_device = None, True
        self.weights = self.weights.cpu()
        if self._classes is None:  # out of memory at the first window: the CPU chooses its own way
            self._scores = self._weight_sum = None
        elif self._scores is not None and self._weight_sum is not None:
            self._scores, self._weight_sum = self._scores.cpu(), self._weight_sum.cpu()
        _free_device_cache()
        if self.memory is not None:
            self.memory.stitch_ran_out(need)
        else:
            log.warning("out of device memory stitching an image (%.1f MB on the device): it goes on on the CPU", need / 2**20)

    def _add_window(self, scores: torch.Tensor) -> None:
        """The next window's scores into the held windows or the band. Where it runs out of device
        memory, nothing has changed yet: the band is only added to in place, after every allocation."""
        scores = scores.to(self.device or "cpu", torch.float32)
        window = self.plan.window
        at_window = tuple(scores.shape[1:]) == window
        if self._classes is None:
            if self.device is None and not at_window and bilinear_formula(scores, window) is not None:
                self._held = []
            else:
                self._scores = torch.zeros(scores.shape[0], window[0], self.plan.padded_width, device=scores.device)
                self._weight_sum = torch.zeros(window[0], self.plan.padded_width, device=scores.device)
            self._classes = scores.shape[0]
        elif scores.shape[0] != self._classes:
            raise ValueError(f"windows disagree on the number of classes: {scores.shape[0]} != {self._classes}")
        y0, x0 = self._windows[self._next]
        if self._held is not None:
            # a contiguous copy: rows gather fast from it (the formula is the original layout's), the
            # batch's scores are freed with its last window, and no buffer of score_fn's is kept
            resize = None if at_window else bilinear_rows(scores, window)
            held = scores.clone(memory_format=torch.contiguous_format) if at_window or resize is not None else resize_scores(scores, window)
            self._held.append(_HeldWindow(y0, x0, held, resize))
        else:
            assert self._scores is not None and self._weight_sum is not None
            scores = resize_scores(scores, window) if self.device is None else scores if at_window else _resize_on_device(scores, window)
            if not self._uniform:
                scores = scores * self.weights
            row = y0 - self._band_top
            wh, ww = window
            self._scores[:, row : row + wh, x0 : x0 + ww] += scores
            self._weight_sum[row : row + wh, x0 : x0 + ww] += self.weights

    def skip(self) -> list[Band]:
        """Pass the next window without scores (never run): it adds nothing, so pixels that only
        skipped windows cover have no weight and come out as `skipped_label` with probability 0."""
        if self.finished:
            raise RuntimeError("all windows of this image have been added already")
        self._skipped = True
        return self._advance()

    def _advance(self) -> list[Band]:
        """On to the next window: the band (0 or 1) of the rows above its top, which can no longer change."""
        self._next += 1
        final_until = self.plan.padded_height if self.finished else self._windows[self._next][0]
        if final_until <= self._band_top:
            return []
        band = self._emit(final_until)
        return [] if band is None else [band]

    def _emit(self, until: int) -> Band | None:
        """Emit padded rows [band_top, until) and let go of what only they needed."""
        plan = self.plan
        # the part of these rows that is image, not padding
        top = max(self._band_top, plan.pad_top)
        bottom = min(until, plan.pad_top + plan.height)
        band = None
        if bottom > top:
            if self._classes is None:  # only skipped windows so far: nothing scored these rows
                band = self._unscored_band(top, bottom)
            else:
                band = self._blend_band(top, bottom) if self._held is None else self._blend_held(top, bottom)
        if self._held is not None:
            self._held = [held for held in self._held if held.y0 + plan.window[0] > until]
        elif self._scores is None:
            pass  # no band yet: skipped windows only
        elif not self.finished:
            self._shift_band(until - self._band_top)
        else:
            self._scores = self._weight_sum = None  # free the band
        self._band_top = until
        return band

    def _unscored_band(self, top: int, bottom: int) -> Band:
        rows, width = bottom - top, self.plan.width
        probability = np.zeros((rows, width), np.float32) if self.binary is not None else None
        labels = np.full((rows, width), self.skipped_label, label_dtype(self.skipped_label + 1))
        return Band(top - self.plan.pad_top, labels, probability, None)

    def _mark_skipped(self, labels: np.ndarray, probability: np.ndarray | None, weight_sum: torch.Tensor) -> None:
        """Pixels no window run covers (where windows were skipped): the skipped label, probability 0."""
        if not self._skipped:
            return
        uncovered = (weight_sum == 0).cpu().numpy()
        if uncovered.any():
            labels[uncovered] = self.skipped_label
            if probability is not None:
                probability[uncovered] = 0.0

    def _blend_band(self, top: int, bottom: int) -> Band:
        plan, scores, weight_sum = self.plan, self._scores, self._weight_sum
        assert scores is not None and weight_sum is not None
        rows = slice(top - self._band_top, bottom - self._band_top)
        cols = slice(plan.pad_left, plan.pad_left + plan.width)
        # divide in place: these rows leave the band anyway, and a copy would be one more band's worth
        blended = scores[:, rows, cols].div_(weight_sum[rows, cols])
        failed = False
        try:
            labels, probability = labels_and_probability(blended, self.binary)
        except torch.OutOfMemoryError:
            if self.device is None:
                raise
            failed = True
        if failed:  # the rows are divided already: reduced on the CPU as they are
            self._leave_device(scores.shape[0])
            scores, weight_sum = self._scores, self._weight_sum
            blended = scores[:, rows, cols]
            labels, probability = labels_and_probability(blended, self.binary)
        self._mark_skipped(labels, probability, weight_sum[rows, cols])
        return Band(top - plan.pad_top, labels, probability, blended.clone() if self.keep_scores else None)

    def _shift_band(self, done: int) -> None:
        """Move the band's rows still in use to the top, chunk by chunk so that source and target
        never overlap, and zero the rows it frees."""
        scores, weight_sum = self._scores, self._weight_sum
        assert scores is not None and weight_sum is not None
        keep = scores.shape[1] - done
        for start in range(0, keep, done):
            n = min(done, keep - start)
            scores[:, start : start + n] = scores[:, start + done : start + done + n]
            weight_sum[start : start + n] = weight_sum[start + done : start + done + n]
        scores[:, keep:] = 0
        weight_sum[keep:] = 0

    def _blend_held(self, top: int, bottom: int) -> Band:
        """Padded rows [top, bottom) from the held windows, a block of rows at a time, on one thread:
        its operations are many and small (a run of rows of a window: some 100k floats), and with
        several threads each is an OpenMP region that waits for every thread's core (on 2 cores
        busy with other work, segment_images of a 4096 x 4096 image with 40 classes took 547 s on
        2 threads, 7.7 s on one)."""
        with _one_thread():
            return self._blend_held_rows(top, bottom)

    def _blend_held_rows(self, top: int, bottom: int) -> Band:
        plan, held_windows, num_classes = self.plan, self._held, self._classes
        assert held_windows is not None and num_classes is not None
        (wh, ww), cols = plan.window, slice(plan.pad_left, plan.pad_left + plan.width)
        block = max(1, min(wh, BLOCK_BYTES // (4 * num_classes * plan.padded_width)))
        total = torch.empty(num_classes, block, plan.padded_width)
        weight_total = torch.empty(block, plan.padded_width)
        part = torch.empty(num_classes, block, ww)  # one window's rows of the block
        labels, probability, kept = [], [], []
        for start in range(top, bottom, block):
            end = min(start + block, bottom)
            scores, weight_sum = total[:, : end - start].zero_(), weight_total[: end - start].zero_()
            for held in held_windows:  # in plan order: the additions of a band, in its order
                a, b = max(start, held.y0) - held.y0, min(end, held.y0 + wh) - held.y0  # window rows
                if a >= b:
                    continue
                if held.resize is not None:
                    window_rows = held.resize.rows(held.scores, a, b, part[:, : b - a])
                    if not self._uniform:
                        window_rows.mul_(self.weights[a:b])
                elif self._uniform:
                    window_rows = held.scores[:, a:b]
                else:
                    window_rows = torch.mul(held.scores[:, a:b], self.weights[a:b], out=part[:, : b - a])
                rows = slice(held.y0 + a - start, held.y0 + b - start)
                scores[:, rows, held.x0 : held.x0 + ww] += window_rows
                weight_sum[rows, held.x0 : held.x0 + ww] += self.weights[a:b]
            blended = scores[:, :, cols].div_(weight_sum[:, cols])
            block_labels, block_probability = labels_and_probability(blended, self.binary)
            self._mark_skipped(block_labels, block_probability, weight_sum[:, cols])
            labels.append(block_labels)
            probability.append(block_probability)
            if self.keep_scores:
                kept.append(blended.clone())
        return Band(
            top - plan.pad_top,
            np.concatenate(labels),
            None if probability[0] is None else np.concatenate(probability),
            torch.cat(kept, dim=1) if self.keep_scores else None,
        )


# --------------------------------------------------------------------------- test-time augmentation


class TTAScoreFn:
    """A score_fn averaging several views of each window: `scales` (each a resize factor of the
    window, bilinear, align_corners=False) times, with `flip`, the window and its left-right mirror.

    Scores of a flipped view are mirrored back before averaging; every view's scores are resized to
    the finest output size among the views (the largest scale's), capped at the window size, and
    the mean over views is returned (see the module docstring for why scores, not probabilities).
    A scale listed twice counts twice.
    """

    def __init__(self, score_fn: ScoreFn, flip: bool = False, scales: Iterable[float] = (1.0,)) -> None:
        self.score_fn = score_fn
        self.flip = bool(flip)
        self.scales = sorted((float(s) for s in scales), reverse=True)  # largest first: it sets the output size
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")

    @property
    def views(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        total: torch.Tensor | None = None
        size: tuple[int, int] | None = None
        for scale in self.scales:
            # sizes round half up, as mmseg's rescale does
            scaled = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
            view = pixels if scaled == (height, width) else F.interpolate(pixels, size=scaled, mode="bilinear", align_corners=False)
            for mirrored in (False, True) if self.flip else (False,):
                scores = self.score_fn(view.flip(-1) if mirrored else view).to(torch.float32)
                if mirrored:
                    scores = scores.flip(-1)
                if size is None:
                    size = (min(scores.shape[-2], height), min(scores.shape[-1], width))
                if tuple(scores.shape[-2:]) != size:
                    scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
                total = scores.clone() if total is None else total.add_(scores)
        assert total is not None
        return total.div_(self.views)


def with_tta(score_fn: ScoreFn, flip: bool = False, scales: Iterable[float] = (1.0,)) -> ScoreFn:
    """score_fn itself when there is nothing to augment (no flip, scales [1.0]), else a TTAScoreFn."""
    scales = list(scales)
    if not flip and scales == [1.0]:
        return score_fn
    return TTAScoreFn(score_fn, flip, scales)


# --------------------------------------------------------------------------- entry points


def to_pixels(windows: list[np.ndarray], pin_memory: bool = False) -> torch.Tensor:
    """h x w x C arrays (uint8, or float32 for rasters scaled by mean and std) -> N x C x h x w
    float32 on the 0-255 scale (C: 3, or a raster's bands). `pin_memory`: in pinned host memory,
    whose copy to a CUDA device does not block the host."""
    # each window converted and transposed straight into the batch: no stacked or channels-last copy
    pixels = torch.empty(len(windows), windows[0].shape[2], *windows[0].shape[:2], pin_memory=pin_memory)
    for target, window in zip(pixels, windows):
        window = window if min(window.strides) >= 0 else window.copy()  # torch takes no negative strides
        with warnings.catch_warnings():  # Ray's arrays are read-only: only read here, never written
            warnings.simplefilter("ignore", UserWarning)
            source = torch.from_numpy(window)
        target.copy_(source.permute(2, 0, 1))
    return pixels


def window_inside(plan: WindowPlan, y0: int, x0: int) -> tuple[int, int, int, int, int, int]:
    """The part of the window at padded (y0, x0) that lies inside the image: its top-left in the
    image, its top-left in the window, its height and width."""
    top, left = max(y0 - plan.pad_top, 0), max(x0 - plan.pad_left, 0)
    bottom = min(y0 + plan.window[0] - plan.pad_top, plan.height)
    right = min(x0 + plan.window[1] - plan.pad_left, plan.width)
    return top, left, top + plan.pad_top - y0, left + plan.pad_left - x0, bottom - top, right - left


def read_padded(read_window: ReadWindow, plan: WindowPlan, y0: int, x0: int) -> np.ndarray:
    """The window at padded coordinates (y0, x0): read what lies inside the image, zeros elsewhere."""
    top, left, oy, ox, height, width = window_inside(plan, y0, x0)
    region = read_window(top, left, height, width)
    if region.shape[:2] == plan.window:
        return region
    window = np.zeros((*plan.window, region.shape[2]), dtype=region.dtype)
    window[oy : oy + region.shape[0], ox : ox + region.shape[1]] = region
    return window


class BatchSizes:
    """Windows per forward pass, by window size: `start` (inference.batch_size) until a batch of that
    size runs out of device memory (torch.OutOfMemoryError: CUDA's); then half of it, remembered for
    the life of whoever holds this (the predictor actor: every later image of that window size).
    `lowered` is what run.json reports.

    The stitcher on the model's device (`StreamingStitcher(device=...)`, whole mode's resize) lowers
    its own way: an image whose stitch runs out of device memory goes on on the CPU (the same labels),
    and `stitch_on_cpu_from` keeps the device bytes that stitch needed (`stitch_bytes`): every later
    image that needs as much or more is stitched on the CPU from its start. `report()` is both, as
    run.json's actors.lowered_batch_sizes holds them."""

    STITCHER_KEY = "stitcher_on_cpu_from_bytes"  # run.json's name for stitch_on_cpu_from

    def __init__(self, start: int) -> None:
        self.start = start
        self.lowered: dict[tuple[int, int], int] = {}
        self.stitch_on_cpu_from: int | None = None  # device bytes of the smallest stitch that ran out of memory

    def stitch_fits(self, need: int) -> bool:
        """Whether a stitch needing `need` bytes of device memory is still tried there."""
        return self.stitch_on_cpu_from is None or need < self.stitch_on_cpu_from

    def stitch_ran_out(self, need: int) -> None:
        if self.stitch_fits(need):
            self.stitch_on_cpu_from = need
            log.warning(
                "out of device memory stitching an image (%.1f MB on the device): that image and every later one needing "
                "as much are stitched on the CPU",
                need / 2**20,
            )

    def report(self) -> dict[str, int]:
        """What run.json's actors.lowered_batch_sizes holds: windows per forward by "HxW", and the stitcher's bytes."""
        out = {f"{h}x{w}": n for (h, w), n in self.lowered.items()}
        if self.stitch_on_cpu_from is not None:
            out[self.STITCHER_KEY] = self.stitch_on_cpu_from
        return out

    def of(self, window: tuple[int, int]) -> int:
        return self.lowered.get(tuple(window), self.start)

    def halve(self, window: tuple[int, int], failed: int) -> int:
        size = min(max(1, failed // 2), self.of(window))
        self.lowered[tuple(window)] = size
        log.warning("out of memory at a batch of %d windows of %d x %d: %d a batch from now on", failed, *window, size)
        return size


def score_within_memory(score_fn: Callable, pixels: torch.Tensor, window: tuple[int, int], sizes: BatchSizes) -> Iterator:
    """score_fn over `pixels` (N windows) in batches of sizes.of(window), window by window in order:
    each window's scores (or, for a score_fn that returns a tuple, its tuple of outputs). A batch
    that runs out of device memory is halved (`BatchSizes.halve`) and run again; a single window that
    does is raised: its image is an errors row."""
    start = 0
    while start < len(pixels):
        part = pixels[start : start + sizes.of(window)]
        try:
            outputs = score_fn(part)
        except torch.OutOfMemoryError:
            if len(part) == 1:
                raise
            sizes.halve(window, len(part))
            outputs = None
        if outputs is None:  # outside the except block: its traceback held the failed batch's tensors
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            continue
        several = isinstance(outputs, tuple)  # a query model's (class logits, mask logits)
        first = outputs[0] if several else outputs
        if first.shape[0] != len(part) or (not several and first.ndim != 4):
            raise ValueError(f"score_fn must return N x C x h x w for N = {len(part)} windows, got {tuple(first.shape)}")
        yield from zip(*outputs) if several else outputs
        start += len(part)


SKIPPED_PER_BATCH = 4096  # skipped windows handed to the stitchers at most between two batches
SkipWindow = Callable[[int, int, int, int], bool]  # (top, left, height, width) inside the image -> not to be run


@dataclass
class _ImageJob:
    plan: WindowPlan
    read_window: ReadWindow
    stitcher: StreamingStitcher
    skip_window: SkipWindow | None = None  # a raster's windows without valid data


def _run_windows(
    score_fn: ScoreFn,
    jobs: Iterable[_ImageJob],
    window: tuple[int, int],
    sizes: BatchSizes,
    gather: Executor | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[int, Band]]:
    """Batch the windows (all of size `window`) of consecutive images through score_fn, in batches of
    sizes.of(window) (`score_within_memory`); yield (job index, band) as rows finish.

    A batch may hold windows of several images; only the images whose windows are in flight (this
    batch's and the next one's) have a stitcher band allocated (`jobs` may be a lazy iterable). A
    window that its job's `skip_window` refuses is not read and not scored: the stitcher is told to
    pass it (`StreamingStitcher.skip`), in its place in the plan's order. `gather` (an executor of
    one thread): the next batch's windows are read into a tensor (pinned with `pin_memory`) there
    while score_fn runs on this one; the same batches in the same order as without, so the same
    results (a next batch gathered before this one ran out of memory is split by
    `score_within_memory` at the lowered size).
    """
    windows = ((index, job, y0, x0) for index, job in enumerate(jobs) for (y0, x0) in job.plan.windows)

    def next_batch() -> tuple[list, list]:
        """The next batch's windows, and the windows skipped before them: (position in the batch's order, index, job)."""
        batch, skipped = [], []
        for index, job, y0, x0 in windows:  # the lazy jobs advance here, in this thread
            if job.skip_window is not None and job.skip_window(*_inside_box(job.plan, y0, x0)):
                skipped.append((len(batch), index, job))
                if len(skipped) == SKIPPED_PER_BATCH:  # a vast no-data area: pass them on, bands keep coming
                    break
                continue
            batch.append((index, job, y0, x0))
            if len(batch) == sizes.of(window):
                break
        return batch, skipped

    def gathered(batch: list) -> torch.Tensor:
        return to_pixels([read_padded(job.read_window, job.plan, y0, x0) for _, job, y0, x0 in batch], pin_memory)

    batch, skipped = next_batch()
    upcoming: Future | None = None
    while batch or skipped:
        pixels = (upcoming.result() if upcoming is not None else gathered(batch)) if batch else None
        following = next_batch()
        upcoming = gather.submit(gathered, following[0]) if gather is not None and following[0] else None
        scores = list(score_within_memory(score_fn, pixels, window, sizes)) if batch else []
        waiting = iter(skipped)
        next_skip = next(waiting, None)
        for k in range(len(batch) + 1):
            while next_skip is not None and next_skip[0] == k:  # skipped windows before the k-th scored one
                _, index, job = next_skip
                for band in job.stitcher.skip():
                    yield index, band
                next_skip = next(waiting, None)
            if k < len(batch):
                index, job = batch[k][:2]
                for band in job.stitcher.add(scores[k]):  # resized to the window by the stitcher
                    yield index, band
        batch, skipped = following


def _inside_box(plan: WindowPlan, y0: int, x0: int) -> tuple[int, int, int, int]:
    top, left, _, _, height, width = window_inside(plan, y0, x0)
    return top, left, height, width


def _free_device_cache() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _segment_whole(
    score_fn: ScoreFn,
    image: np.ndarray,
    binary: Foreground | Confidence | None,
    device: torch.device | None = None,
    pin_memory: bool = False,
    memory: BatchSizes | None = None,
) -> Segmentation:
    """One image in one forward, its scores resized to it and reduced to labels: on `device` (the
    model's) where given and its memory holds them (`memory`: a stitch as large ran out before), else
    on the CPU; a device that runs out of memory here hands the image to the CPU (the same labels)."""
    height, width = image.shape[:2]
    scores = score_fn(to_pixels([image], pin_memory))
    if scores.ndim != 4 or scores.shape[0] != 1:
        raise ValueError(f"score_fn must return 1 x C x h x w for one image, got {tuple(scores.shape)}")
    need = scores.shape[1] * height * width * 4  # the scores at full resolution, float32
    if device is not None and (memory is None or memory.stitch_fits(need)):
        failed = False
        try:  # resized and reduced where the model ran: only the labels (and probability) cross back
            on_device = scores[0].to(device, torch.float32)
            on_device = on_device if tuple(on_device.shape[-2:]) == (height, width) else _resize_on_device(on_device, (height, width))
            labels, probability = labels_and_probability(on_device, binary)
        except torch.OutOfMemoryError:
            failed = True
        if not failed:
            return Segmentation(labels, probability)
        on_device = None
        _free_device_cache()
        if memory is not None:
            memory.stitch_ran_out(need)
        else:
            log.warning("out of device memory resizing an image's scores (%.1f MB): it is stitched on the CPU", need / 2**20)
    labels, probability = labels_and_probability(resize_scores(scores[0].cpu(), (height, width)), binary)
    return Segmentation(labels, probability)


def _check_image(image: np.ndarray, channels: int | None = 3) -> None:
    """H x W x 3 uint8 (images), or H x W x C uint8 / float32 where `channels` is None (rasters)."""
    if channels is None:
        if image.ndim != 3 or image.dtype not in (np.uint8, np.float32):
            raise ValueError(f"raster windows must be H x W x C uint8 or float32 arrays, got {image.dtype} {image.shape}")
        return
    if image.ndim != 3 or image.shape[2] != channels or image.dtype != np.uint8:
        raise ValueError(f"images must be H x W x 3 uint8 arrays, got {image.dtype} {image.shape}")


def segment_images(
    score_fn: ScoreFn,
    images: list[np.ndarray],
    settings: TilingSettings,
    batch_sizes: BatchSizes | None = None,
    stitch_device: torch.device | None = None,
) -> list[Segmentation]:
    """Segment H x W x 3 uint8 images of any sizes.

    Whole mode runs each image through score_fn alone and resizes its scores to H x W. Slide mode
    plans windows for every image, batches `settings.batch_size` windows per score_fn call (a batch
    may mix windows of several images; `batch_sizes`: fewer where a batch ran out of memory, see
    `BatchSizes`) and stitches each image with a `StreamingStitcher`. `stitch_device`: resize, blend
    and reduce to labels there (the model's device, where score_fn leaves its scores); None: the CPU.
    """
    results: list[Segmentation | None] = [None] * len(images)
    for index, result in segmentations(score_fn, images, settings, batch_sizes, stitch_device):
        results[index] = result
    return results  # type: ignore[return-value]


def segmentations(
    score_fn: ScoreFn,
    images: list[np.ndarray],
    settings: TilingSettings,
    batch_sizes: BatchSizes | None = None,
    stitch_device: torch.device | None = None,
    gather: Executor | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[int, Segmentation]]:
    """`segment_images`, one image at a time as its last rows are stitched: (its index, its
    segmentation), in the order of `images` (the predictor actor encodes each while the next run).
    `gather`, `pin_memory`: the next batch of windows gathered while this one runs (`_run_windows`)."""
    for image in images:
        _check_image(image)
    sizes = batch_sizes or BatchSizes(settings.batch_size)
    if settings.mode == "whole":
        for index, image in enumerate(images):
            yield index, _segment_whole(score_fn, image, settings.beside, stitch_device, pin_memory, sizes)
        return

    def job(image: np.ndarray) -> _ImageJob:
        plan = plan_windows(image.shape[0], image.shape[1], settings.window, settings.stride)
        stitcher = StreamingStitcher(plan, settings.blend, settings.beside, device=stitch_device, memory=sizes)
        return _ImageJob(plan, lambda y, x, h, w: image[y : y + h, x : x + w], stitcher)

    results: dict[int, Segmentation] = {}
    rows_left = [image.shape[0] for image in images]  # bands cover each row once
    for index, band in _run_windows(score_fn, (job(image) for image in images), settings.window, sizes, gather, pin_memory):
        result = results.get(index)
        if result is None:
            height, width = images[index].shape[:2]
            probability = np.empty((height, width), np.float32) if band.probability is not None else None
            result = results[index] = Segmentation(np.empty((height, width), band.labels.dtype), probability)
        rows = slice(band.y0, band.y0 + band.labels.shape[0])
        result.labels[rows] = band.labels
        if result.probability is not None:
            result.probability[rows] = band.probability
        rows_left[index] -= band.labels.shape[0]
        if rows_left[index] == 0:
            yield index, results.pop(index)
    assert not results and not any(rows_left)


def segment_streaming(
    score_fn: ScoreFn,
    read_window: ReadWindow,
    height: int,
    width: int,
    settings: TilingSettings,
    batch_sizes: BatchSizes | None = None,
    skip_window: SkipWindow | None = None,
    channels: int | None = 3,
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Segment one image too large to hold, reading it window by window.

    read_window(y0, x0, h, w) returns that region (inside the image) as h x w x 3 uint8, e.g. from a
    tiled TIFF (`channels` None: h x w x C uint8 or float32, a raster's bands). Yields (y0, label_rows,
    probability_rows) bands from top to bottom as soon as their rows are final; together they cover
    rows 0..height-1 once each. Memory: one batch of windows and the stitcher's band (see
    `StreamingStitcher`). Whole mode reads the image in one piece. `skip_window(top, left, h, w)`:
    true for a window not to be read nor scored (a raster's window without valid data, a slide's
    without tissue); pixels that only such windows cover get 255 (the stitcher's `skipped_label`),
    probability 0.
    """
    if settings.mode == "whole":
        image = read_window(0, 0, height, width)
        _check_image(image, channels)
        result = _segment_whole(score_fn, image, settings.beside)
        yield 0, result.labels, result.probability
        return
    plan = plan_windows(height, width, settings.window, settings.stride)
    job = _ImageJob(plan, read_window, StreamingStitcher(plan, settings.blend, settings.beside), skip_window)
    for _, band in _run_windows(score_fn, [job], settings.window, batch_sizes or BatchSizes(settings.batch_size)):
        yield band.y0, band.labels, band.probability
