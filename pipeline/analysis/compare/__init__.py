"""`segpipe compare`: several runs over the same images, side by side, with paired bootstrap intervals.

A run is given by its directory URI, `<output.uri>/<run_id>` (a local path or any fsspec URI). The
runs are joined on `image_id`: the images each run segmented, and the metrics rows of the labeled
ones. Runs over different image sets are refused (`CompareError`, exit 2) unless `intersect`, which
keeps the images every run holds. What is written under `out`:

    comparison.parquet  one row per run: model, checkpoint, speed, every scalar of its summary (as
                        summary.json says; recomputed over the common images with `intersect`),
                        per-class IoU and the class names
    per_image.parquet   one row per image and run: the image's IoU per class (NaN where its union
                        is 0), pixel accuracy, binary measures where the run has them, the
                        fraction of its pixels on which the runs' masks do not all agree and, for
                        runs with a confidence map, how sure each was there (masks.py)
    pairs.parquet       each ordered pair of runs (A, B) and headline metric: A - B and its 95%
                        paired bootstrap interval over images
    report.html         one self-contained page (every chart an inline base64 PNG): the table, IoU
                        per class, the differences as a forest plot, confusion matrices, speed
                        against accuracy, and the images where the runs disagree most

The modules, in the order `compare_runs` (comparison.py) uses them:

    runs.py              the run directories opened, the images every run segmented, the metrics rows joined
    sources.py           the runs' images and labels (image folders): paired, read as the run read them
    masks.py             one pass over the masks: disagreement per image (and confidence there), confusion matrices
    bootstrap.py         the paired bootstrap: metrics of resampled images, the 95% interval
    tables.py            comparison.parquet, per_image.parquet, pairs.parquet
    receptive_fields.py  each run's model's effective receptive field (--receptive-field)
    result.py            `Comparison`: what a comparison gives
    report.py            report.html and its charts
    terminal.py          the short table the command prints

Memory: per-image areas and binary scalars are kept (a few numbers per image); curves are read part
by part; masks are read one part per run at a time and decoded one image at a time.
"""

from pipeline.analysis.compare.bootstrap import (
    RESAMPLE_BLOCK,
    batch_metrics,
    bootstrap_metric_samples,
    interval,
    point_metrics,
    resample_counts,
)
from pipeline.analysis.compare.comparison import compare_runs
from pipeline.analysis.compare.masks import CONFIDENT, MaskPass, RunConfidence, disagreement, mask_parts, scan_masks
from pipeline.analysis.compare.receptive_fields import receptive_fields
from pipeline.analysis.compare.report import class_palette, render_report
from pipeline.analysis.compare.result import Comparison, iter_pairs
from pipeline.analysis.compare.runs import (
    COD_PER_IMAGE,
    CompareError,
    ImageTable,
    Run,
    cod_values,
    open_run,
    read_image_table,
    speed_notes,
)
from pipeline.analysis.compare.sources import Sources, find_sources, label_classes, read_label, read_photo
from pipeline.analysis.compare.tables import COD_HEADLINE, HEADLINE, LOWER_IS_BETTER, PAIRS_SCHEMA, SUMMARY_SCALARS
from pipeline.analysis.compare.terminal import format_comparison

__all__ = [
    "COD_HEADLINE",
    "COD_PER_IMAGE",
    "CONFIDENT",
    "HEADLINE",
    "LOWER_IS_BETTER",
    "PAIRS_SCHEMA",
    "RESAMPLE_BLOCK",
    "SUMMARY_SCALARS",
    "CompareError",
    "Comparison",
    "ImageTable",
    "MaskPass",
    "Run",
    "RunConfidence",
    "Sources",
    "batch_metrics",
    "bootstrap_metric_samples",
    "class_palette",
    "cod_values",
    "compare_runs",
    "disagreement",
    "find_sources",
    "format_comparison",
    "interval",
    "iter_pairs",
    "label_classes",
    "mask_parts",
    "open_run",
    "point_metrics",
    "read_image_table",
    "read_label",
    "read_photo",
    "receptive_fields",
    "render_report",
    "resample_counts",
    "scan_masks",
    "speed_notes",
]
