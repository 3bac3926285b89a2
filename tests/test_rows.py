"""pipeline.rows: the types that travel between the stages survive the trip through Ray Data's rows
(to_record -> to_columns -> from_batch) whatever they carry, and an error row is made by failed()."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.metrics.semantic import ClassAreas
from pipeline.rows import NOT_AN_END, DecodedImage, IdSet, MaskChunk, Prediction, SourceUnit, StreamSource, batch_length, to_columns


def through_a_batch(rows: list) -> list:
    """The rows as Ray Data moves them: records, one batch of columns, and back, row by row."""
    batch = to_columns([row.to_record() for row in rows])
    assert batch_length(batch) == len(rows)
    return [type(rows[0]).from_batch(batch, i) for i in range(len(rows))]


def assert_same_decoded(got: DecodedImage, want: DecodedImage) -> None:
    assert (got.unit, got.image_id, got.height, got.width, got.stream) == (want.unit, want.image_id, want.height, want.width, want.stream)
    assert (got.error, got.stage, got.unit_rows, got.is_unit_end, got.has_label) == (
        want.error,
        want.stage,
        want.unit_rows,
        want.is_unit_end,
        want.has_label,
    )
    np.testing.assert_array_equal(got.image, want.image)
    if want.label is None:
        assert got.label is None
    else:
        np.testing.assert_array_equal(got.label, want.label)


def assert_same_prediction(got: Prediction, want: Prediction) -> None:
    assert (got.unit, got.image_id, got.height, got.width) == (want.unit, want.image_id, want.height, want.width)
    assert (got.error, got.stage, got.unit_rows, got.is_unit_end) == (want.error, want.stage, want.unit_rows, want.is_unit_end)
    assert got.chunks == want.chunks  # MaskChunk: boxes and bytes
    if want.areas is None:
        assert got.areas is None
    else:
        for name in ClassAreas.FIELDS:
            np.testing.assert_array_equal(getattr(got.areas, name), getattr(want.areas, name))
            assert getattr(got.areas, name).dtype == np.int64


def test_source_units_round_trip_through_records():
    unit = SourceUnit(3, "images", ("/d/a.png", "/d/b.png"), ("/l/a.png", None), ("a.png", "b.png"))
    assert SourceUnit.from_record(unit.to_record()) == unit
    shard = SourceUnit(0, "tar", ("s3://b/x.tar",), image_ids=("x.tar",))
    assert SourceUnit.from_record(shard.to_record()) == shard
    assert SourceUnit.from_record({**shard.to_record(), "label_uris": None}).label_uris == ()


def test_decoded_images_with_and_without_label_stream_or_error_round_trip_in_one_batch():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (5, 7)).astype(np.int64)
    rows = [
        DecodedImage(0, "labeled.png", image, label, 5, 7),
        DecodedImage(0, "unlabeled.png", image[:3, :4].copy(), None, 3, 4),
        DecodedImage(0, "big.tif", height=40_000, width=30_000, stream=StreamSource("/d/big.tif", "/l/big.tif", 40_000, 30_000)),
        DecodedImage(0, "big-unlabeled.tif", height=9, width=8, stream=StreamSource("/d/u.tif", None, 9, 8)),
        DecodedImage(0, "bad.png").failed("decode", "empty image file"),
        DecodedImage.unit_end(0, 5),
    ]
    back = through_a_batch(rows)
    for got, want in zip(back, rows):
        assert_same_decoded(got, want)
    assert [r.has_label for r in back] == [True, False, True, False, False, False]
    assert back[3].stream.label_uri is None and back[4].error == "empty image file" and back[4].stage == "decode"
    assert [r.is_unit_end for r in back] == [False] * 5 + [True] and back[5].unit_rows == 5 and back[0].unit_rows == NOT_AN_END


def test_predictions_with_and_without_chunks_probabilities_or_areas_round_trip_in_one_batch():
    areas = ClassAreas(np.array([1, 2, 0]), np.array([3, 4, 0]), np.array([2, 3, 0]), np.array([2, 3, 1]))
    chunks = [MaskChunk(0, 0, 4, 4, b"mask-0", b"prob-0"), MaskChunk(0, 4, 4, 2, b"mask-1", b"prob-1")]
    rows = [
        Prediction(1, "binary.png", 4, 6, chunks, areas),  # chunked, with probabilities and areas
        Prediction(1, "plain.png", 2, 3, [MaskChunk(0, 0, 2, 3, b"mask", None)]),  # no probability, no label
        Prediction(1, "labeled.png", 2, 3, [MaskChunk(0, 0, 2, 3, b"mask", None)], ClassAreas.zeros(3)),
        Prediction(1, "failed.png", 2, 3, chunks, areas).failed("predict", "RuntimeError: out of memory"),
        Prediction(1, "", unit_rows=4),
    ]
    back = through_a_batch(rows)
    for got, want in zip(back, rows):
        assert_same_prediction(got, want)
    assert back[0].chunks[1].probability == b"prob-1" and back[1].chunks[0].probability is None
    assert back[2].areas is not None and back[1].areas is None  # zero areas are still a label's areas


def test_failed_makes_an_error_row_that_drops_the_mask_and_keeps_the_image():
    prediction = Prediction(2, "x.png", 4, 6, [MaskChunk(0, 0, 4, 6, b"m", None)], ClassAreas.zeros(2))
    failed = prediction.failed("encode", "ValueError: boom")
    assert (failed.unit, failed.image_id, failed.height, failed.width) == (2, "x.png", 4, 6)
    assert (failed.chunks, failed.areas, failed.stage, failed.error) == ([], None, "encode", "ValueError: boom")
    assert prediction.chunks and not prediction.error  # a new row: the original is unchanged
    decoded = DecodedImage(2, "y.png", np.zeros((2, 2, 3), np.uint8), None, 2, 2)
    bad = decoded.failed("read", "read: gone")
    assert (bad.stage, bad.error, bad.image_id) == ("read", "read: gone", "y.png") and not decoded.error
    # an image that failed before the predictor becomes a prediction carrying its error
    carried = Prediction.of(bad)
    assert (carried.image_id, carried.height, carried.width, carried.stage, carried.error) == ("y.png", 2, 2, "read", "read: gone")
    assert carried.chunks == [] and carried.areas is None
    assert Prediction.of(DecodedImage.unit_end(2, 7)).unit_rows == 7


def test_to_columns_keeps_each_rows_mask_lists_in_one_cell_even_when_their_lengths_agree():
    chunks = [MaskChunk(0, 0, 2, 2, b"a", b"p"), MaskChunk(0, 2, 2, 2, b"b", b"q")]
    batch = to_columns([Prediction(0, f"{i}.png", 2, 4, chunks).to_record() for i in range(3)])
    for column in ("chunks", "mask", "probability"):
        assert batch[column].dtype == object and batch[column].shape == (3,)  # never a 3 x 2 (x 4) array
    assert batch["chunks"][0] == [[0, 0, 2, 2], [0, 2, 2, 2]] and batch["mask"][2] == [b"a", b"b"]
    assert to_columns([]) == {}


def test_idset_answers_one_id_at_a_time_by_binary_search_like_a_set():
    import random

    rng = random.Random(0)
    ids = [f"s/{rng.randrange(10_000):05d}/k" for _ in range(2_000)]
    held = IdSet(pa.array(ids)).sorted_for_lookup()
    probes = ids[:50] + [f"s/{i:05d}/k" for i in range(0, 10_000, 97)] + ["", "s/", "zzz", "s/00000/k "]
    assert [p in held for p in probes] == [p in set(ids) for p in probes]
    assert "x" not in IdSet() and ("b" in IdSet(pa.array(["c", "b", "a"])))
