"""`segpipe compare`: several runs over the same images, side by side, with paired bootstrap intervals.

A run is given by its directory URI, `<output.uri>/<run_id>` (a local path or any fsspec URI). The
runs are joined on `image_id`: the images each run segmented, and the metrics rows of the labeled
ones. Runs over different image sets are refused (`CompareError`, exit 2) unless `intersect`, which
keeps the images every run holds. What is written under `out`:

    comparison.parquet  one row per run: model, checkpoint, speed, every scalar of its summary (as
                        summary.json says; recomputed over the common images with `intersect`),
                        per-class IoU and the class names
    per_image.parquet   one row per image and run: the image's IoU per class (NaN where its union
                        is 0), pixel accuracy, binary measures where the run has them, and the
                        fraction of its pixels on which the runs' masks do not all agree
    pairs.parquet       each ordered pair of runs (A, B) and headline metric: A - B and its 95%
                        paired bootstrap interval over images
    report.html         one self-contained page (every chart an inline base64 PNG): the table, IoU
                        per class, the differences as a forest plot, confusion matrices, speed
                        against accuracy, and the images where the runs disagree most

The paired bootstrap. Resample the n compared images with replacement, the same draw for every run
(a resample is a vector of counts, how often each image was drawn: a row of the R x n matrix W).
The dataset metric of a resample is recomputed as the run computes it: W @ areas sums each run's
per-image intersections, unions and areas (mmseg: ratios of sums, NaN classes left out of the
means); the binary measures are means over images, W @ values / n (for Em_mean the mean of each
image's E curve, which is the mean of the image-averaged curve). The interval is the 2.5th and
97.5th percentile of A - B over the R resamples; a run against itself is exactly [0, 0]. W is made
in blocks of resamples, so memory stays at a few million counts whatever the number of images.

Memory: per-image areas and binary scalars are kept (a few numbers per image); curves are read part
by part; masks are read one part per run at a time and decoded one image at a time.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import LabelsConfig
from pipeline.extras import require
from pipeline.io.source import key_stem, list_labels  # the label pairing of ImageFolderReader
from pipeline.io.storage import open_fs, read_bytes, with_retries
from pipeline.metrics.cod import KEYS as COD_KEYS
from pipeline.metrics.cod import CodAccumulator, CodImageStats
from pipeline.metrics.semantic import ClassAreas, LabelReading, LabelReadingError, summarize
from pipeline.results.masks import assemble_mask
from pipeline.results.run_tables import AREAS, CHUNK_FIELDS, MASKS, METRICS
from pipeline.results.runstore import RunStore
from pipeline.rows import IdSet

HEADLINE = ("mIoU", "mDice", "aAcc")
COD_HEADLINE = ("Sm", "Em_mean", "wFm", "MAE")
LOWER_IS_BETTER = {"MAE"}
SUMMARY_SCALARS = ("aAcc", "mIoU", "mAcc", "mDice")
# per image: the binary scalars, then the mean of each curve (what the bootstrap of Em_mean / Fm_mean needs)
COD_PER_IMAGE = (*CodImageStats.SCALARS, "em_mean", "fm_mean")
RESAMPLE_BLOCK = 4_000_000  # counts of W held at once (R_block x n)


class CompareError(ValueError):
    """Runs that cannot be compared: the message says why, in one line."""


# --------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run directory as the comparison reads it."""

    uri: str
    run_id: str
    label: str  # unique among the compared runs: the run_id, or <parent>/<run_id> where two share one
    store: RunStore
    info: dict
    summary: dict
    segmented: IdSet
    num_classes: int
    class_names: list[str]

    @property
    def model_name(self) -> str:
        model = self.info.get("model") or {}
        return str(model.get("name") or model.get("family") or "?")

    @property
    def config(self) -> dict:
        return self.info.get("config") or {}

    @property
    def images_per_second(self) -> float | None:
        value = (self.summary.get("throughput") or {}).get("images_per_second")
        return float(value) if value is not None else None


SPEED = "img/s: the images every attempt committed over the seconds of each attempt's plan: the actors' start-up (loading the model) included, Ray's start-up not"


def speed_notes(runs: list[Run]) -> list[str]:
    """What a run's images/s includes of its start-up, said once; runs that do not record it named."""
    unknown = [r.label for r in runs if "startup" not in (r.summary.get("throughput") or {})]
    notes = [SPEED] if len(unknown) < len(runs) else []
    if unknown:
        notes.append(
            f"img/s of {', '.join(unknown)}: written by an older segpipe, which did not count interrupted attempts "
            "and did not record whether its seconds include start-up"
        )
    return notes


def open_run(uri: str, storage_options: dict | None = None) -> Run:
    store = RunStore.at(uri, storage_options)
    info = store.read_json("run.json")
    if not info:
        raise CompareError(f"{uri}: not a run directory (no run.json)")
    summary = store.read_json("summary.json") or {}
    model = info.get("model") or {}
    num_classes = int(model.get("mask_classes") or model.get("num_classes") or len(summary.get("IoU") or []))
    names = list(summary.get("class_names") or model.get("class_names") or [])
    if len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    run_id = str(info.get("run_id") or store.run_id)
    return Run(uri.rstrip("/"), run_id, run_id, store, info, summary, store.outcomes().segmented, num_classes, names)


def _label_runs(runs: list[Run]) -> None:
    uris = [r.uri for r in runs]
    twice = sorted({u for u in uris if uris.count(u) > 1})
    if twice:
        raise CompareError(f"{twice[0]} is given twice")
    ids = [r.run_id for r in runs]
    for run in runs:
        if ids.count(run.run_id) > 1:
            parts = run.uri.split("/")
            run.label = "/".join(parts[-2:]) if len(parts) > 1 else run.uri
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):
        for i, run in enumerate(runs):
            run.label = f"{run.label} [{i + 1}]"


# ------------------------------------------------------------------------------- per-image data


@dataclass
class ImageTable:
    """One run's metrics rows, one per image (its last row wins), aligned to `ids`."""

    ids: list[str]
    areas: dict[str, np.ndarray]  # intersection, union, pred_area, label_area: n x C int64
    cod: np.ndarray | None  # n x len(COD_PER_IMAGE) float64, NaN rows for images without binary stats
    row_of: dict[str, tuple[str, int]]  # image_id -> (part, row in that part), for the curves

    def take(self, ids: list[str]) -> ImageTable:
        index = {image_id: i for i, image_id in enumerate(self.ids)}
        rows = np.array([index[i] for i in ids], dtype=np.int64)
        return ImageTable(
            list(ids),
            {k: v[rows] for k, v in self.areas.items()},
            self.cod[rows] if self.cod is not None else None,
            {i: self.row_of[i] for i in ids},
        )


def _matrix(column: pa.ChunkedArray | pa.Array, rows: int, width: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return np.asarray(column.flatten(), dtype=np.int64).reshape(rows, width)


def read_image_table(run: Run) -> ImageTable:
    """Per-image areas (and binary scalars, and the mean of each binary curve) of every labeled
    image of `run`, part by part: a curve column is reduced to its mean in the part that holds it."""
    c = run.num_classes
    ids: list[np.ndarray] = []
    areas: dict[str, list[np.ndarray]] = {a: [] for a in AREAS}
    cods: list[np.ndarray] = []
    where: list[tuple[str, int]] = []
    any_cod = False
    for part in run.store.parts_of(METRICS):
        names = set(run.store.part_schema(METRICS, part).names)
        wanted = ["image_id", *AREAS] + [n for n in (*CodImageStats.SCALARS, *CodImageStats.CURVES) if n in names]
        table = run.store.read_part(METRICS, part, wanted)
        n = table.num_rows
        if not n:
            continue
        ids.append(np.asarray(table.column("image_id").to_pylist(), dtype=object))
        for a in AREAS:
            areas[a].append(_matrix(table.column(a), n, c))
        cod = np.full((n, len(COD_PER_IMAGE)), np.nan)
        if CodImageStats.SCALARS[0] in names:
            any_cod = True
            for j, name in enumerate(CodImageStats.SCALARS):
                cod[:, j] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            for j, name in enumerate(CodImageStats.CURVES, start=len(CodImageStats.SCALARS)):
                if name in names:
                    cod[:, j] = _curve_means(table.column(name))
        cods.append(cod)
        where.extend((part, i) for i in range(n))
    if not ids:
        return ImageTable([], {a: np.zeros((0, c), np.int64) for a in AREAS}, None, {})
    all_ids = np.concatenate(ids)
    # each image once: its last row wins (as pipeline.results.runstore.sum_areas)
    last: dict[str, int] = {}
    for i, image_id in enumerate(all_ids):
        last[image_id] = i
    order = sorted(last)
    rows = np.array([last[i] for i in order], dtype=np.int64)
    return ImageTable(
        order,
        {a: np.concatenate(areas[a])[rows] for a in AREAS},
        np.concatenate(cods)[rows] if any_cod else None,
        {image_id: where[last[image_id]] for image_id in order},
    )


def _curve_means(column: pa.ChunkedArray) -> np.ndarray:
    """The mean of each row's curve (NaN for a null row), without a Python loop over rows."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = np.asarray(column.flatten(), dtype=np.float64)
    sums = np.add.reduceat(values, np.r_[0, np.cumsum(lengths)[:-1]]) if values.size else np.zeros(len(lengths))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(lengths > 0, sums / np.maximum(lengths, 1), np.nan)
    return means


def cod_values(run: Run, table: ImageTable) -> dict[str, float]:
    """The binary measures (pipeline.metrics.cod.KEYS) over the images of `table`, reduced by
    CodAccumulator from the metrics rows, read part by part; {} when the run has none."""
    if table.cod is None:
        return {}
    by_part: dict[str, list[int]] = {}
    for image_id in table.ids:
        part, row = table.row_of[image_id]
        by_part.setdefault(part, []).append(row)
    accumulator = CodAccumulator()
    columns = [*CodImageStats.SCALARS, *CodImageStats.CURVES]
    for part, rows in sorted(by_part.items()):
        part_table = run.store.read_part(METRICS, part, columns).take(pa.array(sorted(rows)))
        values = {name: part_table.column(name).to_pylist() for name in columns}
        for i in range(part_table.num_rows):
            if values["sm"][i] is None:
                continue
            accumulator.add(CodImageStats.from_record({name: v[i] for name, v in values.items()}))
    return accumulator.result() if accumulator.images else {}


# ------------------------------------------------------------------------------------ metrics


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _row_nanmean(x: np.ndarray) -> np.ndarray:
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
        "mIoU": _row_nanmean(_ratio(intersection, union)),
        "mDice": _row_nanmean(_ratio(2 * intersection, pred_area + label_area)),
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
    cods = [np.nan_to_num(t.cod[cod_index]) for t in tables] if has_cod else []
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


# ------------------------------------------------------------------------------------ masks


@dataclass
class MaskPass:
    """What one pass over the compared images' masks gives."""

    disagreement: dict[str, float] = field(default_factory=dict)  # image_id -> fraction of pixels not all runs agree on
    confusion: list[np.ndarray] | None = None  # per run: C x C counts, rows label, columns prediction
    confusion_images: int = 0
    top: list[tuple[float, str]] = field(default_factory=list)  # (fraction, image_id): where the runs disagree most
    notes: list[str] = field(default_factory=list)


class _PartCache:
    """The masks rows of one part of one run at a time (PNG bytes, never decoded masks)."""

    def __init__(self, run: Run) -> None:
        self.run, self.part, self.table, self.rows = run, None, None, {}

    def image(self, part: str, image_id: str) -> np.ndarray:
        if part != self.part:
            self.table = self.run.store.read_part(MASKS, part, ["image_id", "height", "width", *CHUNK_FIELDS, "mask"])
            self.rows = {}
            for i, image in enumerate(self.table.column("image_id").to_pylist()):
                self.rows.setdefault(image, []).append(i)
            self.part = part
        return assemble_mask(self.table.take(pa.array(self.rows[image_id], pa.int64())))


def mask_parts(run: Run) -> dict[str, str]:
    """image_id -> the latest committed part holding its mask (the run store's view)."""
    return run.store.mask_parts()


@dataclass
class Sources:
    """Where the compared images and their labels are read from (image folders only)."""

    images_uri: str | None = None
    labels: dict[str, str] = field(default_factory=dict)  # image_id -> label URI
    exif_transpose: bool = True
    reading: LabelReading | None = None  # how the run read its labels (a binary task's masks or class indices)
    notes: list[str] = field(default_factory=list)


def find_sources(run: Run, image_ids: list[str], storage_options: dict) -> Sources:
    """The images and labels of `run`'s config: labels are paired as pipeline.io.source's
    ImageFolderReader pairs them (the image's relative key, any label extension, the earliest of
    `labels.extensions` preferred), from one listing of the labels prefix."""
    cfg = run.config
    inp = cfg.get("input") or {}
    fmt = inp.get("format") or (run.info.get("identity") or {}).get("input.format")
    metrics = cfg.get("metrics") or {}
    src = Sources(
        exif_transpose=bool(inp.get("exif_transpose", True)),
        reading=LabelReading.of(
            metrics.get("task", "semantic"),
            metrics.get("binary_labels", "class_index"),  # runs from before binary_labels read class indices
            metrics.get("ignore_index"),
            int(metrics.get("positive_class", 1)) if run.num_classes == 2 and (run.info.get("model") or {}).get("num_classes") != 1 else 1,
            run.num_classes,
        ),
    )
    if fmt != "images":
        src.notes.append(
            f"the input is {fmt or 'not an image folder'} ({inp.get('uri')}): confusion matrices and photos need an image folder"
        )
        return src
    src.images_uri = inp.get("uri")
    labels_cfg = inp.get("labels") or {}
    labels_uri = labels_cfg.get("uri")
    if not labels_uri:
        src.notes.append(f"run {run.label} has no labels configured: no confusion matrices")
        return src
    extensions = labels_cfg.get("extensions") or LabelsConfig().extensions
    try:
        labels = list_labels(labels_uri, extensions, storage_options)
    except OSError as exc:
        src.notes.append(f"labels {labels_uri} are not reachable ({' '.join(str(exc).split())[:200]}): no confusion matrices")
        return src
    if not labels:
        src.notes.append(f"no label files under {labels_uri} (missing or empty): no confusion matrices")
        return src
    for image_id in image_ids:
        hit = labels.get(key_stem(image_id))
        if hit is not None:
            src.labels[image_id] = hit
    return src


def read_label(src: Sources, image_id: str, storage_options: dict) -> np.ndarray | None:
    from pipeline.io.decode import decode_label

    uri = src.labels.get(image_id)
    if uri is None:
        return None
    fs, path = open_fs(uri, storage_options)
    return decode_label(read_bytes(fs, path), exif_transpose=src.exif_transpose)


def label_classes(src: Sources, label: np.ndarray, num_classes: int) -> tuple[np.ndarray, int | None]:
    """The label's class map as the run read it (a binary task's mask or class indices), and the
    value in it that counts nowhere; LabelReadingError where the run's reading refuses it."""
    reading = src.reading or LabelReading(num_classes)
    return reading.class_map(label, reading.decide(np.unique(label)))


def read_photo(src: Sources, image_id: str, storage_options: dict) -> np.ndarray | None:
    from pipeline.io.decode import decode_image

    if not src.images_uri:
        return None
    fs, root = open_fs(src.images_uri, storage_options)
    return decode_image(read_bytes(fs, f"{root.rstrip('/')}/{image_id}"), exif_transpose=src.exif_transpose)


def scan_masks(runs: list[Run], image_ids: list[str], src: Sources, storage_options: dict, top: int = 6) -> MaskPass:
    """One pass over the compared images: each run's mask decoded one image at a time (masks read
    one part per run at a time), the fraction of pixels where the runs do not all agree, and, with
    labels, each run's confusion matrix."""
    result = MaskPass()
    c = runs[0].num_classes
    parts = [mask_parts(r) for r in runs]
    caches = [_PartCache(r) for r in runs]
    if src.labels:
        result.confusion = [np.zeros((c, c), np.int64) for _ in runs]
    order = sorted(image_ids, key=lambda i: (tuple(p.get(i, "") for p in parts), i))
    unreadable = 0
    for image_id in order:
        masks = [cache.image(p[image_id], image_id) for cache, p in zip(caches, parts)]
        if any(m.shape != masks[0].shape for m in masks[1:]):
            result.notes.append(f"{image_id}: the runs' masks differ in size; left out of the disagreement")
            continue
        differ = np.zeros(masks[0].shape, bool)
        for m in masks[1:]:
            differ |= m != masks[0]
        fraction = float(differ.mean()) if differ.size else 0.0
        result.disagreement[image_id] = fraction
        if result.confusion is not None and image_id in src.labels:
            try:
                label = read_label(src, image_id, storage_options)
            except Exception:  # one unreadable label is one image without a confusion count
                label = None
            if label is None or label.shape != masks[0].shape:
                unreadable += 1
                continue
            try:
                label, ignore = label_classes(src, label, c)
            except LabelReadingError:
                unreadable += 1
                continue
            keep = (label >= 0) & (label < c) if ignore is None else (label != ignore) & (label >= 0) & (label < c)
            truth = label[keep].astype(np.int64)
            for k, m in enumerate(masks):
                pred = m[keep].astype(np.int64)
                ok = pred < c
                result.confusion[k] += np.bincount(truth[ok] * c + pred[ok], minlength=c * c).reshape(c, c)
            result.confusion_images += 1
    if unreadable:
        result.notes.append(f"{unreadable} labels could not be read or do not fit their mask: left out of the confusion matrices")
    # the most disagreement first; among equal fractions the first image id
    result.top = [(f, i) for i, f in sorted(result.disagreement.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    return result


# ------------------------------------------------------------------------------------ compare


@dataclass
class Comparison:
    runs: list[Run]
    out_uri: str
    images: int  # images compared (every run segmented them)
    labeled: int  # of those, labeled in every run
    intersect: bool
    resamples: int
    seed: int
    comparison: pa.Table
    pairs: pa.Table
    per_image: pa.Table
    notes: list[str]
    mask_pass: MaskPass
    sources: Sources
    binary: bool
    files: dict[str, str] = field(default_factory=dict)
    receptive_fields: list[dict] = field(default_factory=list)  # per run: label, ErfResult, figure


def compare_runs(
    run_uris: list[str],
    out_uri: str,
    *,
    intersect: bool = False,
    resamples: int = 1000,
    seed: int = 0,
    storage_options: dict | None = None,
    top: int = 6,
    receptive_field: int = 0,
) -> Comparison:
    """Compare the runs at `run_uris` and write comparison.parquet, per_image.parquet, pairs.parquet
    and report.html under `out_uri`. CompareError for runs that cannot be compared."""
    storage_options = storage_options or {}
    if not run_uris:
        raise CompareError("compare needs at least one run")
    if resamples < 1:
        raise CompareError(f"--resamples must be at least 1, got {resamples}")
    require("matplotlib", "report", "segpipe compare's report")  # its charts; before anything is read or written
    runs = [open_run(u, storage_options) for u in run_uris]
    _label_runs(runs)
    classes = {r.num_classes for r in runs}
    if len(classes) > 1:
        raise CompareError("the runs have different numbers of classes: " + ", ".join(f"{r.label} {r.num_classes}" for r in runs))
    notes: list[str] = speed_notes(runs)
    names = [tuple(r.class_names) for r in runs]
    if len(set(names)) > 1:
        notes.append(f"the runs name their classes differently; the names of {runs[0].label} are used")

    # the images: every run's segmented ids
    common = runs[0].segmented
    for r in runs[1:]:
        common = IdSet(common.ids.filter(pc.is_in(common.ids, value_set=r.segmented.ids)))
    union = IdSet.union(*(r.segmented for r in runs))
    differ = len(union) - len(common)
    if differ:
        counts = ", ".join(f"{r.label} {len(r.segmented)}" for r in runs)
        if not intersect:
            raise CompareError(
                f"the runs segmented different images: {differ} of {len(union)} images are not in every run ({counts}; "
                f"{len(common)} in common); --intersect compares the common ones"
            )
        if not len(common):
            raise CompareError(f"the runs have no image in common ({counts})")
        notes.append(
            f"--intersect: {len(common)} images every run segmented are compared; {differ} of {len(union)} are left out ({counts})"
        )
    image_ids = sorted(common.to_pylist())

    # per-image areas, joined on image_id: the images labeled in every run
    tables = [read_image_table(r) for r in runs]
    in_common = set(image_ids)
    labeled = set(tables[0].ids) & in_common
    for t in tables[1:]:
        labeled &= set(t.ids)
    labeled_ids = sorted(labeled)
    joined = [t.take(labeled_ids) for t in tables]
    if not labeled_ids:
        notes.append("no compared image has a label in every run: no metrics, no intervals")
    binary = all(t.cod is not None for t in joined) and bool(labeled_ids)
    cod_rows = None
    if binary:
        cod_rows = np.all([~np.isnan(t.cod[:, 0]) for t in joined], axis=0)
        binary = bool(cod_rows.any())

    run0 = runs[0]
    src = find_sources(run0, image_ids, storage_options)
    notes.extend(src.notes)
    mask_pass = scan_masks(runs, image_ids, src, storage_options, top=top)
    notes.extend(mask_pass.notes)

    comparison = _comparison_table(runs, joined, intersect and differ > 0, len(image_ids), cod_rows if binary else None)
    per_image = _per_image_table(runs, tables, image_ids, mask_pass.disagreement)
    pairs = _pairs_table(runs, joined, resamples, seed, cod_rows if binary else None)

    result = Comparison(
        runs, out_uri, len(image_ids), len(labeled_ids), intersect and differ > 0, resamples, seed, comparison, pairs, per_image,
        notes, mask_pass, src, binary,
    )  # fmt: skip
    if receptive_field:
        result.receptive_fields = receptive_fields(runs, image_ids[:receptive_field], src, storage_options, notes)
    # everything is made before the first byte is written: a comparison that fails writes nothing
    written = {"comparison.parquet": comparison, "per_image.parquet": per_image, "pairs.parquet": pairs}
    result.files = {name: f"{out_uri.rstrip('/')}/{name}" for name in written}
    outputs = {name: _parquet_bytes(table) for name, table in written.items()}
    outputs["report.html"] = render_report(result, storage_options).encode()
    result.files["report.html"] = f"{out_uri.rstrip('/')}/report.html"
    fs, root = open_fs(out_uri, storage_options)
    with_retries(lambda: fs.makedirs(root, exist_ok=True), what="write", uri=out_uri)
    for name, data in outputs.items():
        path = f"{root.rstrip('/')}/{name}"
        with_retries(lambda path=path, data=data: fs.pipe_file(path, data), what="write", uri=path)
    return result


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _float(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _comparison_table(runs: list[Run], joined: list[ImageTable], recompute: bool, images: int, cod_rows: np.ndarray | None) -> pa.Table:
    """One row per run. Without `recompute` every scalar is summary.json's; with it (--intersect over
    different image sets) the metrics are recomputed over the compared images."""
    rows = []
    cod_keys = [k for k in COD_KEYS if any(k in r.summary for r in runs)] or (list(COD_KEYS) if cod_rows is not None else [])
    for run, table in zip(runs, joined):
        model = run.info.get("model") or {}
        s = run.summary
        row: dict[str, Any] = {
            "run_id": run.label,
            "run_uri": run.uri,
            "status": run.info.get("status"),
            "model": run.model_name,
            "family": model.get("family"),
            "checkpoint": model.get("checkpoint") or (run.config.get("model") or {}).get("checkpoint"),
            "parameters": model.get("parameters"),
            "num_classes": run.num_classes,
            "images": s.get("images"),
            "errors": s.get("errors"),
            "labeled_images": s.get("labeled_images"),
            "seconds": (s.get("throughput") or {}).get("seconds"),
            "images_per_second": run.images_per_second,
            "wall_seconds": (s.get("throughput") or {}).get("wall_seconds"),
            "startup": (s.get("throughput") or {}).get("startup"),
            "scope": "summary.json",
        }
        for key in SUMMARY_SCALARS:
            row[key] = _float(s.get(key))
        for key in cod_keys:
            row[key] = _float(s.get(key))
        iou = [_float(v) for v in (s.get("IoU") or [None] * run.num_classes)]
        if recompute:
            point = point_metrics(table)
            row.update({k: _float(point[k]) for k in SUMMARY_SCALARS})
            iou = [_float(v) for v in point["IoU"]]
            row.update(images=images, errors=None, labeled_images=len(table.ids), scope="common images")
            if cod_keys:
                values = cod_values(run, table.take([i for i, keep in zip(table.ids, cod_rows) if keep])) if cod_rows is not None else {}
                row.update({k: _float(values.get(k)) for k in cod_keys})
        row["IoU"] = iou
        row["class_names"] = list(run.class_names)
        rows.append(row)
    fields = [
        pa.field("run_id", pa.string()),
        pa.field("run_uri", pa.string()),
        pa.field("status", pa.string()),
        pa.field("model", pa.string()),
        pa.field("family", pa.string()),
        pa.field("checkpoint", pa.string()),
        pa.field("parameters", pa.int64()),
        pa.field("num_classes", pa.int32()),
        pa.field("images", pa.int64()),
        pa.field("errors", pa.int64()),
        pa.field("labeled_images", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("images_per_second", pa.float64()),
        pa.field("wall_seconds", pa.float64()),
        pa.field("startup", pa.string()),  # what `seconds` includes of a run's start-up (summary.json's throughput)
        pa.field("scope", pa.string()),
        *(pa.field(k, pa.float64()) for k in (*SUMMARY_SCALARS, *cod_keys)),
        pa.field("IoU", pa.list_(pa.float64())),
        pa.field("class_names", pa.list_(pa.string())),
    ]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def _per_image_table(runs: list[Run], tables: list[ImageTable], image_ids: list[str], disagreement: dict[str, float]) -> pa.Table:
    """One row per compared image and run; columns built from arrays, not row by row."""
    n, c = len(image_ids), runs[0].num_classes
    chunks = []
    has_cod = any(t.cod is not None for t in tables)
    fraction = np.array([disagreement.get(i, np.nan) for i in image_ids], dtype=np.float64)
    for run, table in zip(runs, tables):
        index = {image_id: k for k, image_id in enumerate(table.ids)}
        rows = np.array([index.get(i, -1) for i in image_ids], dtype=np.int64)
        labeled = rows >= 0
        take = np.where(labeled, rows, 0)
        inter = table.areas["intersection"][take] if len(table.ids) else np.zeros((n, c), np.int64)
        union = table.areas["union"][take] if len(table.ids) else np.zeros((n, c), np.int64)
        label_area = table.areas["label_area"][take] if len(table.ids) else np.zeros((n, c), np.int64)
        iou = _ratio(inter, union).astype(np.float64)
        offsets = pa.array(np.arange(0, (n + 1) * c, c, dtype=np.int32) if n else np.zeros(1, np.int32))
        iou_list = pa.ListArray.from_arrays(offsets, pa.array(iou.ravel(), pa.float64()), mask=pa.array(~labeled))
        labeled_px = label_area.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            pixel_acc = np.where(labeled & (labeled_px > 0), inter.sum(axis=1) / np.maximum(labeled_px, 1), np.nan)
        columns: dict[str, pa.Array] = {
            "run_id": pa.array([run.label] * n, pa.string()),
            "image_id": pa.array(image_ids, pa.string()),
            "labeled": pa.array(labeled),
            "IoU": iou_list,
            "mIoU": pa.array(_row_nanmean(np.where(labeled[:, None], iou, np.nan)) if n else np.zeros(0), pa.float64(), from_pandas=True),
            "pixel_accuracy": pa.array(pixel_acc, pa.float64(), from_pandas=True),
            "disagreement": pa.array(fraction, pa.float64(), from_pandas=True),
        }
        if has_cod:
            cod = table.cod[take] if table.cod is not None and len(table.ids) else np.full((n, len(COD_PER_IMAGE)), np.nan)
            for j, name in enumerate(COD_PER_IMAGE):
                columns[name] = pa.array(np.where(labeled, cod[:, j], np.nan), pa.float64(), from_pandas=True)
        chunks.append(pa.table(columns))
    return pa.concat_tables(chunks)


PAIRS_SCHEMA = pa.schema(
    [
        pa.field("run_a", pa.string()),
        pa.field("run_b", pa.string()),
        pa.field("metric", pa.string()),
        pa.field("value_a", pa.float64()),
        pa.field("value_b", pa.float64()),
        pa.field("difference", pa.float64()),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("resamples", pa.int64()),
        pa.field("images", pa.int64()),
    ]
)


def _pairs_table(runs: list[Run], joined: list[ImageTable], resamples: int, seed: int, cod_rows: np.ndarray | None) -> pa.Table:
    if len(runs) < 2 or not joined[0].ids:
        return PAIRS_SCHEMA.empty_table()
    samples = bootstrap_metric_samples(joined, resamples=resamples, seed=seed, cod_rows=cod_rows)
    points = [point_metrics(t) for t in joined]
    metrics = list(HEADLINE)
    if cod_rows is not None:
        metrics += list(COD_HEADLINE)
        cod_points = []
        for run, t in zip(runs, joined):
            cod_points.append(cod_values(run, t.take([i for i, keep in zip(t.ids, cod_rows) if keep])))
        points = [{**p, **c} for p, c in zip(points, cod_points)]
    rows = []
    for a in range(len(runs)):
        for b in range(len(runs)):
            if a == b:
                continue
            for metric in metrics:
                va, vb = _float(points[a].get(metric)), _float(points[b].get(metric))
                low, high = interval(samples[a][metric] - samples[b][metric])
                n = int(cod_rows.sum()) if metric in COD_HEADLINE else len(joined[0].ids)
                rows.append(
                    {
                        "run_a": runs[a].label,
                        "run_b": runs[b].label,
                        "metric": metric,
                        "value_a": va,
                        "value_b": vb,
                        "difference": None if va is None or vb is None else va - vb,
                        "ci_low": _float(low),
                        "ci_high": _float(high),
                        "resamples": resamples,
                        "images": n,
                    }
                )
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


# ------------------------------------------------------------------------------------ terminal


def _pct(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def format_comparison(result: Comparison) -> str:
    """The short table `segpipe compare` prints."""
    rows = result.comparison.to_pylist()
    width = max([len("run")] + [len(r["run_id"]) for r in rows])
    mwidth = max([len("model")] + [len(r["model"] or "") for r in rows])
    lines = [f"{'run':<{width}}  {'model':<{mwidth}}  {'images':>7}  {'img/s':>7}  {'aAcc':>6}  {'mIoU':>6}  {'mDice':>6}"]
    for r in rows:
        rate = f"{r['images_per_second']:.2f}" if r["images_per_second"] is not None else "-"
        lines.append(
            f"{r['run_id']:<{width}}  {r['model'] or '':<{mwidth}}  {r['images'] or 0:>7}  {rate:>7}  "
            f"{_pct(r['aAcc']):>6}  {_pct(r['mIoU']):>6}  {_pct(r['mDice']):>6}"
        )
    pairs = [p for p in iter_pairs(result) if p["metric"] == "mIoU"]
    if pairs:
        lines.append(f"mIoU A - B, 95% paired bootstrap over {result.labeled} images ({result.resamples} resamples), points:")
        for p in pairs:
            lines.append(
                f"  {p['run_a']} - {p['run_b']}: {_signed(p['difference'])} [{_signed(p['ci_low'])}, {_signed(p['ci_high'])}]"
                + (" *" if _excludes_zero(p) else "")
            )
    for note in result.notes:
        lines.append(f"note: {note}")
    lines.append(f"report: {result.files.get('report.html', '')}")
    return "\n".join(lines)


def iter_pairs(result: Comparison) -> Iterator[dict]:
    """pairs.parquet's rows with run_a given before run_b (the other order is the same pair negated)."""
    order = {r.label: i for i, r in enumerate(result.runs)}
    for p in result.pairs.to_pylist():
        if order[p["run_a"]] < order[p["run_b"]]:
            yield p


def _signed(v: Any, scale: float = 100.0, digits: int = 2) -> str:
    return "-" if v is None else f"{scale * v:+.{digits}f}"


def _excludes_zero(p: dict) -> bool:
    return p["ci_low"] is not None and p["ci_high"] is not None and (p["ci_low"] > 0 or p["ci_high"] < 0)


# ------------------------------------------------------------------------------------ report

RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
# class colours: distinct on a photo and against each other (the first ten are matplotlib's tab10, reordered)
CLASS_COLORS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79",
]  # fmt: skip
THUMB = 240  # the longer side of each picture in the disagreement section, in pixels

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d232b;
       margin: 0 auto; max-width: 1216px; padding: 24px 32px 48px; line-height: 1.45; background: #fff; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
h2 { font-size: 1.25em; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #e3e7ec; }
h3 { font-size: 1.02em; margin: 18px 0 6px; }
p.meta { color: #57606a; margin: 0 0 12px; }
nav a { margin-right: 14px; color: #0b62c4; text-decoration: none; font-size: .92em; }
ul.notes { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px 8px 30px; margin: 12px 0; }
p.note { background: #f4f6f8; border-left: 4px solid #9aa5b1; padding: 8px 12px; }
p.caption, figcaption { color: #57606a; font-size: .88em; }
div.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: .86em; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e3e7ec; text-align: right; white-space: nowrap; }
th { background: #f4f6f8; font-weight: 600; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
td.best { font-weight: 700; }
td.up { color: #1a7f37; font-weight: 600; } td.down { color: #c62828; font-weight: 600; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; vertical-align: -1px;
          border: 1px solid rgba(0,0,0,.25); }
ul.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 6px 0 12px; }
img.chart { max-width: 100%; height: auto; display: block; margin: 8px 0; }
figure.case { margin: 18px 0; padding: 12px; border: 1px solid #e3e7ec; border-radius: 6px; }
div.strip { display: flex; flex-wrap: wrap; gap: 10px; }
div.strip figure { margin: 0; text-align: center; }
div.strip img { display: block; image-rendering: pixelated; border: 1px solid #d0d7de; }
code { background: #f4f6f8; padding: 1px 4px; border-radius: 3px; }
"""


def _pyplot():
    """matplotlib's pyplot on the Agg backend (the `report` extra: compare_runs requires it first)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100})
    return plt


def _figure_uri(plt, fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _png_uri(array: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def class_palette(n: int) -> np.ndarray:
    """n x 3 uint8 class colours: CLASS_COLORS, then golden-ratio hues."""
    import colorsys

    out = [tuple(int(h[i : i + 2], 16) for i in (1, 3, 5)) for h in CLASS_COLORS[:n]]
    for k in range(len(out), n):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65, 0.95)
        out.append((int(255 * r), int(255 * g), int(255 * b)))
    return np.array(out, dtype=np.uint8).reshape(n, 3)


def _hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _isnum(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def _fmt(metric: str, v: Any) -> str:
    """Percentages with 2 decimals for the mmseg metrics, 3 decimals for the binary measures."""
    if not _isnum(v):
        return "–"
    return f"{v:.3f}" if metric in COD_KEYS else f"{100 * v:.2f}"


def _fmt_diff(metric: str, v: Any) -> str:
    if not _isnum(v):
        return "–"
    return f"{v:+.3f}" if metric in COD_KEYS else f"{100 * v:+.2f}"


def _unit(metric: str) -> str:
    return "" if metric in COD_KEYS else " (points)"


def _swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{color}"></span>'


def render_report(result: Comparison, storage_options: dict | None = None) -> str:
    """report.html: one self-contained page (inline PNGs, an inline style, no script, no link)."""
    storage_options = storage_options or {}
    plt = _pyplot()
    colors = {r.label: RUN_COLORS[i % len(RUN_COLORS)] for i, r in enumerate(result.runs)}
    notes = list(result.notes)
    sections = [
        _section_table(result, colors),
        _section_per_class(result, colors, plt),
        _section_pairs(result, plt),
        _section_confusion(result, plt),
        _section_speed(result, colors, plt),
        _section_disagreements(result, storage_options),
        *([_section_receptive_field(result)] if result.receptive_fields else []),
        _section_method(result),
    ]
    runs = ", ".join(_esc(r.label) for r in result.runs)
    scope = f"{result.images} images compared, {result.labeled} of them labeled"
    nav = "".join(
        f'<a href="#{sid}">{title}</a>'
        for sid, title in (
            ("comparison-table", "Table"),
            ("per-class-iou", "Per class"),
            ("pairs", "Differences"),
            ("confusion", "Confusion"),
            ("speed-accuracy", "Speed"),
            ("disagreements", "Disagreements"),
            *([("receptive-field", "Receptive field")] if result.receptive_fields else []),
            ("method", "Method"),
        )
    )
    note_html = "<ul class='notes'>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>" if notes else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>segpipe compare: {runs}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<header id='overview'><h1>Segmentation runs compared</h1>\n"
        f"<p class='meta'>{len(result.runs)} runs ({runs}) · {scope} · 95% paired bootstrap over images, "
        f"{result.resamples} resamples, seed {result.seed} · generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC</p>\n"
        f"<nav>{nav}</nav>\n{note_html}</header>\n<main>\n" + "\n".join(sections) + "\n</main>\n</body>\n</html>\n"
    )


TEXT_COLUMNS = {"Run", "Model", "Checkpoint", "Status"}
_TEXT = " class='text'"


def _metric_cells(rows: list[dict], metrics: list[str]) -> list[list[str]]:
    """One list of <td> per row: each metric formatted, the best of each column bold."""
    best = {}
    for m in metrics:
        values = [r[m] for r in rows if _isnum(r[m])]
        if values and len(rows) > 1:
            best[m] = min(values) if m in LOWER_IS_BETTER else max(values)
    return [[f"<td{' class=best' if m in best and r[m] == best[m] else ''}>{_fmt(m, r[m])}</td>" for m in metrics] for r in rows]


def _section_table(result: Comparison, colors: dict[str, str]) -> str:
    rows = result.comparison.to_pylist()
    metrics = [m for m in SUMMARY_SCALARS if m in result.comparison.column_names]
    cod = [m for m in COD_KEYS if m in result.comparison.column_names]
    head = ["Run", "Model", "Checkpoint", "Parameters", "Status", "Images", "Errors", "Labeled", "Images/s"]
    head += [f"{m} (%)" for m in metrics]
    body = []
    for r, scores in zip(rows, _metric_cells(rows, metrics)):
        ckpt = r["checkpoint"] or ""
        cells = [
            f"<td class='text'>{_swatch(colors[r['run_id']])}{_esc(r['run_id'])}</td>",
            f"<td class='text'>{_esc(r['model'])}</td>",
            f"<td class='text' title='{_esc(ckpt)}'>{_esc(PurePosixPath(ckpt).name or ckpt)}</td>",
            f"<td>{r['parameters']:,}</td>" if _isnum(r["parameters"]) else "<td>–</td>",
            f"<td class='text'>{_esc(r['status'])}</td>",
            f"<td>{_esc(r['images'])}</td>",
            f"<td>{_esc(r['errors'] if r['errors'] is not None else '–')}</td>",
            f"<td>{_esc(r['labeled_images'])}</td>",
            f"<td>{r['images_per_second']:.2f}</td>" if _isnum(r["images_per_second"]) else "<td>–</td>",
        ]
        body.append("<tr>" + "".join(cells + scores) + "</tr>")
    header = "".join(f"<th{_TEXT if h in TEXT_COLUMNS else ''}>{h}</th>" for h in head)
    scope = (
        "Metrics over the images every run segmented (--intersect)."
        if result.intersect
        else "Every number is the run's own summary.json (all its images)."
    )
    parts = [
        "<section id='comparison-table'><h2>Runs</h2>",
        f"<div class='scroll'><table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table></div>",
    ]
    if cod:
        cod_head = "<th>Run</th>" + "".join(f"<th>{m}</th>" for m in cod)
        cod_body = "".join(
            f"<tr><td class='text'>{_swatch(colors[r['run_id']])}{_esc(r['run_id'])}</td>{''.join(scores)}</tr>"
            for r, scores in zip(rows, _metric_cells(rows, cod))
        )
        parts.append("<h3>Camouflaged-object measures (binary task)</h3>")
        parts.append(f"<div class='scroll'><table><thead><tr>{cod_head}</tr></thead><tbody>{cod_body}</tbody></table></div>")
    lower = " MAE: lower is better." if cod else ""
    parts.append(
        f"<p class='caption'>{scope} The best value of each metric is bold.{lower} Images/s: the images every attempt of the run committed, over its attempts' plan seconds (the actors' start-up included, Ray's start-up not).</p></section>"
    )
    return "\n".join(parts)


def _section_per_class(result: Comparison, colors: dict[str, str], plt) -> str:
    rows = result.comparison.to_pylist()
    names = rows[0]["class_names"] if rows else []
    parts = ["<section id='per-class-iou'><h2>IoU per class</h2>"]
    if names:
        c, k = len(names), len(rows)
        fig, ax = plt.subplots(figsize=(min(16, max(7, 0.28 * c * k + 2)), 3.8))
        width = 0.8 / k
        x = np.arange(c)
        for i, r in enumerate(rows):
            values = [100 * v if _isnum(v) else 0.0 for v in r["IoU"]]
            ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=r["run_id"], color=colors[r["run_id"]])
        ax.set_xticks(x, names, rotation=45 if c > 8 else 0, ha="right" if c > 8 else "center")
        ax.set_ylabel("IoU (%)")
        top = max([100 * v for r in rows for v in r["IoU"] if _isnum(v)] + [1.0])
        ax.set_ylim(0, min(100, top * 1.15 + 2))
        ax.grid(axis="y", color="#e3e7ec")
        ax.set_axisbelow(True)
        ax.legend(title="run", frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        parts.append(f"<img class='chart' alt='IoU per class and run' src='{_figure_uri(plt, fig)}'>")
    head = "<th>Class</th>" + "".join(f"<th>{_swatch(colors[r['run_id']])}{_esc(r['run_id'])}</th>" for r in rows)
    body = []
    for j, name in enumerate(names):
        values = [r["IoU"][j] if j < len(r["IoU"]) else None for r in rows]
        nums = [v for v in values if _isnum(v)]
        top_v = max(nums) if nums and len(rows) > 1 else None
        cells = "".join(f"<td{' class=best' if _isnum(v) and v == top_v else ''}>{_fmt('IoU', v)}</td>" for v in values)
        body.append(f"<tr><td class='text'>{_esc(name)}</td>{cells}</tr>")
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    parts.append(
        "<p class='caption'>IoU (%) per class: the dataset's summed intersections over summed unions. – : the class is in neither labels nor predictions.</p></section>"
    )
    return "\n".join(parts)


def _section_pairs(result: Comparison, plt) -> str:
    pairs = list(iter_pairs(result))
    parts = ["<section id='pairs'><h2>Differences between runs</h2>"]
    if not pairs:
        why = "one run only" if len(result.runs) < 2 else "no labeled image in common"
        parts.append(f"<p class='note'>No pairwise differences: {why}.</p></section>")
        return "\n".join(parts)
    metrics = list(dict.fromkeys(p["metric"] for p in pairs))
    labels = list(dict.fromkeys(f"{p['run_a']} − {p['run_b']}" for p in pairs))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8.5, sum(0.5 + 0.42 * len(labels) for _ in metrics) + 0.6), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        rows = [p for p in pairs if p["metric"] == metric]
        scale = 1.0 if metric in COD_KEYS else 100.0
        for y, p in enumerate(rows):
            if not all(_isnum(p[k]) for k in ("difference", "ci_low", "ci_high")):
                continue
            d, lo, hi = (scale * p[k] for k in ("difference", "ci_low", "ci_high"))
            color = "#6e7781"  # the interval holds 0
            if _excludes_zero(p):
                color = "#1a7f37" if (p["ci_low"] > 0) != (metric in LOWER_IS_BETTER) else "#c62828"
            ax.errorbar([d], [y], xerr=[[d - lo], [hi - d]], fmt="o", color=color, capsize=4, markersize=6, lw=2)
        ax.axvline(0, color="#1d232b", lw=0.8, ls="--")
        ax.set_yticks(range(len(rows)), [f"{p['run_a']} − {p['run_b']}" for p in rows])
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.invert_yaxis()
        ax.set_title(f"{metric}{_unit(metric)}", loc="left", fontsize=10, fontweight="bold")
        ax.grid(axis="x", color="#e3e7ec")
        ax.set_axisbelow(True)
        lo_all = [scale * p["ci_low"] for p in rows if _isnum(p["ci_low"])] + [0.0]
        hi_all = [scale * p["ci_high"] for p in rows if _isnum(p["ci_high"])] + [0.0]
        span = max(max(hi_all) - min(lo_all), 1e-3 * scale)
        ax.set_xlim(min(lo_all) - 0.12 * span, max(hi_all) + 0.12 * span)
    axes[-1, 0].set_xlabel("difference A − B with its 95% interval")
    fig.tight_layout()
    parts.append(f"<img class='chart' alt='forest plot of the differences between runs' src='{_figure_uri(plt, fig)}'>")
    parts.append(
        "<ul class='legend'><li>" + _swatch("#1a7f37") + "A better: the interval excludes 0</li><li>" + _swatch("#c62828")
        + "A worse: the interval excludes 0</li><li>" + _swatch("#6e7781") + "the interval holds 0: no clear difference</li></ul>"
    )  # fmt: skip
    head = "".join(f"<th>{h}</th>" for h in ("Pair (A − B)", "Metric", "A", "B", "A − B", "95% interval", "Images"))
    body = []
    for p in pairs:
        m = p["metric"]
        direction = ""
        if _excludes_zero(p):
            better = (p["ci_low"] > 0) != (m in LOWER_IS_BETTER)
            direction = " class='up'" if better else " class='down'"
        body.append(
            f"<tr><td class='text'>{_esc(p['run_a'])} − {_esc(p['run_b'])}</td><td class='text'>{_esc(m)}{_unit(m)}</td>"
            f"<td>{_fmt(m, p['value_a'])}</td><td>{_fmt(m, p['value_b'])}</td><td{direction}>{_fmt_diff(m, p['difference'])}</td>"
            f"<td>[{_fmt_diff(m, p['ci_low'])}, {_fmt_diff(m, p['ci_high'])}]</td><td>{p['images']}</td></tr>"
        )
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    parts.append(
        "<p class='caption'>A − B over the images both runs labeled; mIoU, mDice and aAcc in percentage points. The interval: "
        f"{result.resamples} resamples of the images with replacement (the same images for both runs), the dataset metric "
        "recomputed from the summed areas of each resample, the 2.5th and 97.5th percentile of A − B. An interval that excludes "
        "0 is coloured (green: A better; for MAE lower is better). pairs.parquet holds both orders of each pair.</p></section>"
    )
    return "\n".join(parts)


def _section_confusion(result: Comparison, plt) -> str:
    mp = result.mask_pass
    parts = ["<section id='confusion'><h2>Confusion matrices</h2>"]
    if mp.confusion is None or not mp.confusion_images:
        why = "; ".join(result.sources.notes) or "no label could be paired with the compared images"
        parts.append(f"<p class='note'>No confusion matrices: {_esc(why)}.</p></section>")
        return "\n".join(parts)
    names = result.runs[0].class_names
    c, k = len(names), len(result.runs)
    cols = min(k, 3)
    rows_n = math.ceil(k / cols)
    side = min(6.0, max(3.4, 0.32 * c + 2.2))
    fig, axes = plt.subplots(rows_n, cols, figsize=(side * cols + 1.0, side * rows_n), squeeze=False, layout="constrained")
    image = None
    for idx, ax in enumerate(axes.ravel()):
        if idx >= k:
            ax.axis("off")
            continue
        counts = mp.confusion[idx].astype(np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(result.runs[idx].label, fontsize=10, fontweight="bold")
        ax.set_xticks(range(c), names, rotation=45 if c > 4 else 0, ha="right" if c > 4 else "center", fontsize=8 if c > 12 else 9)
        ax.set_yticks(range(c), names, fontsize=8 if c > 12 else 9)
        ax.set_xlabel("predicted")
        if idx % cols == 0:
            ax.set_ylabel("label")
        ax.spines[:].set_visible(False)
        if c <= 12:
            for i in range(c):
                for j in range(c):
                    if not np.isnan(share[i, j]):
                        ax.text(j, i, f"{100 * share[i, j]:.0f}%", ha="center", va="center", fontsize=8,
                                color="white" if share[i, j] > 0.55 else "#1d232b")  # fmt: skip
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
        bar.set_label("share of the label's pixels")
    parts.append(f"<img class='chart' alt='confusion matrices' src='{_figure_uri(plt, fig)}'>")
    parts.append(
        f"<p class='caption'>Pixels of {mp.confusion_images} labeled images, labels read from "
        f"<code>{_esc(result.sources.labels and next(iter(result.sources.labels.values())).rsplit('/', 1)[0])}</code> "
        "(the image's relative key, any label extension, .png preferred). Each row is a label class: the share of its pixels "
        "predicted as each class (rows sum to 100%); ignore_index pixels count nowhere.</p></section>"
    )
    return "\n".join(parts)


def _section_speed(result: Comparison, colors: dict[str, str], plt) -> str:
    rows = [r for r in result.comparison.to_pylist() if _isnum(r["images_per_second"]) and _isnum(r["mIoU"])]
    parts = ["<section id='speed-accuracy'><h2>Speed against accuracy</h2>"]
    if not rows:
        parts.append("<p class='note'>No run has both a speed and an mIoU.</p></section>")
        return "\n".join(parts)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        ax.scatter([r["images_per_second"]], [100 * r["mIoU"]], s=90, color=colors[r["run_id"]], zorder=3, edgecolor="white")
        ax.annotate(r["run_id"], (r["images_per_second"], 100 * r["mIoU"]), textcoords="offset points", xytext=(8, 6), fontsize=9)
    xs = [r["images_per_second"] for r in rows]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ys = [100 * r["mIoU"] for r in rows]
    pad_y = max(2.0, 0.2 * (max(ys) - min(ys)))
    ax.set_ylim(max(0, min(ys) - pad_y), min(100, max(ys) + pad_y))
    pad_x = max(0.05, 0.25 * (max(xs) - min(xs)))
    if ax.get_xscale() == "linear":
        ax.set_xlim(max(0, min(xs) - pad_x), max(xs) + pad_x)
    ax.set_xlabel("images per second (all attempts)")
    ax.set_ylabel("mIoU (%)")
    ax.grid(color="#e3e7ec")
    ax.set_axisbelow(True)
    parts.append(f"<img class='chart' alt='images per second against mIoU' src='{_figure_uri(plt, fig)}'>")
    parts.append(
        "<p class='caption'>Up and to the right is better. Speed is each run's own throughput (summary.json), so it depends "
        "on the machine and settings of that run (batch size, actors, GPUs).</p></section>"
    )
    return "\n".join(parts)


def _thumb(array: np.ndarray, target: int = THUMB) -> np.ndarray:
    """`array` (H x W or H x W x 3) with its longer side brought near `target`: strided sampling when
    large, whole-pixel blocks when small (nearest, so that masks stay crisp)."""
    h, w = array.shape[:2]
    step = max(1, max(h, w) // target)
    array = array[::step, ::step]
    h, w = array.shape[:2]
    grow = max(1, target // max(h, w, 1))
    return np.repeat(np.repeat(array, grow, axis=0), grow, axis=1) if grow > 1 else array


def _colour(mask: np.ndarray, palette: np.ndarray, photo: np.ndarray | None, ignore: np.ndarray | None = None) -> np.ndarray:
    colours = palette[np.clip(mask.astype(np.int64), 0, len(palette) - 1)]
    if photo is not None:
        out = (0.35 * photo.astype(np.float32) + 0.65 * colours.astype(np.float32)).astype(np.uint8)
    else:
        out = colours
    if ignore is not None and ignore.any():
        base = photo if photo is not None else np.full_like(out, 255)
        out[ignore] = (0.6 * base[ignore].astype(np.float32) + 0.4 * 128).astype(np.uint8)
    return out


def _section_disagreements(result: Comparison, storage_options: dict) -> str:
    mp = result.mask_pass
    parts = ["<section id='disagreements'><h2>Where the runs disagree most</h2>"]
    if len(result.runs) < 2 or not mp.top:
        parts.append("<p class='note'>Needs two runs or more with masks of the same images.</p></section>")
        return "\n".join(parts)
    names = result.runs[0].class_names
    palette = class_palette(max(len(names), 1))
    legend = "".join(f"<li>{_swatch(_hex(palette[i]))}{_esc(n)}</li>" for i, n in enumerate(names))
    parts.append(f"<ul class='legend'>{legend}<li>{_swatch('#ff00ff')}runs differ</li></ul>")
    src = result.sources
    per_image = {}
    iou_col = result.per_image.select(["run_id", "image_id", "mIoU"]).to_pylist()
    top_ids = {i for _, i in mp.top}
    for r in iou_col:
        if r["image_id"] in top_ids:
            per_image[(r["run_id"], r["image_id"])] = r["mIoU"]
    missing_photo = False
    for fraction, image_id in mp.top:
        masks = [r.store.mask_of(image_id) for r in result.runs]
        shape = masks[0].shape
        try:
            photo = read_photo(src, image_id, storage_options)
        except Exception:  # a photo that cannot be read: the masks alone
            photo = None
        if photo is not None and photo.shape[:2] != shape:
            photo = None
        missing_photo |= photo is None
        try:
            label = read_label(src, image_id, storage_options)
        except Exception:
            label = None
        if label is not None and label.shape != shape:
            label = None
        label_ignore = None
        if label is not None:
            try:
                label, label_ignore = label_classes(src, label, len(palette))
            except LabelReadingError:
                label = None
        tiles_n = (photo is not None) + (label is not None) + len(masks) + 1
        target = max(120, min(THUMB, (1150 - 12 * (tiles_n - 1)) // tiles_n))
        photo_t = _thumb(photo, target) if photo is not None else None
        tiles = []
        if photo_t is not None:
            tiles.append(("image", _png_uri(photo_t), "photo"))
        if label is not None:
            lab = _thumb(label, target)
            ignore = (lab < 0) | (lab >= len(palette)) | ((lab == label_ignore) if label_ignore is not None else False)
            tiles.append(("label", _png_uri(_colour(np.where(ignore, 0, lab), palette, photo_t, ignore)), "overlay label"))
        for run, mask in zip(result.runs, masks):
            m = _thumb(mask, target)
            score = per_image.get((run.label, image_id))
            caption = f"{run.label}" + (f" · mIoU {100 * score:.1f}%" if _isnum(score) else "")
            tiles.append((caption, _png_uri(_colour(m, palette, photo_t)), "overlay mask"))
        differ = np.zeros(shape, bool)
        for m in masks[1:]:
            differ |= m != masks[0]
        d = _thumb(differ, target)
        base = (photo_t.mean(axis=2) if photo_t is not None else np.full(d.shape, 200.0)) * 0.5 + 60
        diff_img = np.repeat(base[:, :, None], 3, axis=2).astype(np.uint8)
        diff_img[d] = (255, 0, 255)
        tiles.append(("runs differ", _png_uri(diff_img), "overlay difference"))
        strip = "".join(
            f"<figure><img class='{cls}' alt='{_esc(cap)}' src='{uri}'><figcaption>{_esc(cap)}</figcaption></figure>"
            for cap, uri, cls in tiles
        )
        parts.append(
            f"<figure class='case'><div class='strip'>{strip}</div><figcaption><strong>{_esc(image_id)}</strong> "
            f"({shape[1]} × {shape[0]}): the runs disagree on {100 * fraction:.1f}% of its pixels</figcaption></figure>"
        )
    explain = (
        f"The {len(mp.top)} images (of {len(mp.disagreement)}) with the largest fraction of pixels on which the runs' masks are not "
        "all the same; per_image.parquet has the fraction of every image (column disagreement)."
    )
    if missing_photo:
        explain += " Where the image could not be read (or the input is not an image folder) the masks are drawn without it."
    parts.append(f"<p class='caption'>{explain}</p></section>")
    return "\n".join(parts)


def _section_method(result: Comparison) -> str:
    files = "".join(f"<li><code>{_esc(uri)}</code></li>" for name, uri in result.files.items())
    binary = (
        " Binary measures (Sm, Em_mean, wFm, MAE) are means over images: each resample weighs the per-image values "
        "by how often the image was drawn (Em_mean: the mean of each image's E-measure curve)."
        if result.binary
        else ""
    )
    return (
        "<section id='method'><h2>How these numbers were made</h2>"
        "<p>Runs are joined on <code>image_id</code>. Metrics follow mmsegmentation: per-class IoU is the dataset's summed "
        "intersections over its summed unions, a class absent from labels and predictions is left out of the means. "
        f"Each interval is a paired bootstrap: {result.resamples} resamples of the {result.labeled} labeled images with "
        f"replacement (seed {result.seed}), the same images for every run; each resample's metric is recomputed from the "
        f"resample's summed areas (a resample matrix times the per-image area matrix).{binary}</p>"
        f"<p>Files written:</p><ul>{files}<li><code>report.html</code> (this page)</li></ul></section>"
    )


# --------------------------------------------------------------------------- receptive fields


def receptive_fields(runs: list[Run], image_ids: list[str], src: Sources, storage_options: dict, notes: list[str]) -> list[dict]:
    """Each run's model's effective receptive field (pipeline.analysis.receptive_field) on a sample of the
    compared images: the same images for every model, at the size of the run's sliding window (at
    most 256 pixels, so that the field fits the crop and the gradient stays cheap)."""
    from pipeline.analysis.receptive_field import effective_receptive_field, erf_figure_png
    from pipeline.config import ModelConfig
    from pipeline.predict.job_model import load_job_model

    photos = [p for p in (read_photo(src, i, storage_options) for i in image_ids) if p is not None]
    if not photos:
        notes.append("receptive fields need the run's images (an image folder): none was readable")
        return []
    out = []
    for run in runs:
        model_cfg = dict(run.config.get("model") or {})
        model_cfg["storage_options"] = storage_options  # run.json holds them redacted
        try:
            model = load_job_model(ModelConfig.model_validate(model_cfg))
        except Exception as exc:  # a checkpoint moved or gone: the report says so, the rest stands
            notes.append(f"receptive field of {run.label}: its model cannot be loaded ({' '.join(str(exc).split())[:200]})")
            continue
        window = (run.config.get("inference") or {}).get("window") or [256, 256]
        size = int(min(256, *window))
        try:
            result = effective_receptive_field(model, photos, size=size)
        except ValueError as exc:  # e.g. a model whose centre score ignores its input: nothing to draw
            notes.append(f"receptive field of {run.label}: {exc}")
            continue
        figure = erf_figure_png(result, f"{run.label} ({run.model_name})")
        out.append({"label": run.label, "result": result, "figure": "data:image/png;base64," + base64.b64encode(figure).decode()})
    return out


def _section_receptive_field(result: Comparison) -> str:
    parts = [
        "<section id='receptive-field'><h2>Effective receptive fields</h2>",
        "<p class='lead'>Where each model looks: the gradient of the centre output pixel's score with respect to the input "
        "(Luo et al. 2016), averaged over the same sample of these images. The theoretical field of an attention model is the "
        "whole input; the effective one is where the mass actually sits.</p>",
        "<table><tr><th class='text'>Run</th><th>images</th><th>crop</th><th>theoretical</th><th>50% within</th><th>90% within</th></tr>",
    ]
    for erf in result.receptive_fields:
        r = erf["result"]
        theoretical = f"{r.theoretical} px" if r.theoretical else "whole input"
        parts.append(
            f"<tr><td class='text'>{_esc(erf['label'])}</td><td>{r.images}</td><td>{r.size} px</td><td>{theoretical}</td>"
            f"<td>{r.effective_radius(0.5)} px</td><td>{r.effective_radius(0.9)} px</td></tr>"
        )
    parts.append("</table><div class='figures'>")
    for erf in result.receptive_fields:
        parts.append(f"<figure><img src='{erf['figure']}' alt='receptive field of {_esc(erf['label'])}'></figure>")
    parts.append("</div></section>")
    return "".join(parts)
