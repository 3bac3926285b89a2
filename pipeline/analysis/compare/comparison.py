"""`compare_runs`: the comparison from the run URIs to the files written, step by step: the runs
opened, the images every run segmented, their metrics rows joined, one pass over their masks, the
three tables and the report made; then, and only then, everything written."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.analysis.compare.masks import scan_masks
from pipeline.analysis.compare.receptive_fields import receptive_fields
from pipeline.analysis.compare.report import render_report
from pipeline.analysis.compare.result import Comparison
from pipeline.analysis.compare.runs import (
    CompareError,
    class_name_notes,
    common_images,
    join_labeled,
    open_runs,
    source_notes,
    speed_notes,
)
from pipeline.analysis.compare.sources import find_sources
from pipeline.analysis.compare.tables import comparison_table, pairs_table, per_image_table
from pipeline.extras import require
from pipeline.io.storage import open_fs, with_retries


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
    runs = open_runs(run_uris, storage_options)
    notes: list[str] = [*speed_notes(runs), *class_name_notes(runs), *source_notes(runs)]
    images = common_images(runs, intersect)
    if images.note:
        notes.append(images.note)
    labeled = join_labeled(runs, images.ids)
    if not labeled.ids:
        notes.append("no compared image has a label in every run: no metrics, no intervals")
    # each run's images and labels as its run.json's config says: the first run's give the photos and the
    # notes, each run's its own confusion matrix
    sources = [find_sources(r, images.ids, storage_options) for r in runs]
    src = sources[0]
    notes.extend(src.notes)
    mask_pass = scan_masks(runs, images.ids, sources, storage_options, top=top)
    notes.extend(mask_pass.notes)

    recompute = intersect and images.left_out > 0
    result = Comparison(
        runs, out_uri, len(images.ids), len(labeled.ids), recompute, resamples, seed,
        comparison_table(runs, labeled.own(images.ids), recompute, len(images.ids), labeled.cod_rows),
        pairs_table(runs, labeled.joined, resamples, seed, labeled.cod_rows),
        per_image_table(runs, labeled.tables, images.ids, mask_pass.disagreement, mask_pass.confidence),
        notes, mask_pass, src, labeled.binary,
    )  # fmt: skip
    if receptive_field:
        result.receptive_fields = receptive_fields(runs, images.ids[:receptive_field], src, storage_options, notes)
    _write(out_uri, _render(result, storage_options), storage_options)
    return result


def _render(result: Comparison, storage_options: dict) -> dict[str, bytes]:
    """Every file's bytes, made before the first byte is written: a comparison that fails writes nothing."""
    out_uri = result.out_uri
    written = {"comparison.parquet": result.comparison, "per_image.parquet": result.per_image, "pairs.parquet": result.pairs}
    result.files = {name: f"{out_uri.rstrip('/')}/{name}" for name in written}
    outputs = {name: _parquet_bytes(table) for name, table in written.items()}
    outputs["report.html"] = render_report(result, storage_options).encode()
    result.files["report.html"] = f"{out_uri.rstrip('/')}/report.html"
    return outputs


def _write(out_uri: str, outputs: dict[str, bytes], storage_options: dict) -> None:
    fs, root = open_fs(out_uri, storage_options)
    with_retries(lambda: fs.makedirs(root, exist_ok=True), what="write", uri=out_uri)
    for name, data in outputs.items():
        path = f"{root.rstrip('/')}/{name}"
        with_retries(lambda path=path, data=data: fs.pipe_file(path, data), what="write", uri=path)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
