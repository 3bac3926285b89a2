"""models.onnx_backend: a model's forward exported to ONNX and run by ONNX Runtime gives torch's
scores (to 1e-4) for each family, exports once per window size, and falls back to torch, with one
warning, where no exporter gives a graph ONNX Runtime can run."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import tiny_model

from models.onnx_backend import run_with_onnxruntime


def scores(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(model.normalize(pixels))


# one family of each kind of backbone: MiT, ViT, Swin, ResNet (Mask2Former exports too, slowly)
@pytest.mark.parametrize("name", ["segformer-b0", "segmenter-mask-vit-base", "maskformer-swin-tiny", "detr-resnet50-panoptic"])
def test_onnxruntime_gives_torchs_scores_and_exports_once_per_window_size(name):
    model = tiny_model(name, num_classes=5)
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    expected = scores(model, pixels)

    run_with_onnxruntime(model)
    full = scores(model, pixels)
    short = scores(model, pixels[:2])  # the last, short batch: padded into the same session
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(short, expected[:2], rtol=0, atol=1e-4)
    sessions = model.forward.onnx.sessions  # window size -> (batch, session)
    assert list(sessions) == [(64, 64)] and sessions[(64, 64)][0] == 3
    assert "forward" in vars(model)  # still on ONNX Runtime: nothing fell back


def test_a_model_no_exporter_can_translate_runs_in_torch_after_one_warning(caplog):
    model = tiny_model("segformer-b0", num_classes=3)
    base = type(model)

    class WithSvd(base):  # singular values: no ONNX operator computes them
        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            out = base.forward(self, pixels)
            return out + 0 * torch.linalg.svdvals(out.flatten(2)).sum()

    model.__class__ = WithSvd
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    expected = scores(model, pixels)
    run_with_onnxruntime(model)
    with caplog.at_level(logging.WARNING, logger="models.onnx_backend"):
        first = scores(model, pixels)
        second = scores(model, pixels)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "models.onnx_backend"]
    assert len(warnings) == 1 and "running it in torch from now on" in warnings[0] and "dynamo" in warnings[0], warnings
    assert "forward" not in vars(model)  # the class's forward for good
