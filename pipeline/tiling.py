"""Tiling and stitching: plan windows over images of any size, batch them through a model, blend.

Read top to bottom:
  settings and results    `TilingSettings`, `Segmentation`
  the window planner      `window_starts`, `plan_windows` -> `WindowPlan`
  blending weights        `importance_map` (mean: ones; gaussian: MONAI's map)
  stitchers               `stitch_windows` (reference, whole image in memory) and
                          `StreamingStitcher` (a band of rows; what the pipeline uses)
  entry points            `segment_images` (in-memory images, the predictor actor's call) and
                          `segment_streaming` (huge images read window by window, yields row bands)
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
  whose labels are then probability > 0.5.

Stitching resolution: the stitchers blend at the image's full resolution, after each window's scores
are resized to the window. Windows at an image's edge start at offsets that are not multiples of the
model's output stride, so blending at the output stride would put those windows up to stride - 1
pixels off (MONAI truncates `int(start * zoom)`); at full resolution every window lands exactly where
it was read and the result is the same as mmseg's resize-then-paste. The cost is memory: the band of
the streaming stitcher is window height x image width x classes float32 at full resolution.
Huge images (pipeline.tiff, read by pipeline.predictor) are stitched the same way, at full resolution, band by band.

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

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F

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

    @property
    def foreground(self) -> Foreground | None:
        return Foreground(self.positive_class, self.score_kind) if self.binary else None

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
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "stride", stride)


@dataclass
class Segmentation:
    labels: np.ndarray  # H x W, uint8 when num_classes <= 256 else uint16
    probability: np.ndarray | None  # H x W float32 in [0, 1] (binary tasks), else None


@dataclass
class Band:
    """Finished rows of one image, as a stitcher emits them."""

    y0: int  # the first row, in image coordinates
    labels: np.ndarray  # rows x W
    probability: np.ndarray | None  # rows x W float32 (binary tasks), else None
    scores: torch.Tensor | None = None  # C x rows x W blended scores, where the stitcher was asked to keep them


def label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


def argmax_classes(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(dim=0) of C x h x w scores (ties to the lower class), as a running maximum.

    torch's CPU argmax over the leading dimension is slow: 1.4 s for 2 x 500 x 12000 (a band of a
    12000-wide image) where this loop takes 0.09 s; 2.0 s against 0.6 s for 19 classes, 0.6
    against 0.5 for 150; it also needs no int64 result. uint8 labels up to 256 classes, int32 above.
    """
    num_classes = scores.shape[0]
    labels = torch.zeros(scores.shape[1:], dtype=torch.uint8 if num_classes <= 256 else torch.int32)
    best = scores[0].clone()
    for c in range(1, num_classes):
        better = scores[c] > best  # strictly: a tie keeps the lower class, as argmax does
        labels.masked_fill_(better, c)
        torch.maximum(best, scores[c], out=best)
    return labels


@dataclass(frozen=True)
class Foreground:
    """How a binary task's foreground probability comes from blended scores (see the module doc)."""

    positive: int = 1  # the foreground class
    scores: str = "logits"  # "logits" | "probabilities"


def _foreground(binary: bool | Foreground | None) -> Foreground | None:
    if binary is True:
        return Foreground()
    return binary or None


def labels_and_probability(scores: torch.Tensor, binary: bool | Foreground | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Blended scores C x h x w -> labels (argmax over classes) and, for binary tasks, the foreground
    probability; a one-logit head (C == 1) gives labels probability > 0.5 (0 background, 1 foreground)."""
    foreground = _foreground(binary)
    num_classes = scores.shape[0]
    if foreground is not None and num_classes == 1:
        probability = torch.sigmoid(scores[0])
        return (probability > 0.5).numpy().astype(np.uint8), probability.numpy().astype(np.float32, copy=False)
    labels = argmax_classes(scores).numpy().astype(label_dtype(num_classes), copy=False)
    if foreground is None:
        return labels, None
    if num_classes != 2:
        raise ValueError(f"binary output needs 2 classes (background, foreground) or one logit, the model gives {num_classes}")
    if foreground.scores == "probabilities":
        probability = scores[foreground.positive] / scores.sum(dim=0).clamp_min(torch.finfo(scores.dtype).tiny)
    else:
        probability = torch.softmax(scores, dim=0)[foreground.positive]
    return labels, probability.numpy().astype(np.float32, copy=False)


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


class StreamingStitcher:
    """Blends the windows of one image, emitting finished rows while it goes.

    Windows come in plan order (row-major: all windows of a row of windows, then the next row), one
    `add` each, with scores C x window_h x window_w at window (= full image) resolution.

    What it holds, and why: windows arrive top to bottom, so once every window starting at row y has
    been added, no later window touches a row above the next window row's start: those rows are final.
    The stitcher therefore keeps only the band of rows the current window row covers,
    `scores` C x window_h x padded W (the weighted sum) and `weight_sum` window_h x padded W, both
    float32 (the gaussian map's clamp makes the weight sum non-separable, so it is a 2-D band too).
    When a window row is complete, the rows above the next window row are divided by their weight
    sum, turned into labels (and probabilities) and emitted as a `Band`; the band shifts up and the
    rows it frees are zeroed for the next window row. Peak memory is about (C + 1) x window height x
    image width x 4 bytes (rows are divided in place when emitted), plus the labels (and probabilities)
    of the emitted rows: it grows with the image's width, never with its height.
    """

    def __init__(self, plan: WindowPlan, blend: str = "mean", binary: bool | Foreground | None = False, keep_scores: bool = False):
        self.plan = plan
        self.binary = _foreground(binary)
        self.keep_scores = keep_scores  # also hand out the blended scores in each Band (tests, TTA)
        self.weights = importance_map(plan.window, blend)
        self._uniform = blend == "mean"  # weights of 1: skip the multiplication
        self._windows = plan.windows
        self._next = 0  # index of the next window to add
        self._band_top = 0  # padded row held in band row 0; every row above it has been emitted
        self._scores: torch.Tensor | None = None  # allocated at the first window, when C is known
        self._weight_sum = torch.zeros(plan.window[0], plan.padded_width)

    @property
    def finished(self) -> bool:
        return self._next == len(self._windows)

    def add(self, scores: torch.Tensor) -> list[Band]:
        """Add the next window's scores; returns the bands (0 or 1) that this window finished."""
        if self.finished:
            raise RuntimeError("all windows of this image have been added already")
        wh, ww = self.plan.window
        if tuple(scores.shape[1:]) != (wh, ww):
            raise ValueError(f"window scores must be C x {wh} x {ww} (window resolution), got {tuple(scores.shape)}")
        if self._scores is None:
            self._scores = torch.zeros(scores.shape[0], wh, self.plan.padded_width)
        elif scores.shape[0] != self._scores.shape[0]:
            raise ValueError(f"windows disagree on the number of classes: {scores.shape[0]} != {self._scores.shape[0]}")
        y0, x0 = self._windows[self._next]
        row = y0 - self._band_top
        self._scores[:, row : row + wh, x0 : x0 + ww] += scores if self._uniform else scores * self.weights
        self._weight_sum[row : row + wh, x0 : x0 + ww] += self.weights
        self._next += 1
        # rows above the next window's top can no longer change
        final_until = self.plan.padded_height if self.finished else self._windows[self._next][0]
        if final_until <= self._band_top:
            return []
        band = self._emit(final_until)
        return [] if band is None else [band]

    def _emit(self, until: int) -> Band | None:
        """Emit padded rows [band_top, until), then shift the band up to start at `until`."""
        plan, scores, weight_sum = self.plan, self._scores, self._weight_sum
        assert scores is not None
        done = until - self._band_top
        # the part of these rows that is image, not padding
        top = max(self._band_top, plan.pad_top)
        bottom = min(until, plan.pad_top + plan.height)
        band = None
        if bottom > top:
            rows = slice(top - self._band_top, bottom - self._band_top)
            cols = slice(plan.pad_left, plan.pad_left + plan.width)
            # divide in place: these rows leave the band anyway, and a copy would be one more band's worth
            blended = scores[:, rows, cols].div_(weight_sum[rows, cols])
            labels, probability = labels_and_probability(blended, self.binary)
            band = Band(top - plan.pad_top, labels, probability, blended.clone() if self.keep_scores else None)
        if not self.finished:
            # shift the rows still in use to the top, chunk by chunk so that source and target never overlap
            keep = scores.shape[1] - done
            for start in range(0, keep, done):
                n = min(done, keep - start)
                scores[:, start : start + n] = scores[:, start + done : start + done + n]
                weight_sum[start : start + n] = weight_sum[start + done : start + done + n]
            scores[:, keep:] = 0
            weight_sum[keep:] = 0
        else:
            self._scores = None  # free the band
        self._band_top = until
        return band


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


def to_pixels(windows: list[np.ndarray]) -> torch.Tensor:
    """h x w x 3 uint8 arrays -> N x 3 x h x w float32 on the 0-255 scale."""
    batch = torch.from_numpy(np.stack(windows))
    return batch.permute(0, 3, 1, 2).to(torch.float32).contiguous()


def read_padded(read_window: ReadWindow, plan: WindowPlan, y0: int, x0: int) -> np.ndarray:
    """The window at padded coordinates (y0, x0): read what lies inside the image, zeros elsewhere."""
    wh, ww = plan.window
    top, left = max(y0 - plan.pad_top, 0), max(x0 - plan.pad_left, 0)
    bottom, right = min(y0 + wh - plan.pad_top, plan.height), min(x0 + ww - plan.pad_left, plan.width)
    region = read_window(top, left, bottom - top, right - left)
    if region.shape[:2] == (wh, ww):
        return region
    window = np.zeros((wh, ww, 3), dtype=np.uint8)
    oy, ox = top + plan.pad_top - y0, left + plan.pad_left - x0
    window[oy : oy + region.shape[0], ox : ox + region.shape[1]] = region
    return window


def resize_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """C x h' x w' -> C x size, bilinear with align_corners=False, only where the size differs."""
    scores = scores.to("cpu", torch.float32)
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


@dataclass
class _ImageJob:
    plan: WindowPlan
    read_window: ReadWindow
    stitcher: StreamingStitcher


def _run_windows(score_fn: ScoreFn, jobs: Iterable[_ImageJob], batch_size: int) -> Iterator[tuple[int, Band]]:
    """Batch the windows of consecutive images through score_fn; yield (job index, band) as rows finish.

    A batch may hold windows of several images; only the images whose windows are in flight have a
    stitcher band allocated (`jobs` may be a lazy iterable).
    """
    windows = ((index, job, y0, x0) for index, job in enumerate(jobs) for (y0, x0) in job.plan.windows)
    while batch := list(islice(windows, batch_size)):
        pixels = to_pixels([read_padded(job.read_window, job.plan, y0, x0) for _, job, y0, x0 in batch])
        scores = score_fn(pixels)
        if scores.ndim != 4 or scores.shape[0] != len(batch):
            raise ValueError(f"score_fn must return N x C x h x w for N = {len(batch)} windows, got {tuple(scores.shape)}")
        for (index, job, _, _), window_scores in zip(batch, scores):
            for band in job.stitcher.add(resize_scores(window_scores, job.plan.window)):
                yield index, band


def _segment_whole(score_fn: ScoreFn, image: np.ndarray, binary: Foreground | None) -> Segmentation:
    height, width = image.shape[:2]
    scores = score_fn(to_pixels([image]))
    if scores.ndim != 4 or scores.shape[0] != 1:
        raise ValueError(f"score_fn must return 1 x C x h x w for one image, got {tuple(scores.shape)}")
    labels, probability = labels_and_probability(resize_scores(scores[0], (height, width)), binary)
    return Segmentation(labels, probability)


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"images must be H x W x 3 uint8 arrays, got {image.dtype} {image.shape}")


def segment_images(score_fn: ScoreFn, images: list[np.ndarray], settings: TilingSettings) -> list[Segmentation]:
    """Segment H x W x 3 uint8 images of any sizes.

    Whole mode runs each image through score_fn alone and resizes its scores to H x W. Slide mode
    plans windows for every image, batches `settings.batch_size` windows per score_fn call (a batch
    may mix windows of several images) and stitches each image with a `StreamingStitcher`.
    """
    for image in images:
        _check_image(image)
    if settings.mode == "whole":
        return [_segment_whole(score_fn, image, settings.foreground) for image in images]

    def job(image: np.ndarray) -> _ImageJob:
        plan = plan_windows(image.shape[0], image.shape[1], settings.window, settings.stride)
        stitcher = StreamingStitcher(plan, settings.blend, settings.foreground)
        return _ImageJob(plan, lambda y, x, h, w: image[y : y + h, x : x + w], stitcher)

    results: list[Segmentation | None] = [None] * len(images)
    for index, band in _run_windows(score_fn, (job(image) for image in images), settings.batch_size):
        result = results[index]
        if result is None:
            height, width = images[index].shape[:2]
            probability = np.empty((height, width), np.float32) if band.probability is not None else None
            result = results[index] = Segmentation(np.empty((height, width), band.labels.dtype), probability)
        rows = slice(band.y0, band.y0 + band.labels.shape[0])
        result.labels[rows] = band.labels
        if result.probability is not None:
            result.probability[rows] = band.probability
    assert all(result is not None for result in results)
    return results  # type: ignore[return-value]


def segment_streaming(
    score_fn: ScoreFn, read_window: ReadWindow, height: int, width: int, settings: TilingSettings
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Segment one image too large to hold, reading it window by window.

    read_window(y0, x0, h, w) returns that region (inside the image) as h x w x 3 uint8, e.g. from a
    tiled TIFF. Yields (y0, label_rows, probability_rows) bands from top to bottom as soon as their
    rows are final; together they cover rows 0..height-1 once each. Memory: one batch of windows and
    the stitcher's band (see `StreamingStitcher`). Whole mode reads the image in one piece.
    """
    if settings.mode == "whole":
        image = read_window(0, 0, height, width)
        _check_image(image)
        result = _segment_whole(score_fn, image, settings.foreground)
        yield 0, result.labels, result.probability
        return
    plan = plan_windows(height, width, settings.window, settings.stride)
    job = _ImageJob(plan, read_window, StreamingStitcher(plan, settings.blend, settings.foreground))
    for _, band in _run_windows(score_fn, [job], settings.batch_size):
        yield band.y0, band.labels, band.probability
