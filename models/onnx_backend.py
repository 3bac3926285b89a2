"""inference.backend: onnxruntime. A model's forward exported to ONNX and run by ONNX Runtime's CPU
provider, where that measures faster than torch on a CPU (`benchmarks/model_speed.py --onnx`, one
thread, 512 x 512: SegFormer 1.2-1.3x our eager torch, DETR 2x, SETR, Segmenter and MaskFormer
1.02-1.13x; Mask2Former only through the TorchScript exporter, at 0.5x: keep torch for it).

`run_with_onnxruntime(model)` mirrors `models.base.compile_for_inference`: the model stays the
same object, its `forward` now runs an ONNX Runtime session. Sessions are made at the first call
of each window size (an export: seconds), for the largest batch seen; a smaller batch is padded
to it, so that the last, short batch of a run does not export again. Where neither exporter (torch's
dynamo one, then its TorchScript one) gives a graph that ONNX Runtime loads and runs, one warning
says why and the model runs eagerly for good. Only the semantic forward (`forward`) goes through
ONNX Runtime; the object tasks' `forward_queries` stays in torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch

from models.base import SegmentationModel, brief, root_cause

log = logging.getLogger(__name__)

QUIET_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")
MAX_SESSIONS = 4  # window sizes held at once (one for a slide run; whole mode may see several)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (the dynamo exporter's)
    except ImportError:
        return False
    return True


class ExportError(RuntimeError):
    """Neither exporter gave a graph that ONNX Runtime loads."""


def _session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: not its notes on unused initializers
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def export_session(model: torch.nn.Module, example: torch.Tensor, threads: int) -> tuple[str, Any]:
    """(the exporter that worked, an ONNX Runtime session of `model` at the shape of `example`): the
    dynamo exporter first, the TorchScript one where that fails or ONNX Runtime refuses its graph;
    ExportError if neither."""
    errors = []
    for name in QUIET_LOGGERS:  # "torchvision is not installed", constant folding notes: every export
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="segpipe-onnx-") as folder:
        for exporter, dynamo in (("dynamo", True), ("torchscript", False)):
            path = os.path.join(folder, f"{exporter}.onnx")
            try:
                # the exporters' progress lines and warnings are not the run's
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (example,), path, dynamo=dynamo, input_names=["pixels"], output_names=["scores"])
                return exporter, _session(path, threads)  # loaded whole: the file may go
            except Exception as exc:  # an op without a translation, a graph ONNX Runtime refuses...
                errors.append(f"{exporter}: {root_cause(exc)}")
    raise ExportError("; ".join(errors))


class OnnxForward:
    """forward(pixels N x 3 x h x w, normalised float32 on the CPU) through ONNX Runtime sessions,
    one per window size, each for a fixed batch (smaller batches padded)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.name = getattr(model, "name", "") or type(model).__name__
        self.sessions: dict[tuple[int, int], tuple[int, Any]] = {}  # (h, w) -> (batch, session)
        self.exporters: dict[tuple[int, int], str] = {}  # (h, w) -> the exporter whose graph runs

    def session_for(self, pixels: torch.Tensor) -> tuple[int, Any]:
        size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        batch, session = self.sessions.get(size, (0, None))
        if pixels.shape[0] > batch:
            batch = int(pixels.shape[0])
            started = time.perf_counter()
            self.exporters[size], session = self.export(batch, size)
            log.info(
                "%s exported at %d x %d x %d (%s exporter) in %.1f s",
                self.name,
                batch,
                *size,
                self.exporters[size],
                time.perf_counter() - started,
            )
            if len(self.sessions) >= MAX_SESSIONS and size not in self.sessions:
                self.sessions.pop(next(iter(self.sessions)))  # the oldest size
            self.sessions[size] = (batch, session)
        return batch, session

    def export(self, batch: int, size: tuple[int, int]) -> tuple[str, Any]:
        # traced: the class's forward (not the one set on the model, which calls this), outside
        # inference mode (the caller's), on a plain example tensor of the shape
        own = self.model.__dict__.pop("forward", None)
        try:
            with torch.inference_mode(False), torch.no_grad():
                example = torch.zeros(batch, 3, *size)
                return export_session(self.model, example, max(1, torch.get_num_threads()))
        finally:
            if own is not None:
                self.model.forward = own

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, session = self.session_for(pixels)
        n = pixels.shape[0]
        inputs = pixels.detach().contiguous().numpy()
        if n < batch:
            inputs = np.concatenate([inputs, np.zeros((batch - n, *inputs.shape[1:]), inputs.dtype)])
        (scores,) = session.run(None, {"pixels": inputs})
        return torch.from_numpy(scores[:n])


def run_with_onnxruntime(model: SegmentationModel) -> SegmentationModel:
    """`model` itself, its forward run by ONNX Runtime (see the module's docstring); the eager
    forward for good, after one warning, where the export or the session fails. Inputs that are
    not float32 on the CPU (autocast, a GPU) take the eager forward."""
    backend = OnnxForward(model)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        eager = type(model).forward
        if pixels.device.type != "cpu" or pixels.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return eager(model, pixels)
        try:
            return backend(pixels)
        except Exception as exc:
            log.warning("ONNX Runtime cannot run %s, running it in torch from now on: %s", backend.name, brief(exc, limit=300))
            model.__dict__.pop("forward", None)
            return eager(model, pixels)

    forward.onnx = backend  # its sessions, for a look inside
    model.forward = forward
    return model
