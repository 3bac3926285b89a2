"""`segpipe export --format qupath`: a mask as GeoJSON that QuPath imports as annotations.

One Feature per connected region of a class (4-connected: regions that touch at a corner only are
two), a Polygon whose first ring is the region's outline and the others its holes, in the slide's
level-0 pixel coordinates (the mask's coordinates times `level0_scale`, pipeline.io.slide), with
`properties: {objectType: "annotation", classification: {name, color: [r, g, b]}}`. Pixels of
`SKIPPED_LABEL` (255: no tissue, not segmented) are no class and give no feature.

How the outlines are traced (`RegionTracer`): every pixel of a class contributes the four unit edges
around it, clockwise on screen (y down), so that the region lies to the right of each edge; an edge
shared by two pixels of the class comes twice, once each way, and both cancel. What is left are the
region's boundaries, as closed chains. A mask comes in chunks (pipeline.results.masks): each chunk
is traced alone, and the edges along a chunk's border that its neighbour's same-class pixels cancel
are cancelled across chunks too, so that a region cut by chunk edges comes out whole. Memory: the
boundary edges of the image, never its pixels beyond one band of chunks. Chains are linked at each
vertex by the rightmost turn (that is what splits corner-touching pixels), vertices where the
direction does not change are dropped, and rings of negative area (counter-clockwise on screen)
are holes, each given to the smallest outline that holds a pixel next to it. Features come class
by class, the largest regions first. Rasterising the
polygons (pixel centres inside, even-odd) gives the mask back exactly.

An instance run's objects (its `instances/` table) are exported as QuPath detections instead
(`detection`): one Feature per instance, objectType "detection", its classification, its score and
instance id as measurements, traced the same way from its mask's box.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.io.coco_codec import decode_rle_box

SKIPPED_LABEL = 255  # pipeline.predict.slides: pixels not segmented (no tissue)
# class colours (QuPath's classification colour, RGB): a fixed cycle, so that runs compare
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
DIRECTIONS = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)])  # east, south, west, north (x, y), y down


class RegionTracer:
    """Collects the boundary edges of each class chunk by chunk (`add`), then gives the regions (`regions`)."""

    def __init__(self, height: int, width: int, skipped: int | None = SKIPPED_LABEL) -> None:
        self.height, self.width, self.skipped = height, width, skipped
        self._edges: dict[int, list[np.ndarray]] = {}  # class -> arrays of edge keys (vertex * 4 + direction)

    def add(self, y: int, x: int, chunk: np.ndarray) -> None:
        """The chunk of the mask whose top-left pixel is (y, x)."""
        stride = self.width + 1  # vertices are (width + 1) x (height + 1)
        for value in np.unique(chunk):
            if self.skipped is not None and value == self.skipped:
                continue
            m = np.pad(chunk == value, 1)
            inside = m[1:-1, 1:-1]
            keys = []
            # (edge exists where, its start vertex offset (dx, dy) from the pixel's top-left, direction)
            for other, (dx, dy), direction in (
                (m[:-2, 1:-1], (0, 0), 0),  # top edge, going east
                (m[1:-1, 2:], (1, 0), 1),  # right edge, going south
                (m[2:, 1:-1], (1, 1), 2),  # bottom edge, going west
                (m[1:-1, :-2], (0, 1), 3),  # left edge, going north
            ):
                rows, cols = np.nonzero(inside & ~other)
                vertex = (rows + y + dy).astype(np.int64) * stride + (cols + x + dx)
                keys.append(vertex * 4 + direction)
            self._edges.setdefault(int(value), []).append(np.concatenate(keys))

    def regions(self) -> Iterable[tuple[int, list[np.ndarray]]]:
        """(class, [outline, hole, ...]) per connected region, rings as k x 2 (x, y) vertex arrays
        (closed: the last vertex is the first), in the mask's pixel coordinates."""
        for value in sorted(self._edges):
            keys = np.concatenate(self._edges[value])
            keys = _cancel(keys, self.width + 1)
            rings = _link(keys, self.width + 1)
            yield from ((value, polygon) for polygon in _polygons(rings))


def _cancel(keys: np.ndarray, stride: int) -> np.ndarray:
    """The edges whose reverse (end vertex, opposite direction) is not among them."""
    vertex, direction = keys // 4, keys % 4
    step = DIRECTIONS[direction]
    end = vertex + step[:, 1] * stride + step[:, 0]
    reverse = end * 4 + (direction + 2) % 4
    return np.sort(keys[~np.isin(keys, reverse)])  # sorted: the same rings, in the same order, however the mask was cut


def _link(keys: np.ndarray, stride: int) -> list[np.ndarray]:
    """Closed rings from boundary edges: at each vertex the rightmost turn, collinear vertices dropped."""
    unused = set(keys.tolist())
    rings = []
    for first in keys.tolist():
        if first not in unused:
            continue
        unused.discard(first)
        points, key = [], first
        previous_direction = None
        while True:
            vertex, direction = divmod(key, 4)
            if direction != previous_direction:
                points.append((vertex % stride, vertex // stride))
            previous_direction = direction
            dx, dy = DIRECTIONS[direction]
            end = vertex + dy * stride + dx
            key = -1
            for turn in (1, 0, 3):  # right, straight, left; the first edge closes the ring where it is the turn taken
                candidate = end * 4 + (direction + turn) % 4
                if candidate == first or candidate in unused:
                    key = candidate
                    break
            if key in (first, -1):
                break
            unused.discard(key)
        # the first vertex is dropped too where the ring goes straight through it
        if len(points) > 1 and previous_direction == first % 4:
            points = points[1:]
        ring = np.array(points + points[:1], np.int64)
        rings.append(ring)
    return rings


def ring_area(ring: np.ndarray) -> float:
    """Shoelace area, positive for outlines (clockwise on screen, y down), negative for holes."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return float((x[:-1] * y[1:] - x[1:] * y[:-1]).sum() / 2)


def inside(ring: np.ndarray, px: float, py: float) -> bool:
    """Even-odd: is (px, py) (never on an edge: pixel centres against integer vertices) inside the ring."""
    x0, y0, x1, y1 = ring[:-1, 0], ring[:-1, 1], ring[1:, 0], ring[1:, 1]
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0 + (py - y0) * (x1 - x0) / np.where(y1 != y0, y1 - y0, 1)
    return bool((crosses & (px < at)).sum() % 2)


def _polygons(rings: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Outlines with their holes: each hole to the smallest outline that holds the pixel it borders."""
    outlines = sorted((r for r in rings if ring_area(r) > 0), key=ring_area)
    boxes = [(r[:, 0].min(), r[:, 1].min(), r[:, 0].max(), r[:, 1].max()) for r in outlines]
    polygons = [[r] for r in outlines]
    for hole in (r for r in rings if ring_area(r) < 0):
        (x0, y0), (x1, y1) = hole[0], hole[1]
        direction = int(np.flatnonzero((np.sign([x1 - x0, y1 - y0]) == DIRECTIONS).all(axis=1))[0])
        right = DIRECTIONS[(direction + 1) % 4]
        # the centre of the pixel of the region to the right of the hole's first edge
        px, py = x0 + 0.5 * DIRECTIONS[direction][0] + 0.5 * right[0], y0 + 0.5 * DIRECTIONS[direction][1] + 0.5 * right[1]
        for k, (bx0, by0, bx1, by1) in enumerate(boxes):
            if bx0 < px < bx1 and by0 < py < by1 and inside(outlines[k], px, py):
                polygons[k].append(hole)
                break
    return polygons[::-1]  # the largest regions first


@dataclass(frozen=True)
class QupathClass:
    name: str
    color: tuple[int, int, int]


def qupath_classes(class_names: list[str]) -> dict[int, QupathClass]:
    return {i: QupathClass(name, PALETTE[i % len(PALETTE)]) for i, name in enumerate(class_names)}


def features(tracer: RegionTracer, classes: dict[int, QupathClass], scale: float) -> list[dict]:
    """The GeoJSON features of a traced mask, coordinates times `scale` (level-0 pixels per mask pixel)."""
    out = []
    for value, rings in tracer.regions():
        cls = classes.get(value, QupathClass(str(value), PALETTE[value % len(PALETTE)]))
        coordinates = [[[_number(x * scale), _number(y * scale)] for x, y in ring.tolist()] for ring in rings]
        out.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": coordinates},
                "properties": {"objectType": "annotation", "classification": {"name": cls.name, "color": list(cls.color)}},
            }
        )
    return out


def detection(row: dict, classes: dict[int, QupathClass], scale: float) -> dict | None:
    """An instance run's `instances/` row as a QuPath detection (objectType "detection"): its mask's box
    decoded from the RLE (never the whole image) and traced as the class regions are, offset to the
    image and times `scale` (level 0); a mask in pieces is one MultiPolygon. Its score and instance_id
    as QuPath measurements. None for an empty mask."""
    x, y, w, h = (int(v) for v in row["bbox"])
    crop = decode_rle_box({"size": [int(row["height"]), int(row["width"])], "counts": row["rle"]}, (x, y, w, h))
    tracer = RegionTracer(h, w, skipped=0)  # 0: outside the instance
    tracer.add(0, 0, crop.astype(np.uint8))
    polygons = [
        [[[_number((px + x) * scale), _number((py + y) * scale)] for px, py in ring.tolist()] for ring in rings]
        for _, rings in tracer.regions()
    ]
    if not polygons:
        return None
    class_id = int(row["class_id"])
    cls = classes.get(class_id, QupathClass(str(class_id), PALETTE[class_id % len(PALETTE)]))
    geometry = {"type": "Polygon", "coordinates": polygons[0]} if len(polygons) == 1 else {"type": "MultiPolygon", "coordinates": polygons}
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "objectType": "detection",
            "classification": {"name": cls.name, "color": list(cls.color)},
            "measurements": {"score": float(row["score"]), "instance_id": int(row["instance_id"])},
        },
    }


def _number(v: float) -> float | int:
    """Whole numbers as integers (most level-0 coordinates are), others to 1/1000 pixel."""
    rounded = round(v, 3)
    return int(rounded) if rounded == int(rounded) else rounded
