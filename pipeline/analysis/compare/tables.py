"""The three tables a comparison writes: comparison.parquet (one row per run), per_image.parquet
(one row per image and run) and pairs.parquet (each ordered pair of runs and headline metric, A - B
with its paired bootstrap interval)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.analysis.compare.bootstrap import bootstrap_metric_samples, interval, point_metrics, ratio, row_nanmean
from pipeline.analysis.compare.masks import RunConfidence
from pipeline.analysis.compare.runs import COD_PER_IMAGE, ImageTable, Run, cod_values
from pipeline.metrics.cod import KEYS as COD_KEYS

HEADLINE = ("mIoU", "mDice", "aAcc")
COD_HEADLINE = ("Sm", "Em_mean", "wFm", "MAE")
LOWER_IS_BETTER = {"MAE"}
SUMMARY_SCALARS = ("aAcc", "mIoU", "mAcc", "mDice")


def _float(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def comparison_table(runs: list[Run], own: list[ImageTable], recompute: bool, images: int, cod_rows: np.ndarray | None) -> pa.Table:
    """One row per run. Without `recompute` every scalar is summary.json's; with it (--intersect over
    different image sets) the metrics are recomputed over the compared images each run labeled
    (`own`: per run, its rows of those images; only the pairs need the images every run labeled)."""
    cod_keys = [k for k in COD_KEYS if any(k in r.summary for r in runs)] or (list(COD_KEYS) if cod_rows is not None else [])
    rows = []
    for run, table in zip(runs, own):
        row = _summary_row(run, cod_keys)
        if recompute:
            _recompute(row, run, table, images, cod_keys, cod_rows)
        row["class_names"] = list(run.class_names)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=_comparison_schema(cod_keys))


def _summary_row(run: Run, cod_keys: list[str]) -> dict[str, Any]:
    """A run's row as its run.json and summary.json say."""
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
    row["IoU"] = [_float(v) for v in (s.get("IoU") or [None] * run.num_classes)]
    return row


def _recompute(row: dict[str, Any], run: Run, table: ImageTable, images: int, cod_keys: list[str], cod_rows: np.ndarray | None) -> None:
    """`row`'s metrics recomputed over the images of `table` (the compared images the run labeled)."""
    point = point_metrics(table)
    row.update({k: _float(point[k]) for k in SUMMARY_SCALARS})
    row["IoU"] = [_float(v) for v in point["IoU"]]
    row.update(images=images, errors=None, labeled_images=len(table.ids), scope="common images")
    if cod_keys:
        values = cod_values(run, table.take([i for i, keep in zip(table.ids, table.has_cod) if keep])) if table.has_cod is not None else {}
        row.update({k: _float(values.get(k)) for k in cod_keys})


def _comparison_schema(cod_keys: list[str]) -> pa.Schema:
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
    return pa.schema(fields)


def per_image_table(
    runs: list[Run],
    tables: list[ImageTable],
    image_ids: list[str],
    disagreement: dict[str, float],
    confidence: dict[str, list[RunConfidence | None]] | None = None,
) -> pa.Table:
    """One row per compared image and run; columns built from arrays, not row by row. Where a run has
    a confidence map (`confidence`: image_id -> per run, see masks.disagreement) two more columns:
    confident_disagreement and disagreement_confidence (null for the runs without one); without any,
    the table is as before."""
    n, c = len(image_ids), runs[0].num_classes
    confidence = confidence or {}
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
        iou = ratio(inter, union).astype(np.float64)
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
            "mIoU": pa.array(row_nanmean(np.where(labeled[:, None], iou, np.nan)) if n else np.zeros(0), pa.float64(), from_pandas=True),
            "pixel_accuracy": pa.array(pixel_acc, pa.float64(), from_pandas=True),
            "disagreement": pa.array(fraction, pa.float64(), from_pandas=True),
        }
        if confidence:
            k = len(chunks)  # this run's index
            measures = [(confidence.get(i) or [None] * len(runs))[k] for i in image_ids]
            for name, attribute in (("confident_disagreement", "confident"), ("disagreement_confidence", "mean")):
                values = np.array([np.nan if m is None else getattr(m, attribute) for m in measures], dtype=np.float64)
                columns[name] = pa.array(values, pa.float64(), from_pandas=True)
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


def pairs_table(runs: list[Run], joined: list[ImageTable], resamples: int, seed: int, cod_rows: np.ndarray | None) -> pa.Table:
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
