"""Camouflaged-object (binary) segmentation metrics with PySODMetrics' conventions, streamed.

Per image, `cod_image_stats(prediction, label)` reduces the image to a `CodImageStats` of fixed
size (five floats and two curves of 256 floats, whatever the image's size); `CodAccumulator`
sums them and `result()` gives the dataset's `Sm`, `Em_mean`, `Em_max`, `Em_adp`, `wFm`,
`Fm_mean`, `Fm_max`, `Fm_adp` and `MAE`. Nothing is kept per image, so memory does not grow with
the number of images; a `CodImageStats` travels through Ray and Parquet as `to_record()`.

The conventions are PySODMetrics' (py_sod_metrics 1.6.2, `py_sod_metrics/sod_metrics.py` and
`py_sod_metrics/utils.py`), replicated operation by operation so that the values agree with it
(`CONVENTIONS` says them in words, for run.json):

- `utils.prepare_data`: the 8-bit prediction becomes `p / 255`, then min-max normalised to
  [0, 1] (`(p - min) / (max - min)`) unless max == min, when it stays `p / 255`; the label is
  binarised at `> 128`.
- The E and F curves are over 256 thresholds: the normalised prediction is requantised as
  `uint8(p * 255)` (truncation) and index i of a curve counts the pixels with level >= 255 - i
  (`np.flip` then `np.cumsum` of the histograms, as PySODMetrics orders them).
- Adaptive threshold (`utils.get_adaptive_threshold`): `min(2 * mean(p), 1)`, pixels `p >= t`.

Runtime requirement: the weighted F-measure needs scipy (`scipy.ndimage.distance_transform_edt`
with its nearest-foreground indices, and `scipy.ndimage.convolve`), imported when the first image
is measured. The indices of equidistant foreground pixels are scipy's choice, so no other
distance transform reproduces PySODMetrics' values exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

EPS = np.spacing(1)  # PySODMetrics' EPS: MATLAB's eps, 2.220446049250313e-16
LEVELS = 256
S_ALPHA = 0.5
F_BETA2 = 0.3  # beta^2 of the F-measure curve and adaptive F-measure
WF_BETA2 = 1.0  # beta^2 of the weighted F-measure

KEYS = ("Sm", "Em_mean", "Em_max", "Em_adp", "wFm", "Fm_mean", "Fm_max", "Fm_adp", "MAE")

CONVENTIONS: dict[str, str] = {
    "reference": "PySODMetrics (py_sod_metrics 1.6.2): Smeasure, Emeasure, WeightedFmeasure, Fmeasure, MAE of py_sod_metrics/sod_metrics.py",
    "prediction": "the 8-bit probability map round(255 p) divided by 255, then min-max normalised per image to [0, 1]; "
    "an image whose map is constant (max == min) keeps p / 255 (utils.prepare_data, MATLAB mapminmax(im2double(...)))",
    "label": "ground truth on 0-255, foreground where > 128",
    "thresholds": "E and F curves over 256 thresholds: the normalised map requantised as uint8(p * 255) (truncated), "
    "binarised at level >= t for t = 255 ... 0",
    "adaptive_threshold": "min(2 * mean(p), 1) per image, foreground where p >= threshold",
    "Sm": f"S-measure (Fan et al. ICCV 2017), alpha {S_ALPHA}: per image, then the mean over images; "
    "1 - mean(p) for an all-background label, mean(p) for an all-foreground label",
    "Em_mean": "E-measure (Fan et al. IJCAI 2018) curve per image, averaged over images per threshold; the mean of that curve",
    "Em_max": "the maximum of the image-averaged E-measure curve",
    "Em_adp": "E-measure at each image's adaptive threshold, the mean over images",
    "wFm": f"weighted F-measure (Margolin et al. CVPR 2014), beta^2 {WF_BETA2:g}, Gaussian 7x7 sigma 5 (MATLAB fspecial), "
    "per image then the mean over images; 0 for an all-background label",
    "Fm_mean": f"F-measure, beta^2 {F_BETA2}: the F curve of each image (from its own precision and recall), averaged over "
    "images per threshold (F is averaged, not precision and recall); the mean of that curve",
    "Fm_max": "the maximum of the image-averaged F-measure curve",
    "Fm_adp": f"F-measure, beta^2 {F_BETA2}, at each image's adaptive threshold (0 where nothing is true positive), the mean over images",
    "MAE": "mean absolute error between p and the binary label, per image then the mean over images",
    "empty": "every value is NaN when no image was added",
}


@dataclass(frozen=True, eq=False)
class CodImageStats:
    """What one image contributes to the dataset's values: fixed size, whatever the image's size.

    Curves are float64, 256 values, index i for the threshold level >= 255 - i (PySODMetrics' order).
    """

    sm: float  # S-measure
    wfm: float  # weighted F-measure
    mae: float
    em_adp: float  # E-measure at the adaptive threshold
    fm_adp: float  # F-measure at the adaptive threshold
    em_curve: np.ndarray  # E-measure per threshold
    fm_curve: np.ndarray  # F-measure per threshold

    SCALARS = ("sm", "wfm", "mae", "em_adp", "fm_adp")
    CURVES = ("em_curve", "fm_curve")

    def to_record(self) -> dict[str, Any]:
        """Plain floats and lists of 256 floats (for Ray and Parquet)."""
        record: dict[str, Any] = {name: float(getattr(self, name)) for name in self.SCALARS}
        record.update({name: [float(v) for v in getattr(self, name)] for name in self.CURVES})
        return record

    def to_flat(self) -> list[float]:
        """One flat list (the scalars, then the two curves): how the stats travel between stages."""
        return [float(getattr(self, name)) for name in self.SCALARS] + [float(v) for name in self.CURVES for v in getattr(self, name)]

    @classmethod
    def from_flat(cls, values: Any) -> CodImageStats:
        values = np.asarray(values, dtype=np.float64)
        n = len(cls.SCALARS)
        if values.shape != (n + LEVELS * len(cls.CURVES),):
            raise ValueError(f"expected {n + LEVELS * len(cls.CURVES)} values, got {values.shape}")
        scalars = {name: float(values[i]) for i, name in enumerate(cls.SCALARS)}
        curves = {name: values[n + LEVELS * j : n + LEVELS * (j + 1)].copy() for j, name in enumerate(cls.CURVES)}
        return cls(**scalars, **curves)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> CodImageStats:
        """The inverse of `to_record`; curves may come back as lists, tuples or arrays."""
        values: dict[str, Any] = {name: float(record[name]) for name in cls.SCALARS}
        for name in cls.CURVES:
            curve = np.array(record[name], dtype=np.float64)
            if curve.shape != (LEVELS,):
                raise ValueError(f"{name} has shape {curve.shape}, expected ({LEVELS},)")
            values[name] = curve
        return cls(**values)


def _check_inputs(prediction: np.ndarray, label: np.ndarray) -> None:
    for name, arr in (("prediction", prediction), ("label", label)):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 2:
            got = f"{arr.dtype} array of shape {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise TypeError(f"{name} must be a uint8 H x W array (0-255), got {got}")
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {prediction.shape} and label {label.shape} differ in size")
    if prediction.size == 0:
        raise ValueError("an empty image has no metrics")


def _level_values(prediction: np.ndarray) -> np.ndarray:
    """The normalised value of each 8-bit level, computed with the same float64 operations as
    PySODMetrics' `prepare_data` applies to each pixel (so `values[prediction]` is its map bit for bit)."""
    values = np.arange(LEVELS) / 255
    lo, hi = values[prediction.min()], values[prediction.max()]
    if hi != lo:
        values = (values - lo) / (hi - lo)
    return values


def _enhanced_sum(fg_fg: np.ndarray, fg_bg: np.ndarray, gt_fg: int, size: int) -> np.ndarray:
    """Sum of the enhanced alignment matrix for binarised predictions with `fg_fg` true and `fg_bg`
    false positives (arrays: one per threshold), as `Emeasure.cal_em_with_cumsumhistogram` and
    `generate_parts_numel_combinations`; divided by (size - 1 + EPS) it is the E-measure."""
    pred_fg = fg_fg + fg_bg
    pred_bg = size - pred_fg
    if gt_fg == 0:
        return pred_bg
    if gt_fg == size:
        return pred_fg
    bg_fg = gt_fg - fg_fg
    bg_bg = pred_bg - bg_fg
    mean_pred = pred_fg / size
    mean_gt = gt_fg / size
    pred_fg_value, pred_bg_value = 1 - mean_pred, 0 - mean_pred
    gt_fg_value, gt_bg_value = 1 - mean_gt, 0 - mean_gt
    parts = (
        (fg_fg, pred_fg_value, gt_fg_value),
        (fg_bg, pred_fg_value, gt_bg_value),
        (bg_fg, pred_bg_value, gt_fg_value),
        (bg_bg, pred_bg_value, gt_bg_value),
    )
    total = np.zeros(np.shape(fg_fg), dtype=np.float64)
    for numel, a, b in parts:
        align = 2 * (a * b) / (a**2 + b**2 + EPS)
        total = total + (align + 1) ** 2 / 4 * numel
    return total


def _s_object(x: np.ndarray) -> float:
    mean = np.mean(x)
    std = np.std(x, ddof=1) if x.size > 1 else 0
    return 2 * mean / (np.power(mean, 2) + 1 + std + EPS)


def _ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    n = pred.size
    if n == 0:
        # PySODMetrics takes np.mean of the empty quadrant: NaN, which makes the S-measure NaN
        # (a label whose foreground centroid rounds to the last row or column). Same value, no warning.
        return float("nan")
    x = np.mean(pred)
    y = np.mean(gt)
    sigma_x = np.sum((pred - x) ** 2) / (n - 1 + EPS)
    sigma_y = np.sum((gt - y) ** 2) / (n - 1 + EPS)
    sigma_xy = np.sum((pred - x) * (gt - y)) / (n - 1 + EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x**2 + y**2) * (sigma_x + sigma_y)
    if alpha != 0:
        return alpha / (beta + EPS)
    if beta == 0:
        return 1.0
    return 0.0


def _s_measure(pred: np.ndarray, gt: np.ndarray, gt_fg: int) -> float:
    """`Smeasure.cal_sm`: object score and region score (quadrants around the foreground's centroid)."""
    y = np.mean(gt)
    if y == 0:
        return float(1 - np.mean(pred))
    if y == 1:
        return float(np.mean(pred))
    gt_mean = y
    obj = _s_object(pred[gt]) * gt_mean + _s_object((1 - pred)[~gt]) * (1 - gt_mean)

    h, w = gt.shape
    area = h * w
    # the centroid as np.argwhere(gt).mean(axis=0).round(): sums of integers, exact in float64
    cy = np.round(float(np.arange(h) @ np.count_nonzero(gt, axis=1)) / gt_fg)
    cx = np.round(float(np.arange(w) @ np.count_nonzero(gt, axis=0)) / gt_fg)
    cy, cx = int(cy) + 1, int(cx) + 1  # MATLAB's 1:X includes X
    w_lt = cx * cy / area
    w_rt = cy * (w - cx) / area
    w_lb = (h - cy) * cx / area
    w_rb = 1 - w_lt - w_rt - w_lb
    region = (
        _ssim(pred[0:cy, 0:cx], gt[0:cy, 0:cx]) * w_lt
        + _ssim(pred[0:cy, cx:w], gt[0:cy, cx:w]) * w_rt
        + _ssim(pred[cy:h, 0:cx], gt[cy:h, 0:cx]) * w_lb
        + _ssim(pred[cy:h, cx:w], gt[cy:h, cx:w]) * w_rb
    )
    return float(np.maximum(0, obj * S_ALPHA + region * (1 - S_ALPHA)))


def _matlab_gaussian(size: int = 7, sigma: float = 5) -> np.ndarray:
    """MATLAB's fspecial('gaussian', size, sigma), as `WeightedFmeasure.matlab_style_gauss2D`."""
    m = (size - 1) / 2
    y, x = np.ogrid[-m : m + 1, -m : m + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    total = h.sum()
    if total != 0:
        h /= total
    return h


def _weighted_f_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    """`WeightedFmeasure.cal_wfm` (Margolin et al.'s MATLAB code); 0 for an all-background label."""
    if not gt.any():
        return 0.0
    from scipy.ndimage import convolve, distance_transform_edt  # runtime requirement: scipy

    background = ~gt
    dist, nearest = distance_transform_edt(background, return_indices=True)
    error = np.abs(pred - gt)
    error_t = error.copy()
    error_t[background] = error[nearest[0][background], nearest[1][background]]
    del nearest
    error_a = convolve(error_t, weights=_matlab_gaussian(7, 5), mode="constant", cval=0)
    del error_t
    min_e_ea = np.where(gt & (error_a < error), error_a, error)
    del error_a, error
    importance = np.where(background, 2 - np.exp(np.log(0.5) / 5 * dist), np.ones_like(gt))
    del dist
    weighted = min_e_ea * importance
    tp = np.sum(gt) - np.sum(weighted[gt])
    fp = np.sum(weighted[background])
    recall = 1 - np.mean(weighted[gt])
    precision = tp / (tp + fp + EPS)
    return float((1 + WF_BETA2) * recall * precision / (recall + WF_BETA2 * precision + EPS))


def cod_image_stats(prediction_u8: np.ndarray, label_u8: np.ndarray) -> CodImageStats:
    """One image's contribution: `prediction_u8` the 8-bit probability map (uint8 H x W, round(255 p)),
    `label_u8` the ground truth on 0-255 (uint8 H x W, foreground where > 128; a class map of 0/1 must
    be scaled to 0/255 first). Working memory is a few float64 copies of the image; the result has a
    fixed size."""
    _check_inputs(prediction_u8, label_u8)
    gt = label_u8 > 128
    size = gt.size
    gt_fg = int(np.count_nonzero(gt))

    values = _level_values(prediction_u8)
    pred = values[prediction_u8]  # PySODMetrics' normalised map, bit for bit

    # histograms of the 8-bit levels in the label's background (row 0) and foreground (row 1)
    hist = np.bincount((prediction_u8.astype(np.intp) + LEVELS * gt).ravel(), minlength=2 * LEVELS).reshape(2, LEVELS)
    used = hist.sum(axis=0) > 0

    # curves: the normalised map requantised as uint8(p * 255), counted at level >= 255 - i
    requantised = np.zeros(LEVELS, dtype=np.intp)
    requantised[used] = (values[used] * 255).astype(np.uint8)
    bg_hist = np.bincount(requantised, weights=hist[0], minlength=LEVELS).astype(np.int64)
    fg_hist = np.bincount(requantised, weights=hist[1], minlength=LEVELS).astype(np.int64)
    tp = np.cumsum(np.flip(fg_hist))
    fp = np.cumsum(np.flip(bg_hist))
    em_curve = _enhanced_sum(tp, fp, gt_fg, size) / (size - 1 + EPS)

    positives = tp + fp  # `Fmeasure.cal_pr`
    positives[positives == 0] = 1
    precision = tp / positives
    recall = tp / max(gt_fg, 1)
    numerator = (1 + F_BETA2) * precision * recall
    fm_curve = numerator / np.where(numerator == 0, 1, F_BETA2 * precision + recall)

    # adaptive threshold: the pixels p >= t are whole 8-bit levels
    threshold = min(2 * pred.mean(), 1)
    above = used & (values >= threshold)
    tp_adp, fp_adp = int(hist[1][above].sum()), int(hist[0][above].sum())
    em_adp = float(_enhanced_sum(np.array([tp_adp]), np.array([fp_adp]), gt_fg, size)[0] / (size - 1 + EPS))
    if tp_adp == 0:  # `Fmeasure.cal_adaptive_fm`
        fm_adp = 0.0
    else:
        pre, rec = tp_adp / (tp_adp + fp_adp), tp_adp / gt_fg
        fm_adp = (1 + F_BETA2) * pre * rec / (F_BETA2 * pre + rec)

    return CodImageStats(
        sm=_s_measure(pred, gt, gt_fg),
        wfm=_weighted_f_measure(pred, gt),
        mae=float(np.mean(np.abs(pred - gt))),
        em_adp=em_adp,
        fm_adp=float(fm_adp),
        em_curve=em_curve.astype(np.float64),
        fm_curve=fm_curve.astype(np.float64),
    )


class CodAccumulator:
    """Sums of the per-image stats (five floats, two curves of 256 floats, a count): constant size,
    whatever the number of images. `merge` combines accumulators of disjoint sets of images."""

    def __init__(self) -> None:
        self.images = 0
        self._scalars = dict.fromkeys(CodImageStats.SCALARS, 0.0)
        self._curves = {name: np.zeros(LEVELS, dtype=np.float64) for name in CodImageStats.CURVES}

    def add(self, stats: CodImageStats) -> None:
        self.images += 1
        for name in CodImageStats.SCALARS:
            self._scalars[name] += float(getattr(stats, name))
        for name in CodImageStats.CURVES:
            self._curves[name] += getattr(stats, name)

    def merge(self, other: CodAccumulator) -> None:
        self.images += other.images
        for name in CodImageStats.SCALARS:
            self._scalars[name] += other._scalars[name]
        for name in CodImageStats.CURVES:
            self._curves[name] += other._curves[name]

    def result(self) -> dict[str, float]:
        """The dataset's values (`KEYS`); NaN for every key when no image was added."""
        if self.images == 0:
            return dict.fromkeys(KEYS, float("nan"))
        n = self.images
        mean = {name: total / n for name, total in self._scalars.items()}
        em, fm = self._curves["em_curve"] / n, self._curves["fm_curve"] / n
        return {
            "Sm": mean["sm"],
            "Em_mean": float(em.mean()),
            "Em_max": float(em.max()),
            "Em_adp": mean["em_adp"],
            "wFm": mean["wfm"],
            "Fm_mean": float(fm.mean()),
            "Fm_max": float(fm.max()),
            "Fm_adp": mean["fm_adp"],
            "MAE": mean["mae"],
        }
