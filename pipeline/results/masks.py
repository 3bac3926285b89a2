"""The mask codec: label maps and probabilities as PNG chunks, written band by band, read back whole.

Chunked masks: the mask of an image larger than `output.chunk_size` on either side is cut into
chunk_size x chunk_size chunks (smaller at the right and bottom edges), one masks row each:
`chunk_y`, `chunk_x`, `chunk_height`, `chunk_width` and the chunk's PNG, so that no Parquet cell
holds a gigapixel PNG. Smaller images have one row with the chunk fields 0, 0, height, width: one
schema for both. `height` and `width` are the full image's size in every row. All chunks of an
image travel in one Prediction and are written to the same part, so an image is committed whole or
not at all. `ChunkedMaskWriter` PNG-encodes chunks from row bands as they arrive (a streamed image
never exists whole, not even as labels); `assemble_mask` puts a mask back together from its rows,
`decode_png` reads one cell. Reading the rows (committed parts only, an image's latest result) is the
run store's: pipeline.results.runstore's `RunStore.mask_of` and `read_mask`.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.results.run_tables import CHUNK_FIELDS
from pipeline.rows import MaskChunk

# --------------------------------------------------------------------------- chunked masks


def chunk_boxes(height: int, width: int, chunk_size: int | None) -> list[tuple[int, int, int, int]]:
    """(y, x, height, width) of each chunk, row-major. An image is cut when either side is over
    chunk_size; then both axes are cut at multiples of chunk_size."""
    if not chunk_size or (height <= chunk_size and width <= chunk_size):
        return [(0, 0, height, width)]
    return [
        (y, x, min(chunk_size, height - y), min(chunk_size, width - x))
        for y in range(0, height, chunk_size)
        for x in range(0, width, chunk_size)
    ]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


class PngRows:
    """A grayscale PNG (8- or 16-bit) encoded band of rows by band of rows.

    Only the compressed bytes are kept, never the image: a chunk of a streamed mask is encoded as
    the stitcher finishes its rows. Two PNG row filters, picked by what deflates best (measured on
    4096 x 4096 maps): label maps use Up (each byte minus the byte above: the inside of a region
    becomes zeros) with run-length deflate, about 4x smaller than Pillow's PNG of the same map;
    probabilities use Sub (minus the pixel to the left: slopes become runs of small values).
    Deflate level 1: masks compress well already, and level 1 is fast.
    """

    SIGNATURE = b"\x89PNG\r\n\x1a\n"
    FILTERS: ClassVar[dict[str, int]] = {"up": 2, "sub": 1}

    def __init__(self, height: int, width: int, bit_depth: int = 8, row_filter: str = "up") -> None:
        if bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
        if row_filter not in self.FILTERS:
            raise ValueError(f"row_filter must be one of {sorted(self.FILTERS)}, got {row_filter!r}")
        self.height, self.width, self.bit_depth, self.row_filter = height, width, bit_depth, row_filter
        self.rows_written = 0
        strategy = zlib.Z_RLE if row_filter == "up" else zlib.Z_DEFAULT_STRATEGY
        self._deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, strategy)
        self._compressed: list[bytes] = []
        self._previous_row = np.zeros(width * bit_depth // 8, np.uint8)  # PNG's row above the first row

    def add(self, rows: np.ndarray) -> None:
        """rows: r x width integers that fit the bit depth."""
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows must be r x {self.width}, got {rows.shape}")
        if self.rows_written + rows.shape[0] > self.height:
            raise ValueError(f"more than {self.height} rows")
        if rows.shape[0] == 0:
            return
        if self.bit_depth == 8:
            data, bpp = np.ascontiguousarray(rows, dtype=np.uint8), 1
        else:  # PNG samples are big-endian
            data, bpp = np.ascontiguousarray(rows, dtype=">u2").view(np.uint8), 2
        filtered = np.empty((data.shape[0], data.shape[1] + 1), np.uint8)
        filtered[:, 0] = self.FILTERS[self.row_filter]
        # uint8 arithmetic wraps modulo 256, as PNG's filters want
        if self.row_filter == "up":
            np.subtract(data[:1], self._previous_row[None], out=filtered[:1, 1:])
            np.subtract(data[1:], data[:-1], out=filtered[1:, 1:])
            self._previous_row = data[-1].copy()
        else:
            filtered[:, 1 : 1 + bpp] = data[:, :bpp]
            np.subtract(data[:, bpp:], data[:, :-bpp], out=filtered[:, 1 + bpp :])
        self._compressed.append(self._deflate.compress(filtered.data))
        self.rows_written += rows.shape[0]

    def finish(self) -> bytes:
        if self.rows_written != self.height:
            raise ValueError(f"{self.rows_written} of {self.height} rows written")
        header = struct.pack(">IIBBBBB", self.width, self.height, self.bit_depth, 0, 0, 0, 0)  # grayscale
        idat = b"".join([*self._compressed, self._deflate.flush()])
        self._compressed = []
        return self.SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def quantize_probability(probability: np.ndarray) -> np.ndarray:
    """Probability in [0, 1] -> uint8 round(255 p), as the probability and confidence columns store it."""
    scaled = np.multiply(probability, np.float32(255.0), dtype=np.float32)  # one temporary, worked in place
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


class ChunkedMaskWriter:
    """Cuts one image's mask into chunks (see `chunk_boxes`) and PNG-encodes them as rows arrive.

    `add(y0, labels, probability)` takes bands of rows top to bottom, each the full image width (an
    in-memory image is one band; a streamed image arrives as the stitcher's bands). `binary`: each
    band has probability rows in [0, 1] (a binary task's foreground probability, or a multi-class
    run's confidence), encoded as 8-bit round(255 p) chunks beside the mask's. A row of chunks
    is finished, encoded and handed out as soon as its last row has arrived; memory is the
    compressed PNGs plus one deflate state per chunk column.
    """

    def __init__(self, height: int, width: int, chunk_size: int | None, num_classes: int, binary: bool) -> None:
        self.height, self.width, self.binary = height, width, binary
        self.bit_depth = 8 if num_classes <= 256 else 16
        boxes = chunk_boxes(height, width, chunk_size)
        self.ys = sorted({box[0] for box in boxes})  # chunk rows
        self.xs = sorted({box[1] for box in boxes})  # chunk columns
        self.chunks: list[MaskChunk] = []
        self._next_row = 0
        self._row_writers: list[tuple[PngRows, PngRows | None]] = []

    def _open_chunk_row(self, index: int) -> None:
        y = self.ys[index]
        rows = (self.ys[index + 1] if index + 1 < len(self.ys) else self.height) - y
        self._row_writers = []
        for j, x in enumerate(self.xs):
            cols = (self.xs[j + 1] if j + 1 < len(self.xs) else self.width) - x
            self._row_writers.append((PngRows(rows, cols, self.bit_depth, "up"), PngRows(rows, cols, 8, "sub") if self.binary else None))

    def add(self, y0: int, labels: np.ndarray, probability: np.ndarray | None = None) -> list[MaskChunk]:
        """Rows y0 .. y0 + len(labels) - 1; returns the chunks they finished."""
        if y0 != self._next_row:
            raise ValueError(f"rows must arrive in order: expected row {self._next_row}, got {y0}")
        if labels.ndim != 2 or labels.shape[1] != self.width or y0 + labels.shape[0] > self.height:
            raise ValueError(f"labels of {labels.shape} do not fit rows {y0}.. of a {self.height} x {self.width} mask")
        if self.binary and probability is None:
            raise ValueError("binary masks need the probability rows")
        quantized = quantize_probability(probability) if self.binary else None
        finished: list[MaskChunk] = []
        start = 0
        while start < labels.shape[0]:
            row = y0 + start
            index = int(np.searchsorted(self.ys, row, side="right")) - 1  # the chunk row holding `row`
            if row == self.ys[index]:
                self._open_chunk_row(index)
            end_of_chunk_row = self.ys[index + 1] if index + 1 < len(self.ys) else self.height
            stop = min(labels.shape[0], end_of_chunk_row - y0)
            bounds = [*self.xs, self.width]
            for j, (mask_png, probability_png) in enumerate(self._row_writers):
                cols = slice(bounds[j], bounds[j + 1])
                mask_png.add(labels[start:stop, cols])
                if probability_png is not None:
                    probability_png.add(quantized[start:stop, cols])
            start = stop
            if y0 + stop == end_of_chunk_row:
                for j, (mask_png, probability_png) in enumerate(self._row_writers):
                    finished.append(
                        MaskChunk(
                            self.ys[index],
                            bounds[j],
                            mask_png.height,
                            mask_png.width,
                            mask_png.finish(),
                            probability_png.finish() if probability_png is not None else None,
                        )
                    )
                self._row_writers = []
        self._next_row = y0 + labels.shape[0]
        self.chunks.extend(finished)
        return finished

    def finish(self) -> list[MaskChunk]:
        """All chunks, row-major; every row of the image must have been added."""
        if self._next_row != self.height:
            raise ValueError(f"{self._next_row} of {self.height} mask rows were added")
        return self.chunks


def encode_chunks(labels: np.ndarray, probability: np.ndarray | None, chunk_size: int | None, num_classes: int) -> list[MaskChunk]:
    """An in-memory mask (and probability) as chunks."""
    writer = ChunkedMaskWriter(labels.shape[0], labels.shape[1], chunk_size, num_classes, probability is not None)
    writer.add(0, labels, probability)
    return writer.finish()


def decode_png(data: bytes) -> np.ndarray:
    """One mask or probability cell back to an H x W array (uint8, or uint16 for 16-bit masks)."""
    array = np.asarray(Image.open(io.BytesIO(data)))
    return array.astype(np.uint16) if array.dtype.itemsize > 1 and array.dtype != np.uint16 else array


def assemble_mask(rows: pa.Table | Iterable[dict], column: str = "mask") -> np.ndarray:
    """The full mask (column "mask": labels, uint8 or uint16), quantized probability (column
    "probability": uint8 round(255 p)) or confidence (column "confidence", the same encoding) of ONE
    image from its masks rows, chunked or not."""
    if isinstance(rows, pa.Table):
        rows = rows.select(["image_id", "height", "width", *CHUNK_FIELDS, column]).to_pylist()
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to assemble")
    ids = {r["image_id"] for r in rows}
    if len(ids) != 1:
        raise ValueError(f"rows of several images: {sorted(ids)[:3]}")
    height, width = int(rows[0]["height"]), int(rows[0]["width"])
    out: np.ndarray | None = None
    covered = 0
    seen = set()
    for r in rows:
        box = tuple(int(r.get(k, v)) for k, v in zip(CHUNK_FIELDS, (0, 0, height, width)))
        if box in seen:
            raise ValueError(f"{r['image_id']}: chunk {box} appears twice")
        seen.add(box)
        y, x, h, w = box
        chunk = decode_png(r[column])
        if chunk.shape != (h, w):
            raise ValueError(f"{r['image_id']}: chunk {box} holds a {chunk.shape} PNG")
        if out is None:
            out = np.zeros((height, width), chunk.dtype)
        out[y : y + h, x : x + w] = chunk
        covered += h * w
    if covered != height * width:
        raise ValueError(f"{rows[0]['image_id']}: chunks cover {covered} of {height * width} pixels")
    assert out is not None
    return out
