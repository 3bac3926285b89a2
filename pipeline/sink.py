"""Where results go: the run directory `<output.uri>/<run_id>/` on any fsspec store.

A batch of results is one *part*, named from the input position of its first image
(`part-<unit>-<index>`), written as metrics, errors, then masks. The masks file is the commit
marker: a part whose masks file exists is complete; metrics or errors files of a part without one
are leftovers of an interrupted run and are removed before a resumed run starts. Each file is
written under a temporary name and moved into place, so a reader never sees half a file.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MASKS, METRICS, ERRORS = "masks", "metrics", "errors"

AREAS = ("intersection", "union", "pred_area", "label_area")


def masks_schema(binary: bool) -> pa.Schema:
    fields = [
        pa.field("image_id", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("mask", pa.binary()),
    ]
    if binary:
        fields.append(pa.field("probability", pa.binary()))
    return pa.schema(fields)


METRICS_SCHEMA = pa.schema([pa.field("image_id", pa.string())] + [pa.field(a, pa.list_(pa.int64())) for a in AREAS])
ERRORS_SCHEMA = pa.schema([pa.field("image_id", pa.string()), pa.field("stage", pa.string()), pa.field("error", pa.string())])


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, output_uri: str, storage_options: dict, run_id: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
        self.root = f"{root.rstrip('/')}/{run_id}"
        self.uri = f"{output_uri.rstrip('/')}/{run_id}"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _parts(self, kind: str) -> set[str]:
        try:
            names = self.fs.ls(self.path(kind), detail=False)
        except FileNotFoundError:
            return set()
        return {n.rsplit("/", 1)[-1][: -len(".parquet")] for n in names if n.endswith(".parquet")}

    def committed_parts(self) -> set[str]:
        return self._parts(MASKS)

    def discard_uncommitted(self) -> None:
        """Remove what an interrupted run left: parts without a masks file, temporary files."""
        committed = self.committed_parts()
        for kind in (METRICS, ERRORS):
            for part in self._parts(kind) - committed:
                self.fs.rm(self.path(kind, part + ".parquet"))
        if self.fs.exists(self.path("_tmp")):
            self.fs.rm(self.path("_tmp"), recursive=True)

    def committed_image_ids(self) -> set[str]:
        """Images already done: those with a mask, and those that failed, in committed parts."""
        ids: set[str] = set()
        committed = self.committed_parts()
        for kind in (MASKS, ERRORS):
            for part in self._parts(kind) & committed:
                table = self._read(self.path(kind, part + ".parquet"), columns=["image_id"])
                ids.update(table.column("image_id").to_pylist())
        return ids

    def _read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def read_table(self, kind: str, columns: list[str] | None = None) -> pa.Table | None:
        """All committed parts of one table, in part order; None when there are none."""
        parts = sorted(self._parts(kind) & self.committed_parts())
        tables = [self._read(self.path(kind, p + ".parquet"), columns) for p in parts]
        return pa.concat_tables(tables) if tables else None

    def _write_atomic(self, path: str, write) -> None:
        tmp = self.path("_tmp", f"{uuid.uuid4().hex}.tmp")
        self.fs.makedirs(self.path("_tmp"), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            write(f)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(tmp, path)

    def write_part(self, name: str, masks: pa.Table, metrics: pa.Table, errors: pa.Table) -> None:
        # masks last: its presence commits the part
        for kind, table in ((METRICS, metrics), (ERRORS, errors), (MASKS, masks)):
            self._write_atomic(self.path(kind, name + ".parquet"), lambda f, t=table: pq.write_table(t, f))

    def write_json(self, name: str, obj: Any) -> None:
        data = json.dumps(obj, indent=2, allow_nan=True, default=str).encode()
        self._write_atomic(self.path(name), lambda f: f.write(data))

    def read_json(self, name: str) -> Any | None:
        if not self.fs.exists(self.path(name)):
            return None
        with self.fs.open(self.path(name), "rb") as f:
            return json.loads(f.read())


def part_name(unit: int, index_in_unit: int) -> str:
    return f"part-{unit:06d}-{index_in_unit:06d}"


def write_results(batch: dict[str, Any], *, output_uri: str, storage_options: dict, run_id: str, binary: bool) -> dict[str, list]:
    """The sink stage: write one batch of predictor results as one part; return what the driver
    shows as progress (ids and status only, never the masks)."""
    n = len(batch["image_id"])
    order = sorted(range(n), key=lambda i: (int(batch["unit"][i]), int(batch["index_in_unit"][i])))
    pick = lambda col: [batch[col][i] for i in order]  # noqa: E731
    ids, errors = pick("image_id"), pick("error")
    ok = [j for j, e in enumerate(errors) if not e]
    failed = [j for j, e in enumerate(errors) if e]
    labeled = [j for j in ok if bool(pick("labeled")[j])]

    masks = {"image_id": [ids[j] for j in ok], "height": [int(pick("height")[j]) for j in ok], "width": [int(pick("width")[j]) for j in ok], "mask": [pick("mask")[j] for j in ok]}
    if binary:
        masks["probability"] = [pick("probability")[j] for j in ok]
    metrics = {"image_id": [ids[j] for j in labeled]}
    for area in AREAS:
        metrics[area] = [list(map(int, pick(area)[j])) for j in labeled]
    errs = {"image_id": [ids[j] for j in failed], "stage": [str(pick("stage")[j]) for j in failed], "error": [str(errors[j]) for j in failed]}

    store = RunStore(output_uri, storage_options, run_id)
    store.write_part(
        part_name(int(batch["unit"][order[0]]), int(batch["index_in_unit"][order[0]])),
        pa.Table.from_pydict(masks, schema=masks_schema(binary)),
        pa.Table.from_pydict(metrics, schema=METRICS_SCHEMA),
        pa.Table.from_pydict(errs, schema=ERRORS_SCHEMA),
    )
    return {"image_id": ids, "ok": [not e for e in errors]}
