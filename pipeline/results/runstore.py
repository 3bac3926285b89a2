"""The run directory `<output.uri>/<run_id>/` and its commit protocol: a written result is never lost.

Parts. A batch of results is one *part*: one Parquet file in each of masks/, metrics/ and
errors/, named `part-a<attempt>-u<unit>-<seq>`: the attempt that wrote it, the unit (input block or
shard) of that attempt's listing, and its sequence within the unit. The name never depends on where
an image sits in a listing, and every attempt writes names of its own, so a later attempt over a
changed listing can never overwrite a committed part. Files are written metrics, errors, then
masks; the masks file is the commit marker (a part without one is a leftover of an interrupted
attempt, removed before the next one starts), and a committed part is never written again. Each
file is written under a hidden temporary name beside its place and moved there, so a reader never
sees half a file.

Outcomes. An image is *segmented* when a committed part holds its mask, and *failed* when committed
parts hold error rows for it and no mask. Error rows carry the attempt that wrote them: a rerun
retries failed images and supersedes (never deletes) their earlier error rows; summaries count each
image's latest outcome once.

Records. run.json keeps the run's identity (what decides its results: see `run_identity`), its first
config and one record per attempt; summary.json counts the whole run. Both are strict JSON (NaN is
written as null), readable by any JSON parser.

Reading. Every reader of results (read_mask, compare, export, summaries, --incremental) reads them
here, through pipeline.io.storage's retries: the committed rows of a table (`read_table`,
`latest_rows`: each image's from the latest part that holds it), one part (`read_part`), the mask of
an image (`mask_of`: its latest committed result, assembled by pipeline.results.masks' codec).

The tables' names, their Parquet schemas and the parts' names are pipeline.results.run_tables', shared
with the mask codec, the writer and the readers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import math
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError, JobConfig, public_config
from pipeline.io.storage import StoreError, StoreStats, full_uri, open_fs, read_bytes, with_retries
from pipeline.metrics.cod import CONVENTIONS as COD_CONVENTIONS
from pipeline.metrics.cod import CodAccumulator, CodImageStats
from pipeline.metrics.panoptic import CategoryCounts, PanopticQuality
from pipeline.metrics.semantic import MASK_THRESHOLD, ClassAreas, LabelReading, summarize
from pipeline.redaction import redact, scrub
from pipeline.results.masks import assemble_mask
from pipeline.results.run_tables import (
    AREA_UNITS,
    AREAS,
    ERRORS,
    ERRORS_SCHEMA,
    INDEX,
    INDEX_PARTS_KEY,
    MASKS,
    METRICS,
    OBJECT_TABLES,
    OUTSIDE_FIELD,
    PANOPTIC_COUNTS,
    RASTER_COLUMNS,
    READING_FIELD,
    TABLES,
    TMP_PREFIX,
    class_area_field,
    part_attempt,
)
from pipeline.rows import IdSet


def split_run_uri(uri: str) -> tuple[str, str]:
    """`<output.uri>/<run_id>` -> (output.uri, run_id), as RunStore takes them."""
    uri = uri.rstrip("/")
    if "/" not in uri:
        return ".", uri
    head, run_id = uri.rsplit("/", 1)
    if head.endswith(":/"):  # memory://run: the run sits at the store's root
        head += "/"
    return head or "/", run_id


def strict_json(obj: Any) -> Any:
    """obj with every NaN or infinity replaced by None: JSON has no NaN (JSON.parse and jq reject it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.generic):
        return strict_json(obj.item())
    return obj


@dataclass
class Outcomes:
    """What the committed parts hold: ids with a mask, and ids whose only rows are errors."""

    segmented: IdSet = field(default_factory=IdSet)
    failed: IdSet = field(default_factory=IdSet)
    parts: set[str] = field(default_factory=set)  # the committed parts these ids come from


class RunStore:
    """Reads and writes one run directory, on any fsspec store, through pipeline.io.storage."""

    def __init__(self, output_uri: str, storage_options: dict, run_id: str) -> None:
        self.fs, root = open_fs(output_uri, storage_options)
        self.run_id = run_id
        self.root = f"{root.rstrip('/')}/{run_id}"
        self.uri = f"{output_uri.rstrip('/')}/{run_id}"

    @classmethod
    def of_job(cls, cfg: JobConfig) -> RunStore:
        """The run directory a job config writes: `<output.uri>/<run_id>`."""
        return cls(cfg.output.uri, cfg.output.storage_options, cfg.run_id)

    @classmethod
    def at(cls, run_uri: str, storage_options: dict | None = None) -> RunStore:
        """The run directory at `<output.uri>/<run_id>`, as `segpipe compare` and `export` take it."""
        output_uri, run_id = split_run_uri(run_uri)
        return cls(output_uri, storage_options or {}, run_id)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _uri(self, path: str) -> str:
        """A path of this run directory as a URI, as messages name it."""
        return self.uri + path[len(self.root) :]

    def has(self, *parts: str) -> bool:
        """Whether the run directory holds the file at `parts` (as `path` joins them), retried on transient errors."""
        path = self.path(*parts)
        return with_retries(lambda: self.fs.exists(path), what="stat", uri=self._uri(path))

    def _names(self, kind: str) -> list[str]:
        def listing() -> list[str]:
            try:
                return self.fs.ls(self.path(kind), detail=False)
            except FileNotFoundError:  # no part of this table
                return []

        return [n.rsplit("/", 1)[-1] for n in with_retries(listing, what="list", uri=f"{self.uri}/{kind}")]

    def _parts(self, kind: str) -> set[str]:
        return {n[: -len(".parquet")] for n in self._names(kind) if n.endswith(".parquet") and not n.startswith(TMP_PREFIX)}

    def committed_parts(self) -> set[str]:
        return self._parts(MASKS)

    def parts_of(self, kind: str) -> list[str]:
        """The committed parts that hold a `kind` table, in the order they were written (a part's
        name starts with its attempt); a file of a part without a masks file is an interrupted write."""
        return sorted(self._parts(kind) & self.committed_parts())

    def committed_by(self, attempt: int) -> tuple[int, int]:
        """Images the parts of one attempt hold: (processed, failed), each image once (a mask cut
        into chunks may span parts). Read from the parts, so it holds for an attempt that was
        interrupted or killed outright as for one that finished."""
        masks, errors = self._id_columns(sorted(p for p in self.committed_parts() if part_attempt(p) == attempt))
        segmented = IdSet(pa.chunked_array(masks, pa.string()))
        failed = IdSet(pa.chunked_array(errors, pa.string())).minus(segmented)
        return len(segmented) + len(failed), len(failed)

    def _id_columns(self, parts: list[str]) -> tuple[list[pa.Array], list[pa.Array]]:
        """The image_id columns of these committed parts: of their masks files, of their errors files."""
        masks, errors = [], []
        with_errors = self._parts(ERRORS) if parts else set()  # one listing, not a look-up per part
        for part in parts:
            masks.append(self._read(self.path(MASKS, part + ".parquet"), ["image_id"]).column("image_id"))
            if part in with_errors:
                errors.append(self._read(self.path(ERRORS, part + ".parquet"), ["image_id"]).column("image_id"))
        return masks, errors

    def discard_uncommitted(self) -> None:
        """Remove what an interrupted attempt left: parts without a masks file, temporary files."""
        committed = self.committed_parts()
        for kind in TABLES:
            for name in self._names(kind):
                if name.startswith(TMP_PREFIX):
                    self._remove(self.path(kind, name))
            if kind != MASKS:
                for part in self._parts(kind) - committed:
                    self._remove(self.path(kind, part + ".parquet"))

    def _remove(self, path: str) -> None:
        with_retries(lambda: self.fs.rm(path), what="remove", uri=self._uri(path))

    def outcomes(self) -> Outcomes:
        """Segmented and failed image ids in committed parts (an image retried successfully is
        segmented), as Arrow: the run's id index (`ids.parquet`, see `write_index`) for the parts it
        covers, the committed parts' id columns for the rest."""
        committed = self.committed_parts()
        segmented, failed, covered = [], [], set()
        index = self._read_index()
        if index is not None:
            covered = set(json.loads(index.schema.metadata[INDEX_PARTS_KEY]))
            if covered <= committed:  # committed parts are never removed; if some were, trust the parts
                is_segmented = pc.equal(index.column("outcome"), "segmented")
                segmented.append(index.column("image_id").filter(is_segmented))
                failed.append(index.column("image_id").filter(pc.invert(is_segmented)))
            else:
                covered = set()
        masks, errors = self._id_columns(sorted(committed - covered))
        segmented += masks
        failed += errors
        done = IdSet(pa.chunked_array(segmented, pa.string()))
        return Outcomes(done, IdSet(pa.chunked_array(failed, pa.string())).minus(done), committed)

    def write_index(self, outcomes: Outcomes) -> None:
        """`ids.parquet`: every committed id and its outcome, and the parts they come from, so that a
        later run of the same job looks a run up in one read (`pipeline.plan`'s --incremental)."""
        ids = pa.concat_arrays([outcomes.segmented.ids, outcomes.failed.ids])
        outcome = ["segmented"] * len(outcomes.segmented) + ["failed"] * len(outcomes.failed)
        table = pa.table({"image_id": ids, "outcome": pa.array(outcome, pa.string())})
        table = table.replace_schema_metadata({INDEX_PARTS_KEY: json.dumps(sorted(outcomes.parts))})
        self._write_atomic(self.path(INDEX), lambda f: pq.write_table(table, f))

    def _read_index(self) -> pa.Table | None:
        try:
            return self._read(self.path(INDEX))
        except StoreError as exc:
            if exc.missing:
                return None
            raise

    def _read(self, path: str, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
        """One Parquet file of the run directory (`columns`, rows matching `filters`), retried on
        transient errors: a store's hiccup at the end of a run must not fail what it segmented."""

        def read() -> pa.Table:
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f, columns=columns, filters=filters)

        return with_retries(read, what="read", uri=self._uri(path))

    def read_table(self, kind: str, columns: list[str] | None = None) -> pa.Table | None:
        """All committed parts of one table, in part order; None when there are none. Error rows of
        runs written before errors carried an attempt read as attempt 1."""
        parts = self.parts_of(kind)
        tables = []
        for p in parts:
            # errors are read whole: an old part may lack the attempt column that `columns` names
            table = self._read(self.path(kind, p + ".parquet"), None if kind == ERRORS else columns)
            if kind == ERRORS and "attempt" not in table.column_names:
                table = table.append_column("attempt", pa.array([1] * table.num_rows, pa.int32()))
            tables.append(table.select(columns) if columns else table)
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def read_part(self, kind: str, part: str, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
        """One part's file of table `kind` (`columns`, rows matching `filters`), retried on transient errors."""
        return self._read(self.path(kind, part + ".parquet"), columns, filters)

    def part_schema(self, kind: str, part: str) -> pa.Schema:
        """The Parquet schema of one part's file of table `kind`, retried on transient errors."""
        path = self.path(kind, part + ".parquet")

        def read() -> pa.Schema:
            with self.fs.open(path, "rb") as f:
                return pq.read_schema(f)

        return with_retries(read, what="read", uri=self._uri(path))

    def latest_rows(self, kind: str, columns: list[str] | None = None) -> pa.Table | None:
        """The committed rows of table `kind`, each image's from the latest committed part that holds
        it (an image has several rows there: its instances, segments or chunks); sorted by image_id,
        then in part order. None when no committed part has the table. An object table (instances,
        segments) follows the masks: an image's rows are those of the part holding its latest mask, so
        one committed again with no object has none, not the objects of the part before."""
        parts = self.parts_of(kind)
        tables = [self.read_part(kind, part, columns) for part in parts]
        if kind not in OBJECT_TABLES.values() or not tables:
            return latest_of(tables)
        latest = self.mask_parts()
        kept = []
        for part, table in zip(parts, tables):
            ids = table.column("image_id").to_pylist()
            kept.append(table.filter(pa.array([latest.get(i) == part for i in ids], pa.bool_())))
        return latest_of(kept)

    def class_area_rows(self) -> tuple[pa.Table | None, list[str]]:
        """A raster or slide run's predicted areas in physical units: each image's masks rows (one per
        chunk) from its latest committed part, `image_id` and `class_area_m2`, `class_area_um2` (a chunk's
        per-class areas; null in parts written before they were recorded); and the units that some part
        records (none: a run of other inputs, or an older one)."""
        fields = [class_area_field(unit) for unit in AREA_UNITS.values()]
        tables, units = [], set()
        for part in self.parts_of(MASKS):
            path = self.path(MASKS, part + ".parquet")

            def read(path: str = path) -> pa.Table:
                with self.fs.open(path, "rb") as handle:
                    file = pq.ParquetFile(handle)  # one read: the footer says which columns this part has
                    names = file.schema_arrow.names
                    return file.read(columns=["image_id", *(f.name for f in fields if f.name in names)])

            table = with_retries(read, what="read", uri=self._uri(path))
            for unit, area_field in zip(AREA_UNITS.values(), fields):
                if area_field.name in table.column_names:
                    units.add(unit)
                else:
                    table = table.append_column(area_field, pa.nulls(table.num_rows, area_field.type))
            tables.append(table.select(["image_id", *(f.name for f in fields)]))
        return latest_of(tables), sorted(units)

    def mask_parts(self) -> dict[str, str]:
        """image_id -> the latest committed part holding its mask (a rerun's result supersedes an earlier one)."""
        out: dict[str, str] = {}
        for part in self.parts_of(MASKS):
            for image_id in self.read_part(MASKS, part, ["image_id"]).column("image_id").to_pylist():
                out[image_id] = part
        return out

    def mask_rows(self, image_id: str) -> pa.Table | None:
        """One image's masks rows (all its chunks) from the latest committed part that holds it; None
        when no committed part does. Parts are read latest first, each filtered to the image."""
        for part in reversed(self.parts_of(MASKS)):
            rows = self.read_part(MASKS, part, filters=[("image_id", "=", image_id)])
            if rows.num_rows:
                return rows
        return None

    def mask_of(self, image_id: str, column: str = "mask") -> np.ndarray:
        """One image's whole mask (column "mask"), quantized probability ("probability") or confidence ("confidence"), from its
        latest committed part (see `mask_rows`, pipeline.results.masks.assemble_mask); KeyError when none holds it."""
        rows = self.mask_rows(image_id)
        if rows is None:
            raise KeyError(f"no mask for {image_id!r}")
        return assemble_mask(rows, column)

    def latest_errors(self) -> pa.Table | None:
        """One row per failed image: its latest error (highest attempt), images segmented later left out."""
        errors = self.read_table(ERRORS)
        if errors is None:
            return None
        errors = errors.filter(pc.invert(pc.is_in(errors.column("image_id"), value_set=self.outcomes().segmented.ids)))
        latest: dict[str, dict] = {}
        for row in errors.to_pylist():
            if row["image_id"] not in latest or row["attempt"] >= latest[row["image_id"]]["attempt"]:
                latest[row["image_id"]] = row
        return pa.Table.from_pylist(sorted(latest.values(), key=lambda r: r["image_id"]), schema=ERRORS_SCHEMA)

    def _write_atomic(self, path: str, write: Callable) -> None:
        """Write under a temporary name, then move into place; each step retried on transient errors."""
        directory, name = path.rsplit("/", 1)
        tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"

        def write_tmp() -> None:
            self.fs.makedirs(directory, exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                write(f)

        with_retries(write_tmp, what="write", uri=self._uri(path))
        with_retries(lambda: self.fs.mv(tmp, path), what="commit", uri=self._uri(path))

    def write_part(
        self, name: str, masks: pa.Table, metrics: pa.Table, errors: pa.Table, objects: dict[str, pa.Table] | None = None
    ) -> bool:
        """Commit one part; False (and nothing written) when a part of that name is committed already,
        as when Ray retries a write that had finished. `objects`: the instances or segments table."""
        if self.has(MASKS, name + ".parquet"):
            return False
        tables = [(METRICS, metrics), (ERRORS, errors), *(objects or {}).items(), (MASKS, masks)]
        for kind, table in tables:  # masks last: it commits the part
            self._write_atomic(self.path(kind, name + ".parquet"), lambda f, t=table: pq.write_table(t, f))
        return True

    def save_log(self, name: str, local_path: str, *secret_options: dict) -> None:
        """A log of Ray's lines (see pipeline.plan.ray_lines_to) as logs/<name>.log, credentials
        scrubbed; the local file is removed."""
        try:
            with open(local_path, encoding="utf-8", errors="replace") as f:
                text = scrub(f.read(), *secret_options)
            os.remove(local_path)
        except FileNotFoundError:
            return
        self._write_atomic(self.path("logs", f"{name}.log"), lambda f: f.write(text.encode()))

    def write_bytes(self, name: str, data: bytes) -> None:
        """A file of the run directory (`name` may hold folders), written atomically."""
        self._write_atomic(self.path(name), lambda f: f.write(data))

    def write_json(self, name: str, obj: Any) -> None:
        data = json.dumps(strict_json(obj), indent=2, allow_nan=False, default=str).encode()
        self._write_atomic(self.path(name), lambda f: f.write(data))

    def read_json(self, name: str) -> Any | None:
        """A JSON file of the run directory (run.json, summary.json); None when there is none."""
        path = self.path(name)
        try:
            return json.loads(read_bytes(self.fs, path, uri=self._uri(path)))
        except StoreError as exc:
            if exc.missing:
                return None
            raise

    def object_summary(self, task: str, class_names: list[str]) -> dict:
        """summary.json's account of the instance or panoptic task: objects written, per class."""
        kind = OBJECT_TABLES[task]
        table = self.latest_rows(kind, ["image_id", "class_id"])  # each image's latest result, once
        counts = pc.value_counts(table.column("class_id")).to_pylist() if table is not None and table.num_rows else []
        per_class = {class_names[c["values"]] if 0 <= c["values"] < len(class_names) else str(c["values"]): c["counts"] for c in counts}
        return {
            "task": task,
            "table": kind,
            "rows": table.num_rows if table is not None else 0,
            "images_with_objects": len(pc.unique(table.column("image_id"))) if table is not None else 0,
            "per_class": dict(sorted(per_class.items())),
        }

    def panoptic_summary(self, names: list[str], category_ids: list[int], is_thing: list[bool]) -> dict:
        """PQ, SQ, RQ (All, Things, Stuff, per class) from the metrics rows' counts, panopticapi's
        averages over the categories present; {} when no image had a panoptic label."""
        metrics = latest_metrics([self.read_table(METRICS)])
        if metrics is None or "pq_tp" not in metrics.column_names:
            return {}
        rows = metrics.filter(pc.is_valid(metrics.column("pq_tp")))
        if not rows.num_rows:
            return {}
        quality = PanopticQuality(dict(zip(category_ids, is_thing)))
        iou, tp, fp, fn = (np.asarray(rows.column(name).to_pylist()).sum(axis=0) for name in PANOPTIC_COUNTS)
        for k, counts in enumerate(quality.counts.values()):
            counts += CategoryCounts(float(iou[k]), int(tp[k]), int(fp[k]), int(fn[k]))
        result = quality.summary()
        return {
            **result.to_record(),
            "panoptic_images": rows.num_rows,
            "per_class": {name: {"PQ": q.pq, "SQ": q.sq, "RQ": q.rq} for name, q in zip(names, result.per_class.values())},
        }

    def summarize(self, num_classes: int, class_names: list[str], outcomes: Outcomes | None = None) -> dict:
        """summary.json's counts and metrics, from what the run directory holds (every attempt)."""
        outcomes = outcomes or self.outcomes()
        return summary_of([self.read_table(METRICS)], outcomes, num_classes, class_names, self.class_area_rows())

    def raster_summary(self, class_names: list[str]) -> dict:
        """A raster run's facts from its masks table (one row per image, its first chunk's): see
        `raster_summary`."""
        table = self.latest_rows(MASKS, ["image_id", "chunk_y", "chunk_x", *RASTER_COLUMNS])
        return raster_summary(table, class_names)


RASTER_IMAGES_LISTED = 1000  # run.json lists the georeferencing of this many rasters; the masks table has all


def raster_summary(table: pa.Table | None, class_names: list[str]) -> dict:
    """What a raster run's masks rows say, summed: windows and pixels without valid data, the rasters
    without a CRS, the CRSs seen (per class areas in square metres: summary.json's `area_m2`, see
    `physical_summary`), and per raster (the first RASTER_IMAGES_LISTED by id) its CRS,
    transform, resolution and the scale applied to its bands."""
    out: dict[str, Any] = {"images": 0, "nodata_windows": 0, "nodata_pixels": 0, "without_crs": [], "crs": []}
    if table is None or not table.num_rows:
        return out
    first = table.filter(pc.and_(pc.equal(table.column("chunk_y"), 0), pc.equal(table.column("chunk_x"), 0)))
    per_image: dict[str, dict] = {}
    crs_seen: set[str] = set()
    for row in first.to_pylist():
        out["images"] += 1
        out["nodata_windows"] += int(row["nodata_windows"] or 0)
        out["nodata_pixels"] += int(row["nodata_pixels"] or 0)
        if row["crs"] is None:
            out["without_crs"].append(row["image_id"])
        else:
            crs_seen.add(row["crs"])
        if len(per_image) < RASTER_IMAGES_LISTED:
            per_image[row["image_id"]] = {k: row[k] for k in ("crs", "transform", "resolution", "band_scale", "nodata_windows")}
    out["crs"] = sorted(crs_seen)
    out["rasters"] = per_image
    return out


def latest_of(tables: list[pa.Table]) -> pa.Table | None:
    """Tables of rows by image (a run's parts, or runs, in order: a later one supersedes an earlier one) as one:
    each image's rows from the last table that holds it (an image has several rows there: its instances,
    segments or chunks); sorted by image_id, then in table order. None without a table."""
    if not tables:
        return None
    table = pa.concat_tables(
        [t.append_column("_part", pa.array(np.full(t.num_rows, i, np.int32))) for i, t in enumerate(tables)], promote_options="default"
    )
    table = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    last = table.group_by("image_id").aggregate([("_part", "max")])
    # each row's image's latest table (no join: Arrow joins refuse list columns such as bbox)
    latest = last.column("_part_max").take(pc.index_in(table.column("image_id"), value_set=last.column("image_id")))
    table = table.filter(pc.equal(table.column("_part"), latest))
    return table.sort_by([("image_id", "ascending"), ("_row", "ascending")]).drop_columns(["_part", "_row"])


def read_mask(run_dir: str | pa.Table, image_id: str, column: str = "mask", storage_options: dict | None = None) -> np.ndarray:
    """One image's mask from a run directory (any fsspec URI: its latest committed result, see
    `RunStore.mask_of`) or from a masks table; see pipeline.results.masks.assemble_mask."""
    if isinstance(run_dir, pa.Table):
        table = run_dir.filter(pc.equal(run_dir.column("image_id"), image_id))
        if table.num_rows == 0:
            raise KeyError(f"no mask for {image_id!r}")
        return assemble_mask(table, column)
    return RunStore.at(run_dir, storage_options).mask_of(image_id, column)


def read_confidence(run_dir: str | pa.Table, image_id: str, storage_options: dict | None = None) -> np.ndarray:
    """One image's confidence map (a multi-class run with output.confidence): each pixel's largest
    class probability as uint8 round(255 p), reassembled from its chunks as `read_mask` does the mask."""
    return read_mask(run_dir, image_id, "confidence", storage_options)


def latest_metrics(metrics: list[pa.Table | None]) -> pa.Table | None:
    """Metrics tables as one, each image once: its last row wins (a later run or part supersedes an
    earlier one). Vectorised, never a Python loop over images."""
    tables = [t for t in metrics if t is not None and t.num_rows]
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default").combine_chunks()
    table = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    last = table.group_by("image_id").aggregate([("_row", "max")]).column("_row_max")
    return table.take(last).drop_columns(["_row"])


def sum_areas(metrics: list[pa.Table | None], num_classes: int) -> tuple[ClassAreas, int]:
    """Class areas summed over metrics tables, each image once (see `latest_metrics`); and how many
    images that is. One row per image in int64 arrays."""
    table = latest_metrics(metrics)
    if table is None:
        return ClassAreas.zeros(num_classes), 0
    areas = [
        np.asarray(table.column(a).combine_chunks().flatten(), dtype=np.int64).reshape(table.num_rows, num_classes).sum(axis=0)
        for a in AREAS
    ]
    return ClassAreas(*areas), table.num_rows


def summary_of(
    metrics: list[pa.Table | None],
    outcomes: Outcomes,
    num_classes: int,
    class_names: list[str],
    class_areas: tuple[pa.Table | None, list[str]] = (None, []),
) -> dict:
    """Counts and dataset metrics (mmseg conventions: sums of areas, then ratios) of a run, or of
    several runs of a job (metrics recomputed from the summed areas, never averaged over runs).
    `class_areas`: the masks' areas in physical units, each image's latest (`RunStore.class_area_rows`)."""
    total, labeled = sum_areas(metrics, num_classes)
    summary = {
        "images": len(outcomes.segmented),
        "errors": len(outcomes.failed),
        "labeled_images": labeled,
        "class_names": class_names,
        **summarize(total),
    }
    latest = latest_metrics(metrics)
    summary.update(physical_summary(*class_areas, latest, class_names))
    summary.update(labels_summary(latest))
    summary.update(cod_summary(latest))
    return summary


def _summed(column: pa.ChunkedArray, class_names: list[str]) -> tuple[dict | None, int]:
    """Per-class lists summed over the rows that have one, by class name; and how many rows had one."""
    known = column.drop_null()
    if not len(known):
        return None, 0
    total = np.asarray(known.combine_chunks().flatten(), np.float64).reshape(len(known), -1).sum(axis=0)
    return dict(zip(class_names, total.tolist())), len(known)


def physical_summary(masks: pa.Table | None, units: list[str], metrics: pa.Table | None, class_names: list[str]) -> dict:
    """Raster and slide runs (`units`: those the masks table records): per class the summed areas in
    square metres (`area_m2`) or microns (`area_um2`): `predicted` over every image whose pixel size is
    known (`images`; the masks table's chunk rows, each image's latest), and over the labeled images
    (`labeled_images`, the metrics table): the labels' (`labeled`) and the masks' (`predicted_labeled`),
    null without any; {} for other runs."""
    out: dict[str, Any] = {}
    for unit in units:
        predicted, _ = _summed(masks.column(f"class_area_{unit}"), class_names)
        known = masks.filter(pc.is_valid(masks.column(f"class_area_{unit}")))
        section: dict[str, Any] = {"predicted": predicted, "images": pc.count_distinct(known.column("image_id")).as_py()}
        labeled, predicted_labeled, labeled_images = None, None, 0
        if metrics is not None and f"label_area_{unit}" in metrics.column_names:
            labeled, labeled_images = _summed(metrics.column(f"label_area_{unit}"), class_names)
            predicted_labeled, _ = _summed(
                metrics.filter(pc.is_valid(metrics.column(f"label_area_{unit}"))).column(f"pred_area_{unit}"), class_names
            )
        section.update(labeled=labeled, predicted_labeled=predicted_labeled, labeled_images=labeled_images)
        out[f"area_{unit}"] = section
    return out


def labels_summary(metrics: pa.Table | None) -> dict:
    """What the labels held beyond the classes: `label_values_outside_classes` (pixels whose value
    is no class and not ignore_index, and the images that had any; images of metrics parts written
    before they were counted are `unknown_images`), and for a binary task `label_readings`: how
    many images' labels were read as masks, as class indices, or were background only."""
    if metrics is None:
        return {}
    rows = metrics.num_rows
    column = metrics.column(OUTSIDE_FIELD.name) if OUTSIDE_FIELD.name in metrics.column_names else pa.nulls(rows, pa.int64())
    known = column.drop_null()
    out: dict[str, Any] = {
        "label_values_outside_classes": {
            "pixels": int(pc.sum(known).as_py() or 0),
            "images": int(pc.sum(pc.greater(known, 0).cast(pa.int64())).as_py() or 0),
            "unknown_images": column.null_count,
        }
    }
    if READING_FIELD.name in metrics.column_names:
        counts = {c["values"]: c["counts"] for c in pc.value_counts(metrics.column(READING_FIELD.name).drop_null()).to_pylist()}
        out["label_readings"] = {name: counts.get(name, 0) for name in ("mask", "class_index", "empty")}
    return out


def cod_summary(metrics: pa.Table | None) -> dict:
    """A binary task's camouflaged-object measures (Sm, Em_*, wFm, Fm_*, MAE) from the metrics rows
    that hold their stats; {} when none does (a semantic task, or no labeled image)."""
    if metrics is None or CodImageStats.SCALARS[0] not in metrics.column_names:
        return {}
    rows = metrics.filter(pc.is_valid(metrics.column(CodImageStats.SCALARS[0])))
    if not rows.num_rows:
        return {}
    accumulator = CodAccumulator()
    columns = {name: rows.column(name).to_pylist() for name in (*CodImageStats.SCALARS, *CodImageStats.CURVES)}
    for i in range(rows.num_rows):
        accumulator.add(CodImageStats.from_record({name: values[i] for name, values in columns.items()}))
    return {**accumulator.result(), "cod_images": rows.num_rows}


# --------------------------------------------------------------------------- run.json


def run_identity(cfg: JobConfig, model_name: str, num_classes: int, weights: str) -> dict[str, Any]:
    """What decides a run's results. A rerun under the same run_id that changes any of it is refused:
    its masks would mix with the earlier ones. Batch size, actors and output chunking may change."""
    inference = cfg.inference
    identity = {
        "input.uri": redact(cfg.input.uri.rstrip("/")),  # a password or signature in it decides nothing and is no output
        "input.format": cfg.input.format,
        "model.name": model_name,
        "model.num_classes": num_classes,
        "model.weights_sha256": weights,
        "inference.mode": inference.mode,
        "inference.window": list(inference.window),
        "inference.stride": list(inference.stride),
        "inference.blend": inference.blend,
        "inference.precision": inference.precision,
        "inference.tta": inference.tta.model_dump(mode="json"),
        "inference.task": inference.task,
        # how labels are read decides the metrics rows: a rerun that reads them otherwise would mix them
        "metrics.task": cfg.metrics.task,
        "metrics.ignore_index": cfg.metrics.ignore_index,
        # a confidence column in some parts and not in others would read as missing values
        "output.confidence": cfg.output.confidence,
    }
    if inference.task != "semantic":
        identity["inference.objects"] = inference.objects.model_dump(mode="json")
    identity["metrics.reduce_zero_label"] = bool(cfg.metrics.reduce_zero_label)  # runs from before it: false
    if cfg.metrics.task == "binary":
        identity["metrics.binary_labels"] = cfg.metrics.binary_labels
        identity["metrics.positive_class"] = cfg.metrics.positive_class
    if cfg.input.lists_files or cfg.input.format == "slide":  # the files a listing takes (shards and tables: every one)
        identity["input.pattern"] = cfg.input.pattern
        if cfg.input.manifest:  # another list of keys is another input
            identity["input.manifest"] = redact(cfg.input.manifest)
    if cfg.input.format == "slide":  # the grid (mpp or level) and the windows run decide every mask
        identity["input.slide"] = cfg.input.slide.model_dump(mode="json")
    if cfg.input.format in ("images", "tar", "parquet"):  # which way up decoded images and labels are
        identity["input.exif_transpose"] = cfg.input.exif_transpose
    if cfg.input.format == "parquet":  # which columns are the images, their ids and labels
        identity["input.columns"] = [cfg.input.image_column, cfg.input.id_column, cfg.input.label_column]
    if cfg.input.format == "raster":  # which bands and how they are scaled decide the masks
        identity["input.bands"] = cfg.input.bands
        identity["input.scale"] = cfg.input.scale.model_dump(mode="json") if cfg.input.scale else None
    if cfg.input.format == "video":  # which frames are sampled decides the frame ids
        identity["input.video"] = cfg.input.video.model_dump(mode="json", exclude={"autorotate"})
        identity["input.video.autorotate"] = cfg.input.video.autorotate  # which way up the frames are
        if model_name and model_name.startswith("vistr"):  # a clip model: the clips decide its masks and tracks
            identity["inference.clip_length"] = inference.clip_length
            identity["inference.clip_stride"] = inference.clip_stride
    return identity


def config_changes(first: dict, now: dict, prefix: str = "") -> dict[str, list]:
    """Fields whose value differs from the first attempt's config: {"a.b": [first, now]}."""
    out: dict[str, list] = {}
    for key in sorted(set(first) | set(now)):
        a, b = first.get(key), now.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, name + "."))
        elif a != b and name != "run_id":
            out[name] = [a, b]
    return out


LOSSY_SUFFIXES = (".jpg", ".jpeg")  # label files whose compression moves class values at edges


def labels_report(cfg: JobConfig, listed: int, with_label: int, jpeg_labels: int = 0) -> dict:
    """How many listed images have a label: said on the terminal and in run.json (image folders;
    shards carry labels inside and are counted as they are read: summary.json's labeled_images).
    `jpeg_labels`: labels in a lossy format, said where they are read as class indices (JPEG moves
    values at every edge, so pixels there count as other classes); masks are thresholded, and a
    binary task's `auto` refuses values other than 0 and 255."""
    if cfg.input.labels is None:
        return {"configured": False}
    if not cfg.input.lists_files:
        return {"configured": True}
    report: dict[str, Any] = {
        "configured": True,
        "uri": cfg.input.labels.uri,
        "images_with_label": with_label,
        "images_without_label": listed - with_label,
    }
    if listed and with_label == 0:
        where = (
            "(a frame's label is <video stem>/<frame index>.png)"
            if cfg.input.format == "video"
            else "(label files share the image's relative path; the extension may differ)"
        )
        report["note"] = f"none of the {listed} images has a label under {cfg.input.labels.uri} {where}"
    elif with_label < listed:
        report["note"] = f"{with_label} of {listed} images have a label; {listed - with_label} have none and get no metrics"
    if jpeg_labels:
        report["jpeg_labels"] = jpeg_labels
    if jpeg_labels and (cfg.metrics.task == "semantic" or cfg.metrics.binary_labels == "class_index"):
        lossy = (
            f"{jpeg_labels} of the labels are JPEG files: their compression moves class values at every edge, "
            "so pixels there count as other classes (or none); PNG keeps them exact"
        )
        report["note"] = f"{report['note']}; {lossy}" if "note" in report else lossy
    return report


def metrics_record(cfg: JobConfig, summary: dict | None = None) -> dict:
    """run.json's account of how metrics are computed (and, with the run's summary, what its labels
    held beyond the classes and how a binary task's labels were read)."""
    metrics = cfg.metrics
    reading = LabelReading.of(metrics.task, metrics.binary_labels, metrics.ignore_index, metrics.positive_class, 2)
    out: dict[str, Any] = {
        "task": metrics.task,
        "ignore_index": reading.ignore,
        "semantic": "mmsegmentation: per-class IoU = the dataset's summed intersections / summed unions; "
        "a class absent from labels and predictions is null and left out of the means",
        "outside_classes": "labeled pixels whose value is no class of the model and not ignore_index count in no class's "
        "label area (their predictions still count in the predicted areas, as in mmsegmentation)",
    }
    if metrics.reduce_zero_label:
        out["reduce_zero_label"] = "mmsegmentation's: label value 0 counts nowhere and every other value v is class v - 1"
    if summary and "label_values_outside_classes" in summary:
        out["label_values_outside_classes"] = summary["label_values_outside_classes"]
    if metrics.task == "binary":
        out["positive_class"] = metrics.positive_class
        out["binary_labels"] = {
            "setting": metrics.binary_labels,
            "mask": f"8-bit masks: foreground where the value is > {MASK_THRESHOLD} (PySODMetrics' gt > 128), the rest background"
            + (f", {reading.ignore} ignored" if reading.ignore is not None else "; no value is ignored"),
            "class_index": f"class-index maps: foreground where the value is the positive class ({metrics.positive_class}), "
            "other classes background" + (f", {reading.ignore} ignored" if reading.ignore is not None else "; no value is ignored"),
            "auto": "per image: a label of 0 and 255 only is a mask, one of classes 0 and 1 only class indices, one of 0 only "
            "background either way (empty); any other label is that image's error, naming metrics.binary_labels",
            "images": (summary or {}).get("label_readings"),
        }
        out["camouflaged_object"] = {
            **COD_CONVENTIONS,
            "label": "the foreground, as the label was read (binary_labels), is 255, every other pixel 0 (ignored pixels included)",
            "images": "images read whole; a TIFF streamed window by window gets no camouflaged-object stats",
        }
    return out


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("segpipe", "torch", "ray", "pyarrow", "numpy", "pillow", "fsspec", "pydantic", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class AttemptReport:
    """What run.json records of one attempt, as the plan (pipeline.plan) knows it: the listing's
    counts, the model and the labels found, and once the plan runs, its outcome so far (the
    defaults: nothing run yet)."""

    listed: int  # images listed (so far, while a listing in batches goes on)
    done: int  # segmented (or failed and not retried) by earlier attempts
    retried: int  # failed earlier and tried again
    to_do: int
    model_info: dict
    labels: dict  # see labels_report
    list_stats: StoreStats  # the listing's store requests
    message: str = ""
    seconds: float = 0.0  # the plan's, from its start (actors' start-up included)
    processed: int = 0  # images committed (segmented or failed)
    failed: int = 0
    actors: dict | None = None
    stages: dict | None = None  # seconds per stage, summed over the processes that ran it
    store: dict | None = None  # the plan's store requests (StoreStats' fields)
    slides: dict | None = None  # slides: how many, windows run and skipped (no tissue), their mpp
    warnings: list[str] | None = None  # what the read tasks said and went on (a video's frame size changing mid-stream)


class RunRecord:
    """run.json across attempts: the run's identity and first config, and one record per attempt.

    An attempt's record says `running` while it runs, rewritten every HEARTBEAT_SECONDS with its
    counts and seconds so far (`heartbeat`). An attempt killed outright (kill -9, a lost node) never
    says more: the next attempt finds it `running` and records it as `lost`, with the images its
    parts hold and its seconds up to its last heartbeat."""

    def __init__(self, store: RunStore, cfg: JobConfig, identity: dict, previous: dict, identity_changes: dict | None = None) -> None:
        self.store, self.cfg, self.identity, self.previous = store, cfg, identity, previous
        attempts = previous.get("attempts")
        # run.json of older versions counted attempts as a number: their records are not kept
        self.earlier: list[dict] = [a for a in attempts if isinstance(a, dict)] if isinstance(attempts, list) else []
        self.attempt = len(self.earlier) + 1
        self.started = time.time()
        self.incremental: dict | None = None  # set by an --incremental run: the job, the runs consulted, ids skipped
        # the identity of a run whose attempts committed nothing, replaced by this one: {field: [was, now]}
        self.identity_changes = identity_changes or {}
        self._lock = threading.Lock()  # the heartbeat's thread and the driver both write run.json
        self._final = False  # a final status is written: a late heartbeat must not say `running` again
        for record in self.earlier:
            self._account(record)

    def _account(self, record: dict) -> None:
        """An earlier attempt's record as the run directory shows it: found `running`, it ended without
        a word (`lost`); counted by a version that counted only the images its driver saw, its
        processed images recounted from its parts."""
        if record.get("status") == "running":
            record["status"] = "lost"
            record["message"] = (
                f"ended without a word (killed, or its machine lost); found running by attempt {self.attempt}: "
                "its committed parts are kept, its seconds are up to its last heartbeat"
            )
        if record.get("counted") != COUNTED_FROM_PARTS and isinstance(record.get("attempt"), int):
            processed, failed = self.store.committed_by(record["attempt"])
            record.setdefault("counts", {}).update(processed=processed, failed=failed)
            record["counted"] = COUNTED_FROM_PARTS

    @classmethod
    def load(cls, store: RunStore, cfg: JobConfig, identity: dict) -> RunRecord:
        """The record of run `cfg.run_id`; ConfigError, naming the fields, when the run holds results
        and this config would change them. A run whose attempts committed nothing holds no result to
        mix with: its identity is replaced (and the change recorded)."""
        previous = store.read_json("run.json") or {}
        known = previous.get("identity")
        changes = identity_changes(known, identity) if known else {}
        job = previous.get("job")
        if job and cfg.job and job != cfg.job and store.committed_parts():
            # the job defaults to the config file's name: resumed from another file, the run (and what it
            # holds) would leave its job's roll-up and --incremental lookups without a word
            raise ConfigError(
                f"run {cfg.run_id} belongs to job {job!r}, this config to job {cfg.job!r}: set `job: {job}` to resume it "
                "(or use another run_id)"
            )
        if changes:
            if store.committed_parts():
                raise ConfigError(
                    f"run {cfg.run_id} was made with other {', '.join(changes)}: its results would mix; "
                    "use another run_id (or restore the settings to resume it)"
                )
            previous = {k: v for k, v in previous.items() if k != "config"}  # this config becomes the run's first
        return cls(store, cfg, identity, previous, changes)

    def throughput(self, processed: int, seconds: float, wall_seconds: float) -> dict:
        """summary.json's throughput: over every attempt (the images each committed, interrupted and
        lost ones included), and this attempt's alone."""
        images = sum(a.get("counts", {}).get("processed", 0) for a in self.earlier) + processed
        total = sum(a.get("seconds") or 0.0 for a in self.earlier) + seconds
        wall = sum(a.get("wall_seconds") or a.get("seconds") or 0.0 for a in self.earlier) + wall_seconds
        return {
            "throughput": {
                "images": images,
                "seconds": round(total, 3),
                "images_per_second": images / total if total > 0 else None,
                "wall_seconds": round(wall, 3),
                "startup": THROUGHPUT_STARTUP,
            },
            "this_attempt": {
                "attempt": self.attempt,
                "images": processed,
                "seconds": round(seconds, 3),
                "images_per_second": processed / seconds if seconds > 0 else None,
            },
        }

    def write(self, report: AttemptReport, status: str, summary: dict | None = None) -> None:
        """run.json with this attempt's record as it stands (so far while the attempt runs: a heartbeat)."""
        with self._lock:
            if self._final:
                return
            self._final = status != "running"
            self._write(report, status, summary)

    def _write(self, report: AttemptReport, status: str, summary: dict | None) -> None:
        config = public_config(self.cfg)
        first_config = self.previous.get("config", config)
        stats = StoreStats().add(report.list_stats)
        if report.store:
            stats.add(StoreStats(**report.store))
        now = time.time()
        record = {
            "attempt": self.attempt,
            "started": _iso(self.started),
            "ended": None if status == "running" else _iso(now),
            "status": status,
            "message": report.message,
            # the plan's seconds: from its start (actors' start-up included) to the attempt's end
            "seconds": round(report.seconds, 3),
            "wall_seconds": round(now - self.started, 3),  # from the attempt's start: Ray's start-up included
            "counts": {
                "listed": report.listed,
                "done_earlier": report.done,
                "retried": report.retried,
                "to_do": report.to_do,
                "processed": report.processed,  # images its committed parts hold
                "failed": report.failed,
            },
            "counted": COUNTED_FROM_PARTS if status != "running" else "so far",
            "config_changes": config_changes(first_config, config),
            "incremental": self.incremental,
            "actors": report.actors,
            # seconds in each stage summed over the processes that ran it, beside the attempt's wall time
            "stages": report.stages,
            "store": stats.as_dict(),
            **({"slides": report.slides} if report.slides else {}),
            **({"warnings": report.warnings} if report.warnings else {}),
            "versions": package_versions(),
        }
        if status == "running":
            record["heartbeat"] = _iso(now)
        if self.identity_changes:
            record["identity_changes"] = self.identity_changes  # of a run that had committed nothing
        counts = {"listed": report.listed}
        if summary:
            counts.update(segmented=summary["images"], errors=summary["errors"], labeled=summary["labeled_images"])
        self.store.write_json(
            "run.json",
            {
                "run_id": self.cfg.run_id,
                "job": self.cfg.job,
                "status": status,
                "message": record["message"],
                "identity": self.identity,
                "config": first_config,
                "model": report.model_info,
                "labels": report.labels,
                "metrics": metrics_record(self.cfg, summary),
                "versions": record["versions"],  # of the latest attempt; each attempt keeps its own
                "started": self.previous.get("started", record["started"]),
                "ended": record["ended"],
                "counts": counts,
                **({"raster": summary["raster"]} if summary and "raster" in summary else {}),
                "attempts": [*self.earlier, record],
            },
        )


COUNTED_FROM_PARTS = "committed parts"  # an attempt record whose counts are the images its parts hold
THROUGHPUT_STARTUP = (
    "seconds: each attempt's plan, from its start (the actors' start-up, model loading included) to its end; "
    "Ray's start-up and the driver's checks before it are in wall_seconds only"
)
HEARTBEAT_SECONDS = 30.0  # a running attempt rewrites its record this often
LOST_AFTER_SECONDS = 600.0  # a run whose running attempt has not been heard of for this long is lost


# identity fields added after runs were recorded without them, whose behaviour then is not their default
# now: a run recorded before the field existed is held to the value it behaved as
BEFORE_THEY_EXISTED = {
    "input.video.autorotate": False,  # video frames were segmented as stored
    "metrics.reduce_zero_label": False,  # labels were read as they are
}


def identity_changes(known: dict, identity: dict) -> dict[str, list]:
    """The identity fields that differ: {field: [known, now]}. A field that only one side states was
    recorded by another version of segpipe (no field is ever optional within one version for a given
    format and task, and those two are fields themselves): it is not held against the run, unless
    the run behaved otherwise before it existed (BEFORE_THEY_EXISTED)."""
    known = {**{k: v for k, v in BEFORE_THEY_EXISTED.items() if k in identity}, **known}
    identity = {**{k: v for k, v in BEFORE_THEY_EXISTED.items() if k in known}, **identity}  # either side may be the older
    return {k: [known[k], identity[k]] for k in sorted(set(identity) & set(known)) if identity[k] != known[k]}


def run_status(info: dict, now: float | None = None) -> str | None:
    """A run's status as run.json says it, except that a run `running` whose attempt has sent no
    heartbeat for LOST_AFTER_SECONDS is `lost` (killed outright: no later attempt has said so yet)."""
    status = info.get("status")
    if status != "running":
        return status
    attempts = [a for a in info.get("attempts") or [] if isinstance(a, dict)]
    last = (attempts[-1].get("heartbeat") or attempts[-1].get("started")) if attempts else info.get("started")
    try:
        heard = dt.datetime.fromisoformat(last).timestamp()
    except (TypeError, ValueError):
        return "lost"
    return "lost" if (now or time.time()) - heard > LOST_AFTER_SECONDS else status


class JobRun:
    """One run of a job: its run.json, and what its committed parts hold (read when first asked)."""

    def __init__(self, info: dict, store: RunStore) -> None:
        self.run_id: str = info["run_id"]
        self.info, self.store = info, store

    @functools.cached_property
    def outcomes(self) -> Outcomes:
        return self.store.outcomes()

    @property
    def identity(self) -> dict | None:
        return self.info.get("identity")


def job_runs(output_uri: str, storage_options: dict, job: str) -> list[JobRun]:
    """The runs under output_uri whose run.json names `job`, oldest first (by first start)."""
    fs, root = open_fs(output_uri, storage_options)
    try:
        paths = with_retries(lambda: fs.glob(f"{root.rstrip('/')}/*/run.json"), what="list", uri=output_uri)
    except StoreError:
        return []
    infos = []
    for path in paths:
        info = json.loads(read_bytes(fs, path, uri=full_uri(fs, path)))
        if info.get("job") == job and info.get("run_id"):
            infos.append(info)
    infos.sort(key=lambda i: (i.get("started") or "", i["run_id"]))
    return [JobRun(info, RunStore(output_uri, storage_options, info["run_id"])) for info in infos]


def runs_of_job(output_uri: str, storage_options: dict, job: str) -> list[str]:
    """The run_ids under output_uri whose run.json names `job`, oldest first (by first start)."""
    return [r.run_id for r in job_runs(output_uri, storage_options, job)]


def job_identity_conflicts(runs: list[JobRun], identity: dict | None = None) -> dict[str, list[str]]:
    """{field: [run_ids]}: the runs holding results whose identity differs, in that field, from
    `identity` (default: the first such run's). A run that committed nothing binds nothing."""
    holding = [r for r in runs if r.outcomes.parts and r.identity]
    if identity is None:
        if not holding:
            return {}
        identity = holding[0].identity
    out: dict[str, list[str]] = {}
    for run in holding:
        for name in identity_changes(run.identity, identity):
            out.setdefault(name, []).append(run.run_id)
    return out


def check_job_identity(job: str, runs: list[JobRun], identity: dict) -> None:
    """ConfigError, naming the fields, when a run of `job` that holds results was made with another
    identity: the job's roll-up would mix their results (a job is bound as a run_id is)."""
    conflicts = job_identity_conflicts(runs, identity)
    if conflicts:
        fields = ", ".join(conflicts)
        runs_named = sorted({r for ids in conflicts.values() for r in ids})
        raise ConfigError(
            f"job {job} was run with other {fields} (runs {', '.join(runs_named[:3])}{', ...' if len(runs_named) > 3 else ''}): "
            "its results would mix in `segpipe summary --job`; name a new job (job: ...) or restore the settings"
        )


def job_summary(output_uri: str, storage_options: dict, job: str) -> dict:
    """The runs of `job` rolled up into one summary: every image once (a later run's result wins),
    metrics recomputed from the areas summed over all runs, never averaged over runs. ConfigError
    when its runs were made with different identities (by an older segpipe that let them): one
    mIoU over two models would be wrong without a word."""
    runs = job_runs(output_uri, storage_options, job)
    if not runs:
        raise FileNotFoundError(f"no run of job {job!r} under {output_uri}")
    conflicts = job_identity_conflicts(runs)
    if conflicts:
        detail = "; ".join(f"{name} differs in {', '.join(ids)}" for name, ids in conflicts.items())
        raise ConfigError(f"job {job}: its runs were made with different settings, their results would mix: {detail}")
    outcomes = [r.outcomes for r in runs]
    segmented = IdSet.union(*(o.segmented for o in outcomes))
    merged = Outcomes(segmented, IdSet.union(*(o.failed for o in outcomes)).minus(segmented))
    # the model of the latest run holding results (a later run that committed nothing binds nothing,
    # and may have been made with another model: its classes are not these results')
    holding = [r for r in runs if r.outcomes.parts] or runs
    model = holding[-1].info.get("model", {})
    num_classes = int(model.get("mask_classes", model.get("num_classes", 0)))
    per_run = [r.store.class_area_rows() for r in runs]  # a later run's areas of an image supersede an earlier one's
    class_areas = (latest_of([t for t, _ in per_run if t is not None]), sorted({u for _, units in per_run for u in units}))
    summary = summary_of([r.store.read_table(METRICS) for r in runs], merged, num_classes, model.get("class_names") or [], class_areas)
    summary["job"] = job
    summary["identity"] = next((r.identity for r in runs if r.outcomes.parts and r.identity), None)
    summary["runs"] = [
        {
            "run_id": r.run_id,
            "status": run_status(r.info),
            "started": r.info.get("started"),
            "images": len(r.outcomes.segmented),
            "errors": len(r.outcomes.failed),
            "identity": r.identity,
        }
        for r in runs
    ]
    return summary


def write_job_summary(output_uri: str, storage_options: dict, job: str, summary: dict) -> str:
    """`<output_uri>/<job>.summary.json`; returns its URI."""
    fs, root = open_fs(output_uri, storage_options)
    path = f"{root.rstrip('/')}/{job}.summary.json"
    data = json.dumps(strict_json(summary), indent=2, allow_nan=False).encode()
    with_retries(lambda: fs.pipe_file(path, data), what="write", uri=path)
    return f"{output_uri.rstrip('/')}/{job}.summary.json"
