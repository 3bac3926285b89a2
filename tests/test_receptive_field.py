"""pipeline/analysis/receptive_field.py: the effective receptive field (Luo et al. 2016) of a model."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models import build_model
from models.base import SegmentationModel
from pipeline.analysis.receptive_field import ErfResult, effective_receptive_field, erf_figure_png, prepare_image, theoretical_extent

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PixelIdentity(SegmentationModel):
    """Scores = the normalized pixels: 3 classes, output stride 1, each output depends on one pixel."""

    def __init__(self) -> None:
        super().__init__(arch={}, num_classes=3)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels


class ConvStack(SegmentationModel):
    """k 3x3 convs (padding 1, the given strides), positive weights, no nonlinearity: the gradient of an
    output is positive exactly on its theoretical field and zero elsewhere."""

    def __init__(self, strides: list[int], width: int = 4, num_classes: int = 2) -> None:
        super().__init__(arch={"strides": strides}, num_classes=num_classes)
        widths = [3] + [width] * (len(strides) - 1) + [num_classes]
        self.layers = nn.Sequential(*(nn.Conv2d(a, b, 3, stride=s, padding=1) for a, b, s in zip(widths, widths[1:], strides)))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for conv in self.layers:
                conv.weight.copy_(torch.rand(conv.weight.shape, generator=generator) * 0.9 + 0.1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


class SneakyGlobal(ConvStack):
    """A 1x1 conv whose forward adds a mean over the whole image: the modules say 1 pixel, the field is everything."""

    def __init__(self) -> None:
        super().__init__(strides=[1])
        self.layers = nn.Sequential(nn.Conv2d(3, 2, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels) + pixels.mean(dim=(1, 2, 3), keepdim=True)


def random_images(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(count)]


def support_box(grad: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(grad)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


@pytest.mark.parametrize("score", ["predicted", "sum"])
def test_a_model_reading_one_pixel_has_all_its_field_at_the_centre_pixel(score):
    result = effective_receptive_field(PixelIdentity(), random_images(3, 40, 40), size=32, score=score)
    expected = np.zeros((32, 32))
    expected[16, 16] = 1.0
    assert result.grad.shape == (32, 32) and result.grad.dtype == np.float64
    np.testing.assert_array_equal(result.grad, expected)
    assert result.images == 3
    assert result.theoretical == 1
    assert result.radius_share(0) == 1.0
    assert result.effective_radius(0.9) == 0


def test_a_1x1_conv_head_has_a_one_pixel_field():
    model = ConvStack(strides=[1])
    model.layers[0] = nn.Conv2d(3, 2, 1)
    result = effective_receptive_field(model, random_images(2, 32, 32), size=32)
    assert np.count_nonzero(result.grad) == 1 and result.grad[16, 16] == 1.0
    assert result.theoretical == 1


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_3x3_convs_have_support_exactly_the_2k_plus_1_square_around_the_centre(k):
    result = effective_receptive_field(ConvStack(strides=[1] * k), random_images(2, 32, 32), size=32)
    inside = np.zeros((32, 32), dtype=bool)
    inside[16 - k : 16 + k + 1, 16 - k : 16 + k + 1] = True
    assert (result.grad[inside] > 0).all()
    assert (result.grad[~inside] == 0).all()
    assert result.theoretical == 2 * k + 1
    assert result.radius_share(k) == 1.0 and result.radius_share(k - 1) < 1.0
    assert result.effective_radius(1.0) == k


def test_a_strided_stack_maps_the_centre_output_pixel_to_the_input_centre_and_states_its_extent():
    # 3x3 stride 2, then 3x3 stride 1: extent 1 + 2 + 2 * 2 = 7; the output (16 x 16) pixel 8 is centred on input pixel 16
    result = effective_receptive_field(ConvStack(strides=[2, 1]), random_images(2, 32, 32), size=32)
    assert result.theoretical == 7
    assert support_box(result.grad) == (13, 19, 13, 19)
    assert (result.grad[13:20, 13:20] > 0).all()


def test_grad_sums_to_1_and_radius_share_is_monotone_and_reaches_1():
    result = effective_receptive_field(ConvStack(strides=[1, 1, 1, 1]), random_images(2, 48, 48), size=32)
    assert result.grad.sum() == pytest.approx(1.0, abs=1e-12)
    assert (result.grad >= 0).all()
    shares = [result.radius_share(r) for r in range(0, 17)]
    assert all(a <= b for a, b in itertools.pairwise(shares))
    assert shares[-1] == 1.0 and result.radius_share(100) == 1.0 and result.radius_share(-1) == 0.0
    assert [r for r, _ in result.shares] == [1, 2, 4, 8, 16]
    assert result.shares[-1] == (16, 1.0)
    assert [s for _, s in result.shares] == [result.radius_share(r) for r in (1, 2, 4, 8, 16)]
    assert result.effective_radius(0.5) <= result.effective_radius(0.9) <= result.effective_radius(1.0) == 4


def test_shares_end_at_half_the_size_when_it_is_no_power_of_2():
    result = ErfResult(grad=np.full((20, 20), 1 / 400), images=1, theoretical=None)
    assert [r for r, _ in result.shares] == [1, 2, 4, 8, 10]
    assert result.shares[-1][1] == 1.0
    assert result.radius_share(1) == pytest.approx(9 / 400)


def test_images_are_centre_cropped_and_small_ones_scaled_up_first():
    columns = np.broadcast_to(np.arange(60, dtype=np.uint8)[None, :, None], (40, 60, 3)).copy()
    crop = prepare_image(columns, 32)
    assert crop.shape == (3, 32, 32)
    assert crop[0, 0, 0] == 14 and crop[0, 0, -1] == 45  # columns 14..45 of 60, unscaled
    small = prepare_image(columns[:16, :24], 32)  # short side 16 -> scaled x2 to 32 x 48, then cropped
    assert small.shape == (3, 32, 32)
    assert float(small[0, 0, 0]) == pytest.approx(3.75) and float(small[0, 0, 16]) == pytest.approx(11.75)  # columns 8..39 of 48


def test_a_forward_that_mixes_pixels_functionally_drops_the_extent_read_from_the_modules():
    model = SneakyGlobal()
    assert theoretical_extent(model) == 1
    with pytest.warns(UserWarning, match="theoretical extent dropped"):
        result = effective_receptive_field(model, random_images(1, 16, 16), size=16)
    assert result.theoretical is None
    assert (result.grad > 0).all()


def test_the_model_keeps_its_mode_and_its_parameters_get_no_gradient():
    model = ConvStack(strides=[1, 1]).train()
    effective_receptive_field(model, random_images(1, 16, 16), size=16)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="score"):
        effective_receptive_field(PixelIdentity(), random_images(1, 8, 8), size=8, score="max")
    with pytest.raises(ValueError, match="no images"):
        effective_receptive_field(PixelIdentity(), [], size=8)
    with pytest.raises(ValueError, match="H x W x 3"):
        effective_receptive_field(PixelIdentity(), [np.zeros((8, 8), dtype=np.uint8)], size=8)


def test_segformer_b0_has_a_finite_wide_field_no_theoretical_extent_and_a_matplotlib_figure():
    torch.manual_seed(0)
    model = build_model(
        "segformer-b0", num_classes=3, hidden_sizes=[8, 16, 32, 64], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], decoder_dim=16
    )
    result = effective_receptive_field(model, random_images(2, 64, 64), size=64)
    assert result.grad.shape == (64, 64)
    assert np.isfinite(result.grad).all()
    assert result.grad.sum() == pytest.approx(1.0, abs=1e-12)
    assert result.theoretical is None  # attention: the theoretical field is the whole input
    assert result.radius_share(16) < 1.0  # mass beyond 16 px of the centre
    assert result.grad[:8, :8].sum() > 0 and result.grad[-8:, -8:].sum() > 0  # even in the corners

    png = erf_figure_png(result, "segformer-b0 (tiny, random weights)")
    assert png.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(png)) as image:
        assert image.info.get("Software", "").startswith("Matplotlib")
        assert image.size[0] > 400


def test_the_figure_draws_a_known_theoretical_extent():
    result = effective_receptive_field(ConvStack(strides=[1, 1]), random_images(1, 32, 32), size=32)
    png = erf_figure_png(result, "two 3x3 convs")
    assert png.startswith(PNG_SIGNATURE)
    one_pixel = effective_receptive_field(PixelIdentity(), random_images(1, 16, 16), size=16)
    assert erf_figure_png(one_pixel, "one pixel").startswith(PNG_SIGNATURE)
