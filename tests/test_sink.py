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


def writer(tmp_path, images_per_unit: int) -> PartWriter:
    cfg = load_config(
        {
            "run_id": "r",
            "input": {"uri": "/x", "images_per_unit": images_per_unit},
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
