"""The write stage: result rows gathered by unit and committed as parts of the run directory.

`PartWriter`, one Ray actor, gathers the predictor's Predictions by unit and commits a part
(pipeline.results.runstore: masks, metrics and errors files; the masks file commits) every
`images_per_unit` images and at the end of each unit, so parts follow units and the user chooses
the commit granularity. The read stage ends each unit with a marker row that says how many image
rows it sent; the writer knows from it when a unit is complete, whatever order rows arrive in from
the actor pool.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.metrics.cod import CodImageStats
from pipeline.results.run_tables import (
    AREA_UNITS,
    CHUNK_FIELDS,
    CLIPS,
    CLIPS_SCHEMA,
    ERRORS_SCHEMA,
    METRICS_SCHEMA,
    OBJECT_SCHEMAS,
    OBJECT_TABLES,
    OUTSIDE_FIELD,
    PANOPTIC_COUNTS,
    RASTER_COLUMNS,
    READING_FIELD,
    masks_schema,
    metrics_schema,
    part_name,
)
from pipeline.results.runstore import RunStore
from pipeline.rows import Prediction, batch_length
from pipeline.telemetry import StageClock, say_warning

# --------------------------------------------------------------------------- writing parts


def object_table(rows: list[Prediction], kind: str) -> pa.Table:
    """The instances or segments table of one part: each image's object rows, its id in front."""
    schema = OBJECT_SCHEMAS[kind]
    records = [{"image_id": r.image_id, **obj} for r in sorted(rows, key=lambda r: r.image_id) if not r.error for obj in r.objects or ()]
    return pa.Table.from_pylist(records, schema=schema)


def clips_table(rows: list[Prediction]) -> pa.Table:
    """The clips table of one part (a clip model's run): the track pieces its frames' rows carry."""
    return pa.Table.from_pylist([r for p in rows if not p.error for r in p.clip_rows or ()], schema=CLIPS_SCHEMA)


def part_tables(
    rows: list[Prediction],
    binary: bool,
    attempt: int,
    cod: bool = False,
    panoptic: bool = False,
    confidence: bool = False,
    raster: bool = False,
    slide: bool = False,
    video: bool = False,
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The masks, metrics and errors tables of one part; `confidence`: the chunks' probability PNGs
    are a multi-class run's confidence (output.confidence), in the masks' confidence column;
    `raster`, `slide`, `video`: the masks' raster, slide or video columns too; raster and slide: the areas in
    physical units (masks: each chunk's; metrics: each labeled image's, pipeline.results.run_tables.AREA_UNITS)."""
    rows = sorted(rows, key=lambda r: r.image_id)
    ok = [r for r in rows if not r.error]
    # one masks row per chunk (one chunk for most images); all chunks of an image land in this part
    schema = masks_schema(binary, confidence=confidence, raster=raster, slide=slide, video=video)
    masks: dict[str, list] = {k: [] for k in schema.names}
    area_unit = AREA_UNITS["raster" if raster else "slide"] if raster or slide else None
    for r in ok:
        # rasters and slides: each chunk's row its own pixels' per-class areas (null: the pixel's size unknown)
        chunk_areas = (r.physical or {}).get("chunks") or [None] * len(r.chunks)
        for c, chunk_area in zip(r.chunks, chunk_areas, strict=True):
            masks["image_id"].append(r.image_id)
            masks["height"].append(r.height)
            masks["width"].append(r.width)
            for name, value in zip(CHUNK_FIELDS, (c.y, c.x, c.height, c.width)):
                masks[name].append(value)
            masks["mask"].append(c.mask)
            if slide:
                masks["mpp"].append(r.mpp)
                masks["level0_scale"].append(r.level0_scale)
            if video:
                masks["timestamp_s"].append(r.timestamp_s)
            if binary:
                masks["probability"].append(c.probability)
            if confidence:
                masks["confidence"].append(c.probability)
            if raster:
                for name in RASTER_COLUMNS:
                    masks[name].append((r.raster or {}).get(name))
            if area_unit:
                masks[f"class_area_{area_unit}"].append(chunk_area)
    labeled = [r for r in ok if r.areas is not None]  # one metrics row per labeled image
    metrics: dict[str, list] = {"image_id": [r.image_id for r in labeled]}
    for area in METRICS_SCHEMA.names[1:]:
        metrics[area] = [getattr(r.areas, area).tolist() for r in labeled]
    metrics[OUTSIDE_FIELD.name] = [r.areas.outside for r in labeled]
    if area_unit:  # rasters and slides: the labeled image's areas in square metres or microns, the mask's and the label's
        metrics[f"pred_area_{area_unit}"] = [r.physical["pred"] if r.physical else None for r in labeled]
        metrics[f"label_area_{area_unit}"] = [r.physical["label"] if r.physical else None for r in labeled]
    if cod:  # a binary task: the camouflaged-object stats beside the areas (null for a streamed image)
        metrics[READING_FIELD.name] = [r.areas.reading for r in labeled]
        stats = [CodImageStats.from_flat(r.cod).to_record() if r.cod else None for r in labeled]
        for name in (*CodImageStats.SCALARS, *CodImageStats.CURVES):
            metrics[name] = [s[name] if s else None for s in stats]
    if panoptic:  # panopticapi's counts per category, where the image had a panoptic label
        for k, name in enumerate(PANOPTIC_COUNTS):
            metrics[name] = [[c[k] for c in r.panoptic] if r.panoptic is not None else None for r in labeled]
    failed = [r for r in rows if r.error]
    errors = {
        "image_id": [r.image_id for r in failed],
        "stage": [r.stage for r in failed],
        "error": [r.error for r in failed],
        "attempt": [attempt] * len(failed),
    }
    return (
        pa.Table.from_pydict(masks, schema=schema),
        pa.Table.from_pydict(metrics, schema=metrics_schema(cod, panoptic, area_unit)),
        pa.Table.from_pydict(errors, schema=ERRORS_SCHEMA),
    )


class PartWriter:
    """Ray actor of the write stage (a pool of one, so that every row of a unit meets here).

    Each call takes Predictions; it returns one progress row per image (`image_id`, `ok`) and one
    row per finished unit (`unit_done` = its index, `image_id` empty), never the masks. A unit is
    finished when its end row (the number of image rows its read task sent) has arrived and as many
    image rows have been committed. An image that arrives twice (a predictor batch retried after its
    actor died) is taken once: every image of a unit is committed once.

    Parquet tables name their images themselves, so two files may give the same image_id (the read
    stage sends an id once per file), and a manifest may list a key twice, chunks apart: the row that
    arrives first is taken, a later unit's is left out (counted as its unit's, so that the unit
    completes) and said as a warning. For that the writer holds every id of such a run's attempt
    (about 100 bytes an id); other inputs' ids are unique by construction (listed paths,
    `<shard>/<key>`, `<video>#<frame>`). Ids committed by earlier attempts are dropped by the read
    stage (`done`).
    """

    def __init__(self, cfg: JobConfig, attempt: int, binary: bool, monitor=None, clips: bool = False) -> None:
        self.monitor, self.clock = monitor, StageClock()
        self.store = RunStore.of_job(cfg)
        self.objects = OBJECT_TABLES.get(cfg.inference.task)  # the instances or segments table, if any
        self.attempt, self.binary, self.images_per_part = attempt, binary, cfg.input.images_per_unit
        # a clip model's run: a clip's frames and its track pieces commit together, in one part
        self.clips = clips
        if clips:
            self.images_per_part = cfg.inference.clip_length
        self.cod = cfg.metrics.task == "binary"
        self.confidence = cfg.output.confidence and not binary
        self.panoptic = cfg.metrics.panoptic_labels is not None
        self.raster = cfg.input.format == "raster"
        self.slide = cfg.input.format == "slide"
        self.video = cfg.input.format == "video"
        self.pending: dict[int, list[Prediction]] = {}  # unit -> rows not yet committed
        self.expected: dict[int, int] = {}  # unit -> image rows its read task sent
        self.committed: dict[int, int] = {}  # unit -> image rows committed
        self.next_seq: dict[int, int] = {}
        self.seen: dict[int, set[str]] = {}  # unit -> image ids taken (units in flight only)
        # Parquet tables and manifests (ids that may repeat across units): image id -> the unit that gave
        # it first (every unit of the attempt); None: ids are unique by construction
        self.repeats_in = "another Parquet file of the input" if cfg.input.format == "parquet" else "the manifest, further on"
        self.first_unit: dict[str, int] | None = {} if cfg.input.format == "parquet" or cfg.input.manifest else None
        self.left_out: dict[int, int] = {}  # unit -> its rows left out as another unit's id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        progress: dict[str, list] = {"image_id": [], "ok": [], "unit_done": []}
        touched = set()
        for i in range(batch_length(batch)):
            row = Prediction.from_batch(batch, i)
            touched.add(row.unit)
            if row.is_unit_end:
                self.expected[row.unit] = row.unit_rows
                continue
            if row.image_id in self.seen.setdefault(row.unit, set()):
                continue  # a retried batch's duplicate
            if self.first_unit is not None and self.first_unit.setdefault(row.image_id, row.unit) != row.unit:
                self._leave_out(row)
                continue
            self.seen[row.unit].add(row.image_id)
            self.pending.setdefault(row.unit, []).append(row)
            progress["image_id"].append(row.image_id)
            progress["ok"].append(not row.error)
            progress["unit_done"].append(-1)
        for unit in sorted(touched):
            rows = self.pending.get(unit, [])
            while len(rows) >= self.images_per_part:
                self._commit(unit, rows[: self.images_per_part])
                rows = rows[self.images_per_part :]
            complete = unit in self.expected and self.committed.get(unit, 0) + self.left_out.get(unit, 0) + len(rows) == self.expected[unit]
            if complete and rows:
                self._commit(unit, rows)
                rows = []
            self.pending[unit] = rows
            if complete:
                progress["image_id"].append("")
                progress["ok"].append(True)
                progress["unit_done"].append(unit)
                del self.pending[unit], self.expected[unit]
                self.seen.pop(unit, None)
                self.left_out.pop(unit, None)
        return progress

    def _leave_out(self, row: Prediction) -> None:
        """A Parquet row whose image_id an earlier file gave: not committed, counted as its unit's, said."""
        self.left_out[row.unit] = self.left_out.get(row.unit, 0) + 1
        say_warning(
            f"image_id {row.image_id!r} comes again in {self.repeats_in}: only its first is segmented, this one is left out", self.monitor
        )

    def _commit(self, unit: int, rows: list[Prediction]) -> None:
        started = time.perf_counter()
        seq = self.next_seq.get(unit, 0)
        self.next_seq[unit] = seq + 1
        objects = {self.objects: object_table(rows, self.objects)} if self.objects else {}
        if self.clips:
            objects[CLIPS] = clips_table(rows)
        self.store.write_part(
            part_name(self.attempt, unit, seq),
            *part_tables(
                rows,
                self.binary,
                self.attempt,
                self.cod,
                self.panoptic,
                confidence=self.confidence,
                raster=self.raster,
                slide=self.slide,
                video=self.video,
            ),
            objects=objects,
        )
        self.committed[unit] = self.committed.get(unit, 0) + len(rows)
        self.clock.add("write", time.perf_counter() - started)
        self.clock.send(self.monitor)
