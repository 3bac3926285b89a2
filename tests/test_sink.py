"""The write stage (pipeline.results.sink): parts follow units, whatever order rows arrive in."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.metrics.semantic import ClassAreas
from pipeline.results.masks import encode_chunks
from pipeline.results.sink import PartWriter, part_tables
from pipeline.rows import Prediction, to_columns


def prediction(unit: int, image_id: str, error: str = "", labeled: bool = False) -> Prediction:
    labels = np.zeros((3, 4), np.uint8)
    if error:
        return Prediction(unit, image_id, error=error, stage="decode")
    areas = ClassAreas(*(np.arange(2, dtype=np.int64) for _ in ClassAreas.FIELDS)) if labeled else None
    return Prediction(unit, image_id, 3, 4, encode_chunks(labels, None, None, 2), areas)


def batch(*rows: Prediction) -> dict:
    return to_columns([r.to_record() for r in rows])


def writer(tmp_path, images_per_unit: int, fmt: str = "images", **inputs) -> PartWriter:
    cfg = load_config(
        {
            "run_id": "r",
            "input": {"uri": "/x", "images_per_unit": images_per_unit, "format": fmt, **inputs},
            "model": {"name": "segformer-b0"},
            "output": {"uri": str(tmp_path)},
        }
    )
    return PartWriter(cfg, attempt=3, binary=False)


def part_ids(tmp_path) -> list[list[str]]:
    return sorted(pq.read_table(p).column("image_id").to_pylist() for p in (tmp_path / "r" / "masks").glob("*.parquet"))


def test_a_unit_is_committed_when_its_end_and_all_its_rows_have_arrived(tmp_path):
    w = writer(tmp_path, images_per_unit=10)
    end = Prediction(0, "", unit_rows=3)
    out = w(batch(prediction(0, "a"), end))  # the end may overtake rows that other actors still hold
    assert out["unit_done"] == [-1] and not (tmp_path / "r" / "masks").exists()
    out = w(batch(prediction(1, "x"), prediction(0, "c"), prediction(0, "b")))
    assert 0 in out["unit_done"] and part_ids(tmp_path) == [["a", "b", "c"]]
    names = [p.name for p in (tmp_path / "r" / "masks").glob("*.parquet")]
    assert names == ["part-a0003-u000000-0000.parquet"]  # attempt, unit, sequence


def test_long_units_are_cut_into_parts_of_images_per_unit(tmp_path):
    w = writer(tmp_path, images_per_unit=2)
    w(batch(*(prediction(0, f"s/{i}") for i in range(5))))
    assert part_ids(tmp_path) == [["s/0", "s/1"], ["s/2", "s/3"]]
    w(batch(Prediction(0, "", unit_rows=5)))
    assert part_ids(tmp_path) == [["s/0", "s/1"], ["s/2", "s/3"], ["s/4"]]


def test_an_empty_unit_finishes_without_a_part(tmp_path):
    out = writer(tmp_path, 2)(batch(Prediction(7, "", unit_rows=0)))
    assert out["unit_done"] == [7] and not (tmp_path / "r" / "masks").exists()


def test_part_tables_hold_masks_metrics_and_errors_with_their_attempt():
    masks, metrics, errors = part_tables([prediction(0, "b", labeled=True), prediction(0, "a"), prediction(0, "z", error="bad")], False, 4)
    assert masks.column("image_id").to_pylist() == ["a", "b"]
    assert metrics.column("image_id").to_pylist() == ["b"] and metrics.column("union").to_pylist() == [[0, 1]]
    assert errors.to_pylist() == [{"image_id": "z", "stage": "decode", "error": "bad", "attempt": 4}]


def test_an_image_that_arrives_twice_is_committed_once(tmp_path):
    w = writer(tmp_path, images_per_unit=10)
    w(batch(prediction(0, "a"), prediction(0, "b")))
    out = w(batch(prediction(0, "a"), Prediction(0, "", unit_rows=2)))  # a retried batch sends "a" again
    assert 0 in out["unit_done"] and part_ids(tmp_path) == [["a", "b"]]


def test_a_parquet_id_that_a_second_file_gives_again_is_left_out_said_and_the_file_still_completes(tmp_path, caplog):
    """Parquet tables name their images: two files (units) giving the same image_id (or a manifest
    listing a key twice) would write two
    masks rows and two metrics rows for one id (metrics counting it twice, read_mask taking either).
    The first to arrive is committed; the other file's row is left out with a warning, and that file
    still completes (its end counts the row). Within a unit the read stage sends an id once; a retried
    batch's row is still taken once, without a warning."""
    import logging

    w = writer(tmp_path, images_per_unit=10, fmt="parquet")
    w(batch(prediction(0, "a"), prediction(0, "b")))
    with caplog.at_level(logging.WARNING, logger="pipeline.results.sink"):
        out = w(batch(prediction(1, "a"), prediction(1, "c"), Prediction(1, "", unit_rows=2), Prediction(0, "", unit_rows=2)))
        w(batch(prediction(0, "b")))  # a retried batch of the first file: no warning
    assert sorted(out["unit_done"]) == [-1, 0, 1] and out["image_id"][:1] == ["c"]
    assert part_ids(tmp_path) == [["a", "b"], ["c"]]
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("image_id 'a' comes again in another Parquet file of the input: only its first is segmented")
    # a manifest may list a key twice, chunks apart: the same; a listed folder's keys are unique, none is held
    listed = writer(tmp_path / "listed", images_per_unit=1, manifest="/keys.csv")
    with caplog.at_level(logging.WARNING, logger="pipeline.results.sink"):
        listed(batch(prediction(0, "k.png"), prediction(5, "k.png"), Prediction(5, "", unit_rows=1)))
    assert caplog.records[-1].getMessage().startswith("image_id 'k.png' comes again in the manifest, further on")
    assert part_ids(tmp_path / "listed") == [["k.png"]]
    assert writer(tmp_path / "images", images_per_unit=10).first_unit is None


def raster_prediction(image_id: str, physical: dict | None, labeled: bool) -> Prediction:
    """A 3 x 4 raster's prediction cut into chunks of 2 (four masks rows), with its areas in m^2."""
    row = prediction(0, image_id, labeled=labeled)
    row.chunks = encode_chunks(np.zeros((3, 4), np.uint8), None, 2, 2)
    row.physical = physical
    return row


def test_a_raster_parts_metrics_hold_labeled_images_only_and_each_masks_row_its_chunks_areas():
    """The metrics table is one row per labeled image (the public contract); every image's predicted
    m^2 go in its masks rows, each row its own chunk's (null without a CRS)."""
    chunks = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]
    physical = {"unit": "m2", "pred": [16.0, 20.0], "chunks": chunks, "label": None}
    rows = [
        raster_prediction("labeled.tif", {**physical, "label": [30.0, 6.0]}, labeled=True),
        raster_prediction("unlabeled.tif", physical, labeled=False),
        raster_prediction("no_crs.tif", None, labeled=False),
    ]
    masks, metrics, _ = part_tables(rows, False, 1, raster=True)
    assert metrics.column("image_id").to_pylist() == ["labeled.tif"]
    assert metrics.column("pred_area_m2").to_pylist() == [[16.0, 20.0]] and metrics.column("label_area_m2").to_pylist() == [[30.0, 6.0]]
    by_image = {}
    for r in masks.to_pylist():
        by_image.setdefault(r["image_id"], []).append(((r["chunk_y"], r["chunk_x"]), r["class_area_m2"]))
    assert by_image["unlabeled.tif"] == list(zip([(0, 0), (0, 2), (2, 0), (2, 2)], chunks))
    assert by_image["labeled.tif"] == by_image["unlabeled.tif"] and [a for _, a in by_image["no_crs.tif"]] == [None] * 4
    assert "class_area_m2" not in part_tables(rows[2:], False, 1)[0].column_names  # other runs: no such column
