"""The runs of a comparison: each run directory opened (`Run`), the runs labelled, the images every run
segmented (`common_images`), and each run's metrics rows joined on `image_id` (`join_labeled`).

A run's metrics rows are read part by part into an `ImageTable`: per image its areas (a few numbers
per class) and its binary scalars; a binary curve is reduced to its mean in the part that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.metrics.cod import CodAccumulator, CodImageStats
from pipeline.metrics.semantic import LabelReading
from pipeline.results.run_tables import AREAS, METRICS
from pipeline.results.runstore import RunStore
from pipeline.rows import IdSet

# per image: the binary scalars, then the mean of each curve (what the bootstrap of Em_mean / Fm_mean needs)
COD_PER_IMAGE = (*CodImageStats.SCALARS, "em_mean", "fm_mean")


class CompareError(ValueError):
    """Runs that cannot be compared: the message says why, in one line."""


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


def open_runs(uris: list[str], storage_options: dict) -> list[Run]:
    """The runs at `uris`, each labelled uniquely; CompareError where they cannot be compared (a run
    given twice, different numbers of classes)."""
    runs = [open_run(u, storage_options) for u in uris]
    _label_runs(runs)
    classes = {r.num_classes for r in runs}
    if len(classes) > 1:
        raise CompareError("the runs have different numbers of classes: " + ", ".join(f"{r.label} {r.num_classes}" for r in runs))
    return runs


def class_name_notes(runs: list[Run]) -> list[str]:
    names = [tuple(r.class_names) for r in runs]
    if len(set(names)) > 1:
        return [f"the runs name their classes differently; the names of {runs[0].label} are used"]
    return []


def source_notes(runs: list[Run]) -> list[str]:
    """Where the runs read their images or labels from different places (images are matched by
    image_id alone), or read their labels otherwise (metrics.ignore_index, reduce_zero_label, a binary
    task's binary_labels): their numbers then differ by that too, not only by their models."""
    notes = []
    places = {
        "images": {r.label: (r.config.get("input") or {}).get("uri") for r in runs},
        "labels": {r.label: ((r.config.get("input") or {}).get("labels") or {}).get("uri") for r in runs},
    }
    for what, where in places.items():
        if len({str(v).rstrip("/") for v in where.values()}) > 1:
            listed = "; ".join(f"{label}: {uri}" for label, uri in where.items())
            notes.append(f"the runs read their {what} from different places ({listed}): images are matched by their image_id alone")
    readings = {r.label: label_reading_words(r.config) for r in runs if (r.config.get("input") or {}).get("labels")}
    if len(set(readings.values())) > 1:
        listed = "; ".join(f"{label}: {words}" for label, words in readings.items())
        notes.append(f"the runs read their labels differently ({listed}): their metrics differ by that too, not only by their models")
    return notes


def label_reading_words(config: dict) -> str:
    """How a run's config reads labels, in words: its metrics task, ignore_index, reduce_zero_label, binary_labels."""
    metrics = config.get("metrics") or {}
    task = metrics.get("task", "semantic")
    binary_labels = metrics.get("binary_labels", "class_index")  # runs from before binary_labels read class indices
    ignore = LabelReading.of(task, binary_labels, metrics.get("ignore_index"), 1, 2).ignore  # null's meaning, as the run took it
    words = [task, f"ignore_index {'none' if ignore is None else ignore}"]
    if metrics.get("reduce_zero_label"):
        words.append("reduce_zero_label")
    if task == "binary":
        words.append(f"binary_labels {binary_labels}")
    return ", ".join(words)


@dataclass
class CommonImages:
    """The images compared: those every run segmented."""

    ids: list[str]  # sorted
    left_out: int  # images some run segmented and another did not (0 unless --intersect)
    note: str | None = None  # what --intersect left out


def common_images(runs: list[Run], intersect: bool) -> CommonImages:
    """Every run's segmented ids; runs over different image sets are a CompareError unless `intersect`."""
    common = runs[0].segmented
    for r in runs[1:]:
        common = IdSet(common.ids.filter(pc.is_in(common.ids, value_set=r.segmented.ids)))
    union = IdSet.union(*(r.segmented for r in runs))
    differ = len(union) - len(common)
    note = None
    if differ:
        counts = ", ".join(f"{r.label} {len(r.segmented)}" for r in runs)
        if not intersect:
            raise CompareError(
                f"the runs segmented different images: {differ} of {len(union)} images are not in every run ({counts}; "
                f"{len(common)} in common); --intersect compares the common ones"
            )
        if not len(common):
            raise CompareError(f"the runs have no image in common ({counts})")
        note = f"--intersect: {len(common)} images every run segmented are compared; {differ} of {len(union)} are left out ({counts})"
    return CommonImages(sorted(common.to_pylist()), differ, note)


# ------------------------------------------------------------------------------- per-image data


@dataclass
class ImageTable:
    """One run's metrics rows, one per image (its last row wins), aligned to `ids`."""

    ids: list[str]
    areas: dict[str, np.ndarray]  # intersection, union, pred_area, label_area: n x C int64
    cod: np.ndarray | None  # n x len(COD_PER_IMAGE) float64, NaN rows for images without binary stats
    row_of: dict[str, tuple[str, int]]  # image_id -> (part, row in that part), for the curves
    # which images have binary stats (a NaN in `cod` may be a measure's own NaN: an S-measure of an
    # empty quadrant is one, and that image still counts in every other measure); None: no binary run
    has_cod: np.ndarray | None = None

    def take(self, ids: list[str]) -> ImageTable:
        index = {image_id: i for i, image_id in enumerate(self.ids)}
        rows = np.array([index[i] for i in ids], dtype=np.int64)
        return ImageTable(
            list(ids),
            {k: v[rows] for k, v in self.areas.items()},
            self.cod[rows] if self.cod is not None else None,
            {i: self.row_of[i] for i in ids},
            self.has_cod[rows] if self.has_cod is not None else None,
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
    stated: list[np.ndarray] = []  # per part: which rows have binary stats
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
        stated.append(np.zeros(n, bool))
        if CodImageStats.SCALARS[0] in names:
            any_cod = True
            stated[-1] = table.column(CodImageStats.SCALARS[0]).is_valid().to_numpy(zero_copy_only=False)
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
        np.concatenate(stated)[rows] if any_cod else None,
    )


def _curve_means(column: pa.ChunkedArray) -> np.ndarray:
    """The mean of each row's curve (NaN for a null row), without a Python loop over rows."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = np.asarray(column.flatten(), dtype=np.float64)
    # each row's own sum (np.add.reduceat), over the rows that have values only: an empty row's start
    # would be past the last value at the end of a part (reduceat's IndexError)
    sums = np.zeros(len(lengths))
    filled = lengths > 0
    if filled.any():
        sums[filled] = np.add.reduceat(values, (np.cumsum(lengths) - lengths)[filled])
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


@dataclass
class LabeledImages:
    """The runs' metrics rows joined on `image_id`: the compared images labeled in every run."""

    tables: list[ImageTable]  # per run: the rows of every image it labeled
    joined: list[ImageTable]  # per run: the rows of `ids`, aligned
    ids: list[str]
    cod_rows: np.ndarray | None  # over `ids`: the images every run has binary stats for; None where not binary

    @property
    def binary(self) -> bool:
        return self.cod_rows is not None

    def own(self, image_ids: list[str]) -> list[ImageTable]:
        """Per run, its rows of the images of `image_ids` that it labeled (whatever the other runs did)."""
        wanted = set(image_ids)
        return [t.take([i for i in t.ids if i in wanted]) for t in self.tables]


def join_labeled(runs: list[Run], image_ids: list[str]) -> LabeledImages:
    """Each run's per-image areas, joined on the compared images that every run labeled."""
    tables = [read_image_table(r) for r in runs]
    labeled = set(tables[0].ids) & set(image_ids)
    for t in tables[1:]:
        labeled &= set(t.ids)
    labeled_ids = sorted(labeled)
    joined = [t.take(labeled_ids) for t in tables]
    cod_rows = None
    if labeled_ids and all(t.cod is not None for t in joined):
        every_run = np.all([t.has_cod for t in joined], axis=0)
        cod_rows = every_run if every_run.any() else None
    return LabeledImages(tables, joined, labeled_ids, cod_rows)
