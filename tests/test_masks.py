"""pipeline.results.masks, the mask codec: PNGs written band by band (PngRows), masks cut into chunks as rows
arrive (ChunkedMaskWriter, chunk_boxes), probabilities quantized, and masks read back whole
(assemble_mask, read_mask), also from a run directory written by the sink."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.results.masks import (
    ChunkedMaskWriter,
    PngRows,
    assemble_mask,
    chunk_boxes,
    decode_png,
    encode_chunks,
    quantize_probability,
)
from pipeline.results.run_tables import part_name
from pipeline.results.runstore import RunStore, read_mask
from pipeline.results.sink import part_tables
from pipeline.rows import Prediction


def test_chunk_boxes_cut_both_axes_at_multiples_of_the_chunk_size_once_either_side_is_over():
    assert chunk_boxes(300, 410, None) == [(0, 0, 300, 410)]  # chunking off
    assert chunk_boxes(128, 128, 128) == [(0, 0, 128, 128)]  # at the size: one chunk
    assert chunk_boxes(100, 129, 128) == [(0, 0, 100, 128), (0, 128, 100, 1)]  # one side over: cut, the other too
    boxes = chunk_boxes(300, 410, 128)
    assert len(boxes) == 3 * 4 and boxes[0] == (0, 0, 128, 128) and boxes[-1] == (256, 384, 44, 26)
    covered = np.zeros((300, 410), int)
    for y, x, h, w in boxes:
        covered[y : y + h, x : x + w] += 1
    assert (covered == 1).all()  # every pixel in exactly one chunk


def test_quantize_probability_rounds_255_p_and_clips_to_uint8():
    p = np.array([[0.0, 0.4 / 255, 0.6 / 255, 0.5], [1.0, 1.2, -0.1, 254.4 / 255]], np.float32)
    q = quantize_probability(p)
    assert q.dtype == np.uint8
    np.testing.assert_array_equal(q, [[0, 0, 1, 128], [255, 255, 0, 254]])  # 127.5 rounds to even


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_png_rows_encodes_bands_that_pillow_decodes_and_refuses_missing_rows(bit_depth):
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 2**bit_depth, (37, 53)).astype(np.uint8 if bit_depth == 8 else np.uint16)
    for row_filter in ("up", "sub"):
        png = PngRows(37, 53, bit_depth, row_filter)
        for band in (rows[:10], rows[10:11], rows[11:11], rows[11:]):
            png.add(band)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.finish()))), rows)
    with pytest.raises(ValueError, match="36 of 37 rows"):
        short = PngRows(37, 53, bit_depth)
        short.add(rows[:36])
        short.finish()


def test_chunked_mask_rows_round_trip_through_the_sink_and_read_mask(tmp_path):
    rng = np.random.default_rng(3)
    big_labels = rng.integers(0, 2, (300, 410)).astype(np.uint8)
    big_probability = rng.random((300, 410)).astype(np.float32)
    small_labels = rng.integers(0, 2, (50, 60)).astype(np.uint8)
    writer = ChunkedMaskWriter(300, 410, 128, num_classes=2, binary=True)
    done = []
    for y0, y1 in ((0, 100), (100, 128), (128, 129), (129, 300)):  # bands that do not follow chunk rows
        done += writer.add(y0, big_labels[y0:y1], big_probability[y0:y1])
    assert len(done) == 12 and [(c.y, c.x, c.height, c.width) for c in done] == chunk_boxes(300, 410, 128)
    small = ChunkedMaskWriter(50, 60, 128, num_classes=2, binary=True)
    small.add(0, small_labels, np.zeros((50, 60), np.float32))

    rows = [Prediction(0, "big.tif", 300, 410, writer.finish()), Prediction(0, "small.png", 50, 60, small.finish())]
    RunStore(str(tmp_path), {}, "r").write_part(part_name(0, 0, 0), *part_tables(rows, binary=True, attempt=0))
    table = pq.read_table(next((tmp_path / "r" / "masks").glob("*.parquet")))
    assert table.num_rows == 13
    by_image = {}
    for row in table.select(["image_id", "height", "width", "chunk_y", "chunk_x", "chunk_height", "chunk_width"]).to_pylist():
        by_image.setdefault(row.pop("image_id"), []).append(tuple(row.values()))
    assert by_image["small.png"] == [(50, 60, 0, 0, 50, 60)]  # one row, chunk fields 0, 0, H, W
    assert all(r[:2] == (300, 410) for r in by_image["big.tif"])  # full size in every chunk row
    np.testing.assert_array_equal(read_mask(str(tmp_path / "r"), "big.tif"), big_labels)
    np.testing.assert_array_equal(read_mask(str(tmp_path / "r"), "big.tif", "probability"), quantize_probability(big_probability))
    np.testing.assert_array_equal(read_mask(table, "small.png"), small_labels)
    incomplete = table.filter(pa.compute.equal(table.column("image_id"), "big.tif")).slice(1)
    with pytest.raises(ValueError, match="cover"):
        assemble_mask(incomplete)


def test_masks_of_up_to_256_classes_are_8_bit_pngs_and_of_more_16_bit():
    lab = np.random.default_rng(1).integers(0, 200, (9, 11))
    [chunk] = encode_chunks(lab, None, None, 200)
    assert Image.open(io.BytesIO(chunk.mask)).mode == "L"
    np.testing.assert_array_equal(decode_png(chunk.mask), lab)
    lab16 = np.random.default_rng(1).integers(0, 300, (9, 11))
    np.testing.assert_array_equal(decode_png(encode_chunks(lab16, None, None, 300)[0].mask), lab16)


def test_assemble_mask_refuses_rows_of_several_images_and_repeated_chunks():
    labels = np.arange(20, dtype=np.uint8).reshape(4, 5)
    [chunk] = encode_chunks(labels, None, None, 20)
    row = {
        "image_id": "a.png",
        "height": 4,
        "width": 5,
        "chunk_y": 0,
        "chunk_x": 0,
        "chunk_height": 4,
        "chunk_width": 5,
        "mask": chunk.mask,
    }
    np.testing.assert_array_equal(assemble_mask([row]), labels)
    with pytest.raises(ValueError, match="several images"):
        assemble_mask([row, {**row, "image_id": "b.png"}])
    with pytest.raises(ValueError, match="appears twice"):
        assemble_mask([row, row])
    with pytest.raises(ValueError, match="no rows"):
        assemble_mask([])
