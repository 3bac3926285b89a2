"""models.base.compile_for_inference: a compiled model gives the eager outputs; a backend that
fails leaves the eager model, with one warning line."""

from __future__ import annotations

import logging

import torch
from torch import nn

from models.base import compile_for_inference


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 2, 1)).eval()


def test_compiled_model_is_the_same_object_and_gives_the_eager_outputs():
    model = _tiny_model()
    pixels = torch.randn(2, 3, 16, 20)
    with torch.inference_mode():
        expected = model(pixels)
        compiled = compile_for_inference(model)
        got = compiled(pixels)
    assert compiled is model and isinstance(compiled, nn.Sequential)
    assert "forward" in vars(model)  # the compiled forward, set on the instance
    assert (got - expected).abs().max().item() <= 1e-5


def test_a_backend_that_fails_falls_back_to_eager_with_one_warning(caplog):
    calls = []

    def broken_backend(graph_module, example_inputs):
        calls.append(len(example_inputs))
        raise RuntimeError("no compiler here\nsecond line")

    model = _tiny_model()
    pixels = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        expected = model(pixels)
        with caplog.at_level(logging.WARNING, logger="models.base"):
            compiled = compile_for_inference(model, backend=broken_backend)
            first, second = compiled(pixels), compiled(pixels)
    assert calls, "the backend was never asked to compile"
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert "forward" not in vars(model)  # back to the class's eager forward
    warnings = [r for r in caplog.records if r.name == "models.base"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "failed, running eagerly" in warnings[0].getMessage() and "no compiler here" in warnings[0].getMessage()
