"""Huge images: TIFFs read window by window, never held whole.

Satellite scenes, slides and scans come as tiled or striped TIFFs far larger than memory. Such an
image is never decoded in one piece:

  read stage    `probe_stream` reads the TIFF's header only (one small ranged read). A tiled or
                striped TIFF with more than `input.stream_above_pixels` pixels becomes a
                `StreamSource` (uri, label uri, height, width) instead of bytes.
  decode stage  `pipeline.io.decode.decode_sample` turns it into a DecodedImage that says "stream
                this one" (its `stream`), with no pixels.
  predictor     `pipeline.predict.predictor` opens the file through `TiffWindows` (fsspec, so s3://,
                gs://, ... work as local paths do), hands `TiffWindows.rgb` to
                `pipeline.predict.tiling.segment_streaming` as its window reader, and feeds the bands of
                finished rows to the same mask writer and class areas as every other image, with
                the label's rows read the same way (`TiffWindows.labels`).

Bounds, against decompression bombs: every image is bounded by its header before any pixel is
read. An image of more than `input.max_pixels` pixels is admitted only when it is streamed (a tiled
or striped TIFF above `input.stream_above_pixels` that `TiffWindows` can read window by window) and
has at most `input.max_stream_pixels` pixels; `probe_stream` makes any other an error naming both
limits, so a header that claims 60000 x 60000 pixels costs one header read, not a worker's memory
and minutes of windows. A streamed image's label must have the image's size, which bounds it the
same way, and is checked before anything else of the label. A header whose tile (or strip) table
cannot hold the size it claims (another number of entries than that size needs, segments that end
past the end of the file) is an error as well, found from the table alone without reading a
segment. Images decoded whole are bounded by `input.max_pixels` in `pipeline.io.decode`, on their
header too.

What is held, and why it is bounded by the window height and the image width, never the height:
- TiffWindows decodes only the tiles (or strips) that a window touches, and keeps decoded segments
  in an LRU cache of about (window height + 2 segment heights) x image width pixels, so that the
  windows of one window row, which overlap, decode each tile once.
- The streaming stitcher holds (classes + 1) x window height x image width float32 (its docstring).
- A batch of windows, their scores, one band of finished rows (labels, probabilities, label rows).
- The mask as compressed chunk PNGs (the output itself), one deflate state per chunk column.
For a 12000 x 12000 RGB image and 512-pixel windows that is tens of MB where the decoded image
alone is 432 MB and its float32 scores 576 MB per class (see tests/test_predictor.py).

Resolution: the stitcher works at the image's full resolution (each window's scores are resized
to the window before blending; see pipeline.predict.tiling), so the labels of a streamed image are the
ones an in-memory image would get from the same windows, bit for bit, and the band's cost is paid
at full resolution: that is what the band size above counts.

What can be streamed: the first page of a 2-D TIFF, tiled or striped, planar contiguous or
separate, 8- or 16-bit unsigned samples (images: gray, gray + alpha, RGB, RGBA; 16-bit is scaled
to 0..255 as `decode_image` does; labels: one channel, integer), compressed with what tifffile
decodes without imagecodecs (none, deflate/zlib with or without predictor, LZMA). JPEG, LZW and
PackBits need the `imagecodecs` package. A TIFF is read as stored: where `input.exif_transpose` turns
images upright, a TIFF (or label) whose Orientation tag is not top-left is not streamed, as the whole
decode would turn it and windows do not. A compressed strip or tile larger than
MAX_SEGMENT_BYTES decoded cannot be read in parts (an uncompressed one can: rows are read
directly). A TIFF that cannot be streamed is decoded whole like any other image if it is within
`input.max_pixels`, and is an error row naming the reason otherwise. Images in tar shards and
Parquet tables are bytes already, and are decoded whole.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np

from pipeline.io.storage import RetryingFile, StoreStats, open_fs
from pipeline.rows import StreamSource

TIFF_SUFFIXES = (".tif", ".tiff")
PROBE_BLOCK_BYTES = 64 * 1024  # fsspec read-ahead for the header probe: one small ranged read
READ_BLOCK_BYTES = 4 * 2**20  # fsspec read-ahead while reading tiles
MAX_SEGMENT_BYTES = 64 * 2**20  # a compressed tile or strip decoding to more than this is not streamed
DIRECT_BLOCK_BYTES = 2**20  # uncompressed strips are read in blocks of rows of about this size

IMAGE_PHOTOMETRIC = {0: "min-is-white", 1: "min-is-black", 2: "rgb"}
LABEL_PHOTOMETRIC = {0: "min-is-white", 1: "min-is-black", 3: "palette"}  # the stored value is the class


class StreamError(ValueError):
    """A huge image (or its label) that cannot be read window by window; the message says why."""


def is_tiff_name(uri: str) -> bool:
    return uri.lower().endswith(TIFF_SUFFIXES)


# --------------------------------------------------------------------------- reading windows


class TiffWindows:
    """Reads regions of the first page of a tiled or striped TIFF, decoding only what they touch.

    `read(y0, x0, h, w)` returns h x w x samples in the file's sample type. Decoded tiles (or strips)
    stay in an LRU cache of `cache_rows` rows of the image (plus two segment rows), so that
    overlapping reads that go left to right, top to bottom decode each segment about once.
    `problem` is "" for a TIFF this class can read, else the reason it cannot (the constructor
    does not raise for it, so that a probe can report it); `damage` is "" unless that reason is a
    header whose segment table does not fit the size it claims.
    """

    def __init__(self, file: Any, uri: str, *, role: str = "image", cache_rows: int = 0) -> None:
        import tifffile  # the `tiff` extra: only needed once a TIFF is streamed

        self.uri = uri
        self._file = file
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self.cache_bytes = 0
        self.segments_decoded = 0  # for tests and benchmarks: how often a segment was decoded
        try:
            self._tiff = tifffile.TiffFile(file)
        except Exception as exc:
            raise StreamError(f"{uri}: not a readable TIFF: {type(exc).__name__}: {exc}") from None
        page = self._tiff.pages.first
        self._page = page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.samples = int(page.samplesperpixel)
        self.separate = page.planarconfig == 2 and self.samples > 1
        self.tiled = bool(page.is_tiled)
        self.photometric = int(page.photometric)
        self.orientation = int(page.tags.valueof(274, 1) or 1)  # Orientation: 1 is top-left, as stored
        self.dtype = np.dtype(page.dtype).newbyteorder("=") if page.dtype is not None else None
        self.problem = self._check(role)
        # `damage`: the header does not hold together; it is also a `problem`, so nothing reads it
        self.damage = "" if self.problem else self._damage()
        self.problem = self.problem or self.damage
        if self.problem:
            return
        contig_samples = 1 if self.separate else self.samples
        self._file_dtype = np.dtype(page.dtype).newbyteorder(self._tiff.byteorder)
        self._direct = page.compression == 1 and not self.tiled  # uncompressed strips: read rows directly
        row_bytes = self.width * contig_samples * self.dtype.itemsize
        if self.tiled:
            self.segment_rows, self.segment_cols = int(page.tilelength), int(page.tilewidth)
        elif self._direct:
            self._strip_rows = int(min(page.rowsperstrip, self.height))
            self.segment_rows, self.segment_cols = max(1, DIRECT_BLOCK_BYTES // row_bytes), self.width
        else:
            self.segment_rows, self.segment_cols = int(min(page.rowsperstrip, self.height)), self.width
        self._grid = (math.ceil(self.height / self.segment_rows), math.ceil(self.width / self.segment_cols))
        self._decode = page.decode
        self.cache_bytes = (cache_rows + 2 * self.segment_rows) * self.width * self.samples * self.dtype.itemsize

    @classmethod
    def open(
        cls,
        uri: str,
        storage_options: dict | None = None,
        *,
        role: str = "image",
        cache_rows: int = 0,
        block_size: int = READ_BLOCK_BYTES,
        stats: StoreStats | None = None,
    ) -> TiffWindows:
        fs, path = open_fs(uri, storage_options)
        file = RetryingFile(fs, path, uri=uri, stats=stats, block_size=block_size)
        try:
            return cls(file, uri, role=role, cache_rows=cache_rows)
        except BaseException:
            file.close()
            raise

    def close(self) -> None:
        self._cache.clear()
        self._tiff.close()
        self._file.close()

    def __enter__(self) -> TiffWindows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what can be read

    def _check(self, role: str) -> str:
        page = self._page
        if page.imagedepth > 1 or page.tiledepth > 1:
            return "a 3-D (volume) TIFF"
        if self.dtype is None or self.dtype.kind not in "ui" or self.dtype.itemsize > (2 if role == "image" else 4):
            kinds = "8- or 16-bit unsigned" if role == "image" else "integer (up to 32-bit)"
            return f"{page.bitspersample}-bit samples of kind {page.sampleformat!s} (streamed {role}s need {kinds} samples)"
        if role == "image":
            if self.photometric not in IMAGE_PHOTOMETRIC or self.dtype.kind != "u":
                return f"photometric {page.photometric!s} (streamed images are gray, gray + alpha, RGB or RGBA)"
            if self.photometric == 2 and self.samples < 3:
                return f"RGB with {self.samples} samples"
        else:
            if self.samples != 1 or self.photometric not in LABEL_PHOTOMETRIC:
                return f"{self.samples} samples, photometric {page.photometric!s} (a label must be one channel of class indices)"
        if page.compression != 1:
            from tifffile import TIFF

            try:
                TIFF.DECOMPRESSORS[page.compression]
                if page.predictor != 1:
                    TIFF.UNPREDICTORS[page.predictor]
            except Exception as exc:  # tifffile says which package is missing
                return f"compression {page.compression!s}: {str(exc).strip(chr(34))}"
            contig_samples = 1 if self.separate else self.samples
            rows, cols = (page.tilelength, page.tilewidth) if self.tiled else (min(page.rowsperstrip, page.imagelength), page.imagewidth)
            segment_bytes = rows * cols * contig_samples * self.dtype.itemsize
            if segment_bytes > MAX_SEGMENT_BYTES:
                kind = "tiles" if self.tiled else "strips"
                return f"compressed {kind} of {cols} x {rows} pixels ({segment_bytes / 2**20:.0f} MB each decoded) cannot be read in parts; re-save it tiled (e.g. 512 x 512)"
        return ""

    def _damage(self) -> str:
        """Why the segment table cannot hold the image the header claims ("" if it can): from the table
        alone, no segment read."""
        page = self._page
        kind = "tile" if self.tiled else "strip"
        if self.tiled:
            rows, cols = int(page.tilelength), int(page.tilewidth)
        else:
            rows, cols = int(min(page.rowsperstrip, self.height)), self.width
        if rows < 1 or cols < 1 or self.height < 1 or self.width < 1:
            return f"a header that claims {self.width} x {self.height} pixels in {kind}s of {cols} x {rows}"
        down, across = math.ceil(self.height / rows), math.ceil(self.width / cols)
        expected = down * across * (self.samples if self.separate else 1)
        offsets = np.asarray(page.dataoffsets, np.int64).ravel()
        counts = np.asarray(page.databytecounts, np.int64).ravel()
        if len(offsets) != expected or len(counts) != expected:
            return (
                f"a header that claims {self.width} x {self.height} pixels, {expected} {kind}s of {cols} x {rows}, "
                f"but lists {len(offsets)} {kind} offsets and {len(counts)} byte counts"
            )
        size = int(self._tiff.filehandle.size)
        if page.compression == 1:
            # uncompressed segments are read by the size their pixels take, whatever their byte count
            contig_samples = 1 if self.separate else self.samples
            need = np.full(expected, rows * cols * contig_samples * self.dtype.itemsize, np.int64)
            if not self.tiled:  # the last strip of each plane holds the rows left
                need[down - 1 :: down] = (self.height - (down - 1) * rows) * cols * contig_samples * self.dtype.itemsize
            # tifffile fills an empty tile (byte count 0); the strips are all read from their offsets
            present = counts > 0 if self.tiled else np.ones(expected, bool)
            short = np.flatnonzero(present & (counts < need))
            if short.size:
                i = int(short[0])
                return f"{kind} {i} of {expected} holds {counts[i]} bytes where its uncompressed pixels take {need[i]}"
            ends = offsets + need
        else:
            present = counts > 0
            ends = offsets + counts
        past = np.flatnonzero(present & (ends > size))
        if past.size:
            i = int(past[0])
            return (
                f"a header that claims {self.width} x {self.height} pixels but {kind} {i} of {expected} ends at byte {ends[i]}, "
                f"past the end of the file ({size} bytes)"
            )
        return ""

    # ---- reading

    def read(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """The region rows y0..y0+height-1, columns x0..x0+width-1: height x width x samples."""
        if self.problem:
            raise StreamError(f"{self.uri}: cannot be read window by window: {self.problem}")
        if y0 < 0 or x0 < 0 or height < 1 or width < 1 or y0 + height > self.height or x0 + width > self.width:
            raise ValueError(f"region ({y0}, {x0}) + ({height}, {width}) is not inside the {self.height} x {self.width} image")
        out = np.empty((height, width, self.samples), self.dtype)
        rows, cols = self.segment_rows, self.segment_cols
        for plane in range(self.samples) if self.separate else (None,):
            for sy in range(y0 // rows, (y0 + height - 1) // rows + 1):
                for sx in range(x0 // cols, (x0 + width - 1) // cols + 1):
                    segment = self._segment(plane or 0, sy, sx)
                    top, left = sy * rows, sx * cols
                    y_from, y_to = max(y0, top), min(y0 + height, top + segment.shape[0])
                    x_from, x_to = max(x0, left), min(x0 + width, left + segment.shape[1])
                    part = segment[y_from - top : y_to - top, x_from - left : x_to - left]
                    target = out[y_from - y0 : y_to - y0, x_from - x0 : x_to - x0]
                    if plane is None:
                        target[...] = part
                    else:
                        target[..., plane] = part[..., 0]
        return out

    def rgb(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """The region as height x width x 3 uint8 RGB: a `pipeline.predict.tiling.ReadWindow`."""
        region = self.read(y0, x0, height, width)
        if self.dtype.itemsize == 2:  # full range of the type to 0..255, as decode_image does
            region = np.clip(region.astype(np.float32) * np.float32(255.0 / 65535.0), 0, 255).round().astype(np.uint8)
        if self.photometric == 0:  # min-is-white
            region = 255 - region
        if self.samples < 3:  # gray (+ alpha)
            return np.repeat(region[..., :1], 3, axis=2)
        return np.ascontiguousarray(region[..., :3])  # RGB (+ alpha)

    def labels(self, y0: int, rows: int) -> np.ndarray:
        """Full-width rows y0..y0+rows-1 of a one-channel TIFF as a rows x width class map."""
        return self.read(y0, 0, rows, self.width)[..., 0]

    def _segment(self, plane: int, sy: int, sx: int) -> np.ndarray:
        """One decoded tile or strip (or block of uncompressed rows): rows x cols x contig samples."""
        key = (plane, sy * self._grid[1] + sx)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        segment = self._read_rows(plane, sy) if self._direct else self._decode_segment(plane, sy, sx)
        self.segments_decoded += 1
        self._cache[key] = segment
        self._cached_bytes += segment.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
        return segment

    def _decode_segment(self, plane: int, sy: int, sx: int) -> np.ndarray:
        page = self._page
        index = plane * self._grid[0] * self._grid[1] + sy * self._grid[1] + sx
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        data = None
        if count:
            handle = self._tiff.filehandle
            handle.seek(offset)
            data = handle.read(count)
        kwargs: dict[str, Any] = {"_fullsize": self.tiled}
        if page.compression in (6, 7, 34892, 33007):  # JPEG flavours (need imagecodecs)
            kwargs.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        decoded, _, shape = self._decode(data, index, **kwargs)
        if decoded is None:  # an empty segment: tifffile's fill value
            decoded = np.zeros(shape, self.dtype)
        return np.asarray(decoded).reshape(shape[1], shape[2], shape[3]).astype(self.dtype, copy=False)

    def _read_rows(self, plane: int, block: int) -> np.ndarray:
        """Rows of uncompressed strips, read straight from their byte offsets (any strip size)."""
        page = self._page
        contig_samples = 1 if self.separate else self.samples
        row_bytes = self.width * contig_samples * self._file_dtype.itemsize
        first = block * self.segment_rows
        last = min(first + self.segment_rows, self.height)
        strips_per_plane = math.ceil(self.height / self._strip_rows)
        parts = []
        handle = self._tiff.filehandle
        row = first
        while row < last:
            strip = row // self._strip_rows
            stop = min(last, (strip + 1) * self._strip_rows)
            handle.seek(int(page.dataoffsets[plane * strips_per_plane + strip]) + (row - strip * self._strip_rows) * row_bytes)
            parts.append(np.frombuffer(handle.read((stop - row) * row_bytes), self._file_dtype))
            row = stop
        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return rows.reshape(last - first, self.width, contig_samples).astype(self.dtype)


# --------------------------------------------------------------------------- the read stage


def probe_stream(uri: str, label_uri: str | None, cfg: Any, stats: StoreStats | None = None) -> StreamSource | None:
    """Decide from the header alone whether an image file is to be streamed, and bound it.

    cfg: the job's InputConfig (stream_above_pixels, max_pixels, max_stream_pixels, exif_transpose,
    storage_options). Returns None for an image to read and decode whole as usual (where
    `pipeline.io.decode` holds it to max_pixels): not a TIFF, not larger than stream_above_pixels,
    streaming off, or a TIFF within max_pixels that cannot be streamed or is over max_stream_pixels.
    Raises StreamError, before any pixel is read, for one over max_pixels that is not streamed
    (cannot be, or over max_stream_pixels), for a header whose segment table cannot hold the size it
    claims, and for a streamed image whose label cannot be read alongside it (not a TIFF, another
    size, not one channel).
    """
    if not cfg.stream_above_pixels or not is_tiff_name(uri):
        return None
    try:
        import tifffile  # noqa: F401
    except ImportError:  # without the `tiff` extra every image is decoded whole, as before
        return None
    with TiffWindows.open(uri, cfg.storage_options, block_size=PROBE_BLOCK_BYTES, stats=stats) as image:
        height, width, problem, damage, orientation = image.height, image.width, image.problem, image.damage, image.orientation
    pixels = height * width
    if pixels <= cfg.stream_above_pixels:
        return None
    claim = f"image of {width} x {height} = {pixels} pixels"
    if pixels > cfg.max_stream_pixels:
        if pixels <= cfg.max_pixels:
            return None
        raise StreamError(
            f"{claim} is over the limits of {cfg.max_pixels} pixels for an image decoded whole (input.max_pixels) "
            f"and {cfg.max_stream_pixels} for a TIFF read window by window (input.max_stream_pixels)"
        )
    if damage:
        raise StreamError(f"{uri} cannot be read: {damage}")
    if not problem and cfg.exif_transpose and orientation != 1:
        problem = _orientation_problem(orientation)
    if problem:
        if pixels <= cfg.max_pixels:
            return None
        raise StreamError(
            f"{claim} is over the limit of {cfg.max_pixels} (input.max_pixels) and cannot be read window by window, "
            f"which admits up to {cfg.max_stream_pixels} pixels (input.max_stream_pixels): {problem}"
        )
    if label_uri is not None:
        if not is_tiff_name(label_uri):
            raise StreamError(f"the image is streamed ({width} x {height}), so its label must be a tiled or striped TIFF, not {label_uri}")
        with TiffWindows.open(label_uri, cfg.storage_options, role="label", block_size=PROBE_BLOCK_BYTES, stats=stats) as label:
            # the size first: a label of the image's size is within the image's bounds
            if (label.height, label.width) != (height, width):
                raise StreamError(f"label is {label.width} x {label.height} but the image is {width} x {height}")
            if label.damage:
                raise StreamError(f"label {label_uri} cannot be read: {label.damage}")
            if label.problem:
                raise StreamError(f"label {label_uri} cannot be read window by window: {label.problem}")
            if cfg.exif_transpose and label.orientation != 1:
                raise StreamError(f"label {label_uri} cannot be read window by window: {_orientation_problem(label.orientation)}")
    return StreamSource(uri, label_uri, height, width)


def _orientation_problem(orientation: int) -> str:
    return (
        f"its Orientation tag ({orientation}) asks to turn it, which windows read as stored do not "
        f"(input.exif_transpose: false takes every image as stored)"
    )
