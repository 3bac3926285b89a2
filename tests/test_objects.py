"""pipeline.predict.objects: instance and panoptic post-processing equal to transformers' processors, and
instances merged across sliding windows (COCO RLE: tests/test_coco_codec.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import saved_hf_model, tiny_mask2former_config, tiny_maskformer_config
from pycocotools import mask as coco_mask
from transformers import (
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessorPil,
    MaskFormerForInstanceSegmentation,
    MaskFormerImageProcessorPil,
)
from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

from models import load_model
from pipeline.predict.objects import (
    ImageObject,
    Instances,
    WindowInstanceMerger,
    instances_from_queries,
    merge_window_instances,
    panoptic_from_queries,
)

# pycocotools' decode on numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

TARGET = (61, 90)  # odd, and not a multiple of the logits' 16 x 24

# ---------------------------------------------------------------------------------------------
# Query outputs of tiny random MaskFormer and Mask2Former, loaded into ours
# ---------------------------------------------------------------------------------------------

FAMILIES = {
    # family: (transformers model, its config, its processor, where it binarises masks)
    "maskformer": (MaskFormerForInstanceSegmentation, tiny_maskformer_config, MaskFormerImageProcessorPil, None),
    "mask2former": (
        Mask2FormerForUniversalSegmentation,
        lambda: tiny_mask2former_config(num_queries=12),
        Mask2FormerImageProcessorPil,
        (384, 384),
    ),
}


def varied(class_logits: torch.Tensor, mask_logits: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random model's queries all predict about the same class and mask: add a random class bias
    per query and a disc per query to the mask logits (positive inside), so that the queries
    disagree, overlap in part and several of them become segments."""
    g = torch.Generator().manual_seed(seed)
    q, h, w = mask_logits.shape
    ys, xs = torch.arange(h).view(1, h, 1).float(), torch.arange(w).view(1, 1, w).float()
    cy, cx = torch.rand(q, 1, 1, generator=g) * h, torch.rand(q, 1, 1, generator=g) * w
    radius = 2 + torch.rand(q, 1, 1, generator=g) * 6
    disc = 6 * (radius - ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()) / radius
    return class_logits + 4 * torch.randn(class_logits.shape, generator=g), 0.2 * mask_logits + disc


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(processor, class_logits Q x (C+1), mask_logits Q x h x w, mask_size) of one family."""
    hf_class, config, processor, mask_size = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    saved_hf_model(hf_class, config(), path)
    model = load_model(path).eval()
    with torch.no_grad():
        class_logits, mask_logits = model.forward_queries(torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)))
    mask_size = mask_size or tuple(mask_logits.shape[-2:])  # MaskFormer's processor: the logits' own size
    return processor(), class_logits[0], mask_logits[0], mask_size


def hf_output(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> Mask2FormerForUniversalSegmentationOutput:
    return Mask2FormerForUniversalSegmentationOutput(class_queries_logits=class_logits[None], masks_queries_logits=mask_logits[None])


def masks_boxes(masks: np.ndarray) -> list[list[int]]:
    """COCO boxes of binary masks, through pycocotools."""
    encoded = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return coco_mask.toBbox(encoded).astype(int).tolist()


# ---------------------------------------------------------------------------------------------
# Instance and panoptic segmentation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 2, 5])
def test_instances_equal_transformers(family, seed):
    processor, class_logits, mask_logits, mask_size = family
    class_logits, mask_logits = varied(class_logits, mask_logits, seed)
    ours = instances_from_queries(class_logits, mask_logits, TARGET, threshold=0.2, mask_size=mask_size)
    reference = processor.post_process_instance_segmentation(
        hf_output(class_logits, mask_logits), threshold=0.2, target_sizes=[TARGET], return_binary_maps=True
    )[0]
    info = reference["segments_info"]
    assert len(info) >= 3 and len({s["label_id"] for s in info}) >= 2  # several segments, several classes
    # transformers keeps an unsorted top-k's order; ours is by score
    order = sorted(range(len(info)), key=lambda i: -info[i]["score"])
    assert len(ours) == len(info)
    assert ours.class_id.tolist() == [info[i]["label_id"] for i in order]
    np.testing.assert_allclose(ours.score, [info[i]["score"] for i in order], atol=1e-5)
    expected_masks = reference["segmentation"].numpy()[order] == 1
    assert ours.masks.shape == (len(info), *TARGET) and np.array_equal(ours.masks, expected_masks)
    assert ours.area.tolist() == expected_masks.sum((1, 2)).tolist()
    assert ours.bbox.tolist() == masks_boxes(expected_masks)


def transformers_segments(segments_info: list[dict]) -> list[dict]:
    """transformers' segments_info lists one entry per query that made a segment: a fused (stuff)
    class's later queries repeat its entry. The distinct segments, in the order they were made."""
    made, stuff = [], set()
    for entry in segments_info:
        if entry["was_fused"] and entry["label_id"] in stuff:
            continue
        made.append(entry)
        if entry["was_fused"]:
            stuff.add(entry["label_id"])
    return made


@pytest.mark.parametrize("seed", [0, 2, 5])
def test_panoptic_equals_transformers(family, seed):
    """Same segments, classes, scores and pixels. Segment ids are transformers' wherever its ids are
    distinct; where it gives two segments one id (a reused stuff id resets its counter: see
    test_panoptic_ids_stay_distinct_after_a_fused_segment_reappears), ours split that id's pixels."""
    processor, class_logits, mask_logits, mask_size = family
    class_logits, mask_logits = varied(class_logits, mask_logits, seed)
    kwargs = dict(threshold=0.3, mask_threshold=0.4, overlap_mask_area_threshold=0.6, label_ids_to_fuse={1, 3, 5})
    ours = panoptic_from_queries(class_logits, mask_logits, TARGET, mask_size=mask_size, **kwargs)
    reference = processor.post_process_panoptic_segmentation(hf_output(class_logits, mask_logits), target_sizes=[TARGET], **kwargs)[0]
    expected, expected_map = transformers_segments(reference["segments_info"]), reference["segmentation"].numpy()
    assert len(expected) >= 2
    assert ours.segment_id.tolist() == list(range(1, len(expected) + 1)) and ours.segment_map.dtype == np.int32
    assert ours.class_id.tolist() == [s["label_id"] for s in expected]
    np.testing.assert_allclose(ours.score, [s["score"] for s in expected], atol=1e-5)
    assert ours.is_thing.tolist() == [not s["was_fused"] for s in expected]
    assert np.array_equal(ours.segment_map == 0, expected_map == 0)  # the same void
    hf_ids = np.array([0] + [s["id"] for s in expected])
    assert np.array_equal(hf_ids[ours.segment_map], expected_map)  # each of our segments lies in its transformers id
    if len(set(hf_ids)) == len(hf_ids):
        assert np.array_equal(ours.segment_map, expected_map)
    segment_masks = ours.segment_map[None] == ours.segment_id[:, None, None]
    assert ours.area.tolist() == segment_masks.sum((1, 2)).tolist()
    assert ours.bbox.tolist() == masks_boxes(segment_masks)


def test_panoptic_fuses_stuff_queries_into_one_segment(family):
    """Two queries of a stuff class in disjoint halves become one segment; two of a thing class
    stay two; is_thing follows thing_ids when given."""
    _, class_logits, mask_logits, mask_size = family
    q, num_labels = class_logits.shape[0], class_logits.shape[1] - 1
    classes = torch.full((q, num_labels + 1), -10.0)
    classes[:, num_labels] = 10.0  # every query: no object ...
    halves = torch.full((q, *mask_logits.shape[1:]), -10.0)
    for k, (cls, rows) in enumerate([(2, slice(0, 4)), (2, slice(4, 8)), (0, slice(8, 12)), (0, slice(12, 16))]):
        classes[k] = -10.0
        classes[k, cls] = 10.0  # ... except four: class 2 (stuff) twice, class 0 (thing) twice
        halves[k, rows] = 10.0
    ours = panoptic_from_queries(classes, halves, TARGET, label_ids_to_fuse={2}, mask_size=mask_size)
    assert ours.segment_id.tolist() == [1, 2, 3] and ours.class_id.tolist() == [2, 0, 0]
    assert ours.is_thing.tolist() == [False, True, True]
    assert ours.area.sum() == TARGET[0] * TARGET[1] and np.unique(ours.segment_map).tolist() == [1, 2, 3]
    assert panoptic_from_queries(classes, halves, TARGET, label_ids_to_fuse={2}, thing_ids={2}).is_thing.tolist() == [True, False, False]


def test_panoptic_ids_stay_distinct_after_a_fused_segment_reappears():
    """transformers' compute_segments continues counting from the reused stuff id (stuff A, thing B,
    stuff A again, thing C gives C the id of B); ours gives C a new one."""
    classes = torch.full((4, 4), -10.0)
    for k, cls in enumerate([0, 1, 0, 2]):
        classes[k, cls] = 10.0
    masks = torch.full((4, 8, 8), -10.0)
    for k in range(4):
        masks[k, 2 * k : 2 * k + 2] = 10.0
    ours = panoptic_from_queries(classes, masks, (8, 8), label_ids_to_fuse={0})
    assert ours.segment_id.tolist() == [1, 2, 3] and ours.class_id.tolist() == [0, 1, 2]
    assert ours.segment_map[:, 0].tolist() == [1, 1, 2, 2, 1, 1, 3, 3]


def test_no_query_above_threshold_gives_void_and_no_instances():
    classes = torch.zeros(3, 5)
    classes[:, -1] = 10.0  # no object, everywhere
    masks = torch.randn(3, 4, 6)
    panoptic = panoptic_from_queries(classes, masks, (7, 9))
    assert len(panoptic) == 0 and panoptic.segment_map.shape == (7, 9) and not panoptic.segment_map.any()
    assert panoptic.bbox.shape == (0, 4)
    instances = instances_from_queries(classes, masks, (7, 9))
    assert len(instances) == 0 and instances.masks.shape == (0, 7, 9) and instances.bbox.shape == (0, 4)


def test_masks_binarised_at_the_target_size_by_default():
    """The default upsamples the logits before thresholding (smooth edges); at the logits' own
    size the mask is blocks of the upsampling factor."""
    classes = torch.tensor([[10.0, -10.0, -10.0]])
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    masks = (3.0 - ((ys - 3.5) ** 2 + (xs - 3.5) ** 2).sqrt())[None]  # a disc of radius 3
    smooth = instances_from_queries(classes, masks, (32, 32)).masks[0]
    blocky = instances_from_queries(classes, masks, (32, 32), mask_size=(8, 8)).masks[0]
    assert np.array_equal(blocky, np.repeat(np.repeat(blocky[::4, ::4], 4, 0), 4, 1))
    assert not np.array_equal(smooth, np.repeat(np.repeat(smooth[::4, ::4], 4, 0), 4, 1))
    assert 0 < np.count_nonzero(smooth != blocky) < 0.2 * blocky.sum()


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="one image"):
        instances_from_queries(torch.zeros(1, 3, 4), torch.zeros(1, 3, 8, 8), (8, 8))
    with pytest.raises(ValueError, match="mask_threshold"):
        instances_from_queries(torch.zeros(3, 4), torch.zeros(3, 8, 8), (8, 8), mask_threshold=1.0)


# ---------------------------------------------------------------------------------------------
# Merging instances across windows
# ---------------------------------------------------------------------------------------------


def window_instances(objects: list[tuple[int, float, np.ndarray]], y: int, x: int, size: tuple[int, int]) -> Instances:
    """What a model that sees each whole-image object perfectly gives for the window at (y, x):
    each object's part inside the window (objects outside it left out)."""
    kept = [(c, s, m[y : y + size[0], x : x + size[1]]) for c, s, m in objects if m[y : y + size[0], x : x + size[1]].any()]
    return Instances(
        class_id=np.array([c for c, _, _ in kept], np.int64),
        score=np.array([s for _, s, _ in kept], np.float32),
        masks=np.stack([m for _, _, m in kept]) if kept else np.zeros((0, *size), bool),
    )


def disc(size: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    ys, xs = np.ogrid[: size[0], : size[1]]
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= r**2


def windows_over(objects, image: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]):
    ys = list(range(0, image[0] - window[0] + 1, stride[0]))
    xs = list(range(0, image[1] - window[1] + 1, stride[1]))
    return [((y, x), window_instances(objects, y, x, window)) for y in ys for x in xs]


def test_an_object_over_four_windows_merges_into_one():
    image = (60, 70)
    blob = disc(image, 30, 35, 17)
    blob[30:34, 20:50] = True  # not quite round
    windows = windows_over([(4, 0.9, blob)], image, (40, 45), (20, 25))  # 2 x 2 windows, 20 x 20 overlap
    assert len(windows) == 4 and all(len(instances) == 1 for _, instances in windows)
    (merged,) = merge_window_instances(windows)
    assert isinstance(merged, ImageObject) and merged.class_id == 4 and merged.score == pytest.approx(0.9)
    assert np.array_equal(merged.full_mask(image), blob) and merged.area == blob.sum()
    assert list(merged.bbox) == coco_mask.toBbox(coco_mask.encode(np.asfortranarray(blob.astype(np.uint8)))).astype(int).tolist()
    assert merged.mask.shape == (merged.bbox[3], merged.bbox[2])  # kept within its box


def test_touching_objects_of_different_classes_or_without_common_pixels_stay_apart():
    image = (60, 70)
    left, right, below = (np.zeros(image, bool) for _ in range(3))
    left[15:45, 10:35] = True
    right[15:45, 35:60] = True  # touches `left` along a column, in the windows' overlap
    below[45:58, 10:35] = True  # touches `left` along a row, same class
    objects = [(1, 0.8, left), (2, 0.7, right), (1, 0.6, below)]
    merged = merge_window_instances(windows_over(objects, image, (40, 45), (20, 25)))
    assert sorted((o.class_id, o.area) for o in merged) == sorted((c, int(m.sum())) for c, _, m in objects)
    for obj in merged:
        (expected,) = [m for c, s, m in objects if c == obj.class_id and m.sum() == obj.area]
        assert np.array_equal(obj.full_mask(image), expected)


def test_merged_score_is_the_area_weighted_mean_of_the_pieces():
    image = (20, 40)
    bar = np.zeros(image, bool)
    bar[5:15, 5:35] = True
    first = window_instances([(0, 0.9, bar)], 0, 0, (20, 25))  # sees 20 columns of the bar
    second = window_instances([(0, 0.5, bar)], 0, 15, (20, 25))  # sees 20 too, 10 of them shared
    (merged,) = merge_window_instances([((0, 0), first), ((0, 15), second)])
    assert merged.score == pytest.approx((0.9 * 200 + 0.5 * 200) / 400)
    assert np.array_equal(merged.full_mask(image), bar)


def test_merger_emits_objects_once_no_later_window_reaches_them():
    image = (80, 40)
    top, tall = np.zeros(image, bool), np.zeros(image, bool)
    top[2:10, 5:30] = True  # only in the first row of windows
    tall[5:75, 18:22] = True  # through all three rows of windows
    windows = windows_over([(0, 0.9, top), (1, 0.9, tall)], image, (40, 40), (20, 20))
    assert [offset for offset, _ in windows] == [(0, 0), (20, 0), (40, 0)]
    merger = WindowInstanceMerger()
    assert merger.add(*windows[0]) == [] and merger.add(*windows[1]) == []  # window 0 reaches row 40
    (done,) = merger.add(*windows[2])  # starts at row 40: window 0 and `top` are final
    assert done.class_id == 0 and np.array_equal(done.full_mask(image), top)
    (rest,) = merger.finish()
    assert rest.class_id == 1 and np.array_equal(rest.full_mask(image), tall)
    with pytest.raises(ValueError, match="raster order"):
        merger.add((0, 0), windows[0][1])
