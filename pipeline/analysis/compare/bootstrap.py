"""The paired bootstrap: the dataset metrics of resamples of the compared images, the same draws for
every run, and the 95% interval of a difference.

Resample the n compared images with replacement, the same draw for every run (a resample is a vector
of counts, how often each image was drawn: a row of the R x n matrix W). The dataset metric of a
resample is recomputed as the run computes it: W @ areas sums each run's per-image intersections,
unions and areas (mmseg: ratios of sums, NaN classes left out of the means); the binary measures are
means over images, W @ values / n (for Em_mean the mean of each image's E curve, which is the mean of
the image-averaged curve). The interval is the 2.5th and 97.5th percentile of A - B over the R
resamples; a run against itself is exactly [0, 0]. W is made in blocks of resamples, so memory stays
at a few million counts whatever the number of images.
"""

from __future__ import annotations

import numpy as np

from pipeline.analysis.compare.runs import COD_PER_IMAGE, ImageTable
from pipeline.metrics.semantic import ClassAreas, summarize
from pipeline.results.run_tables import AREAS

RESAMPLE_BLOCK = 4_000_000  # counts of W held at once (R_block x n)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def row_nanmean(x: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(x)
    count = valid.sum(axis=1)
    total = np.where(valid, x, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def batch_metrics(intersection: np.ndarray, union: np.ndarray, pred_area: np.ndarray, label_area: np.ndarray) -> dict[str, np.ndarray]:
    """`pipeline.metrics.semantic.summarize`'s mIoU, mDice and aAcc for a batch of summed areas (R x C, one
    row per resample): the same ratios of sums, NaN classes left out of the means."""
    labeled = label_area.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        a_acc = np.where(labeled > 0, intersection.sum(axis=1) / np.maximum(labeled, 1), np.nan)
    return {
        "mIoU": row_nanmean(ratio(intersection, union)),
        "mDice": row_nanmean(ratio(2 * intersection, pred_area + label_area)),
        "aAcc": a_acc,
    }


def point_metrics(table: ImageTable) -> dict:
    """summarize() of the summed areas of `table`: the dataset's values over its images."""
    total = ClassAreas(*(table.areas[a].sum(axis=0) for a in AREAS))
    return summarize(total)


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """R x n: how often each of n images is drawn in each of R resamples with replacement."""
    draws = rng.integers(0, n, size=(resamples, n))
    offsets = (np.arange(resamples, dtype=np.int64) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=resamples * n).reshape(resamples, n)


def bootstrap_metric_samples(
    tables: list[ImageTable], *, resamples: int = 1000, seed: int = 0, cod_rows: np.ndarray | None = None
) -> list[dict[str, np.ndarray]]:
    """For each run (tables aligned on the same images), each headline metric over `resamples`
    paired resamples of the images: the same draws for every run. Binary measures over the images
    `cod_rows` (a boolean mask: the images every run has binary stats for)."""
    n = len(tables[0].ids) if tables else 0
    if any(len(t.ids) != n for t in tables) or any(t.ids != tables[0].ids for t in tables):
        raise ValueError("the runs' image tables are not aligned")
    out: list[dict[str, list[np.ndarray]]] = [{} for _ in tables]
    if n == 0 or resamples < 1:
        return [{} for _ in tables]
    rng = np.random.default_rng(seed)
    block = max(1, min(resamples, RESAMPLE_BLOCK // max(n, 1)))
    has_cod = cod_rows is not None and cod_rows.any() and all(t.cod is not None for t in tables)
    # counts and areas as float64: exact (integers below 2**53), and the products go through BLAS
    areas = [[t.areas[a].astype(np.float64) for a in AREAS] for t in tables]
    cod_index = np.flatnonzero(cod_rows) if has_cod else None
    # a measure's own NaN (an S-measure of an empty quadrant) makes the mean of every resample that
    # draws that image NaN, as the run's own mean is (CodAccumulator); `interval` leaves those out
    cods = [np.nan_to_num(t.cod[cod_index]) for t in tables] if has_cod else []
    undefined = [np.isnan(t.cod[cod_index]).astype(np.float64) for t in tables] if has_cod else []
    # the binary measures use the same draws when every image has them, else draws of their own
    cod_rng = None if not has_cod or len(cod_index) == n else np.random.default_rng([seed, 1])
    done = 0
    while done < resamples:
        b = min(block, resamples - done)
        weights = resample_counts(n, b, rng).astype(np.float64)
        for k, acc in enumerate(out):
            for name, values in batch_metrics(*(weights @ area for area in areas[k])).items():
                acc.setdefault(name, []).append(values)
        if has_cod:
            cod_weights = weights if cod_rng is None else resample_counts(len(cod_index), b, cod_rng).astype(np.float64)
            for k, acc in enumerate(out):
                means = (cod_weights @ cods[k]) / len(cod_index)
                means[(cod_weights @ undefined[k]) > 0] = np.nan
                for key, column in (("Sm", "sm"), ("Em_mean", "em_mean"), ("wFm", "wfm"), ("MAE", "mae")):
                    acc.setdefault(key, []).append(means[:, COD_PER_IMAGE.index(column)])
        done += b
    return [{k: np.concatenate(v) for k, v in acc.items()} for acc in out]


def interval(differences: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap differences (NaN resamples left out)."""
    finite = differences[~np.isnan(differences)]
    if not finite.size:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)
