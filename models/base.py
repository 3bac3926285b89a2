"""What every segpipe model is: a module that maps normalized pixels to class scores.

A model keeps the few facts the pipeline and the checkpoint writer need beside its weights:
`arch` (the constructor's keyword arguments, enough to rebuild the architecture), the pixel
normalization, and optionally the class names. `family` names the model file it comes from.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class SegmentationModel(nn.Module):
    """Base of all models.

    forward(pixels): pixels float N x 3 x H x W, normalized with pixel_mean / pixel_std on the
    0-255 scale; returns N x num_classes x h x w class scores at the model's output stride.
    Subclasses call `super().__init__(arch=..., ...)` with the kwargs that rebuild them:
    `type(model)(**model.arch)` must give the same architecture.
    """

    family: ClassVar[str] = ""

    def __init__(
        self,
        arch: dict[str, Any],
        num_classes: int,
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.arch = dict(arch)
        self.num_classes = int(num_classes)
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        self.name: str = ""  # the registry name, where it has one
        self.class_names: list[str] | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float N x 3 x H x W on the 0-255 scale -> the model's input."""
        mean = torch.tensor(self.pixel_mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std, device=images.device).view(1, 3, 1, 1)
        return (images.float() - mean) / std


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the architecture."""


def load_weights(model: SegmentationModel, state_dict: dict[str, torch.Tensor], origin: str) -> SegmentationModel:
    """Load a state dict that must cover the model exactly; name what is missing or extra."""
    result = model.load_state_dict(state_dict, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys, e.g. {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys, e.g. {result.unexpected_keys[:5]}")
    if problems:
        raise CheckpointError(f"{origin}: weights do not fit {type(model).__name__}: " + "; ".join(problems))
    return model
