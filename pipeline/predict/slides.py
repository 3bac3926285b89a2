"""A whole slide through the streaming path: its windows on the target grid (pipeline.io.slide), the
windows without tissue skipped, the stitcher's bands into the same mask writer as a huge TIFF's.

Pixels that only skipped windows cover get `SKIPPED_LABEL` (255, "not segmented: no tissue"), a
value no class of a model of up to 255 classes takes; a model of more classes is refused for slides.
A binary task's probability is 0 there.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.io.slide import SlideGrid, SlideWindows, TissueMap, tissue_mask
from pipeline.io.tiff import StreamError
from pipeline.metrics.areas import PhysicalAreas, PixelAreas
from pipeline.predict.object_windows import ObjectSettings, stream_bands
from pipeline.predict.objects import ImageObject
from pipeline.predict.tiling import BatchSizes, TilingSettings
from pipeline.rows import MaskChunk, StreamSource

SKIPPED_LABEL = 255


@dataclass
class SlideResult:
    chunks: list[MaskChunk]
    grid: SlideGrid
    tissue_png: bytes  # the tissue mask (255 tissue, 0 not), at the overview's size
    tissue_shape: tuple[int, int]
    windows_run: int = 0
    windows_skipped: int = 0
    physical: dict | None = None  # per class the mask's square microns (pipeline.metrics.areas; None: no mpp)
    objective_power: float | None = None  # the scanner's objective (tiffslide./openslide.objective-power; None: not stated)

    @property
    def note(self) -> str:
        return f"{self.windows_run} windows run, {self.windows_skipped} skipped (no tissue)"


def objective_power(value: object) -> float | None:
    """A slide's objective power as its metadata states it (Aperio's AppMag: "40", "20.0"); None when absent or no number."""
    try:
        power = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return power if power > 0 else None


def tissue_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def segment_slide(
    score_fn,
    source: StreamSource,
    settings: TilingSettings,
    *,
    mpp: float | None,
    level: int | None,
    min_tissue: float,
    num_classes: int,
    chunk_size: int | None,
    storage_options: dict | None = None,
    on_rows: Callable[[int, int, str], None] | None = None,
    finish: Callable | None = None,
    batch_sizes: BatchSizes | None = None,
    objects: tuple[Callable, ObjectSettings, list[ImageObject]] | None = None,
) -> SlideResult:
    """Segment one slide on its target grid. Windows whose tissue fraction (`TissueMap`) is under
    `min_tissue` are neither read nor run. on_rows(rows finished, total, "N windows run, M skipped"). `finish`: pipeline.predict.predictor.finish_image (the
    loop every image takes), passed in so that this module needs no predictor. `objects` (query_fn,
    settings, found): the instance task, its objects merged across the windows run into `found`."""
    if settings.mode != "slide":
        raise StreamError(f"a slide is segmented window by window: inference.mode must be 'slide', not {settings.mode!r}")
    if num_classes > SKIPPED_LABEL:
        raise StreamError(f"slides mark pixels without tissue {SKIPPED_LABEL}: a model of {num_classes} classes has that class")
    with SlideWindows.open(source.uri, storage_options, mpp=mpp, level=level) as slide:
        if (slide.height, slide.width) != (source.height, source.width):
            raise StreamError(
                f"{source.uri} is {slide.width} x {slide.height} on its grid now, {source.width} x {source.height} when it was listed"
            )
        slide.keep_rows(settings.window[0])  # overlapping windows decode each tile once
        tissue = tissue_mask(slide.overview())
        tissue_map = TissueMap(tissue, slide.height, slide.width)
        result = SlideResult([], slide.grid, tissue_png(tissue), tissue.shape, objective_power=objective_power(slide.objective_power))

        def skip(top: int, left: int, h: int, w: int) -> bool:  # the window's part inside the slide
            fraction = tissue_map.fraction(top, left, h, w)
            skipped = fraction < min_tissue
            result.windows_skipped += skipped
            result.windows_run += not skipped
            return skipped

        bands = stream_bands(score_fn, objects, slide.rgb, slide.height, slide.width, settings, batch_sizes, skip)
        pixel_areas = PixelAreas.of_slide(slide.grid.mpp)
        physical = PhysicalAreas(pixel_areas, num_classes) if pixel_areas is not None else None
        result.chunks, _ = finish(
            bands,
            slide.height,
            slide.width,
            None,
            num_classes=num_classes,
            chunk_size=chunk_size,
            binary=settings.beside is not None,
            on_rows=(lambda done, total: on_rows(done, total, result.note)) if on_rows else None,
            physical=physical,
        )
        result.physical = physical.record(None) if physical is not None else None
    return result
