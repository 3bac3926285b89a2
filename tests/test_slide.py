"""Whole-slide images (pipeline.io.slide, pipeline.predict.slides, the qupath export): slides written
here with tifffile (an Aperio SVS-like pyramid, a generic pyramidal TIFF with SubIFDs), read by
tiffslide; one `segpipe run` over a folder of them asserts the whole path."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import fsspec
import numpy as np
import pytest
import tifffile
import tiffslide
import torch
import torch.nn.functional as F
from helpers import job_config, read_run_table, segpipe_run, tiny_checkpoint
from PIL import Image

from pipeline.analysis.qupath import RegionTracer, features, qupath_classes
from pipeline.config import ConfigError, load_config
from pipeline.io.slide import (
    OPENSLIDE_SUFFIXES,
    SLIDE_SUFFIXES,
    SlideWindows,
    TissueMap,
    choose_grid,
    otsu_threshold,
    probe_slide,
    slide_backend,
    tissue_mask,
)
from pipeline.io.tiff import StreamError
from pipeline.predict.predictor import finish_image
from pipeline.predict.slides import SKIPPED_LABEL, objective_power, segment_slide
from pipeline.predict.tiling import StreamingStitcher, TilingSettings, plan_windows, segment_images, segment_streaming
from pipeline.results.masks import assemble_mask
from pipeline.rows import StreamSource

GLASS = (242, 240, 244)  # a slide's background: bright, nearly gray (saturation about 4)


def slide_pixels(height: int = 1536, width: int = 2048, tissue: float = 0.3, seed: int = 0) -> np.ndarray:
    """Level 0 of a test slide: glass, with pink-purple tissue (noisy, so a model sees texture) in a
    band of the left `tissue` share of the columns and a blob at the bottom right."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = GLASS
    image += rng.integers(0, 4, image.shape, dtype=np.uint8)
    cols = int(width * tissue * 0.8)
    stain = np.array([200, 110, 170], np.int16) + rng.integers(-20, 20, (height, cols, 3), dtype=np.int16)
    image[:, :cols] = np.clip(stain, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    blob = (yy - height * 0.75) ** 2 + (xx - width * 0.8) ** 2 < (min(height, width) * 0.12) ** 2
    image[blob] = (150, 60, 160)
    return image


def pyramid(level0: np.ndarray, levels: int = 3) -> list[np.ndarray]:
    out = [level0]
    for _ in range(levels - 1):
        a = out[-1]
        out.append(np.asarray(Image.fromarray(a).resize((a.shape[1] // 2, a.shape[0] // 2), Image.Resampling.BOX)))
    return out


def write_svs(path: Path, level0: np.ndarray, mpp: float | None = 0.25, levels: int = 3, tile: int = 256) -> list[np.ndarray]:
    """An Aperio SVS-like pyramid: level 0 with Aperio's ImageDescription (`|MPP = ...`, which
    tiffslide reads as tiffslide.mpp-x/y), a thumbnail page, then the lower levels, tiled, deflate."""
    levels_ = pyramid(level0, levels)
    h, w = level0.shape[:2]
    desc = f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) RAW|AppMag = 40" + (f"|MPP = {mpp}" if mpp else "")
    kw = dict(photometric="rgb", metadata=None)
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels_[0], tile=(tile, tile), compression="zlib", description=desc, **kw)
        tif.write(levels_[-1][::4, ::4].copy(), description="Aperio Image Library thumbnail", **kw)
        for level in levels_[1:]:
            tif.write(level, tile=(tile, tile), compression="zlib", description="Aperio Image Library level", **kw)
    return levels_


def write_generic(path: Path, level0: np.ndarray, mpp: float | None = 0.25, levels: int = 3) -> list[np.ndarray]:
    """A generic pyramidal TIFF: level 0 with its lower levels as SubIFDs, mpp in its resolution tags."""
    levels_ = pyramid(level0, levels)
    res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels_[0], tile=(256, 256), subifds=levels - 1, compression="zlib", photometric="rgb", metadata=None, **res)
        for level in levels_[1:]:
            tif.write(level, tile=(256, 256), subfiletype=1, compression="zlib", photometric="rgb", metadata=None)
    return levels_


def score_fn(pixels):
    """A stand-in model: two class scores from the red and green channels (no torch model needed)."""
    return pixels[:, :2].float()


def segment(path: Path, settings: TilingSettings, *, mpp=0.5, level=None, min_tissue=0.0, size=None):
    source = StreamSource(str(path), None, *(size or probe_size(path, mpp, level)), kind="slide")
    result = segment_slide(
        score_fn, source, settings, mpp=mpp, level=level, min_tissue=min_tissue, num_classes=2, chunk_size=256, finish=finish_image
    )
    return result, assemble_mask(_mask_table(result.chunks))


def probe_size(path: Path, mpp, level) -> tuple[int, int]:
    with SlideWindows.open(str(path), mpp=mpp, level=level) as slide:
        return slide.height, slide.width


def _mask_table(chunks):
    """The chunks as a masks table's rows (what assemble_mask reads)."""
    import pyarrow as pa

    height, width = max(c.y + c.height for c in chunks), max(c.x + c.width for c in chunks)
    return pa.Table.from_pylist(
        [
            {"image_id": "s", "height": height, "width": width, "chunk_y": c.y, "chunk_x": c.x, "chunk_height": c.height,
             "chunk_width": c.width, "mask": c.mask}
            for c in chunks
        ]
    )  # fmt: skip


# --------------------------------------------------------------------------- config


def test_a_slides_objective_power_is_the_number_its_metadata_states_or_none():
    assert [objective_power(v) for v in ("40", "20.0", 40, None, "", "unknown", "0")] == [40.0, 20.0, 40.0, None, None, None, None]


def test_slide_config_takes_mpp_or_level_and_only_with_format_slide():
    base = {"input": {"uri": "/slides", "format": "slide"}, "model": {"name": "segformer-b0"}}
    assert load_config(base).input.slide.model_dump() == {"mpp": 0.5, "level": None, "min_tissue": 0.1}
    by_level = load_config({**base, "input": {**base["input"], "slide": {"level": 1}}}).input.slide
    assert (by_level.mpp, by_level.level) == (None, 1)
    for slide, message in (
        ({"mpp": 0.5, "level": 1}, "give mpp or level, not both"),
        ({"mpp": 0}, "input.slide.mpp"),
        ({"min_tissue": 1.5}, "input.slide.min_tissue"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config({**base, "input": {**base["input"], "slide": slide}})
    with pytest.raises(ConfigError, match="slide: these settings need format: slide"):
        load_config({**base, "input": {"uri": "/images", "slide": {"mpp": 1.0}}})
    with pytest.raises(ConfigError, match="takes no labels"):
        load_config({**base, "input": {**base["input"], "labels": {"uri": "/labels"}}})
    for inference in ({"task": "panoptic"}, {"mode": "whole"}):
        with pytest.raises(ConfigError, match="input.format slide is segmented window by window"):
            load_config({**base, "inference": inference})


# --------------------------------------------------------------------------- the grid and the reader


def test_choose_grid_picks_the_coarsest_level_at_or_finer_than_the_target():
    sizes = [(1536, 2048), (768, 1024), (384, 512)]
    at = {mpp: choose_grid(sizes, (0.25, 0.25), mpp=mpp, level=None) for mpp in (0.25, 0.4, 0.5, 0.503, 1.0, 2.0, 0.1)}
    assert [(at[m].level, at[m].height, at[m].width, at[m].resampled) for m in at] == [
        (0, 1536, 2048, False),
        (0, 960, 1280, True),  # between levels: level 0, resampled to the target grid
        (1, 768, 1024, False),  # level 1 as stored
        (1, 763, 1018, True),  # level 1 is within 1% of 0.503: at the target, resampled to it
        (2, 384, 512, False),
        (2, 192, 256, True),  # coarser than any level: the coarsest, averaged down
        (0, 3840, 5120, True),  # finer than level 0: level 0 upsampled
    ]
    assert (at[0.5].mpp, at[0.5].level0_scale, at[0.4].level0_scale) == (0.5, 2.0, 1.6)
    by_level = choose_grid(sizes, (0.25, 0.25), mpp=None, level=2)
    assert (by_level.level, by_level.height, by_level.mpp, by_level.level0_scale) == (2, 384, 1.0, 4.0)
    assert choose_grid(sizes, None, mpp=None, level=1).mpp is None  # a level needs no mpp
    with pytest.raises(StreamError, match=r"s\.svs states no microns per pixel .*\(use input.slide.level\)"):
        choose_grid(sizes, None, mpp=0.5, level=None, what="s.svs")
    with pytest.raises(StreamError, match="has 3 levels: input.slide.level 3"):
        choose_grid(sizes, (0.25, 0.25), mpp=None, level=3)


def test_tiffslide_reads_the_svs_and_generic_pyramids_levels_and_mpp(tmp_path):
    level0 = slide_pixels(tissue=0.5)
    for write, name in ((write_svs, "a.svs"), (write_generic, "b.tif")):
        levels = write(tmp_path / name, level0)
        with SlideWindows.open(str(tmp_path / name), mpp=0.5, level=None) as slide:
            assert slide.level_sizes == [(1536, 2048), (768, 1024), (384, 512)], name
            assert (slide.grid.level0_mpp, slide.grid.level, slide.grid.resampled) == (0.25, 1, False), name
            # at the target level's own size: windows are the level's pixels as stored
            assert np.array_equal(slide.rgb(100, 300, 200, 250), levels[1][100:300, 300:550]), name
            assert np.array_equal(slide.overview(), levels[2]), name  # the coarsest level, within TISSUE_SIDE
            assert slide.overview(max_side=200).shape == (128, 170, 3)  # block means of 3 x 3: 384 // 3, 512 // 3


def test_windows_between_levels_are_the_whole_target_image_resampled_once(tmp_path):
    """At 0.4 mpp (between 0.25 and 0.5) windows are resampled from level 0 on one grid: read piece
    by piece they make the image that resizing all of level 0 to 1280 x 960 (area average) makes."""
    levels = write_svs(tmp_path / "a.svs", slide_pixels(tissue=0.5))
    whole = np.asarray(Image.fromarray(levels[0]).resize((1280, 960), Image.Resampling.BOX))
    with SlideWindows.open(str(tmp_path / "a.svs"), mpp=0.4, level=None) as slide:
        assert (slide.height, slide.width, slide.grid.resampled) == (960, 1280, True)
        pieces = np.zeros_like(whole)
        for y in range(0, 960, 333):
            for x in range(0, 1280, 401):
                h, w = min(333, 960 - y), min(401, 1280 - x)
                pieces[y : y + h, x : x + w] = slide.rgb(y, x, h, w)
    assert np.abs(pieces.astype(int) - whole).max() <= 1  # Pillow's fixed point may round a sum either way
    assert (pieces == whole).mean() > 0.99


def test_openslide_reads_the_svs_as_tiffslide_does_levels_mpp_objective_and_windows(tmp_path):
    """The same written SVS through both readers (OpenSlide forced): the same levels, mpp, objective
    power and grid, and equal windows as stored (0.5 mpp: level 1) and resampled (0.4 mpp: from level 0)."""
    path = str(tmp_path / "a.svs")
    write_svs(tmp_path / "a.svs", slide_pixels(tissue=0.5))
    for mpp in (0.5, 0.4):
        with SlideWindows.open(path, mpp=mpp, level=None) as tiff, SlideWindows.open(path, mpp=mpp, level=None, backend="openslide") as osl:
            assert (tiff.levels.backend, osl.levels.backend) == ("tiffslide", "openslide")
            assert osl.level_sizes == tiff.level_sizes == [(1536, 2048), (768, 1024), (384, 512)]
            assert osl.grid == tiff.grid and osl.grid.level0_mpp == 0.25
            assert objective_power(osl.objective_power) == objective_power(tiff.objective_power) == 40
            for box in ((0, 0, 128, 128), (100, 300, 200, 250), (tiff.height - 77, tiff.width - 93, 77, 93)):
                assert np.array_equal(osl.rgb(*box), tiff.rgb(*box)), (mpp, box)
            assert np.array_equal(osl.overview(), tiff.overview())


def test_the_reader_is_chosen_per_suffix_and_openslide_formats_are_read_from_local_files_only(tmp_path):
    """tiffslide for the TIFF family, OpenSlide for MRXS, DICOM, VMS, ...: both listed as slides. A
    remote MRXS (OpenSlide opens its .dat files by path) and a local file OpenSlide cannot read are
    errors naming why."""
    names = ["a.svs", "b.NDPI", "c.scn", "d.bif", "e.tif", "f.mrxs", "g.dcm", "h.vms", "i.vmu", "j.svslide", "k.czi"]
    assert [slide_backend(n) for n in names] == ["tiffslide"] * 5 + ["openslide"] * 6
    assert set(OPENSLIDE_SUFFIXES) < set(SLIDE_SUFFIXES)
    fsspec.filesystem("memory").pipe("/remote-slides/s.mrxs", b"x")
    cfg = load_config({"input": {"uri": "memory://remote-slides", "format": "slide"}, "model": {"name": "segformer-b0"}}).input
    with pytest.raises(StreamError, match="s.mrxs: MRXS slides are read by OpenSlide, which reads local files only"):
        probe_slide("memory://remote-slides/s.mrxs", cfg)
    (tmp_path / "broken.mrxs").write_bytes(b"not a slide")
    with pytest.raises(StreamError, match="broken.mrxs: not a slide OpenSlide reads"):
        SlideWindows.open(str(tmp_path / "broken.mrxs"), mpp=0.5, level=None)


def test_overlapping_windows_decode_each_tile_once(tmp_path):
    """Windows of 128 at a stride of 96 over 256-pixel tiles, as the stitcher reads them: with the
    windows' rows kept (`keep_rows`, as segment_slide does) each tile of the level read is decoded
    once; the tiles the reads asked for (each read decoded all of them before the cache) are 11.7x
    (as stored, level 1) and 9x (resampled from level 0) as many. The windows are those read alone."""
    write_svs(tmp_path / "a.svs", slide_pixels(tissue=0.5))
    settings = TilingSettings(window=(128, 128), stride=(96, 96), batch_size=8)
    for mpp, level_tiles, requested in ((0.5, 3 * 4, 140), (0.4, 6 * 8, 432)):
        with SlideWindows.open(str(tmp_path / "a.svs"), mpp=mpp, level=None) as slide:
            slide.keep_rows(settings.window[0])
            reads = []

            def read(y0, x0, h, w, slide=slide, reads=reads):
                reads.append(((y0, x0, h, w), slide.rgb(y0, x0, h, w)))
                return reads[-1][1]

            for _ in segment_streaming(score_fn, read, slide.height, slide.width, settings):
                pass
            assert (slide.tiles_decoded, slide.levels.tiles.requested) == (level_tiles, requested), mpp
        for box, window in reads[::20]:  # a window read alone, nothing cached, is the same
            with SlideWindows.open(str(tmp_path / "a.svs"), mpp=mpp, level=None) as fresh:
                assert np.array_equal(fresh.rgb(*box), window), box


def test_probe_refuses_a_slide_bomb_on_its_header_and_a_slide_without_mpp(tmp_path):
    """A header that claims 200000 x 200000 pixels (tiles left empty: a small file) is refused before
    any tile is read; a slide that states no mpp is its own error when an mpp is asked."""
    path = tmp_path / "bomb.svs"
    side, tile = 200_000, 1024
    count = (side // tile + 1) ** 2
    desc = f"Aperio Image Library v12.0.0\n{side}x{side} [0,0] ({tile}x{tile}) RAW|MPP = 0.25"
    tiles = (np.zeros((tile, tile, 3), np.uint8) if i == 0 else None for i in range(count))
    tifffile.imwrite(
        path, tiles, shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", description=desc, metadata=None
    )
    cfg = load_config({"input": {"uri": str(tmp_path), "format": "slide"}, "model": {"name": "segformer-b0"}}).input
    with pytest.raises(StreamError, match=r"level 0 \(200000 x 200000 = 40000000000 pixels\) is over the limit of 10000000000"):
        probe_slide(str(path), cfg)
    write_generic(tmp_path / "nompp.tif", slide_pixels(256, 256), mpp=None, levels=2)
    with pytest.raises(StreamError, match="states no microns per pixel"):
        probe_slide(str(tmp_path / "nompp.tif"), cfg)
    write_svs(tmp_path / "ok.svs", slide_pixels(512, 768), levels=2)
    assert probe_slide(str(tmp_path / "ok.svs"), cfg) == StreamSource(str(tmp_path / "ok.svs"), None, 256, 384, kind="slide")


# --------------------------------------------------------------------------- tissue


def test_tissue_mask_is_otsu_on_saturation_cleaned_and_glass_alone_has_none():
    values = np.concatenate([np.full(100, 10), np.full(50, 200)]).astype(np.uint8)
    assert 10 <= otsu_threshold(values) < 200
    image = slide_pixels(384, 512, tissue=0.5)
    image[10, 400] = (255, 0, 0)  # a speck of dust on the glass: opened away
    mask = tissue_mask(image)
    cols = int(512 * 0.5 * 0.8)
    assert mask[:, : cols - 1].mean() > 0.99 and not mask[:200, cols + 1 :].any()
    glass = np.full((100, 100, 3), GLASS, np.uint8)
    glass[::7, ::5] += 3  # noise Otsu would split: MIN_SATURATION keeps it glass
    assert not tissue_mask(glass).any()
    tissue = TissueMap(mask, 768, 1024)  # the mask laid over a grid twice its size
    assert tissue.fraction(0, 0, 256, 256) == 1.0 and tissue.fraction(0, 600, 256, 256) == 0.0
    assert tissue.fraction(0, 0, 256, 4 * cols) == pytest.approx(0.5, abs=0.01)  # the band is 2 cols wide on this grid


# --------------------------------------------------------------------------- segmenting a slide


def test_a_slide_at_half_the_level0_resolution_gives_the_masks_of_its_level1_image(tmp_path):
    """0.25 mpp at level 0, run at 0.5: the masks of level 1 segmented directly, bit for bit."""
    levels = write_svs(tmp_path / "a.svs", slide_pixels(tissue=0.5))
    settings = TilingSettings(window=(256, 256), stride=(192, 192), batch_size=4)
    result, mask = segment(tmp_path / "a.svs", settings, mpp=0.5)
    expected = segment_images(score_fn, [levels[1]], settings)[0].labels
    assert mask.shape == (768, 1024) and np.array_equal(mask, expected)
    assert (result.grid.level, result.windows_skipped) == (1, 0)
    assert result.windows_run == len(plan_windows(768, 1024, (256, 256), (192, 192)))
    _, between = segment(tmp_path / "a.svs", settings, mpp=0.4)
    assert between.shape == (960, 1280)  # resampled windows: masks at the target size


def test_windows_without_tissue_are_not_run_and_their_pixels_hold_the_skipped_label(tmp_path):
    """A slide 70% glass runs at most 40% of its windows; pixels that only skipped windows cover are
    255, those of windows run are what the same windows give when every window runs."""
    write_svs(tmp_path / "a.svs", slide_pixels(tissue=0.3))
    settings = TilingSettings(window=(128, 128), stride=(96, 96), batch_size=4)
    calls = []
    counting = lambda pixels: calls.append(len(pixels)) or score_fn(pixels)
    source = StreamSource(str(tmp_path / "a.svs"), None, 768, 1024, kind="slide")
    progress = []
    result = segment_slide(
        counting, source, settings, mpp=0.5, level=None, min_tissue=0.1, num_classes=2, chunk_size=256, finish=finish_image,
        on_rows=lambda done, total, note: progress.append((done, total, note)),
    )  # fmt: skip
    mask = assemble_mask(_mask_table(result.chunks))
    total = len(plan_windows(768, 1024, (128, 128), (96, 96)))
    assert result.windows_run + result.windows_skipped == total and sum(calls) == result.windows_run
    assert result.windows_run <= 0.4 * total and result.windows_skipped > 0
    # the progress line's counts as the rows finish
    assert progress[-1] == (768, 768, f"{result.windows_run} windows run, {result.windows_skipped} skipped (no tissue)")
    assert mask[:, -100:-1][:100].min() == SKIPPED_LABEL  # glass in the top right corner
    _, full = segment(tmp_path / "a.svs", settings, mpp=0.5)
    run = mask != SKIPPED_LABEL
    assert run[:, :150].all() and (SKIPPED_LABEL not in full)
    assert (mask[run] == full[run]).mean() > 0.99  # windows at the tissue's edge blend with fewer neighbours
    assert result.tissue_shape == (384, 512) and result.tissue_png.startswith(b"\x89PNG")


def test_the_stitcher_emits_skipped_rows_before_any_window_runs_and_marks_uncovered_pixels():
    plan = plan_windows(40, 30, (16, 16), (12, 12))
    stitcher = StreamingStitcher(plan, binary=True)
    rows, labels, probability = [], np.zeros((40, 30), np.uint8), np.ones((40, 30), np.float32)
    for y0, x0 in plan.windows:
        run = y0 >= 20 and x0 == plan.windows[-1][1]  # only the bottom right windows run
        scores = torch.stack([torch.zeros(16, 16), torch.ones(16, 16)]) if run else None
        for band in stitcher.add(scores) if run else stitcher.skip():
            rows.append(band.y0)
            labels[band.y0 : band.y0 + len(band.labels)] = band.labels
            probability[band.y0 : band.y0 + len(band.labels)] = band.probability
    assert rows[0] == 0 and stitcher.finished
    covered = np.zeros((40, 30), bool)
    for y0, x0 in plan.windows:
        if y0 >= 20 and x0 == plan.windows[-1][1]:
            top, left = max(0, y0 - plan.pad_top), max(0, x0 - plan.pad_left)
            covered[top : y0 - plan.pad_top + 16, left : x0 - plan.pad_left + 16] = True
    assert (labels[covered] == 1).all() and (labels[~covered] == SKIPPED_LABEL).all()
    assert (probability[~covered] == 0).all() and (probability[covered] > 0.5).all()


# --------------------------------------------------------------------------- the qupath export


def rasterise(rings_per_feature: list[list], height: int, width: int, scale: float = 1.0) -> np.ndarray:
    """Pixel centres inside each feature's polygon (even-odd over its rings), counted per pixel."""
    count = np.zeros((height, width), np.int32)
    ys, xs = (np.arange(height) + 0.5) * scale, (np.arange(width) + 0.5) * scale
    for rings in rings_per_feature:
        inside = np.zeros((height, width), bool)
        for ring in rings:
            ring = np.asarray(ring, np.float64)
            for (x0, y0), (x1, y1) in pairwise(ring):
                if x0 != x1:
                    continue  # horizontal edges cross no row of centres
                rows = (ys > min(y0, y1)) & (ys < max(y0, y1))
                inside[np.ix_(rows, xs < x0)] ^= True
        count += inside
    return count


def test_regions_cut_by_chunks_are_joined_and_rasterise_back_to_the_mask():
    rng = np.random.default_rng(3)
    mask = (rng.random((60, 70)) < 0.45).astype(np.uint8) + (rng.random((60, 70)) < 0.2).astype(np.uint8)
    mask[10:40, 10:50] = 1
    mask[20:30, 20:30] = 0  # a hole
    mask[24:26, 24:26] = 1  # an island in the hole
    mask[50:, :20] = SKIPPED_LABEL
    whole, chunked = RegionTracer(60, 70), RegionTracer(60, 70)
    whole.add(0, 0, mask)
    for y in range(0, 60, 16):
        for x in range(0, 70, 16):
            chunked.add(y, x, mask[y : y + 16, x : x + 16])
    classes = qupath_classes(["background", "tissue", "tumour"])
    found = features(chunked, classes, 2.0)
    assert found == features(whole, classes, 2.0)  # the chunks' cut regions joined: the same features
    for value, name in enumerate(classes.values()):
        mine = [f["geometry"]["coordinates"] for f in found if f["properties"]["classification"]["name"] == name.name]
        count = rasterise(mine, 60, 70, scale=2.0)  # at level 0: pixel centres of the mask times 2
        assert np.array_equal(count, (mask == value).astype(np.int32)), name
    big = next(f for f in found if f["properties"]["classification"]["name"] == "tissue" and len(f["geometry"]["coordinates"]) > 1)
    assert big["properties"] == {"objectType": "annotation", "classification": {"name": "tissue", "color": [255, 127, 14]}}


# --------------------------------------------------------------------------- the whole path


def test_a_folder_of_slides_through_segpipe_run_and_the_qupath_export(ray_session, tmp_path):
    """One run over three slides: a 70% glass SVS at 0.5 mpp (level 1 of 0.25), a generic TIFF that
    states no mpp and a truncated SVS (errors rows); masks at the target size with the mpp
    columns, windows run and skipped in run.json, the tissue PNG, and the QuPath GeoJSON that
    rasterises back to the mask at level 0."""
    from jobs.cli import main

    slides = tmp_path / "slides"
    slides.mkdir()
    write_svs(slides / "tissue.svs", slide_pixels(tissue=0.3))
    write_generic(slides / "nompp.tif", slide_pixels(256, 256), mpp=None, levels=2)
    write_svs(tmp_path / "whole.svs", slide_pixels(512, 512), levels=2)
    (slides / "truncated.svs").write_bytes((tmp_path / "whole.svs").read_bytes()[:5000])
    checkpoint = tiny_checkpoint(tmp_path / "m.safetensors", 3, seed=2, class_names=["background", "tissue", "tumour"])
    cfg = job_config(
        tmp_path,
        slides,
        checkpoint,
        run_id="slides",
        input={"format": "slide", "slide": {"mpp": 0.5, "min_tissue": 0.1}},
        inference={"window": [128, 128], "stride": [96, 96], "batch_size": 8},
        output={"chunk_size": 512},
        max_error_fraction=1.0,
    )
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run = tmp_path / "runs" / "slides"
    masks = read_run_table(run, "masks")
    assert set(masks.column("image_id").to_pylist()) == {"tissue.svs"} and masks.num_rows == 2 * 2  # 512-chunks of 1024 x 768
    assert set(masks.column("mpp").to_pylist()) == {0.5} and set(masks.column("level0_scale").to_pylist()) == {2.0}
    errors = {e["image_id"]: e["error"] for e in read_run_table(run, "errors").to_pylist()}
    assert set(errors) == {"nompp.tif", "truncated.svs"} and "states no microns per pixel" in errors["nompp.tif"]
    mask = assemble_mask(masks)
    assert mask.shape == (768, 1024) and (mask == SKIPPED_LABEL).mean() > 0.3  # glass only skipped windows cover
    slides_record = json.loads((run / "run.json").read_text())["attempts"][-1]["slides"]
    total = len(plan_windows(768, 1024, (128, 128), (96, 96)))
    assert slides_record["slides"] == 1 and slides_record["mpp"] == [0.5]
    assert slides_record["scanned"] == [{"mpp": 0.25, "objective_power": 40.0}]  # level 0 as scanned: Aperio's MPP and AppMag
    assert slides_record["windows_run"] + slides_record["windows_skipped"] == total
    assert 0 < slides_record["windows_run"] <= 0.4 * total
    with Image.open(run / "tissue" / "tissue.svs.png") as tissue:
        assert tissue.size == (512, 384) and tissue.mode == "L"
    # per class the mask's square microns (0.5^2 per pixel, pixels without tissue, 255, in none) in each chunk's
    # masks row; no labels: no metrics row
    assert read_run_table(run, "metrics").num_rows == 0
    for r in masks.to_pylist():
        chunk = mask[r["chunk_y"] : r["chunk_y"] + r["chunk_height"], r["chunk_x"] : r["chunk_x"] + r["chunk_width"]]
        assert r["class_area_um2"] == [0.25 * (chunk == k).sum() for k in range(3)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["labeled_images"] == 0 and summary["area_um2"]["images"] == 1 and summary["area_um2"]["labeled"] is None
    assert summary["area_um2"]["predicted"] == dict(zip(["background", "tissue", "tumour"], [0.25 * (mask == k).sum() for k in range(3)]))

    # the mask as a slide: a pyramid with the target mpp that a slide reader opens, level by level
    assert main(["export", str(run), "--to", str(tmp_path / "tiff"), "--format", "tiff"]) == 0
    with tiffslide.TiffSlide(tmp_path / "tiff" / "tissue.tif") as exported:
        assert exported.properties["tiffslide.mpp-x"] == pytest.approx(0.5) and exported.level_dimensions == ((1024, 768), (512, 384))
        assert np.array_equal(np.asarray(exported.read_region((0, 0), 0, (1024, 768), as_array=True))[..., 0], mask)
        assert np.array_equal(np.asarray(exported.read_region((0, 0), 1, (512, 384), as_array=True))[..., 0], mask[::2, ::2])

    assert main(["export", str(run), "--to", str(tmp_path / "qupath"), "--format", "qupath"]) == 0
    collection = json.loads((tmp_path / "qupath" / "tissue.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    for value, name in enumerate(["background", "tissue", "tumour"]):
        mine = [f["geometry"]["coordinates"] for f in collection["features"] if f["properties"]["classification"]["name"] == name]
        # rasterised at level 0 (2048 x 1536: every other pixel centre is enough, scale 2 keeps the mask's)
        assert np.array_equal(rasterise(mine, 768, 1024, scale=2.0), (mask == value).astype(np.int32)), name


def nuclei_queries(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in query model: query 0 is class 0 ("nucleus") over the dark pixels (red under 100:
    neither stain nor glass), query 1 is no object."""
    dark = F.avg_pool2d(pixels, 4)[:, 0] < 100
    masks = torch.stack([dark, torch.zeros_like(dark)], 1).float() * 20 - 10
    return torch.tensor([[10.0, 0], [0, 10]]).expand(len(pixels), 2, 2).clone(), masks


def test_an_instance_task_on_a_slide_finds_objects_across_windows_at_the_target_mpp_and_none_in_windows_without_tissue(tmp_path):
    """segment_slide's objects path (what the predictor runs for `inference.task: instance` over a slide):
    a nucleus in the tissue, cut by four windows' edges at 0.5 mpp, is one object in the target grid's
    pixels; one on the glass lies in windows that are not run and is not found; the query model is called
    for the windows run only."""
    from pipeline.predict.object_windows import ObjectSettings
    from pipeline.predict.objects import ImageObject

    level0 = slide_pixels(tissue=0.3)
    level0[360:440, 360:440] = (60, 20, 100)  # in the tissue band: 180..220 at 0.5 mpp, across the windows at 192
    level0[200:240, 1800:1840] = (60, 20, 100)  # on the glass, top right
    write_svs(tmp_path / "n.svs", level0)
    settings = TilingSettings(mode="slide", window=(128, 128), stride=(96, 96), batch_size=4, score_kind="probabilities")
    calls: list[int] = []
    counting = lambda pixels: calls.append(len(pixels)) or nuclei_queries(pixels)
    found: list[ImageObject] = []
    source = StreamSource(str(tmp_path / "n.svs"), None, 768, 1024, kind="slide")
    result = segment_slide(
        score_fn, source, settings, mpp=0.5, level=None, min_tissue=0.1, num_classes=1, chunk_size=256, finish=finish_image,
        objects=(counting, ObjectSettings("instance", threshold=0.5), found),
    )  # fmt: skip
    assert sum(calls) == result.windows_run and result.windows_skipped > 0
    [nucleus] = found
    x, y, w, h = nucleus.bbox
    assert nucleus.class_id == 0 and max(abs(x - 180), abs(y - 180), abs(x + w - 220), abs(y + h - 220)) <= 2, nucleus.bbox
    labels = assemble_mask(_mask_table(result.chunks))
    assert labels.shape == (768, 1024) and (labels[100:120, 900:920] == SKIPPED_LABEL).all()
