"""The model registry: plain dicts built from the family modules, each listed once below.

Every family file ends with its `CONTRACT` (models/base.py FamilyContract): its model class, its
named variants, and the checkpoint layouts it loads. The tables here, and the checkpoint loader's
dispatch (models/checkpoint.py), are derived from those declarations and nothing else.

A builder takes `num_classes` (and optional overrides of its architecture) and returns a model
with random weights. A family class rebuilds a model from the `arch` dict a checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Callable

from models import detr, mask2former, maskformer, segformer, segmenter, setr, vistr
from models.base import FamilyContract, SegmentationModel, UnknownModelError

# family name -> contract; a new family is one more module in this tuple
CONTRACTS: dict[str, FamilyContract] = {
    module.CONTRACT.name: module.CONTRACT for module in (segformer, maskformer, mask2former, setr, segmenter, detr, vistr)
}

# model name -> builder
MODELS: dict[str, Callable[..., SegmentationModel]] = {
    name: build for contract in CONTRACTS.values() for name, build in contract.variants.items()
}

# model name -> the contract of its family (the mmseg loader of a name is its family's)
FAMILY_OF: dict[str, FamilyContract] = {name: contract for contract in CONTRACTS.values() for name in contract.variants}

# config.json model_type -> the contract of the family that loads it
HF_MODEL_TYPES: dict[str, FamilyContract] = {
    model_type: contract for contract in CONTRACTS.values() for model_type in contract.hf_model_types
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
    if family not in CONTRACTS:
        raise UnknownModelError(f"unknown model family {family!r}; known: {', '.join(sorted(CONTRACTS))}")
    return CONTRACTS[family].model(**arch)
