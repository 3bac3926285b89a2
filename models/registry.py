"""The model registry: a plain dict from model name to builder, and one from family to class.

A builder takes `num_classes` (and optional overrides of its architecture) and returns a model
with random weights. A family class rebuilds a model from the `arch` dict a checkpoint stores.
"""
from __future__ import annotations

from typing import Callable

from models import mask2former, maskformer, segformer, segmenter, setr
from models.base import SegmentationModel, UnknownModelError

MODELS: dict[str, Callable[..., SegmentationModel]] = {
    **segformer.VARIANTS,
    **maskformer.VARIANTS,
    **mask2former.VARIANTS,
    **setr.VARIANTS,
    **segmenter.VARIANTS,
}

FAMILIES: dict[str, type[SegmentationModel]] = {
    segformer.SegFormer.family: segformer.SegFormer,
    maskformer.MaskFormer.family: maskformer.MaskFormer,
    mask2former.Mask2Former.family: mask2former.Mask2Former,
    setr.SETR.family: setr.SETR,
    segmenter.Segmenter.family: segmenter.Segmenter,
}


def list_models() -> list[str]:
    return sorted(MODELS)


def check_name(name: str) -> None:
    """UnknownModelError, listing every registered name, unless `name` is one."""
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(list_models())}")


def build_model(name: str, num_classes: int = 150, **overrides) -> SegmentationModel:
    """A registered model with random weights."""
    check_name(name)
    model = MODELS[name](num_classes=num_classes, **overrides)
    model.name = name
    return model


def build_from_arch(family: str, arch: dict) -> SegmentationModel:
    """Rebuild a model from a family name and the `arch` dict that a native checkpoint stores."""
    if family not in FAMILIES:
        raise UnknownModelError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family](**arch)
