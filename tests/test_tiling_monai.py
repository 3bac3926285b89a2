"""Our sliding window against MONAI's `sliding_window_inference` (a test-only dependency).

Same windows (overlap = 1 - stride / window), same padding (MONAI pads short axes with 0, diff // 2
before), same blending (constant = our mean, gaussian = MONAI's importance map). MONAI blends what the
predictor returns at its resolution, so its predictor resizes the model's stride-4 scores to the
window, which is what our tiler does itself.
"""

from __future__ import annotations

import monai.data.utils as monai_data_utils
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from torch import nn

from pipeline.predict.tiling import TilingSettings, importance_map, plan_windows, segment_images

MEAN, STD = 120.0, 60.0


class SmallSegNet(nn.Module):
    """A small conv segmentation net with output stride 4 and some context (two 3x3 stages per scale)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(32, num_classes, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixels))


def make_model(num_classes: int, seed: int) -> SmallSegNet:
    torch.manual_seed(seed)
    model = SmallSegNet(num_classes)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        # a random head's bias would outweigh its small random features: one class everywhere
        model.head.bias.zero_()
        model.head.weight.mul_(20.0)
    return model.eval()


def make_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, height // 16 + 2, width // 16 + 2)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return np.clip(smooth.numpy() + rng.normal(0, 12, size=(height, width, 3)), 0, 255).astype(np.uint8)


def our_score_fn(model):
    def score_fn(windows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model((windows - MEAN) / STD)

    return score_fn


def monai_predictor(model, window):
    def predictor(windows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scores = model((windows - MEAN) / STD)
        return F.interpolate(scores, size=window, mode="bilinear", align_corners=False)

    return predictor


def monai_scores(model, image, window, stride, mode, batch_size=4):
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # 0-255, padded with cval 0 like ours
    overlap = [1 - s / w for s, w in zip(stride, window)]
    with torch.no_grad():
        return sliding_window_inference(pixels, window, batch_size, monai_predictor(model, window), overlap=overlap, mode=mode, cval=0.0)[0]


CASES = [
    # height, width, window, stride
    (150, 200, (64, 64), (48, 48)),  # strides that do not divide the image: the last windows move back
    (97, 131, (48, 64), (24, 40)),  # odd sizes, different window and stride per axis
    (40, 130, (64, 64), (32, 32)),  # shorter than the window on one axis: padded
    (30, 50, (64, 64), (32, 32)),  # smaller than the window on both axes
]


@pytest.mark.parametrize("height,width,window,stride", CASES)
def test_same_windows_as_monai(height, width, window, stride):
    plan = plan_windows(height, width, window, stride)
    padded = (plan.padded_height, plan.padded_width)
    overlap = [1 - s / w for s, w in zip(stride, window)]
    interval = _get_scan_interval(padded, window, 2, overlap)
    slices = monai_data_utils.dense_patch_slices(padded, window, interval)
    assert [(s[0].start, s[1].start) for s in slices] == plan.windows
    # MONAI pads diff // 2 before
    assert plan.pad_top == max(window[0] - height, 0) // 2 and plan.pad_left == max(window[1] - width, 0) // 2


@pytest.mark.parametrize("window", [(64, 64), (48, 64), (17, 30), (512, 341)])
def test_gaussian_map_equals_monai(window):
    ours = importance_map(window, "gaussian")
    theirs = monai_data_utils.compute_importance_map(window, mode="gaussian", sigma_scale=0.125)
    torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-6)
    assert torch.equal(importance_map(window, "mean"), monai_data_utils.compute_importance_map(window, mode="constant"))


@pytest.mark.parametrize("blend,monai_mode", [("mean", "constant"), ("gaussian", "gaussian")])
def test_labels_agree_with_monai_sliding_window_inference(blend, monai_mode):
    model = make_model(num_classes=6, seed=2)  # a seed whose labels mix several classes
    images = [make_image(h, w, seed=i) for i, (h, w, _, _) in enumerate(CASES)]
    for (height, width, window, stride), image in zip(CASES, images):
        settings = TilingSettings(mode="slide", window=window, stride=stride, blend=blend, batch_size=5)
        ours = segment_images(our_score_fn(model), [image], settings)[0].labels
        theirs = monai_scores(model, image, window, stride, monai_mode).argmax(0).numpy()
        assert ours.shape == theirs.shape == (height, width)
        agreement = float((ours == theirs).mean())
        assert agreement >= 0.999, f"{height}x{width} window {window}: {agreement:.5f}"
        assert len(np.unique(theirs)) > 1  # not a degenerate one-class map


def test_binary_probability_matches_monai_softmax():
    model = make_model(num_classes=2, seed=1)
    image = make_image(150, 200, seed=7)
    for blend, monai_mode in (("mean", "constant"), ("gaussian", "gaussian")):
        settings = TilingSettings(window=(64, 64), stride=(48, 48), blend=blend, binary=True, batch_size=3)
        ours = segment_images(our_score_fn(model), [image], settings)[0]
        theirs = torch.softmax(monai_scores(model, image, (64, 64), (48, 48), monai_mode), dim=0)[1].numpy()
        np.testing.assert_allclose(ours.probability, theirs, atol=1e-4)
