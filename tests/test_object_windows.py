"""pipeline.predict.object_windows: objects of an image from a query model's windows equal those of one
pass over the whole image (the instance task's merge across window edges, the panoptic task's
painting), with the semantic rows of the same passes.

The model here is analytic, so that an object's extent is known: query 0 sees red pixels (class 0),
query 1 green ones (class 1), query 2 predicts nothing; masks at stride 4 as the query models give them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.predict.object_windows import ObjectSettings, find_objects, find_segments, paint_segments
from pipeline.predict.objects import ImageObject
from pipeline.predict.tiling import TilingSettings


def colour_queries(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = pixels.shape[0]
    pooled = F.avg_pool2d(pixels, 4)  # N x 3 x h/4 x w/4
    red = (pooled[:, 0] > 128) & (pooled[:, 1] < 128)
    green = (pooled[:, 1] > 128) & (pooled[:, 0] < 128)
    masks = torch.stack([red, green, torch.zeros_like(red)], 1).float() * 20 - 10
    class_logits = torch.tensor([[10.0, 0, 0], [0, 10, 0], [0, 0, 10]]).expand(n, 3, 3)
    return class_logits.clone(), masks


def scene() -> np.ndarray:
    image = np.zeros((100, 92, 3), np.uint8)
    image[28:72, 24:68, 0] = 255  # red: across the windows' edges (windows of 48 every 32)
    image[76:96, 8:40, 1] = 255  # green: another object, another class
    return image


def run(image: np.ndarray, mode: str, task: str) -> tuple[list[ImageObject], np.ndarray]:
    tiling = TilingSettings(mode=mode, window=(48, 48), stride=(32, 32), batch_size=3, score_kind="probabilities")
    found: list[ImageObject] = []
    labels = np.full(image.shape[:2], 255, np.uint8)
    read = lambda y, x, h, w: image[y : y + h, x : x + w]
    for y0, rows, _ in find_objects(colour_queries, read, *image.shape[:2], tiling, ObjectSettings(task, threshold=0.5), found):
        labels[y0 : y0 + rows.shape[0]] = rows
    return found, labels


def test_an_object_across_four_windows_is_one_instance_whose_mask_is_the_whole_image_runs():
    image = scene()
    whole, _ = run(image, "whole", "instance")
    slide, labels = run(image, "slide", "instance")
    assert [o.class_id for o in whole] == [0, 1] and [o.class_id for o in slide] == [0, 1]
    for a, b in zip(slide, whole):
        np.testing.assert_array_equal(a.full_mask(image.shape[:2]), b.full_mask(image.shape[:2]))
        assert a.bbox == b.bbox and a.area == b.area
    red = slide[0].full_mask(image.shape[:2])
    assert red[30:70, 26:66].all() and not red[:20].any()  # the red square, not a window's piece of it
    assert (labels != 255).all()  # the semantic rows cover the image once


def test_panoptic_windows_painted_equal_one_pass_over_the_image():
    image = scene()
    tiling = TilingSettings(mode="slide", window=(48, 48), stride=(32, 32), batch_size=4, score_kind="probabilities")
    settings = ObjectSettings("panoptic", threshold=0.8)
    slide = find_segments(colour_queries, image, tiling, settings)
    whole = find_segments(colour_queries, image, TilingSettings(mode="whole", score_kind="probabilities"), settings)
    assert len(slide) == len(whole) == 2
    lut_slide = np.concatenate([[-1], slide.class_id])
    lut_whole = np.concatenate([[-1], whole.class_id])
    np.testing.assert_array_equal(lut_slide[slide.segment_map], lut_whole[whole.segment_map])
    assert sorted(slide.area) == sorted(whole.area) and slide.is_thing.all()


def test_painting_gives_pixels_to_the_higher_score_and_fuses_stuff_per_class():
    def obj(cls, score, y, x, h, w):
        return ImageObject(cls, score, (x, y, w, h), np.ones((h, w), bool), h * w)

    objects = [obj(1, 0.6, 0, 0, 4, 4), obj(2, 0.9, 2, 2, 4, 4), obj(3, 0.8, 0, 6, 2, 2), obj(3, 0.6, 6, 6, 2, 2)]
    segments = paint_segments(objects, (8, 8), stuff_classes=(3,))
    assert segments.class_id.tolist() == [2, 3, 1]  # by score; the class-3 pieces are one segment of score 0.7
    assert segments.segment_map[3, 3] == 1 and segments.segment_map[0, 0] == 3
    assert segments.area.tolist() == [16, 8, 12] and segments.is_thing.tolist() == [True, False, True]
    assert segments.bbox[1].tolist() == [6, 0, 2, 8]  # x, y, w, h of the fused stuff segment


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_an_image_without_objects_gives_none_and_a_void_map(mode):
    image = np.zeros((40, 52, 3), np.uint8)
    found, labels = run(image, mode, "instance")
    assert found == [] and labels.shape == (40, 52)
    tiling = TilingSettings(mode=mode, window=(48, 48), stride=(32, 32), score_kind="probabilities")
    segments = find_segments(colour_queries, image, tiling, ObjectSettings("panoptic", threshold=0.8))
    assert len(segments) == 0 and not segments.segment_map.any()


def test_windows_a_skip_refuses_are_not_run_have_no_objects_and_leave_their_pixels_255_in_the_plans_order():
    """Rasters' no-data windows and slides' windows without tissue: find_objects' skip_window. The
    windows over black only are skipped (their place in the stitcher's order kept, in batches that mix
    both); the objects and the labels of the windows run are those of running every window."""
    image = np.concatenate([scene(), np.zeros((100, 68, 3), np.uint8)], axis=1)  # on the right: black, no object
    tiling = TilingSettings(mode="slide", window=(48, 48), stride=(32, 32), batch_size=3, score_kind="probabilities")
    read = lambda y, x, h, w: image[y : y + h, x : x + w]
    black = lambda top, left, h, w: not image[top : top + h, left : left + w].any()
    calls: list[int] = []
    counting = lambda pixels: calls.append(len(pixels)) or colour_queries(pixels)
    found: list[ImageObject] = []
    labels = np.full(image.shape[:2], 7, np.uint8)
    bands = find_objects(counting, read, *image.shape[:2], tiling, ObjectSettings("instance", threshold=0.5), found, skip_window=black)
    for y0, rows, _ in bands:
        labels[y0 : y0 + rows.shape[0]] = rows
    every, every_labels = run(image, "slide", "instance")
    from pipeline.predict.tiling import plan_windows

    windows = plan_windows(100, 160, (48, 48), (32, 32)).windows
    assert 0 < sum(calls) < len(windows) and (labels != 7).all()  # some windows skipped; every row came once
    assert [(o.class_id, o.bbox, o.area) for o in found] == [(o.class_id, o.bbox, o.area) for o in every]
    run_pixels = labels != 255
    # windows at the edge of those run blend with fewer neighbours (as a slide's, tests/test_slide.py)
    assert not run_pixels.all() and (labels[run_pixels] == every_labels[run_pixels]).mean() > 0.99
