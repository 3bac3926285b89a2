"""What every segpipe model is: a module that maps normalized pixels to class scores.

A model keeps the few facts the pipeline and the checkpoint writer need beside its weights:
`arch` (the constructor's keyword arguments, enough to rebuild the architecture), the pixel
normalization, and optionally the class names. `family` names the model file it comes from.

Also here: what every family file uses to state its contract (`FamilyContract`) and to map a
checkpoint's key names to its own (`rename_keys`), and `compile_for_inference`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

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
    # what forward's scores are: "logits" (softmax gives probabilities), or "probabilities" already
    # (query models sum softmax x sigmoid over queries: a class's share is scores[c] / scores.sum())
    score_kind: ClassVar[str] = "logits"

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
        # a transformers checkpoint's image processor's do_reduce_labels (None: not stated): trained on
        # labels whose value 0 was ignored and every other value v was class v - 1 (ADE20K's)
        self.reduce_labels: bool | None = None

    @property
    def in_channels(self) -> int:
        """The input channels its stem takes (3 unless its arch says otherwise, e.g. SegFormer's
        `in_channels`, a transformers checkpoint's `num_channels`)."""
        return int(self.arch.get("in_channels", 3))

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """pixel_mean and pixel_std, one entry per input channel. Stats of three entries (the RGB
        default) for a stem of another width: each channel gets the mean of the three, as nothing
        says which colour a fourth band is."""
        mean, std, channels = list(self.pixel_mean), list(self.pixel_std), self.in_channels
        if len(mean) != channels:
            mean = [sum(mean) / len(mean)] * channels
        if len(std) != channels:
            std = [sum(std) / len(std)] * channels
        return mean, std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float N x C x H x W on the 0-255 scale -> the model's input."""
        mean, std = self.channel_stats()
        mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
        return (images.float() - mean) / std


class ModelError(ValueError):
    """A model name or a checkpoint that segpipe cannot use; the message is one line.

    Callers (the CLI, the pipeline's error report) print the message as it is, so it must be short
    and fit one line: newlines in the text given are folded into spaces here, whatever raised it.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


class CheckpointError(ModelError):
    """A checkpoint that cannot be read or does not fit the architecture."""


class UnknownModelError(ModelError):
    """A model name (or family) that the registry does not know."""


def brief(exc: BaseException, limit: int = 150, line: str | None = None) -> str:
    """`ExceptionClass: first line of its message` (or the `line` given), cut to `limit` characters:
    enough to tell what went wrong inside a library without quoting its whole (often multi-line) text."""
    lines = [line] if line else [part.strip() for part in str(exc).splitlines() if part.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def building_from(origin: str, settings: str) -> Iterator[None]:
    """Settings read from a checkpoint (config.json, native metadata) that the model's constructor
    refuses (a head count that does not divide the width, a string where a number goes...) are a
    bad checkpoint, not a bug: one CheckpointError line naming the checkpoint and the settings."""
    with checkpoint_fault(f"{origin}: {settings} describes a model that cannot be built"):
        yield


@contextmanager
def checkpoint_fault(message: str) -> Iterator[None]:
    """What fails inside here (a constructor refusing settings, torch refusing tensors) is the
    checkpoint's fault, not a bug: one CheckpointError line, `message: the reason`."""
    try:
        yield
    except ModelError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError, RuntimeError) as exc:
        raise CheckpointError(f"{message}: {brief(exc)}") from exc


def _shape(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return str(list(shape)) if shape is not None else type(value).__name__


# how long the list of what does not fit may get; the origin comes on top of it
_FIT_BUDGET = 300


def describe_misfit(model_shapes: dict[str, Any], weights: dict[str, Any]) -> str | None:
    """None when `weights` has exactly the keys of `model_shapes` with the same shapes; else one line
    that counts the keys of another shape, the missing and the unexpected ones, with up to three
    examples of each (fewer when the line would get long)."""
    wrong = [k for k in model_shapes if k in weights and _shape(weights[k]) != _shape(model_shapes[k])]
    missing = [k for k in model_shapes if k not in weights]
    unexpected = [k for k in weights if k not in model_shapes]
    if not (wrong or missing or unexpected):
        return None

    def line(examples: int) -> str:
        def part(count: int, label: str, items: list[str]) -> str:
            shown = items[:examples]
            return f"{count} {label}" + (f" ({', '.join(shown)}{', ...' if count > len(shown) else ''})" if shown else "")

        return ", ".join(
            (
                part(
                    len(wrong),
                    "key of another shape" if len(wrong) == 1 else "keys of another shape",
                    [f"{k}: checkpoint {_shape(weights[k])} vs model {_shape(model_shapes[k])}" for k in wrong],
                ),
                part(len(missing), "missing", missing),
                part(len(unexpected), "unexpected", unexpected),
            )
        )

    for examples in (3, 2, 1):
        text = line(examples)
        if len(text) <= _FIT_BUDGET:
            return text
    return line(0)


M = TypeVar("M", bound=nn.Module)


def load_weights(model: M, state_dict: dict[str, torch.Tensor], origin: str, target: str | None = None) -> M:
    """Load a state dict that must cover the model exactly (keys and shapes).

    The fit is checked before load_state_dict, whose own error lists every mismatched key over
    hundreds of lines: here the answer is one CheckpointError line naming `origin` (the checkpoint)
    and `target` (what it was loaded into; default: the model's class and registry name).
    """
    misfit = describe_misfit(model.state_dict(), state_dict)
    if misfit:
        if target is None:
            name = getattr(model, "name", "")
            target = type(model).__name__ + (f" ({name})" if name else "")
        raise CheckpointError(f"{origin}: weights do not fit {target}: {misfit}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # keys and shapes fit, yet a copy failed (a dtype torch cannot cast)
        raise CheckpointError(f"{origin}: weights do not load into {target or type(model).__name__}: {brief(exc)}") from exc
    return model


# ---------------------------------------------------------------------------------------------
# Key renaming: one helper for every checkpoint layout
# ---------------------------------------------------------------------------------------------

# (pattern, replacement): the pattern must match the whole key; the replacement is a template
# (\1, \g<name>) or, where a number has to change (a 1-based index made 0-based), a function of the match
Rule = tuple[str, str | Callable[[re.Match], str]]


def rename_keys(
    state_dict: Mapping[str, Any],
    rules: Iterable[Rule],
    *,
    ignored: Iterable[str] = (),
    keep_unknown: bool = False,
    origin: str = "checkpoint",
    layout: str = "",
) -> dict[str, Any]:
    """Rename each key by the first rule whose pattern matches it whole (`re.fullmatch`).

    A key that no rule matches is dropped when an `ignored` pattern matches it whole (a
    classification head, a loss's weights). Any other key is a CheckpointError naming `origin`
    and the `layout`, so that an unsupported feature (layer scale, register tokens...) never
    loads silently; with `keep_unknown` it keeps its name instead, and the strict load that
    follows names it as unexpected. `state_dict` is left as it is.
    """
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    dropped = [re.compile(pattern) for pattern in ignored]
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        for pattern, replacement in compiled:
            match = pattern.fullmatch(key)
            if match:
                out[replacement(match) if callable(replacement) else match.expand(replacement)] = value
                break
        else:
            if any(p.fullmatch(key) for p in dropped):
                continue
            if keep_unknown:
                out[key] = value
            else:
                unknown.append(key)
    if unknown:
        what = f"{layout} layout" if layout else "layout"
        raise CheckpointError(f"{origin}: {len(unknown)} keys of no known {what}, e.g. {', '.join(unknown[:3])}")
    return out


# ---------------------------------------------------------------------------------------------
# A family's contract
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyContract:
    """What a family file declares, at its end, to the registry and the checkpoint loader.

    model       the class; `model.family` names the family, and `model(**arch)` rebuilds a
                native checkpoint
    variants    registry name -> builder(num_classes=..., **overrides), random weights
    hf_model_types, from_hf
                the config.json `model_type` values of the Hugging Face checkpoints that
                `from_hf(config, state_dict, origin=...)` reads
    from_mmseg  `from_mmseg(name, num_classes, state_dict, origin=...)`: an mmsegmentation .pth
                loaded under any of the `variants` names
    from_repository
                `from_repository(name, state_dict, origin=...)`: a research repository's own .pth
                (its model's state dict under "model", e.g. VisTR's) loaded under a `variants` name
    """

    model: type[SegmentationModel]
    variants: Mapping[str, Callable[..., SegmentationModel]]
    hf_model_types: tuple[str, ...] = ()
    from_hf: Callable[..., SegmentationModel] | None = None
    from_mmseg: Callable[..., SegmentationModel] | None = None
    from_repository: Callable[..., SegmentationModel] | None = None

    def __post_init__(self) -> None:
        if not self.model.family:
            raise ValueError(f"{self.model.__name__} names no family")
        if bool(self.hf_model_types) != (self.from_hf is not None):
            raise ValueError(f"{self.model.family}: hf_model_types and from_hf come together")

    @property
    def name(self) -> str:
        return self.model.family


# ---------------------------------------------------------------------------------------------
# torch.compile for inference
# ---------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)


def compile_for_inference(model: M, backend: str | Callable = "inductor", options: dict[str, Any] | None = None) -> M:
    """`model` itself, its forward compiled with torch.compile; the eager forward where it cannot be.

    Compilation happens at the first call (and again for a new input shape). If compiling or
    running the compiled forward fails (no C++ compiler, an operator inductor does not know, a
    backend error...), one warning line says why and the model falls back to its eager forward
    for good, retrying that call eagerly: an error of the call itself then surfaces as in eager
    mode. The model stays the same object (its class, attributes and state dict unchanged), so
    callers keep using it as before; call it under torch.inference_mode() or torch.no_grad().
    By default inductor runs with `freezing` (weights taken as constants: layouts pre-packed,
    folded into the graph), which is for inference only and keeps the weights as they were at the
    first call.
    """
    eager_forward = model.forward
    own_forward = "forward" in vars(model)  # an instance attribute already (compiled before?)
    name = getattr(model, "name", "") or type(model).__name__
    try:
        if backend == "inductor" and options is None:
            options = {"freezing": True}
        compiled_forward = torch.compile(eager_forward, backend=backend, options=options)
    except Exception as exc:  # torch.compile itself refused (an unsupported Python, a bad option)
        log.warning("torch.compile of %s is not available, running eagerly: %s", name, brief(exc))
        return model

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled_forward(*args, **kwargs)
        except Exception as exc:  # whatever compiling or the compiled code raised
            log.warning("torch.compile of %s failed, running eagerly from now on: %s", name, root_cause(exc))
            if own_forward:
                model.forward = eager_forward
            else:
                del model.forward  # the class's forward again
            return eager_forward(*args, **kwargs)

    model.forward = forward
    return model


def root_cause(exc: BaseException) -> str:
    """dynamo wraps what failed ("BackendCompilerFailed: backend=... raised:" on a line of its
    own): name the wrapper and the first line of the innermost cause."""
    root = exc
    while root.__cause__ is not None or getattr(root, "inner_exception", None) is not None:
        root = root.__cause__ or root.inner_exception
    return brief(exc) if root is exc else f"{type(exc).__name__}: {brief(root)}"
