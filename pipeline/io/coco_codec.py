"""COCO's encodings of masks, in numpy: the formats the object tasks read and write.

  panoptic ids   `rgb_to_id`, `id_to_rgb`: a COCO panoptic PNG's colour is its segment id
                 (panopticapi's rgb2id / id2rgb); `VOID`, `OFFSET`
  RLE            `encode_rle`, `decode_rle`, `rle_area`, `rle_bbox`: pycocotools' run-length encoding
  segmentations  `annotation_mask` (RLE or polygons), `polygon_mask` (pycocotools' rleFrPoly, bit for bit)

A leaf: numpy only, no I/O. The metrics (pipeline.metrics.panoptic), the label files
(pipeline.metrics.coco_labels), the object tasks (pipeline.predict.objects, pipeline.predict.predictor), the decoder and
export share it.
"""

from __future__ import annotations

import numpy as np

Size = tuple[int, int]  # (height, width)

# ---------------------------------------------------------------------------------------------
# COCO panoptic ids: a PNG whose colour is the segment id
# ---------------------------------------------------------------------------------------------


VOID = 0  # the segment id of unlabeled pixels, in ground truth and prediction alike
OFFSET = 256**3  # ids fit in three 8-bit channels; gt_id * OFFSET + pred_id names a pixel pair


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG decoded to H x W x 3: R + 256 G + 256^2 B (panopticapi's rgb2id)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an H x W x 3 colour image, got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """The inverse of `rgb_to_id` (panopticapi's id2rgb): uint8 H x W x 3."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise ValueError(f"segment ids must lie in [0, {OFFSET}), got [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# COCO run-length encoding (pycocotools' format, in numpy)
# ---------------------------------------------------------------------------------------------
#
# A mask is read in column-major (Fortran) order; counts alternate runs of 0s and 1s, starting with
# 0s (a count of 0 when the first pixel is set). The compressed string writes each count (from the
# fourth on, as the difference to the count two before) in 5-bit groups, low first, each group as
# chr(48 + bits), bit 0x20 = "more groups follow", the last group's bit 0x10 = the sign.

_GROUPS = np.arange(7)  # counts are uint32, their differences 33-bit signed: 7 groups of 5 bits


def _counts_to_string(counts: np.ndarray) -> str:
    x = counts.astype(np.int64)
    x[3:] -= counts[1:-2].astype(np.int64)
    chunk = (x[:, None] >> (5 * _GROUPS)) & 0x1F
    rest = x[:, None] >> (5 * (_GROUPS + 1))
    # a number ends at its first group after which only its sign remains
    last = np.where(chunk & 0x10, rest == -1, rest == 0).argmax(1)
    used = last[:, None] >= _GROUPS
    chars = chunk + 48 + 0x20 * (last[:, None] > _GROUPS)
    return chars[used].astype(np.uint8).tobytes().decode("ascii")


def _string_to_counts(text: str | bytes) -> np.ndarray:
    chars = np.frombuffer(text.encode("ascii") if isinstance(text, str) else bytes(text), np.uint8).astype(np.int64) - 48
    if not len(chars):
        return np.zeros(0, np.int64)
    ends = (chars & 0x20) == 0
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    group = np.arange(len(chars)) - np.repeat(starts, np.diff(np.append(starts, len(chars))))
    x = np.add.reduceat((chars & 0x1F) << (5 * group), starts)
    groups = group[ends] + 1
    x -= np.where(chars[ends] & 0x10, np.int64(1) << (5 * groups), 0)  # sign-extend negatives
    # undo the differences: counts[i] = x[i] + counts[i - 2] from i = 3 on
    counts = x.copy()
    counts[1::2] = np.cumsum(x[1::2])
    counts[2::2] = np.cumsum(x[2::2])
    return counts


def _rle_counts(rle: dict) -> np.ndarray:
    """The counts of a compressed (str or bytes) or uncompressed (list of ints) COCO RLE."""
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        return _string_to_counts(counts)
    return np.asarray(counts, np.int64)


def encode_rle(mask: np.ndarray, size: Size | None = None, offset: Size = (0, 0)) -> dict:
    """A bool (or 0/1) H x W mask -> {"size": [H, W], "counts": str}: pycocotools' `mask.encode`
    (with counts as str, not bytes). With `size`, the mask is a crop placed at `offset` (y, x) in an
    all-zero image of that size, encoded without building the image."""
    mask = np.asarray(mask).astype(bool, copy=False)
    h, w = mask.shape
    height, width = (h, w) if size is None else (int(size[0]), int(size[1]))
    oy, ox = int(offset[0]), int(offset[1])
    if oy < 0 or ox < 0 or oy + h > height or ox + w > width:
        raise ValueError(f"a {h} x {w} mask at {(oy, ox)} does not fit in {height} x {width}")
    # runs of 1s column by column: a row of 0s above and below keeps runs from crossing columns
    padded = np.zeros((w, h + 2), np.int8)
    padded[:, 1:-1] = mask.T
    edges = np.diff(padded, axis=1)
    start_col, start_row = np.nonzero(edges == 1)
    end_col, end_row = np.nonzero(edges == -1)  # row after the run's last
    # image-wide column-major positions; a run reaching a full-height column's end runs on into the next
    starts = (ox + start_col) * height + oy + start_row
    ends = (ox + end_col) * height + oy + end_row
    joined = np.flatnonzero(ends[:-1] == starts[1:])
    starts, ends = np.delete(starts, joined + 1), np.delete(ends, joined)
    counts = np.diff(np.concatenate([[0], np.stack([starts, ends], 1).ravel(), [height * width]]))
    if len(counts) > 1 and counts[-1] == 0:  # the mask ends in a run of 1s: no empty run of 0s after it
        counts = counts[:-1]
    return {"size": [height, width], "counts": _counts_to_string(counts)}


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed or not) -> H x W bool mask."""
    height, width = rle["size"]
    counts = _rle_counts(rle)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(width, height).T


def decode_rle_box(rle: dict, box: list[int] | tuple[int, ...]) -> np.ndarray:
    """The part of a COCO RLE's mask inside `box` (x, y, w, h) as an h x w bool array, without decoding
    the whole image (an instance of a huge raster or slide is a small box of it)."""
    height = int(rle["size"][0])
    x, y, w, h = (int(v) for v in box)
    out = np.zeros((h, w), bool)
    bounds = np.cumsum(_rle_counts(rle))
    ones = np.arange(1, len(bounds), 2)  # runs of 1s: [bounds[i - 1], bounds[i]) in column-major order
    for start, end in zip(bounds[ones - 1].tolist(), bounds[ones].tolist()):
        while start < end:  # a run may go on past its column's last row into the next column
            col, row = divmod(start, height)
            stop = min(end, (col + 1) * height)
            if x <= col < x + w:
                top, bottom = max(row, y), min(row + stop - start, y + h)
                if top < bottom:
                    out[top - y : bottom - y, col - x] = True
            start = stop
    return out


def rle_area(rle: dict) -> int:
    """The number of set pixels (pycocotools' `mask.area`)."""
    return int(_rle_counts(rle)[1::2].sum())


def rle_bbox(rle: dict) -> list[int]:
    """The tight box x, y, w, h (pycocotools' `mask.toBbox`; 0, 0, 0, 0 when empty), without decoding."""
    height = int(rle["size"][0])
    counts = _rle_counts(rle)
    bounds = np.cumsum(counts)
    ones = np.arange(1, len(counts), 2)  # runs of 1s: [bounds[i - 1], bounds[i])
    starts, ends = bounds[ones - 1], bounds[ones] - 1  # first and last pixel of each run
    starts, ends = starts[ends >= starts], ends[ends >= starts]
    if not len(starts):
        return [0, 0, 0, 0]
    x0, x1 = int(starts.min() // height), int(ends.max() // height)
    if (starts // height != ends // height).any():  # a run over a column's end covers its last row and the next's first
        y0, y1 = 0, height - 1
    else:
        y0, y1 = int((starts % height).min()), int((ends % height).max())
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


# ---------------------------------------------------------------------------------------------
# COCO segmentations (RLE or polygons) as masks, as pycocotools rasterises them
# ---------------------------------------------------------------------------------------------


def annotation_mask(segmentation: dict | list, size: tuple[int, int]) -> np.ndarray:
    """A COCO segmentation as a boolean mask, as pycocotools' COCOeval rasterises it (`annToRLE`):
    RLE (compressed or not) decoded exactly, polygons each by `polygon_mask` (pycocotools'
    `frPyObjects`, bit for bit), several polygons of one object united (`merge`). An empty list is
    an empty mask (pycocotools fails on it), a list whose first polygon has 4 values polygons too
    (pycocotools takes it for a box and fails)."""
    if isinstance(segmentation, dict):
        return decode_rle(segmentation).astype(bool)
    mask = np.zeros(size, dtype=bool)
    for polygon in segmentation:
        mask |= polygon_mask(polygon, *size)
    return mask


POLYGON_SCALE = 5  # rleFrPoly walks the edges at 5x the pixel grid


def _c_int(values: np.ndarray | float) -> np.ndarray:
    """C's (int) cast of doubles: truncation toward zero (not floor: coordinates may be negative)."""
    return np.trunc(values).astype(np.int64)


def polygon_mask(polygon: list[float], height: int, width: int) -> np.ndarray:
    """One COCO polygon [x0, y0, x1, y1, ...] as pycocotools rasterises it (`maskApi.c` rleFrPoly,
    through `mask.frPyObjects`): the vertices scaled by 5 and rounded, every edge walked point by
    point on that grid (from its lower end, as the C code walks it, so that an edge rounds alike in
    both directions), the points where the walk crosses a pixel column's centre kept as that
    column's boundaries (the y below, rounded up, clamped to [0, height]), and the mask between them
    filled column-major by parity (even-odd: a polygon drawn around twice cancels). The same float64
    operations in the same order as the C code, so the mask is equal bit for bit (tested against
    pycocotools: fractional, negative and outside coordinates, edges on pixel centres, several parts).
    A boundary at y = height runs into the next column's top, as pycocotools' does. (A pycocotools
    built with fused multiply-adds, as compilers may do on ARM, could round an edge point otherwise.)"""
    xy = np.asarray(polygon, dtype=np.float64)
    k = len(xy) // 2
    out = np.zeros((height, width), dtype=bool)
    if k == 0 or height == 0 or width == 0:
        return out
    x = _c_int(POLYGON_SCALE * xy[0 : 2 * k : 2] + 0.5)
    y = _c_int(POLYGON_SCALE * xy[1 : 2 * k : 2] + 0.5)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    us, vs = [], []
    for j in range(k):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            t = np.arange(dx + 1)[::-1] if flip else np.arange(dx + 1)
            # a repeated vertex (dx == dy == 0) divides 0 by 0 in C; its one point's v is never read:
            # its u equals its neighbours' or is left of the image (see the column test below)
            slope = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append(_c_int(ys + slope * t + 0.5))
        else:
            t = np.arange(dy + 1)[::-1] if flip else np.arange(dy + 1)
            slope = (xe - xs) / dy
            vs.append(t + ys)
            us.append(_c_int(xs + slope * t + 0.5))
    u, v = np.concatenate(us), np.concatenate(vs)
    moved = u[1:] != u[:-1]  # consecutive points in different columns of the 5x grid
    u1, u0, v1, v0 = u[1:][moved], u[:-1][moved], v[1:][moved], v[:-1][moved]
    xd = (np.where(u1 < u0, u1, u1 - 1).astype(np.float64) + 0.5) / POLYGON_SCALE - 0.5
    column = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)  # a pixel column's centre, inside the image
    yd = np.ceil(np.clip((np.minimum(v1, v0)[column].astype(np.float64) + 0.5) / POLYGON_SCALE - 0.5, 0, height))
    starts = xd[column].astype(np.int64) * height + yd.astype(np.int64)  # column-major, as COCO's RLE
    toggles = np.bincount(starts, minlength=height * width + 1)[: height * width]
    inside = (np.cumsum(toggles) & 1).astype(bool)
    return inside.reshape(width, height).T.copy()
