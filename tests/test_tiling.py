"""pipeline.predict.tiling: the window planner, the streaming stitcher against the full-image reference,
exact bilinear resizing (BilinearRows: F.interpolate's numbers bit for bit) and the stitcher's held
windows, segment_images / segment_streaming with small deterministic conv nets, and test-time augmentation
(TTAScoreFn: flips and scales averaged in score space, in whole and slide mode). The reference
against MONAI's sliding window is tests/test_tiling_monai.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeline.predict.tiling as tiling
from pipeline.predict.tiling import (
    BatchSizes,
    BilinearFormula,
    BilinearRows,
    Segmentation,
    StreamingStitcher,
    TilingSettings,
    TTAScoreFn,
    bilinear_formula,
    importance_map,
    plan_windows,
    read_padded,
    segment_images,
    segment_streaming,
    segmentations,
    stitch_windows,
    to_pixels,
    window_starts,
    with_tta,
)

# --------------------------------------------------------------------------- helpers


def conv_score_fn(num_classes: int = 5, seed: int = 0, stride4: bool = True):
    """A small random conv net as score_fn: 0-255 windows -> scores at output stride 4 (or 1, 1x1 convs)."""
    torch.manual_seed(seed)
    if stride4:
        net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 3, stride=2, padding=1))
    else:  # pointwise: each pixel's scores depend on that pixel only
        net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))
    net.eval()

    def score_fn(windows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net((windows - 128.0) / 64.0).float()

    return score_fn


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish content so labels are not all noise
    coarse = rng.integers(0, 256, size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    image = F.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(height, width), mode="bilinear")
    noise = rng.normal(0, 20, size=(height, width, 3))
    return np.clip(image[0].permute(1, 2, 0).numpy() + noise, 0, 255).astype(np.uint8)


def stream_all(plan, window_scores, blend):
    """Feed window scores to a StreamingStitcher; return the stitched scores and the bands' row ranges."""
    stitcher = StreamingStitcher(plan, blend, keep_scores=True)
    out = torch.full((window_scores[0].shape[0], plan.height, plan.width), float("nan"))
    ranges = []
    for scores in window_scores:
        for band in stitcher.add(scores):
            rows = band.labels.shape[0]
            assert band.scores.shape == (out.shape[0], rows, plan.width)
            assert band.labels.shape == (rows, plan.width)
            out[:, band.y0 : band.y0 + rows] = band.scores
            ranges.append((band.y0, band.y0 + rows))
    assert stitcher.finished
    return out, ranges


# --------------------------------------------------------------------------- the planner


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (16, 11), (7, 3), (5, 1)])
def test_window_starts_cover_the_axis_and_end_at_the_edge(window, stride):
    for size in range(window, 80):
        starts = window_starts(size, window, stride)
        assert starts[0] == 0
        assert starts[-1] + window == size  # the last window ends at the edge
        assert all(b > a for a, b in itertools.pairwise(starts))
        assert all(b - a <= stride for a, b in itertools.pairwise(starts))
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + window] = True
        assert covered.all()
        # mmseg's slide_inference count: (size - window + stride - 1) // stride + 1
        assert len(starts) == (size - window + stride - 1) // stride + 1
        # every start but the last is a multiple of the stride
        assert all(s == i * stride for i, s in enumerate(starts[:-1]))


def test_plan_pads_axes_shorter_than_the_window():
    plan = plan_windows(10, 100, window=(32, 40), stride=(20, 30))
    assert (plan.padded_height, plan.padded_width) == (32, 100)
    assert (plan.pad_top, plan.pad_left) == (11, 0)  # diff 22 -> 11 before, 11 after
    assert plan.ys == (0,)
    assert plan.xs == (0, 30, 60)
    assert len(plan) == 3 and plan.windows == [(0, 0), (0, 30), (0, 60)]
    small = plan_windows(5, 6, window=(16, 16), stride=(8, 8))
    assert (small.pad_top, small.pad_left, small.padded_height, small.padded_width) == (5, 5, 16, 16)
    assert small.windows == [(0, 0)]


def test_read_padded_places_the_image_and_zeros():
    image = random_image(9, 23, seed=1)
    plan = plan_windows(9, 23, window=(16, 10), stride=(8, 7))
    padded = np.zeros((plan.padded_height, plan.padded_width, 3), np.uint8)
    padded[plan.pad_top : plan.pad_top + 9, plan.pad_left : plan.pad_left + 23] = image
    for y0, x0 in plan.windows:
        window = read_padded(lambda y, x, h, w: image[y : y + h, x : x + w], plan, y0, x0)
        np.testing.assert_array_equal(window, padded[y0 : y0 + 16, x0 : x0 + 10])


def test_settings_normalise_sizes_and_refuse_a_stride_over_the_window_and_unknown_blend_or_mode():
    settings = TilingSettings(window=[64, 48], stride=32)
    assert settings.window == (64, 48) and settings.stride == (32, 32)
    with pytest.raises(ValueError, match="stride"):
        TilingSettings(window=(16, 16), stride=(17, 8))
    with pytest.raises(ValueError, match="blend"):
        TilingSettings(blend="max")
    with pytest.raises(ValueError, match="mode"):
        TilingSettings(mode="tiles")


# --------------------------------------------------------------------------- blending and stitching


def test_gaussian_importance_map_is_symmetric_peaked_at_the_centre_and_floored():
    weights = importance_map((16, 9), "gaussian")
    assert weights.shape == (16, 9)
    # symmetric about (size - 1) / 2, largest at the centre, floored at 1e-3
    torch.testing.assert_close(weights, weights.flip(0))
    torch.testing.assert_close(weights, weights.flip(1))
    # 16 rows: sigma 2, the nearest offset to the centre is 0.5; 9 columns: offset 0
    assert weights.max().item() == pytest.approx(math.exp(-(0.5**2) / (2 * 2.0**2)), rel=1e-6)
    assert weights.min().item() == pytest.approx(1e-3)
    assert torch.equal(importance_map((4, 5), "mean"), torch.ones(4, 5))


STITCH_CASES = [
    # height, width, window, stride
    (37, 53, (16, 20), (7, 9)),  # odd sizes, strides that do not divide the image
    (61, 29, (16, 16), (5, 11)),
    (10, 13, (16, 20), (5, 5)),  # smaller than the window on both axes
    (40, 9, (16, 20), (16, 4)),  # smaller on one axis, stride == window on the other
    (16, 20, (16, 20), (3, 3)),  # exactly one window
    (101, 17, (12, 8), (1, 3)),  # stride 1: many windows per row
]


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
@pytest.mark.parametrize("height,width,window,stride", STITCH_CASES)
def test_streaming_stitcher_equals_full_image_stitch(blend, height, width, window, stride):
    torch.manual_seed(height * width)
    plan = plan_windows(height, width, window, stride)
    window_scores = [torch.randn(4, *window) for _ in plan.windows]
    reference = stitch_windows(plan, window_scores, blend)
    assert reference.shape == (4, height, width)
    streamed, ranges = stream_all(plan, window_scores, blend)
    # the bands cover every row once, top to bottom
    assert ranges[0][0] == 0 and ranges[-1][1] == height
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    torch.testing.assert_close(streamed, reference, atol=1e-5, rtol=0)


def test_full_image_stitch_is_the_weighted_mean():
    """The reference itself, against a per-pixel loop over the windows that cover each pixel."""
    torch.manual_seed(3)
    plan = plan_windows(13, 11, (8, 6), (5, 4))
    window_scores = [torch.randn(2, 8, 6) for _ in plan.windows]
    for blend in ("mean", "gaussian"):
        weights = importance_map((8, 6), blend)
        reference = stitch_windows(plan, window_scores, blend)
        for y in range(13):
            for x in range(11):
                num, den = torch.zeros(2), 0.0
                for (y0, x0), s in zip(plan.windows, window_scores):
                    if y0 <= y < y0 + 8 and x0 <= x < x0 + 6:
                        num += s[:, y - y0, x - x0] * weights[y - y0, x - x0]
                        den += weights[y - y0, x - x0].item()
                torch.testing.assert_close(reference[:, y, x], num / den, atol=1e-5, rtol=0)


def test_streaming_stitcher_emits_rows_early_and_holds_a_band():
    plan = plan_windows(400, 30, (16, 16), (8, 8))
    stitcher = StreamingStitcher(plan, "gaussian")
    per_row = len(plan.xs)
    emitted_after = []
    for i in range(len(plan)):
        bands = stitcher.add(torch.randn(3, 16, 16))
        if bands:
            emitted_after.append(i + 1)
            # the band never grows with the image's height
            assert stitcher._scores is None or stitcher._scores.shape == (3, 16, 30)
    # a band after every completed row of windows: rows above the next row's start are final
    assert emitted_after == [per_row * (k + 1) for k in range(len(plan.ys))]


# --------------------------------------------------------------------------- exact resizing, held windows


def scores_in(layout: str, num_classes: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random C x h x w scores, contiguous or channels-last (as the SegFormer head gives them)."""
    generator = torch.Generator().manual_seed(seed)
    if layout == "channels_last":
        return (torch.randn(height, width, num_classes, generator=generator) * 3).permute(2, 0, 1)
    return torch.randn(num_classes, height, width, generator=generator) * 3


def interpolate(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("layout,kind", [("contiguous", "separable"), ("channels_last", "four_point")])
@pytest.mark.parametrize("channels", [19, 40, 3])  # whole vectors and a tail on AVX2 and AVX-512; 40: none; 3: only a tail
@pytest.mark.parametrize("in_size,size", [((65, 65), (512, 512)), ((24, 20), (96, 80)), ((13, 31), (100, 77))])
def test_bilinear_rows_give_f_interpolate_numbers_bit_for_bit(layout, kind, channels, in_size, size):
    """ATen's generic kernel (contiguous scores) and its vectorised one (channels-last scores, more than 3 channels)."""
    scores = scores_in(layout, channels, *in_size)
    formula = bilinear_formula(scores, size)
    if formula is None:  # another CPU's ATen kernel: the stitcher resizes with F.interpolate (tested below)
        pytest.skip(f"no formula rounds as this CPU's F.interpolate does for {layout} scores of {channels} channels")
    assert formula.kind == kind or channels == 3  # 3 channels: by the thread count, either kernel
    expected = interpolate(scores, size)
    rows = BilinearRows(in_size, size, formula)
    assert torch.equal(rows.rows(scores, 0, size[0], torch.empty_like(expected)), expected)
    # any rows alone, into any strides: each output row depends on its own taps only
    for top, bottom in [(0, 1), (3, 17), (size[0] - 5, size[0]), (size[0] // 2, size[0] // 2 + 9)]:
        out = torch.empty(channels, bottom - top, size[1] + 3)[:, :, 1:-2]
        assert torch.equal(rows.rows(scores, top, bottom, out), expected[:, top:bottom])
    # another formula rounds differently: bit-for-bit equality is not a given
    other = BilinearFormula("four_point", channels) if formula.kind == "separable" else BilinearFormula("separable")
    assert not torch.equal(BilinearRows(in_size, size, other).rows(scores, 0, size[0], torch.empty_like(expected)), expected)


HELD_CASES = [
    # height, width, window, stride, scores' size
    (150, 230, (96, 80), (40, 50), (24, 20)),  # a stride under half the window: three window rows overlap
    (50, 230, (96, 80), (96, 60), (24, 20)),  # shorter than the window: padded rows
    (131, 97, (64, 72), (48, 40), (11, 13)),  # an odd output size, sizes that do not divide
]


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("height,width,window,stride,low", HELD_CASES)
def test_held_windows_blend_the_same_float32_scores_as_the_full_image_stitch(blend, layout, height, width, window, stride, low):
    plan = plan_windows(height, width, window, stride)
    window_scores = [scores_in(layout, 5, *low, seed=k) for k in range(len(plan))]
    reference = stitch_windows(plan, [interpolate(scores, window) for scores in window_scores], blend)
    stitcher = StreamingStitcher(plan, blend, keep_scores=True)
    out = torch.full(reference.shape, float("nan"))
    most_held = 0
    for scores in window_scores:
        for band in stitcher.add(scores):
            out[:, band.y0 : band.y0 + band.labels.shape[0]] = band.scores
            np.testing.assert_array_equal(band.labels, reference[:, band.y0 : band.y0 + band.labels.shape[0]].argmax(0).numpy())
        assert stitcher._held is not None and stitcher._scores is None  # windows held at their size, no band
        most_held = max(most_held, len(stitcher._held))
    assert stitcher.finished and not stitcher._held
    assert torch.equal(out, reference)  # the same additions in the same order: the same numbers
    # what it holds: the windows of the window rows that overlap the rows not emitted yet
    assert most_held <= (math.ceil(window[0] / stride[0]) + 1) * len(plan.xs)


def test_held_windows_do_not_grow_with_the_image_height():
    most = []
    for height in (200, 800):
        plan = plan_windows(height, 120, (64, 64), (48, 48))
        stitcher = StreamingStitcher(plan, "gaussian")
        held = 0
        for k in range(len(plan)):
            stitcher.add(scores_in("channels_last", 3, 16, 16, seed=k))
            held = max(held, len(stitcher._held))
        most.append(held)
    assert most[0] == most[1] <= 2 * 3  # at most two rows of three windows


def test_without_an_exact_formula_the_stitcher_resizes_with_f_interpolate_into_a_band(monkeypatch):
    monkeypatch.setattr(tiling, "bilinear_formula", lambda scores, size: None)
    plan = plan_windows(150, 230, (96, 80), (40, 50))
    window_scores = [scores_in("channels_last", 4, 24, 20, seed=k) for k in range(len(plan))]
    reference = stitch_windows(plan, [interpolate(scores, (96, 80)) for scores in window_scores], "gaussian")
    stitcher = StreamingStitcher(plan, "gaussian", keep_scores=True)
    bands = [band for scores in window_scores for band in stitcher.add(scores)]
    assert stitcher._held is None  # the band
    torch.testing.assert_close(torch.cat([band.scores for band in bands], dim=1), reference, atol=1e-5, rtol=0)


def channels_last_score_fn(num_classes: int = 6, seed: int = 0):
    """A conv net at output stride 4 whose scores come channels-last, as the SegFormer head's do."""
    score_fn = conv_score_fn(num_classes, seed)
    return lambda windows: score_fn(windows).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_segment_images_with_channels_last_scores_matches_plain_reference(blend):
    score_fn = channels_last_score_fn()
    images = [random_image(150, 260, 20), random_image(90, 70, 21)]
    settings = TilingSettings(window=(96, 128), stride=(64, 80), blend=blend, batch_size=3)
    for image, result in zip(images, segment_images(score_fn, images, settings)):
        expected = reference_slide_labels(score_fn, image, settings).argmax(0).numpy()
        np.testing.assert_array_equal(result.labels, expected)
        assert len(np.unique(result.labels)) > 1


def test_to_pixels_takes_cropped_and_flipped_windows():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    windows = [image[2:12, 5:25], image[::-1][:10, :20], image[:10, ::-1][:, :20]]
    expected = torch.from_numpy(np.stack([np.ascontiguousarray(w) for w in windows])).permute(0, 3, 1, 2).float()
    assert torch.equal(to_pixels(windows), expected)


# --------------------------------------------------------------------------- segment_images


def reference_slide_labels(score_fn, image, settings):
    """Slide inference written plainly: pad the whole image, run every window, resize, full stitch."""
    plan = plan_windows(image.shape[0], image.shape[1], settings.window, settings.stride)
    padded = np.zeros((plan.padded_height, plan.padded_width, 3), np.uint8)
    padded[plan.pad_top : plan.pad_top + plan.height, plan.pad_left : plan.pad_left + plan.width] = image
    wh, ww = settings.window
    window_scores = []
    for y0, x0 in plan.windows:
        pixels = torch.from_numpy(padded[y0 : y0 + wh, x0 : x0 + ww]).permute(2, 0, 1)[None].float()
        scores = F.interpolate(score_fn(pixels), size=(wh, ww), mode="bilinear", align_corners=False)
        window_scores.append(scores[0])
    return stitch_windows(plan, window_scores, settings.blend)


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_segment_images_slide_matches_plain_reference(blend):
    score_fn = conv_score_fn(num_classes=5)
    images = [random_image(70, 90, 0), random_image(20, 100, 1), random_image(33, 33, 2)]
    settings = TilingSettings(window=(32, 48), stride=(20, 30), blend=blend, batch_size=3)
    results = segment_images(score_fn, images, settings)
    for image, result in zip(images, results):
        assert isinstance(result, Segmentation) and result.probability is None
        assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.uint8
        expected = reference_slide_labels(score_fn, image, settings).argmax(0).numpy()
        np.testing.assert_array_equal(result.labels, expected)
        assert len(np.unique(result.labels)) > 1  # the test image is not trivially one class


def test_segmentations_yield_each_image_once_stitched_with_the_next_batch_gathered_on_a_thread():
    """`segmentations` (the predictor actor's call): each image as soon as its rows are stitched, in
    order, equal to segment_images'; with a gather executor every batch after the first is read on
    its thread while score_fn runs in this one, the batches those of segment_images."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    net = conv_score_fn(num_classes=5)
    images = [random_image(70, 90, 0), random_image(20, 100, 1), random_image(33, 33, 2)]
    settings = TilingSettings(window=(32, 48), stride=(20, 30), batch_size=3)
    calls, readers = [], set()

    def score_fn(windows):
        calls.append(len(windows))
        return net(windows)

    expected = segment_images(score_fn, images, settings)
    serial_calls, calls[:] = list(calls), []
    with ThreadPoolExecutor(1, thread_name_prefix="gather") as gather:
        seen = []
        for index, result in segmentations(score_fn, images, settings, gather=gather):
            seen.append((index, len(calls)))
            np.testing.assert_array_equal(result.labels, expected[index].labels)
    assert [index for index, _ in seen] == [0, 1, 2]
    assert seen[0][1] < len(serial_calls)  # the first image came out before the last batch ran
    assert calls == serial_calls and sum(calls) == sum(len(plan_windows(*i.shape[:2], (32, 48), (20, 30)).windows) for i in images)
    # the windows read on the gather thread: every batch's after the first
    plan = plan_windows(70, 90, (32, 48), (20, 30))
    read = lambda y, x, h, w: readers.add(threading.current_thread().name) or images[0][y : y + h, x : x + w]
    job = tiling._ImageJob(plan, read, StreamingStitcher(plan))
    with ThreadPoolExecutor(1, thread_name_prefix="gather") as gather:
        list(tiling._run_windows(score_fn, [job], (32, 48), BatchSizes(3), gather))
    assert readers == {threading.current_thread().name, "gather_0"}


def test_whole_mode_scores_the_image_once_and_resizes_the_scores_to_it():
    score_fn = conv_score_fn(num_classes=4)
    images = [random_image(45, 61, 3), random_image(8, 5, 4)]
    results = segment_images(score_fn, images, TilingSettings(mode="whole"))
    for image, result in zip(images, results):
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        scores = F.interpolate(score_fn(pixels), size=image.shape[:2], mode="bilinear", align_corners=False)
        np.testing.assert_array_equal(result.labels, scores[0].argmax(0).numpy())


def test_slide_with_window_equal_to_image_equals_whole():
    score_fn = conv_score_fn(num_classes=6)
    image = random_image(45, 61, 5)
    whole = segment_images(score_fn, [image], TilingSettings(mode="whole"))[0]
    for blend in ("mean", "gaussian"):
        slide = segment_images(score_fn, [image], TilingSettings(window=(45, 61), stride=(45, 61), blend=blend))[0]
        np.testing.assert_array_equal(slide.labels, whole.labels)


def test_slide_with_window_larger_than_image_equals_whole_for_a_pointwise_model():
    # the padding is cropped away: with a model whose scores at a pixel depend only on that pixel,
    # padding to the window changes nothing
    score_fn = conv_score_fn(num_classes=6, stride4=False)
    images = [random_image(23, 31, 6), random_image(40, 12, 7)]
    whole = segment_images(score_fn, images, TilingSettings(mode="whole"))
    slide = segment_images(score_fn, images, TilingSettings(window=(48, 40), stride=(24, 20), blend="gaussian"))
    for w, s in zip(whole, slide):
        np.testing.assert_array_equal(s.labels, w.labels)


def test_windows_of_several_images_in_one_batch_equal_one_image_at_a_time():
    score_fn = conv_score_fn(num_classes=5, seed=1)
    images = [random_image(50, 40, 8), random_image(17, 29, 9), random_image(64, 70, 10)]
    settings = TilingSettings(window=(24, 24), stride=(16, 16), blend="gaussian", batch_size=7)
    batched = segment_images(score_fn, images, settings)
    one_at_a_time = TilingSettings(window=(24, 24), stride=(16, 16), blend="gaussian", batch_size=1)
    one_by_one = [segment_images(score_fn, [image], one_at_a_time)[0] for image in images]
    for a, b in zip(batched, one_by_one):
        np.testing.assert_array_equal(a.labels, b.labels)


def out_of_memory_above(score_fn, most: int, calls: list[int]):
    """A stand-in for a device's memory: score_fn, raising torch.OutOfMemoryError (what CUDA's is a
    subclass of) for a batch of more than `most` windows; the size of every call into `calls`."""

    def scored(windows: torch.Tensor) -> torch.Tensor:
        calls.append(len(windows))
        if len(windows) > most:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {len(windows)} windows")
        return score_fn(windows)

    return scored


def test_a_batch_out_of_memory_is_halved_rerun_and_its_size_remembered_for_the_window_size():
    """Before, the OutOfMemoryError left segment_images (the actor then retried image by image, each
    at the same batch size: every image an errors row)."""
    score_fn = conv_score_fn(num_classes=4, seed=5)
    images = [random_image(50, 40, 21), random_image(33, 60, 22), random_image(70, 30, 23)]
    settings = TilingSettings(window=(24, 24), stride=(16, 16), batch_size=8)
    expected = segment_images(score_fn, images, TilingSettings(window=(24, 24), stride=(16, 16), batch_size=1))
    calls: list[int] = []
    sizes = BatchSizes(settings.batch_size)
    result = segment_images(out_of_memory_above(score_fn, 2, calls), images, settings, sizes)
    for a, b in zip(result, expected):
        np.testing.assert_array_equal(a.labels, b.labels)
    assert sizes.lowered == {(24, 24): 2} and sizes.of((48, 48)) == 8  # another window size keeps its own
    assert calls[:3] == [8, 4, 2] and set(calls[3:]) == {2}  # halved twice, then never tried above 2 again
    windows = sum(len(plan_windows(*image.shape[:2], (24, 24), (16, 16))) for image in images)
    assert sum(n for n in calls if n <= 2) == windows  # every window scored once
    calls.clear()  # the remembered size holds for the next images (the actor's next batch)
    streamed = list(
        segment_streaming(
            out_of_memory_above(score_fn, 2, calls), lambda y, x, h, w: images[0][y : y + h, x : x + w], 50, 40, settings, sizes
        )
    )
    assert set(calls) == {2} and np.array_equal(np.concatenate([labels for _, labels, _ in streamed]), expected[0].labels)
    with pytest.raises(torch.OutOfMemoryError):  # one window that does not fit is the image's error
        segment_images(out_of_memory_above(score_fn, 0, []), images[:1], settings, BatchSizes(8))


def test_binary_probability_is_softmax_of_blended_scores():
    score_fn = conv_score_fn(num_classes=2, seed=2)
    image = random_image(40, 50, 11)
    settings = TilingSettings(window=(24, 32), stride=(12, 20), blend="mean", binary=True)
    result = segment_images(score_fn, [image], settings)[0]
    blended = reference_slide_labels(score_fn, image, settings)
    expected = torch.softmax(blended, 0)[1].numpy()
    assert result.probability.dtype == np.float32 and result.probability.shape == (40, 50)
    np.testing.assert_allclose(result.probability, expected, atol=1e-5)
    np.testing.assert_array_equal(result.labels, blended.argmax(0).numpy())
    whole = segment_images(score_fn, [image], TilingSettings(mode="whole", binary=True))[0]
    assert whole.probability.shape == (40, 50) and 0 <= whole.probability.min() <= whole.probability.max() <= 1
    with pytest.raises(ValueError, match="2 classes"):
        segment_images(conv_score_fn(num_classes=3), [image], settings)


@pytest.mark.parametrize("stride4", [True, False])  # held windows (scores at the output stride) and a band (at the window's)
def test_confidence_is_the_max_softmax_of_the_blended_scores_in_slide_whole_and_streamed_images(stride4):
    """output.confidence's rows: each pixel's largest class probability, beside labels that stay as
    they were; nothing of it unless asked (before: multi-class runs kept only the argmax)."""
    score_fn = conv_score_fn(num_classes=5, seed=4, stride4=stride4)
    image = random_image(70, 90, 14)
    plain = TilingSettings(window=(32, 48), stride=(20, 30), blend="gaussian", batch_size=3)
    settings = TilingSettings(window=(32, 48), stride=(20, 30), blend="gaussian", batch_size=3, confidence=True)
    result, without = segment_images(score_fn, [image], settings)[0], segment_images(score_fn, [image], plain)[0]
    expected = torch.softmax(reference_slide_labels(score_fn, image, settings), 0).amax(0).numpy()
    assert without.probability is None and result.probability.dtype == np.float32
    np.testing.assert_allclose(result.probability, expected, atol=1e-5)
    np.testing.assert_array_equal(result.labels, without.labels)
    streamed = list(segment_streaming(score_fn, lambda y, x, h, w: image[y : y + h, x : x + w], 70, 90, settings))
    np.testing.assert_array_equal(np.concatenate([p for _, _, p in streamed]), result.probability)
    whole = segment_images(score_fn, [image], TilingSettings(mode="whole", confidence=True))[0]
    scores = F.interpolate(score_fn(to_pixels([image])), size=(70, 90), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(whole.probability, torch.softmax(scores, 0).amax(0).numpy(), atol=1e-5)
    shares = torch.softmax(scores, 0)  # scores that are probabilities already: the largest share of their sum
    _, largest = tiling.labels_and_probability(shares * 3, tiling.Confidence("probabilities"))
    np.testing.assert_allclose(largest, shares.amax(0).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="ask for one of them"):
        TilingSettings(binary=True, confidence=True)


@pytest.mark.parametrize("stride4", [True, False])
@pytest.mark.parametrize("beside", [{}, {"binary": True}, {"confidence": True}])
def test_the_stitcher_on_the_models_device_forced_on_the_cpu_gives_todays_labels_and_probabilities(stride4, beside):
    """stitch_device: the band where the model's scores are (resized by F.interpolate there, blended,
    reduced to labels), only label and probability rows back. On the CPU it must equal today's path
    (held windows or a band) bit for bit, in slide and whole mode; on a GPU, labels may differ only
    where two classes tie within float error."""
    score_fn = conv_score_fn(num_classes=2 if beside.get("binary") else 5, seed=6, stride4=stride4)
    images = [random_image(70, 90, 15), random_image(20, 100, 16)]
    for settings in (
        TilingSettings(window=(32, 48), stride=(20, 30), blend="gaussian", batch_size=3, **beside),
        TilingSettings(mode="whole", **beside),
    ):
        today = segment_images(score_fn, images, settings)
        on_device = segment_images(score_fn, images, settings, stitch_device=torch.device("cpu"))
        for a, b in zip(today, on_device):
            np.testing.assert_array_equal(b.labels, a.labels)
            assert (a.probability is None) == (b.probability is None) == (not beside)
            if a.probability is not None:
                np.testing.assert_array_equal(b.probability, a.probability)


def test_the_device_stitcher_out_of_memory_goes_on_on_the_cpu_with_the_same_labels_and_remembers_the_size(monkeypatch, caplog):
    """The stitcher on the model's device (forced on the CPU) with a stand-in for the device's memory:
    its resize (tiling._resize_on_device) or its reduction to labels
    (labels_and_probability's first call) raises torch.OutOfMemoryError once, in the middle of the
    first image. That image goes on on the CPU; every image gets today's labels and confidence; the
    bytes that stitch needed are remembered (BatchSizes.report(): run.json's lowered_batch_sizes),
    so a later image as wide starts on the CPU while a narrower one stays on the device; one warning.
    In whole mode the full-size resize runs out for images above 5000 pixels. Before: the error left
    segment_images (the actor's retry then made each image an errors row)."""
    score_fn = conv_score_fn(num_classes=5, seed=6)
    images = [random_image(70, 90, 15), random_image(20, 40, 16), random_image(80, 100, 17)]  # wide, narrow, wider
    settings = TilingSettings(window=(32, 48), stride=(20, 30), blend="gaussian", batch_size=3, confidence=True)
    whole = TilingSettings(mode="whole", confidence=True)
    interpolate, reduce = tiling._resize_on_device, tiling.labels_and_probability
    for step, mode in (("resize", settings), ("reduction", settings), ("resize", whole)):
        today = segment_images(score_fn, images, mode)
        calls: list[int] = []

        def resize(scores, size, calls=calls, whole=mode.mode == "whole", fails=step == "resize"):
            calls.append(size[0] * size[1])
            if fails and ((len(calls) == 2 and not whole) or (whole and size[0] * size[1] > 5000)):
                raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
            return interpolate(scores, size)

        def reduction(scores, beside, calls=calls):
            calls.append(-1)
            if calls.count(-1) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
            return reduce(scores, beside)

        monkeypatch.setattr(tiling, "_resize_on_device", resize)
        monkeypatch.setattr(tiling, "labels_and_probability", reduction if step == "reduction" else reduce)
        sizes = BatchSizes(mode.batch_size)
        caplog.clear()
        result = segment_images(score_fn, images, mode, sizes, stitch_device=torch.device("cpu"))
        for a, b in zip(today, result):
            np.testing.assert_array_equal(b.labels, a.labels)
            np.testing.assert_array_equal(b.probability, a.probability)
        warned = [r for r in caplog.records if "out of device memory stitching" in r.getMessage()]
        assert len(warned) == 1, (step, mode.mode)
        if mode.mode == "whole":
            assert sizes.stitch_on_cpu_from == 5 * 70 * 90 * 4 and calls == [70 * 90, 20 * 40]  # the wider one: the CPU's
        else:
            assert sizes.stitch_on_cpu_from == (5 + 1) * 32 * 90 * 4  # the first image's band
        if step == "resize" and mode.mode == "slide":
            # the narrow image's windows still resized on the device, none of the wider one's
            assert len(calls) == 2 + len(plan_windows(20, 40, (32, 48), (20, 30)))
        assert sizes.report() == {"stitcher_on_cpu_from_bytes": sizes.stitch_on_cpu_from} and sizes.lowered == {}
        monkeypatch.undo()


def test_many_classes_give_uint16_labels():
    image = random_image(12, 14, 12)
    result = segment_images(conv_score_fn(num_classes=300), [image], TilingSettings(window=(8, 8), stride=(4, 4)))[0]
    assert result.labels.dtype == np.uint16 and result.labels.max() < 300


def test_segment_streaming_yields_rows_in_order_and_matches_segment_images():
    score_fn = conv_score_fn(num_classes=2, seed=3)
    image = random_image(150, 70, 13)
    settings = TilingSettings(window=(32, 32), stride=(24, 24), blend="gaussian", batch_size=4, binary=True)
    reads = []

    def read_window(y, x, h, w):
        reads.append((y, x, h, w))
        assert y >= 0 and x >= 0 and y + h <= 150 and x + w <= 70
        return image[y : y + h, x : x + w]

    bands = list(segment_streaming(score_fn, read_window, 150, 70, settings))
    assert len(bands) > 1 and bands[0][0] == 0
    assert all(a[0] + a[1].shape[0] == b[0] for a, b in itertools.pairwise(bands))
    labels = np.concatenate([b[1] for b in bands])
    probability = np.concatenate([b[2] for b in bands])
    expected = segment_images(score_fn, [image], settings)[0]
    np.testing.assert_array_equal(labels, expected.labels)
    np.testing.assert_array_equal(probability, expected.probability)
    assert all((h, w) == (32, 32) for _, _, h, w in reads)  # only windows were read, never the whole image


# --------------------------------------------------------------------------- test-time augmentation


def pointwise_score_fn(num_classes: int = 3, seed: int = 0):
    """A 1 x 1 conv: every pixel scored alone, so the model commutes with flips exactly, and with
    bilinear resizing too (an affine map of the pixel values)."""
    conv = torch.nn.Conv2d(3, num_classes, 1)
    torch.manual_seed(seed)
    torch.nn.init.normal_(conv.weight, std=0.05)
    torch.nn.init.normal_(conv.bias, std=1.0)

    def score_fn(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return conv(pixels / 255.0)

    return score_fn


def blocks_image(height: int, width: int, block: int, seed: int = 0) -> np.ndarray:
    """Constant-colour blocks: bilinear resizing changes nothing inside a block."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (height // block + 1, width // block + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(colours, block, 0), block, 1)[:height, :width])


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_flip_tta_of_a_flip_equivariant_model_changes_nothing(mode):
    image = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    score_fn = pointwise_score_fn(2)
    settings = TilingSettings(mode=mode, window=(32, 32), stride=(20, 20), blend="gaussian", binary=True)
    plain = segment_images(score_fn, [image], settings)[0]
    flipped = segment_images(TTAScoreFn(score_fn, flip=True), [image], settings)[0]
    np.testing.assert_array_equal(flipped.labels, plain.labels)
    np.testing.assert_allclose(flipped.probability, plain.probability, atol=1e-6)


def test_tta_flipped_view_is_mirrored_back_before_averaging():
    """A model that ignores its input and scores by column: with flip, the two views' ramps run in
    opposite directions once mirrored back, so their mean is flat. Without the mirror it would
    still be the ramp."""

    def column_ramp(pixels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = pixels.shape
        ramp = torch.arange(w, dtype=torch.float32).expand(n, 1, h, w)
        return torch.cat([torch.zeros_like(ramp), ramp], dim=1)

    scores = TTAScoreFn(column_ramp, flip=True)(torch.zeros(2, 3, 5, 8))
    torch.testing.assert_close(scores[:, 1], torch.full((2, 5, 8), 3.5))
    torch.testing.assert_close(scores[:, 0], torch.zeros(2, 5, 8))


def test_tta_scales_run_each_view_at_its_size_and_average_them():
    """Scores that report the height each view was run at: scales 0.5, 1 and 2 of a 32-row window
    average to (16 + 32 + 64) / 3, at the output size of the largest view (a quarter of 64 x 96)."""

    def height_at_stride_4(pixels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = pixels.shape
        return torch.full((n, 2, (h + 3) // 4, (w + 3) // 4), float(h))

    scores = TTAScoreFn(height_at_stride_4, scales=[0.5, 1.0, 2.0])(torch.zeros(3, 3, 32, 48))
    assert scores.shape == (3, 2, 16, 24)
    torch.testing.assert_close(scores, torch.full((3, 2, 16, 24), 112 / 3))
    # with flip too, each scale counts twice and the mean is the same
    torch.testing.assert_close(
        TTAScoreFn(height_at_stride_4, flip=True, scales=[0.5, 1.0, 2.0])(torch.zeros(1, 3, 32, 48)), torch.full((1, 2, 16, 24), 112 / 3)
    )
    # the output never exceeds the window: a model at full resolution with an upscaled view
    full = TTAScoreFn(lambda x: torch.zeros(x.shape[0], 2, *x.shape[-2:]), scales=[1.5, 1.0])(torch.zeros(1, 3, 20, 30))
    assert full.shape == (1, 2, 20, 30)


def test_tta_scales_change_nothing_for_a_scale_invariant_model_inside_blocks():
    image = blocks_image(96, 128, block=16)
    score_fn = pointwise_score_fn(3)
    settings = TilingSettings(window=(64, 64), stride=(32, 32))
    plain = segment_images(score_fn, [image], settings)[0].labels
    tta = TTAScoreFn(score_fn, flip=True, scales=[0.75, 1.0, 1.5])
    multi = segment_images(tta, [image], settings)[0].labels
    # resampling only blurs the blocks' edges: 3 pixels in from every edge the labels are the same
    inside = np.zeros(image.shape[:2], bool)
    for y in range(0, 96, 16):
        for x in range(0, 128, 16):
            inside[y + 3 : y + 13, x + 3 : x + 13] = True
    np.testing.assert_array_equal(multi[inside], plain[inside])
    assert (multi == plain).mean() > 0.9


def test_streamed_and_in_memory_images_get_the_same_tta():
    image = np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    tta = TTAScoreFn(pointwise_score_fn(3, seed=3), flip=True, scales=[1.0, 0.5])
    settings = TilingSettings(window=(32, 32), stride=(24, 24), blend="gaussian")
    expected = segment_images(tta, [image], settings)[0].labels
    streamed = np.concatenate(
        [labels for _, labels, _ in segment_streaming(tta, lambda y, x, h, w: image[y : y + h, x : x + w], 70, 90, settings)]
    )
    np.testing.assert_array_equal(streamed, expected)


def test_with_tta_is_the_plain_score_fn_when_there_is_nothing_to_augment():
    score_fn = pointwise_score_fn()
    assert with_tta(score_fn, flip=False, scales=[1.0]) is score_fn
    assert isinstance(with_tta(score_fn, flip=False, scales=[1.0, 1.25]), TTAScoreFn)
    with pytest.raises(ValueError, match="positive"):
        TTAScoreFn(score_fn, scales=[1.0, 0.0])


def test_tiling_settings_from_the_config_carry_every_inference_field_the_tiler_reads():
    """One TilingSettings.from_config for the actor and the dry run: before, the dry run built its own
    and dropped blend and batch size."""
    from pipeline.config import load_config

    inference = {"mode": "slide", "window": [48, 64], "stride": [32, 40], "blend": "gaussian", "batch_size": 3}
    cfg = load_config({"input": {"uri": "/x"}, "model": {"name": "segformer-b0"}, "inference": inference})
    settings = TilingSettings.from_config(cfg.inference)
    assert (settings.mode, settings.window, settings.stride, settings.blend, settings.batch_size) == (
        "slide",
        (48, 64),
        (32, 40),
        "gaussian",
        3,
    )
    assert settings.foreground is None and settings.beside is None and not settings.confidence
    binary = TilingSettings.from_config(cfg.inference, binary=True, positive_class=0, score_kind="probabilities")
    assert (binary.binary, binary.positive_class, binary.score_kind) == (True, 0, "probabilities")
