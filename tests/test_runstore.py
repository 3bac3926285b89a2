"""The run directory's commit protocol and records (pipeline.results.runstore), on local files and memory://."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import strict_json_load

from pipeline.config import ConfigError, load_config
from pipeline.io import storage
from pipeline.io.storage import RetryPolicy, StoreStats
from pipeline.results.masks import encode_chunks
from pipeline.results.run_tables import ERRORS, ERRORS_SCHEMA, METRICS_SCHEMA, masks_schema, metrics_schema, part_name
from pipeline.results.runstore import (
    LOST_AFTER_SECONDS,
    AttemptReport,
    RunRecord,
    RunStore,
    check_job_identity,
    config_changes,
    job_runs,
    job_summary,
    read_mask,
    run_identity,
    run_status,
    strict_json,
)
from pipeline.results.sink import part_tables
from pipeline.rows import IdSet, Prediction


def tables(ids: list[str], failed: list[str] = (), attempt: int = 1):
    masks = pa.Table.from_pydict(
        {
            "image_id": ids,
            "height": [1] * len(ids),
            "width": [1] * len(ids),
            "chunk_y": [0] * len(ids),
            "chunk_x": [0] * len(ids),
            "chunk_height": [1] * len(ids),
            "chunk_width": [1] * len(ids),
            "mask": [b"png"] * len(ids),
        },
        schema=masks_schema(False),
    )
    metrics = pa.Table.from_pydict({"image_id": [], **{k: [] for k in METRICS_SCHEMA.names[1:]}}, schema=METRICS_SCHEMA)
    errors = pa.Table.from_pydict(
        {"image_id": list(failed), "stage": ["decode"] * len(failed), "error": ["bad"] * len(failed), "attempt": [attempt] * len(failed)},
        schema=ERRORS_SCHEMA,
    )
    return masks, metrics, errors


def test_part_names_differ_by_attempt_so_a_later_attempt_never_overwrites():
    assert part_name(1, 0, 0) != part_name(2, 0, 0)
    assert sorted([part_name(2, 0, 0), part_name(1, 5, 3), part_name(1, 10, 0)]) == [
        part_name(1, 5, 3),
        part_name(1, 10, 0),
        part_name(2, 0, 0),
    ]


def test_a_committed_part_is_never_written_again(tmp_path):
    store = RunStore(str(tmp_path), {}, "r")
    assert store.write_part("part-x", *tables(["a.png"]))
    before = (tmp_path / "r" / "masks" / "part-x.parquet").read_bytes()
    assert not store.write_part("part-x", *tables(["b.png", "c.png"]))
    assert (tmp_path / "r" / "masks" / "part-x.parquet").read_bytes() == before


def test_leftovers_of_an_interrupted_attempt_are_discarded_and_committed_parts_kept(tmp_path):
    store = RunStore(str(tmp_path), {}, "r")
    store.write_part("part-committed", *tables(["a.png"]))
    _masks, metrics, errors = tables(["b.png"], failed=["c.png"])
    pq.write_table(metrics, tmp_path / "r" / "metrics" / "part-half.parquet")  # the masks file never came
    pq.write_table(errors, tmp_path / "r" / "errors" / "part-half.parquet")
    (tmp_path / "r" / "masks" / ".tmp-123-part-y.parquet").write_bytes(b"half a file")
    store.discard_uncommitted()
    names = sorted(p.relative_to(tmp_path / "r").as_posix() for p in (tmp_path / "r").rglob("*") if p.is_file())
    assert names == ["errors/part-committed.parquet", "masks/part-committed.parquet", "metrics/part-committed.parquet"]


def test_outcomes_count_each_image_once_by_its_latest_result():
    store = RunStore("memory://runstore-outcomes", {}, "r")
    store.write_part(part_name(1, 0, 0), *tables(["a.png"], failed=["b.png", "c.png"], attempt=1))
    store.write_part(part_name(2, 0, 0), *tables(["b.png"], failed=["c.png"], attempt=2))  # b fixed, c failed again
    outcomes = store.outcomes()
    assert sorted(outcomes.segmented.to_pylist()) == ["a.png", "b.png"] and outcomes.failed.to_pylist() == ["c.png"]
    latest = store.latest_errors().to_pylist()
    assert [(r["image_id"], r["attempt"]) for r in latest] == [("c.png", 2)]
    summary = store.summarize(2, ["bg", "fg"])
    assert summary["images"] == 2 and summary["errors"] == 1 and summary["labeled_images"] == 0


def test_error_rows_written_before_attempts_existed_read_as_attempt_1(tmp_path):
    store = RunStore(str(tmp_path), {}, "r")
    masks, metrics, _ = tables(["a.png"])
    old_errors = pa.table({"image_id": ["b.png"], "stage": ["read"], "error": ["gone"]})
    for kind, table in (("metrics", metrics), ("errors", old_errors), ("masks", masks)):
        (tmp_path / "r" / kind).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / "r" / kind / "part-000000-000000.parquet")
    store.write_part(part_name(1, 0, 0), *tables(["c.png"], failed=["d.png"]))
    errors = store.read_table("errors")
    assert sorted(zip(errors.column("image_id").to_pylist(), errors.column("attempt").to_pylist())) == [("b.png", 1), ("d.png", 1)]


def test_json_is_strict_nan_and_infinity_become_null(tmp_path):
    assert strict_json({"a": [1.0, math.nan], "b": {"c": math.inf}}) == {"a": [1.0, None], "b": {"c": None}}
    store = RunStore(str(tmp_path), {}, "r")
    store.write_json("summary.json", {"mIoU": math.nan, "IoU": [0.5, math.nan]})
    assert strict_json_load(tmp_path / "r" / "summary.json") == {"mIoU": None, "IoU": [0.5, None]}


def test_a_run_record_refuses_a_config_that_changes_the_runs_results(tmp_path):
    cfg = load_config(
        {"run_id": "r", "input": {"uri": "/data/images"}, "model": {"name": "segformer-b0"}, "output": {"uri": str(tmp_path)}}
    )
    store = RunStore(str(tmp_path), {}, "r")
    identity = run_identity(cfg, "segformer-b0", 150, "abc")
    store.write_json("run.json", {"identity": identity, "config": {"was": 1}, "attempts": [{"attempt": 1, "status": "failed"}]})
    assert RunRecord.load(store, cfg, identity).attempt == 2
    other = run_identity(
        cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"stride": (100, 100)})}), "segformer-b0", 150, "def"
    )
    # an attempt that committed nothing holds no result to mix with: a corrected config takes the run_id
    replaced = RunRecord.load(store, cfg, other)
    assert replaced.attempt == 2 and "config" not in replaced.previous
    assert replaced.identity_changes == {"inference.stride": [[341, 341], [100, 100]], "model.weights_sha256": ["abc", "def"]}
    store.write_part(part_name(1, 0, 0), *tables(["a.png"]))
    with pytest.raises(ConfigError, match=r"inference\.stride, model\.weights_sha256"):
        RunRecord.load(store, cfg, other)


def test_how_labels_are_read_is_part_of_a_runs_identity_and_older_identities_still_resume(tmp_path):
    base = {"run_id": "r", "input": {"uri": "/data/images"}, "model": {"name": "segformer-b0"}, "output": {"uri": str(tmp_path)}}
    binary = {**base, "metrics": {"task": "binary", "binary_labels": "mask"}}
    cfg = load_config(binary)
    store = RunStore(str(tmp_path), {}, "r")
    identity = run_identity(cfg, "segformer-b0", 2, "abc")
    store.write_json("run.json", {"identity": identity, "attempts": [{"attempt": 1, "status": "interrupted"}]})
    store.write_part(part_name(1, 0, 0), *tables(["a.png"]))
    # metrics rows read under another rule would mix with the committed ones
    for metrics, field in (({"binary_labels": "class_index"}, "metrics.binary_labels"), ({"ignore_index": 7}, "metrics.ignore_index")):
        other = load_config({**binary, "metrics": {**binary["metrics"], **metrics}})
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            RunRecord.load(store, other, run_identity(other, "segformer-b0", 2, "abc"))
    # a run whose identity was recorded before these fields existed resumes under the same settings
    older = {k: v for k, v in identity.items() if not k.startswith("metrics.") and k != "inference.task"}
    store.write_json("run.json", {"identity": older, "attempts": [{"attempt": 1, "status": "interrupted"}]})
    assert RunRecord.load(store, cfg, identity).attempt == 2


def test_an_attempt_found_running_is_lost_and_counted_by_what_its_parts_hold(tmp_path):
    cfg = load_config({"run_id": "r", "input": {"uri": "/data"}, "model": {"name": "segformer-b0"}, "output": {"uri": str(tmp_path)}})
    store = RunStore(str(tmp_path), {}, "r")
    identity = run_identity(cfg, "segformer-b0", 150, "abc")
    # attempt 1 was interrupted by a version that counted nothing; attempt 2 was killed (its last heartbeat at 12 s)
    store.write_part(part_name(1, 0, 0), *tables(["a.png", "b.png"], attempt=1))
    store.write_part(part_name(2, 0, 0), *tables(["c.png", "d.png"], failed=["e.png"], attempt=2))
    store.write_part(part_name(2, 1, 0), *tables(["f.png"], attempt=2))
    store.write_json(
        "run.json",
        {
            "identity": identity,
            "status": "running",
            "attempts": [
                {"attempt": 1, "status": "interrupted", "seconds": 0.0, "counts": {"processed": 0}},
                {"attempt": 2, "status": "running", "seconds": 12.0, "counted": "so far", "counts": {"processed": 1}},
            ],
        },
    )
    record = RunRecord.load(store, cfg, identity)
    assert record.attempt == 3
    assert [a["status"] for a in record.earlier] == ["interrupted", "lost"] and "found running by attempt 3" in record.earlier[1]["message"]
    assert [(a["counts"]["processed"], a["counts"]["failed"]) for a in record.earlier] == [(2, 0), (4, 1)]
    throughput = record.throughput(1, 3.0, 5.0)
    assert throughput["throughput"]["images"] == 7 and throughput["throughput"]["seconds"] == 15.0
    assert throughput["this_attempt"]["images"] == 1 and "start-up" in throughput["throughput"]["startup"]


def test_an_attempts_record_in_run_json_is_what_the_plan_reports(tmp_path):
    cfg = load_config({"run_id": "r", "input": {"uri": "/data"}, "model": {"name": "segformer-b0"}, "output": {"uri": str(tmp_path)}})
    store = RunStore(str(tmp_path), {}, "r")
    record = RunRecord.load(store, cfg, run_identity(cfg, "segformer-b0", 150, "abc"))
    listing = StoreStats(list_calls=2)
    record.write(AttemptReport(7, 2, 1, 4, {"name": "segformer-b0"}, {"configured": False}, listing), "running")
    assert store.read_json("run.json")["attempts"][-1]["counts"]["processed"] == 0  # nothing run yet
    assert "warnings" not in store.read_json("run.json")["attempts"][-1]  # none said
    ran = AttemptReport(
        7,
        2,
        1,
        4,
        {"name": "segformer-b0"},
        {"configured": False},
        listing,
        "ok",
        2.5,
        3,
        1,
        {"actors": 1},
        None,
        {"list_calls": 5},
        warnings=["v.mp4: the frame size changes mid-stream at frame 5"],
    )
    record.write(ran, "succeeded")
    written = store.read_json("run.json")
    attempt = written["attempts"][-1]
    assert attempt["counts"] == {"listed": 7, "done_earlier": 2, "retried": 1, "to_do": 4, "processed": 3, "failed": 1}
    assert (attempt["status"], attempt["message"], attempt["seconds"], attempt["actors"]) == ("succeeded", "ok", 2.5, {"actors": 1})
    assert attempt["store"]["list_calls"] == 7  # the listing's requests and the plan's
    assert (
        written["model"] == {"name": "segformer-b0"} and written["labels"] == {"configured": False} and written["counts"] == {"listed": 7}
    )
    # what the read tasks said and went on (RunMonitor.add_warning) is in the attempt's record, when there is any
    assert attempt["warnings"] == ["v.mp4: the frame size changes mid-stream at frame 5"]


def test_a_run_running_without_a_heartbeat_for_long_is_lost():
    beat = "2026-01-01T00:00:00+00:00"
    info = {"status": "running", "attempts": [{"attempt": 1, "status": "running", "heartbeat": beat}]}
    t0 = dt.datetime.fromisoformat(beat).timestamp()
    assert run_status(info, now=t0 + 60) == "running"
    assert run_status(info, now=t0 + LOST_AFTER_SECONDS + 1) == "lost"
    assert run_status({"status": "succeeded"}) == "succeeded"


def job_run(root: str, run_id: str, identity: dict, images: list[str]) -> None:
    """A run of job `nightly` as a run directory holds it: run.json, a committed part."""
    store = RunStore(root, {}, run_id)
    store.write_json("run.json", {"run_id": run_id, "job": "nightly", "status": "succeeded", "started": run_id, "identity": identity,
                                  "model": {"num_classes": 2, "class_names": ["bg", "fg"]}})  # fmt: skip
    if images:
        store.write_part(part_name(1, 0, 0), *tables(images))


def test_runs_of_a_job_with_other_settings_are_refused_by_the_night_and_by_the_rollup(tmp_path):
    cfg = load_config({"run_id": "r", "input": {"uri": "/data"}, "model": {"name": "segformer-b0"}, "output": {"uri": str(tmp_path)}})
    identity = run_identity(cfg, "segformer-b0", 2, "abc")
    other = {**identity, "model.weights_sha256": "def", "inference.window": [64, 64]}
    job_run(str(tmp_path), "n1", identity, ["a.png"])
    job_run(str(tmp_path), "n2", identity, ["b.png"])
    job_run(str(tmp_path), "n3", other, [])  # committed nothing: binds nothing
    runs = job_runs(str(tmp_path), {}, "nightly")
    assert [r.run_id for r in runs] == ["n1", "n2", "n3"]
    check_job_identity("nightly", runs, identity)
    with pytest.raises(ConfigError, match=r"job nightly was run with other inference\.window, model\.weights_sha256 \(runs n1, n2\)"):
        check_job_identity("nightly", runs, other)
    summary = job_summary(str(tmp_path), {}, "nightly")
    assert summary["images"] == 2 and summary["identity"] == identity
    assert [r["identity"] for r in summary["runs"]] == [identity, identity, other]

    job_run(str(tmp_path), "n4", other, ["c.png"])  # as an older segpipe let a night with another checkpoint in
    with pytest.raises(ConfigError, match=r"inference\.window differs in n4; model\.weights_sha256 differs in n4"):
        job_summary(str(tmp_path), {}, "nightly")


def test_config_changes_name_the_fields_that_differ():
    assert config_changes({"a": {"b": 1, "c": 2}, "run_id": "x"}, {"a": {"b": 1, "c": 3}, "run_id": "y"}) == {"a.c": [2, 3]}


def test_the_id_index_covers_its_parts_and_later_parts_are_read_beside_it(tmp_path):
    store = RunStore(str(tmp_path), {}, "r")
    store.write_part(part_name(1, 0, 0), *tables(["a.png", "b.png"], failed=["x.png"]))
    store.write_index(store.outcomes())
    index = pq.read_table(tmp_path / "r" / "ids.parquet")
    assert sorted(zip(index.column("image_id").to_pylist(), index.column("outcome").to_pylist())) == [
        ("a.png", "segmented"),
        ("b.png", "segmented"),
        ("x.png", "failed"),
    ]
    # the masks of the indexed part are no longer read: the index answers for them
    (tmp_path / "r" / "masks" / (part_name(1, 0, 0) + ".parquet")).write_bytes(
        (tmp_path / "r" / "masks" / (part_name(1, 0, 0) + ".parquet")).read_bytes()
    )
    pq.write_table(tables(["zzz.png"])[0], tmp_path / "r" / "masks" / (part_name(1, 0, 0) + ".parquet"))
    store.write_part(part_name(2, 0, 0), *tables(["x.png", "c.png"]))  # a later attempt, not indexed yet
    outcomes = store.outcomes()
    assert sorted(outcomes.segmented.to_pylist()) == ["a.png", "b.png", "c.png", "x.png"] and len(outcomes.failed) == 0


def test_id_sets_answer_membership_for_a_whole_listing_at_once():
    held = IdSet(pa.array(["b", "a", "b", "s/1/k"]))
    assert len(held) == 3 and held.contains(["a", "c", "b"]).tolist() == [True, False, True]
    assert held.minus(IdSet(pa.array(["a"]))).to_pylist() == ["b", "s/1/k"]
    assert len(IdSet.union(held, IdSet(pa.array(["z"])), IdSet())) == 4 and IdSet().contains([]).tolist() == []


def test_metrics_parts_written_before_outside_pixels_were_counted_still_read_as_unknown_not_zero(tmp_path):
    """The metrics table gained `label_outside_pixels`: a run's older parts lack it, and are read
    beside newer ones; their images are `unknown_images`, never counted as 0 pixels."""
    store = RunStore(str(tmp_path), {}, "r")
    areas = {k: [[1, 1]] for k in METRICS_SCHEMA.names[1:]}
    old = pa.Table.from_pydict({"image_id": ["a.png"], **areas}, schema=METRICS_SCHEMA)  # as written before
    new = pa.Table.from_pydict({"image_id": ["b.png"], **areas, "label_outside_pixels": [4]}, schema=metrics_schema(False))
    for name, metrics, image_id in ((part_name(1, 0, 0), old, "a.png"), (part_name(2, 0, 0), new, "b.png")):
        masks, _, errors = tables([image_id])
        store.write_part(name, masks, metrics, errors)
    summary = store.summarize(2, ["bg", "fg"])
    assert summary["labeled_images"] == 2 and summary["IoU"] == [1.0, 1.0]
    assert summary["label_values_outside_classes"] == {"pixels": 4, "images": 1, "unknown_images": 1}


def test_a_runs_store_opens_alike_from_its_job_config_and_from_its_uri(tmp_path):
    cfg = load_config(
        {"run_id": "r7", "input": {"uri": "/x"}, "model": {"name": "segformer-b0"}, "output": {"uri": str(tmp_path / "runs")}}
    )
    of_job, at = RunStore.of_job(cfg), RunStore.at(str(tmp_path / "runs" / "r7") + "/")
    assert (of_job.uri, of_job.root, of_job.run_id) == (at.uri, at.root, at.run_id) == (f"{tmp_path}/runs/r7", f"{tmp_path}/runs/r7", "r7")
    assert RunStore.at("memory://r8").run_id == "r8"  # a run at the store's root


def commit_mask(store: RunStore, name: str, image_id: str, labels: np.ndarray, attempt: int) -> None:
    rows = [Prediction(0, image_id, *labels.shape, encode_chunks(labels, None, None, num_classes=3))]
    store.write_part(name, *part_tables(rows, binary=False, attempt=attempt))


def test_mask_of_reads_committed_parts_only_an_images_latest_result_through_retries(tmp_path):
    store = RunStore(str(tmp_path), {}, "r")
    first, rerun, unfinished = (np.full((4, 5), value, np.uint8) for value in (0, 1, 2))
    commit_mask(store, part_name(1, 0, 0), "a.png", first, attempt=1)
    commit_mask(store, part_name(2, 0, 0), "a.png", rerun, attempt=2)  # a later attempt's result for the same image
    # an interrupted attempt 3: its masks file never moved from its hidden temporary name, so the part is not committed
    masks, _, _ = part_tables([Prediction(0, "a.png", 4, 5, encode_chunks(unfinished, None, None, num_classes=3))], binary=False, attempt=3)
    pq.write_table(masks, tmp_path / "r" / "masks" / f".tmp-0123-{part_name(3, 0, 0)}.parquet")
    np.testing.assert_array_equal(store.mask_of("a.png"), rerun)
    np.testing.assert_array_equal(read_mask(str(tmp_path / "r"), "a.png"), rerun)
    with pytest.raises(KeyError, match="b.png"):
        store.mask_of("b.png")
    # every open of the latest part fails once (a connection reset): the store retries it
    flaky = {"target_protocol": "file", "match": f"masks/{part_name(2, 0, 0)}", "fail_opens": 1, "run": str(tmp_path)}
    flaky_store = RunStore.at(f"flaky://{tmp_path}/r", flaky)
    np.testing.assert_array_equal(flaky_store.mask_of("a.png"), rerun)
    assert flaky_store.fs.injected == 1
    np.testing.assert_array_equal(read_mask(f"flaky://{tmp_path}/r", "a.png", storage_options={**flaky, "run": "again"}), rerun)


def test_a_video_run_without_any_label_is_told_where_a_frame_s_label_goes():
    from pipeline.results.runstore import labels_report

    inp = {"uri": "/v", "labels": {"uri": "/l"}, "format": "video"}
    cfg = load_config({"input": inp, "model": {"name": "segformer-b0"}})
    assert (
        labels_report(cfg, 12, 0)["note"]
        == "none of the 12 images has a label under /l (a frame's label is <video stem>/<frame index>.png)"
    )


def test_a_raster_runs_area_summary_sums_every_images_masks_rows_and_the_labeled_ones_metrics(tmp_path):
    """summary.json's area_m2: `predicted` over every image from the masks table (each image's latest
    result, its chunk rows summed; a part written before the areas were recorded counts in none),
    `labeled` and `predicted_labeled` over the labeled images from the metrics table."""
    from pipeline.metrics.semantic import ClassAreas

    store = RunStore(str(tmp_path), {}, "r")

    def raster(image_id: str, chunks: list[list[float]], label: list[float] | None) -> Prediction:
        labels = np.zeros((3, 4), np.uint8)
        areas = ClassAreas(*(np.ones(2, np.int64) for _ in ClassAreas.FIELDS)) if label else None
        pred = np.sum(chunks, axis=0).tolist()
        physical = {"unit": "m2", "pred": pred, "chunks": chunks, "label": label}
        return Prediction(0, image_id, 3, 4, encode_chunks(labels, None, 2 if len(chunks) > 1 else None, 2), areas, physical=physical)

    older, _, _ = tables(["old.tif"])  # a part of an older segpipe: no class_area_m2
    store.write_part(part_name(1, 0, 0), older, *tables([])[1:])
    first = [raster("a.tif", [[1.0, 2.0]], None), raster("b.tif", [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], [5.0, 3.0])]
    store.write_part(part_name(1, 1, 0), *part_tables(first, False, 1, raster=True))
    store.write_part(part_name(2, 1, 0), *part_tables([raster("a.tif", [[10.0, 20.0]], None)], False, 2, raster=True))  # a rerun of a.tif
    area = store.summarize(2, ["bg", "fg"])["area_m2"]
    assert area["predicted"] == {"bg": 14.0, "fg": 24.0} and area["images"] == 2  # a.tif's latest, b.tif's four chunks
    assert area["labeled"] == {"bg": 5.0, "fg": 3.0} and area["predicted_labeled"] == {"bg": 4.0, "fg": 4.0}
    assert area["labeled_images"] == 1
    assert "area_m2" not in RunStore(str(tmp_path), {}, "none").summarize(2, ["bg", "fg"])  # a run without rasters: no section

    # a job's roll-up over two nights: an image's areas from the latest run that segmented it
    for run_id, rows in (("n1", first), ("n2", [raster("a.tif", [[10.0, 20.0]], None)])):
        job_run(str(tmp_path / "jobs"), run_id, {}, [])
        RunStore(str(tmp_path / "jobs"), {}, run_id).write_part(part_name(1, 0, 0), *part_tables(rows, False, 1, raster=True))
    rollup = job_summary(str(tmp_path / "jobs"), {}, "nightly")["area_m2"]
    assert rollup["predicted"] == {"bg": 14.0, "fg": 24.0} and rollup["images"] == 2 and rollup["labeled"] == {"bg": 5.0, "fg": 3.0}


def test_a_runs_closing_reads_retry_a_flaky_store_not_fail_what_it_segmented(tmp_path, monkeypatch):
    """What a run reads at its end (outcomes, the id index, summarize, latest rows, run.json, the job's
    runs) goes through the store's retries, as its writes do: a flaky store costs a retry, never the run."""
    job_run(str(tmp_path), "r", {"model.name": "m"}, [])
    clean = RunStore(str(tmp_path), {}, "r")
    clean.write_part(part_name(1, 0, 0), *tables(["a.png", "b.png"], failed=["x.png"]))
    clean.write_index(clean.outcomes())
    clean.write_part(part_name(2, 0, 0), *tables(["x.png", "c.png"], failed=["d.png"], attempt=2))  # not indexed yet
    monkeypatch.setattr(storage, "DEFAULT_POLICY", RetryPolicy(initial_delay=0.001, max_delay=0.005))  # the retries, without their waits
    # every file's first open (or whole read) fails with a connection reset
    flaky_options = {"target_protocol": "file", "match": f"{tmp_path}/r/", "fail_opens": 1, "run": str(tmp_path)}
    flaky = RunStore.at(f"flaky://{tmp_path}/r", flaky_options)

    outcomes = flaky.outcomes()
    assert (sorted(outcomes.segmented.to_pylist()), outcomes.failed.to_pylist()) == (["a.png", "b.png", "c.png", "x.png"], ["d.png"])
    summary = strict_json(flaky.summarize(2, ["bg", "fg"], outcomes))  # no labels: NaN metrics, null here
    assert summary == strict_json(clean.summarize(2, ["bg", "fg"])) and (summary["images"], summary["errors"]) == (4, 1)
    assert flaky.latest_rows(ERRORS, ["image_id", "attempt"]).to_pylist() == [
        {"image_id": "d.png", "attempt": 2},
        {"image_id": "x.png", "attempt": 1},
    ]
    assert flaky.read_json("run.json")["job"] == "nightly" and flaky.read_json("summary.json") is None
    assert flaky.has("run.json") and not flaky.has("summary.json")
    assert [r.run_id for r in job_runs(f"flaky://{tmp_path}", flaky_options, "nightly")] == ["r"]
    read = {path.removeprefix(f"{tmp_path}/r/") for path in flaky.fs.opens_failed}
    assert {"ids.parquet", "run.json", f"masks/{part_name(2, 0, 0)}.parquet", f"errors/{part_name(2, 0, 0)}.parquet"} <= read
    assert flaky.fs.injected == len(read)  # each failed once, and was read again


def test_jpeg_labels_read_as_class_indices_are_said_to_move_values_at_edges(tmp_path):
    """Labels listed as .jpg beside their images: the listing counts them and the labels report (the
    terminal's `labels:` line, run.json) says what JPEG does to class indices; a binary task reading
    masks (thresholded) only counts them. Before: nothing said, and every edge pixel's value moved."""
    from helpers import write_png
    from PIL import Image

    from pipeline.io.storage import StoreStats
    from pipeline.plan import Listing
    from pipeline.results.runstore import labels_report

    for name in ("a", "b"):
        write_png(tmp_path / "images" / f"{name}.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "labels" / "b.png", np.zeros((4, 4), np.uint8))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "labels" / "a.jpg")
    raw = {"input": {"uri": str(tmp_path / "images"), "labels": {"uri": str(tmp_path / "labels")}}, "model": {"name": "segformer-b0"}}
    listing = Listing(load_config(raw), StoreStats())
    listing.list_batch()
    assert (listing.with_label, listing.jpeg_labels) == (2, 1)
    report = labels_report(load_config(raw), listing.listed, listing.with_label, listing.jpeg_labels)
    assert report["jpeg_labels"] == 1 and report["note"].startswith("1 of the labels are JPEG files: their compression moves class values")
    masks = load_config({**raw, "metrics": {"task": "binary", "binary_labels": "mask"}})
    assert "note" not in labels_report(masks, 2, 2, 1) and labels_report(masks, 2, 2, 1)["jpeg_labels"] == 1
    assert labels_report(load_config(raw), 3, 2, 1)["note"].startswith(
        "2 of 3 images have a label; 1 have none and get no metrics; 1 of the labels are JPEG"
    )


def test_a_slide_runs_identity_holds_its_pattern_as_listed_inputs_do():
    """Slides are listed by input.pattern as image folders are: a rerun that lists other slides under
    the same run_id is refused (before, their pattern was no part of the identity); shards and tables,
    read whole, have none."""
    from pipeline.results.runstore import run_identity

    def identity(fmt: str) -> dict:
        cfg = load_config({"input": {"uri": "/s", "format": fmt, "pattern": "**/*.svs"}, "model": {"name": "segformer-b0"}})
        return run_identity(cfg, "segformer-b0", 3, "abc")

    assert identity("slide")["input.pattern"] == identity("images")["input.pattern"] == "**/*.svs"
    assert "input.pattern" not in identity("tar") and "input.pattern" not in identity("parquet")


def test_a_jobs_rollup_names_its_classes_by_the_latest_run_holding_results_not_a_later_empty_one(tmp_path):
    """Two nights of job `nightly` hold results (2 classes, bg and fg); a third night, started with
    another checkpoint of 3 classes, committed nothing (such a run binds nothing). The roll-up's
    classes are those of the results. Before: the last run's model named (and counted) the classes."""
    from pipeline.results.runstore import RunStore, job_summary

    root = str(tmp_path)
    job_run(root, "n1", {}, ["a.png"])
    job_run(root, "n2", {}, ["b.png"])
    RunStore(root, {}, "n3").write_json(
        "run.json",
        {"run_id": "n3", "job": "nightly", "status": "failed", "started": "n3", "identity": {"model.weights_sha256": "zzz"},
         "model": {"num_classes": 3, "class_names": ["sky", "tree", "water"]}},
    )  # fmt: skip
    summary = job_summary(root, {}, "nightly")
    assert summary["class_names"] == ["bg", "fg"] and len(summary["IoU"]) == 2 and summary["images"] == 2


def test_reduce_zero_label_is_held_against_a_rerun_either_way_and_runs_from_before_it_read_labels_as_they_are():
    """A run's identity always holds metrics.reduce_zero_label; a run recorded before the setting
    existed read labels as they are (false): resuming it, or a job night beside it, with true is a
    change, as is false after true; the same setting is none. Before: the field was recorded only when
    true and a field one side lacked was not compared, so either change passed (one mIoU over classes
    shifted by one)."""
    from pipeline.results.runstore import identity_changes

    def identity(**metrics) -> dict:
        cfg = load_config({"input": {"uri": "/data"}, "model": {"name": "segformer-b0"}, "metrics": metrics})
        return run_identity(cfg, "segformer-b0", 150, "abc")

    plain, reduced = identity(), identity(reduce_zero_label=True)
    assert plain["metrics.reduce_zero_label"] is False and reduced["metrics.reduce_zero_label"] is True
    older = {k: v for k, v in plain.items() if k != "metrics.reduce_zero_label"}
    key = "metrics.reduce_zero_label"
    assert identity_changes(older, reduced) == {key: [False, True]} and identity_changes(reduced, older) == {key: [True, False]}
    assert identity_changes(plain, reduced) == {key: [False, True]} and identity_changes(older, plain) == {}


def test_the_object_summary_counts_each_images_latest_objects_once(tmp_path):
    """An image committed with 3 instances, then again (a later part) with none: the summary's
    object counts are those of each image's latest result. Before: every committed row, superseded
    ones too (4 rows over 2 images where 1 over 1 is left)."""
    from pipeline.results.run_tables import INSTANCES
    from pipeline.results.runstore import RunStore
    from pipeline.results.sink import object_table

    store = RunStore(str(tmp_path), {}, "r")

    def found(image_id: str, n: int) -> Prediction:
        row = Prediction(0, image_id, 4, 5, encode_chunks(np.zeros((4, 5), np.uint8), None, None, 3))
        row.objects = [
            {"instance_id": i + 1, "class_id": 1, "score": 0.9, "bbox": [0, 0, 1, 1], "area": 1, "height": 4, "width": 5, "rle": ""}
            for i in range(n)
        ]
        return row

    for attempt, rows in ((1, [found("a.png", 3), found("b.png", 1)]), (3, [found("a.png", 0)])):
        store.write_part(part_name(attempt, 0, 0), *part_tables(rows, False, attempt), objects={INSTANCES: object_table(rows, INSTANCES)})
    summary = store.object_summary("instance", ["bg", "car", "x"])
    assert (summary["rows"], summary["images_with_objects"], summary["per_class"]) == (1, 1, {"car": 1})


def test_what_decides_masks_of_slides_parquet_tables_and_decoded_images_is_in_the_identity_and_a_run_keeps_its_job(tmp_path):
    """A slide run's grid and tissue threshold, a manifest, a Parquet table's columns and EXIF
    orientation decide what is segmented and how: each is in the identity, so a rerun that changes
    one is refused (before: accepted, masks at two resolutions or orientations in one run). And a run
    resumed from a config of another file name (the job defaults to it) is refused while it holds
    results (before: the run silently left its job's roll-up and --incremental lookups)."""
    from pipeline.results.runstore import RunRecord, RunStore, identity_changes

    def identity(**inputs) -> dict:
        cfg = load_config({"input": {"uri": "/data", **inputs}, "model": {"name": "segformer-b0"}})
        return run_identity(cfg, "segformer-b0", 3, "abc")

    slide = identity(format="slide", slide={"mpp": 0.5})
    assert "input.slide" in identity_changes(slide, identity(format="slide", slide={"mpp": 2.0}))
    assert "input.slide" in identity_changes(slide, identity(format="slide", slide={"mpp": 0.5, "min_tissue": 0.5}))
    assert "input.manifest" in identity_changes(identity(manifest="/m/a.csv"), identity(manifest="/m/b.csv"))
    assert "input.columns" in identity_changes(identity(format="parquet"), identity(format="parquet", id_column="path"))
    assert "input.exif_transpose" in identity_changes(identity(), identity(exif_transpose=False))

    output = {"uri": str(tmp_path)}
    nightly = load_config(
        {"run_id": "r1", "job": "nightly", "input": {"uri": "/data"}, "model": {"name": "segformer-b0"}, "output": output}
    )
    store = RunStore.of_job(nightly)
    record = RunRecord.load(store, nightly, run_identity(nightly, "segformer-b0", 3, "abc"))
    record.write(AttemptReport(1, 0, 0, 1, {"name": "segformer-b0"}, {"configured": False}, StoreStats()), "running")
    store.write_part(part_name(1, 0, 0), *tables(["a.png"]))
    moved = nightly.model_copy(update={"job": "nightly-resume"})
    with pytest.raises(ConfigError, match="run r1 belongs to job 'nightly', this config to job 'nightly-resume'"):
        RunRecord.load(store, moved, run_identity(moved, "segformer-b0", 3, "abc"))
    RunRecord.load(store, nightly, run_identity(nightly, "segformer-b0", 3, "abc"))  # the same job resumes
