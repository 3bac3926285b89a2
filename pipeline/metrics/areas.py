"""Per-class areas in physical units: square metres for rasters, square microns for slides.

A mask pixel's area (`PixelAreas`) is the same for every pixel of a raster in a projected CRS (|a e - b d|
in the CRS's linear unit, squared to metres) and of a slide (mpp at the target resolution, squared). In a
geographic CRS (longitude/latitude) it shrinks towards the poles: each row of pixels gets its own area,
the area on the CRS's ellipsoid (`pyproj.Geod.polygon_area_perimeter`) of the cell at the row's first
column, its four corners joined by geodesics. For a north-up grid (no rotation terms) every cell of a row
spans the same latitudes and longitudes, so this is the area of each of them; the geodesics along the top
and bottom edges (rather than the parallels that bound the cell) differ from it by a relative 1e-9 for a
cell of 0.01 degrees. For a rotated geographic grid the cells of one row differ; the row's middle
column's cell stands for them (an approximation, said in README).

`PhysicalAreas` adds them up band by band: per class the area of the mask's pixels (every pixel of a
class; no-data and skipped pixels, 255, hold no class), for the whole image and for each chunk of its
mask (the masks table's `class_area_m2` / `class_area_um2`, one list per masks row), and, where the
image has a label, of the label's pixels under each reading the label may get (pixels ignored or
outside the valid data count in none; the metrics table's `label_area_m2` / `label_area_um2`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

M2, UM2 = "m2", "um2"  # the units: rasters (square metres), slides (square microns)


@dataclass(frozen=True)
class PixelAreas:
    """The area of each row's pixels in `unit`: `constant` for every row, or `per_row` (one value a row)."""

    unit: str
    constant: float | None = None
    per_row: np.ndarray | None = field(default=None, compare=False)

    def rows(self, y0: int, n: int) -> np.ndarray:
        if self.per_row is not None:
            return self.per_row[y0 : y0 + n]
        return np.full(n, self.constant, np.float64)

    @classmethod
    def of_slide(cls, mpp: float | None) -> PixelAreas | None:
        """A slide's pixels at `mpp` microns per pixel: mpp^2 square microns each (None: mpp not stated)."""
        return cls(UM2, float(mpp) ** 2) if mpp else None

    @classmethod
    def of_raster(cls, georef: dict, height: int, width: int) -> PixelAreas | None:
        """A raster's pixels (`georef`: pipeline.io.raster.georef_of's crs, transform, pixel_area_m2): the
        projected CRS's constant area, the geographic CRS's per-row areas on its ellipsoid; None
        without a CRS, or in a CRS of neither kind."""
        if georef.get("crs") is None:
            return None
        if georef.get("pixel_area_m2") is not None:
            return cls(M2, float(georef["pixel_area_m2"]))
        from pyproj import CRS

        crs = CRS.from_user_input(georef["crs"])
        if not crs.is_geographic:
            return None
        degrees = float(np.degrees(crs.axis_info[0].unit_conversion_factor))  # degrees per unit of the CRS's angles
        return cls(M2, per_row=geographic_row_areas(georef["transform"], height, width, crs.get_geod(), degrees))


def geographic_row_areas(transform: list[float], height: int, width: int, geod, degrees: float = 1.0) -> np.ndarray:
    """Per row of a longitude/latitude grid (rasterio's affine a, b, c, d, e, f: lon = a col + b row + c,
    lat = d col + e row + f, in units of `degrees` degrees), the area in square metres on `geod`'s
    ellipsoid of the row's cell at its first column (north-up) or its middle one (rotated)."""
    a, b, c, d, e, f = (float(v) * degrees for v in transform[:6])
    col = 0 if b == 0 and d == 0 else width // 2
    out = np.empty(height, np.float64)
    for row in range(height):
        corners = [(col, row), (col + 1, row), (col + 1, row + 1), (col, row + 1)]
        lons = [a * x + b * y + c for x, y in corners]
        lats = [d * x + e * y + f for x, y in corners]
        area, _ = geod.polygon_area_perimeter(lons, lats)
        out[row] = abs(area)
    return out


def weighted_class_sums(values: np.ndarray, row_areas: np.ndarray, num_classes: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Per class c in [0, num_classes): the sum over the rows of `values` (n x w class values) of
    row_areas[row] x (pixels of the row equal to c, and where `keep` holds). Values outside the classes count nowhere."""
    n = values.shape[0]
    k = num_classes + 1  # the last bin: no class
    bins = np.where((values >= 0) & (values < num_classes), values, num_classes).astype(np.intp)
    if keep is not None:
        bins = np.where(keep, bins, num_classes)
    bins += (np.arange(n, dtype=np.intp) * k)[:, None]
    counts = np.bincount(bins.ravel(), minlength=n * k).reshape(n, k)[:, :num_classes]
    return row_areas @ counts


class PhysicalAreas:
    """One image's per-class areas in `pixels.unit`, added band by band: the mask's (`add_pred`), per
    chunk of the mask too, and the label's under each reading it may get (`add_label`, called by
    pipeline.metrics.semantic.LabelAreas). The chunks: `chunk_grid(ys, xs)`, the first row and column of
    each chunk row and column (pipeline.results.masks.ChunkedMaskWriter's); one chunk, the whole mask, until told."""

    def __init__(self, pixels: PixelAreas, num_classes: int) -> None:
        self.pixels, self.num_classes = pixels, num_classes
        self.chunk_grid([0], [0])
        self.label: dict[str, np.ndarray] = {}

    def chunk_grid(self, ys: list[int], xs: list[int]) -> None:
        self.ys, self.xs = list(ys), list(xs)
        self.chunks = np.zeros((len(self.ys), len(self.xs), self.num_classes), np.float64)

    @property
    def pred(self) -> np.ndarray:
        """The mask's per-class areas over the whole image: its chunks' summed."""
        return self.chunks.sum(axis=(0, 1))

    def add_pred(self, y0: int, labels: np.ndarray) -> None:
        row_areas = self.pixels.rows(y0, labels.shape[0])
        x_bounds = [*self.xs, labels.shape[1]]
        # a band may straddle chunk rows: each of its rows goes to the chunk row that holds it
        chunk_rows = np.searchsorted(self.ys, np.arange(y0, y0 + labels.shape[0]), side="right") - 1
        for i in np.unique(chunk_rows):
            rows = chunk_rows == i
            for j in range(len(self.xs)):
                values = labels[rows, x_bounds[j] : x_bounds[j + 1]]
                self.chunks[i, j] += weighted_class_sums(values, row_areas[rows], self.num_classes)

    def add_label(self, y0: int, reading: str, classes: np.ndarray, ignore: int | None, valid: np.ndarray | None) -> None:
        keep = classes != ignore if ignore is not None else None
        if valid is not None:
            keep = valid if keep is None else keep & valid
        sums = weighted_class_sums(classes, self.pixels.rows(y0, classes.shape[0]), self.num_classes, keep)
        self.label[reading] = self.label.get(reading, 0) + sums

    def record(self, reading: str | None) -> dict:
        """What a Prediction carries: the unit, the mask's areas (`pred`: the image's; `chunks`: each
        chunk's, row-major as the mask's chunks), the label's under `reading` (None: no label)."""
        label = self.label.get("class_index" if reading == "empty" else reading) if reading is not None else None
        if reading is not None and label is None:
            label = np.zeros(self.num_classes)
        return {
            "unit": self.pixels.unit,
            "pred": self.pred.tolist(),
            "chunks": self.chunks.reshape(-1, self.num_classes).tolist(),
            "label": label.tolist() if label is not None else None,
        }
