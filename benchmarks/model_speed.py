"""Forward time of segpipe's models next to a baseline, in one table.

    python benchmarks/model_speed.py                                   # the default table: CPU, 1 thread
    python benchmarks/model_speed.py --models segformer-b0 --sizes 512 --batches 1 8 --compile
    python benchmarks/model_speed.py --device cuda --dtypes fp32 bf16 fp16 --compile --flops --markdown out.md

The baseline is transformers' model where transformers has the family (SegFormer, MaskFormer,
Mask2Former, DETR): a randomly initialised transformers model is written with `save_pretrained` and
loaded through `models.load_model`, so both sides run the same weights. SETR and Segmenter have no
transformers model: their baseline is our own model with the reference decoder graph
(`decoder.forward_reference`: mmseg's upsample-then-classify order) where there is one, else our
own eager forward (then only the compiled row says something). Query models are compared on their
semantic scores, the others on their logits.

Each case is timed as the median of `--repeats` forwards after `--warmup` ones, ours and the
baseline alternating so that other load on the machine hits both alike; the ratio is baseline /
ours (above 1: ours is faster). `--dtypes` other than fp32 run both sides under torch.autocast, as
the pipeline does. `--compile` adds rows for ours through `models.base.compile_for_inference`
(the first calls, compilation included, are timed apart as `compile s`). `--flops` counts the
matmul / conv FLOPs of one forward (torch.utils.flop_counter) and gives ours' achieved TFLOP/s,
next to a timed large matmul of each dtype (the chip's attainable rate).

`--tiny` builds reduced-width models (seconds on a CPU): benchmarks/gpu.sh --cpu uses it to check
the table's making, not to measure.

transformers (and scipy, which its MaskFormer constructors need) are test dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # --tiny: the tests' tiny configs (helpers)

from models import build_model, load_model
from models.base import compile_for_inference
from models.onnx_backend import run_with_onnxruntime

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# ---------------------------------------------------------------------------------------------
# The cases: how to build ours and the baseline with the same weights
# ---------------------------------------------------------------------------------------------


def _swin(tiny: bool) -> dict:
    from transformers import SwinConfig

    if tiny:
        from helpers import tiny_swin_config

        return tiny_swin_config()
    return SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"]
    )


def hf_segformer(size: str, tiny: bool):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    sizes = {
        "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
        "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
    }[size]
    if tiny:
        sizes = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 3, 4], decoder_hidden_size=16)
    return SegformerForSemanticSegmentation(SegformerConfig(num_labels=150, **sizes))


def hf_maskformer(tiny: bool):
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation

    if tiny:
        from helpers import tiny_maskformer_config

        return MaskFormerForInstanceSegmentation(tiny_maskformer_config(num_labels=150))
    config = MaskFormerConfig(backbone_config=_swin(tiny), decoder_config=dict(model_type="detr"), num_labels=150)
    return MaskFormerForInstanceSegmentation(config)


def hf_mask2former(tiny: bool):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    if tiny:
        from helpers import tiny_mask2former_config

        return Mask2FormerForUniversalSegmentation(tiny_mask2former_config(num_labels=150))
    return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=_swin(tiny), num_labels=150))


def hf_detr(tiny: bool):
    """DetrForSegmentation on transformers' own ResNet-50 (no timm): the published panoptic model's shape."""
    from transformers import DetrConfig, DetrForSegmentation, ResNetConfig

    if tiny:
        from helpers import tiny_detr_config

        return DetrForSegmentation(tiny_detr_config(num_labels=150))
    backbone = ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], out_features=["stage1", "stage2", "stage3", "stage4"])
    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, num_labels=150)
    return DetrForSegmentation(config)


def hf_detr_semantic(model, pixels: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=pixels)
    return torch.einsum("nqc,nqhw->nchw", out.logits.softmax(-1)[..., :-1], out.pred_masks.sigmoid())


def hf_logits(model, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).logits


def hf_semantic(model, pixels: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=pixels)
    probs = out.class_queries_logits.softmax(-1)[..., :-1]
    return torch.einsum("nqc,nqhw->nchw", probs, out.masks_queries_logits.sigmoid())


@dataclass
class Case:
    name: str  # ours' registry name
    family: str
    reference: Callable[[bool], torch.nn.Module] | None  # builds the transformers model; None: ours is the baseline
    reference_forward: Callable = hf_logits
    sizes: tuple[int, ...] = (512,)


CASES = [
    Case("segformer-b0", "segformer", lambda tiny: hf_segformer("b0", tiny)),
    Case("segformer-b2", "segformer", lambda tiny: hf_segformer("b2", tiny)),
    Case("maskformer-swin-tiny", "maskformer", hf_maskformer, hf_semantic, sizes=(384, 512)),
    Case("mask2former-swin-tiny", "mask2former", hf_mask2former, hf_semantic, sizes=(384, 512)),
    *[Case(f"setr-{d}-vit-base", "setr", None) for d in ("naive", "pup", "mla")],
    *[Case(f"segmenter-{d}-vit-base", "segmenter", None) for d in ("linear", "mask")],
    Case("detr-resnet50-panoptic", "detr", hf_detr, hf_detr_semantic),
]


@dataclass
class Pair:
    ours: torch.nn.Module
    baseline: Callable[[torch.Tensor], torch.Tensor]
    baseline_name: str
    reference: torch.nn.Module | None = None  # the transformers model, where there is one

    def to(self, device: torch.device) -> None:
        self.ours.to(device)
        if self.reference is not None:
            self.reference.to(device)


def build_pair(case: Case, tiny: bool) -> Pair:
    """Ours and its baseline, with the same weights, in eval mode."""
    torch.manual_seed(0)
    if case.reference is not None:
        reference = case.reference(tiny).eval()
        with tempfile.TemporaryDirectory() as tmp:
            reference.save_pretrained(tmp)
            ours = load_model(tmp)
        return Pair(ours, lambda x: case.reference_forward(reference, x), "transformers", reference)
    name, overrides = case.name, {}
    if tiny:
        from helpers import TINY_MODELS

        name, overrides = TINY_MODELS[case.name]
    ours = build_model(name, num_classes=150, **overrides).eval()
    decoder = getattr(ours, "decoder", None)
    if not hasattr(decoder, "forward_reference"):
        return Pair(ours, ours.forward, "ours, eager")

    def baseline(x: torch.Tensor) -> torch.Tensor:
        scores = decoder.forward_reference(ours.encoder(x, ours.feature_layers))
        stride = ours.output_stride
        return scores[..., : math.ceil(x.shape[-2] / stride), : math.ceil(x.shape[-1] / stride)]

    return Pair(ours, baseline, "ours, reference decoder")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def timed(fn: Callable, x: torch.Tensor, device: torch.device) -> tuple[float, torch.Tensor]:
    synchronize(device)
    start = time.perf_counter()
    out = fn(x)
    synchronize(device)
    return time.perf_counter() - start, out


@dataclass
class Row:
    model: str
    family: str
    input: str
    batch: int
    dtype: str
    mode: str  # eager | compiled | onnxruntime
    ours_ms: float | None = None
    baseline_ms: float | None = None
    baseline: str = ""
    max_abs_diff: float | None = None
    compile_s: float | None = None
    tflops: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours_ms and self.baseline_ms:
            return self.baseline_ms / self.ours_ms
        return None


def measure(ours_fn, base_fn, x, device, dtype, warmup: int, repeats: int) -> tuple[float, float, float, float]:
    """(ours median s, baseline median s, max |ours - baseline|, ours' first-call s)."""
    ours_s, base_s = [], []
    with torch.inference_mode(), autocast(device, dtype):
        first, a = timed(ours_fn, x, device)
        _, b = timed(base_fn, x, device)
        diff = (a.float() - b.float()).abs().max().item()
        del a, b
        for _ in range(max(0, warmup - 1)):
            timed(ours_fn, x, device)
            timed(base_fn, x, device)
        for _ in range(repeats):
            ours_s.append(timed(ours_fn, x, device)[0])
            base_s.append(timed(base_fn, x, device)[0])
    return statistics.median(ours_s), statistics.median(base_s), diff, first


def count_flops(model: torch.nn.Module, x: torch.Tensor, device: torch.device, dtype: str) -> int:
    """The matmul and conv FLOPs of one forward (FlopCounterMode: elementwise ops, grid sampling
    and embedding_bag are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    # FlopCounterMode's module tracker hooks tensors that require grad: none must
    needs_grad = [p for p in model.parameters() if p.requires_grad]
    for p in needs_grad:
        p.requires_grad_(False)
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), autocast(device, dtype), counter:
            model(x)
    finally:
        for p in needs_grad:
            p.requires_grad_(True)
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, dtype: str, n: int, repeats: int = 10) -> float:
    """The rate of an n x n x n matmul in `dtype`: what the chip attains on the ideal operation."""
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    with torch.inference_mode():
        a @ b
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def uncompiled(model: torch.nn.Module) -> None:
    """Undo compile_for_inference (it sets an instance `forward`) and drop dynamo's caches."""
    model.__dict__.pop("forward", None)
    torch._dynamo.reset()


def run_case(case: Case, args, device: torch.device) -> list[Row]:
    rows = []
    pair = build_pair(case, args.tiny)
    pair.to(device)
    ours, ours_fn, base_fn, baseline = pair.ours, pair.ours.__call__, pair.baseline, pair.baseline_name
    sizes = [args.tiny_size] if args.tiny else (args.sizes or list(case.sizes))
    for size in sizes:
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
            for dtype in args.dtypes:
                compiled = args.compile and dtype in args.compile_dtypes and case.name in args.compile_models
                onnx = args.onnx and dtype == "fp32" and device.type == "cpu" and case.name in args.onnx_models
                modes = ["eager"] + (["compiled"] if compiled else []) + (["onnxruntime"] if onnx else [])
                for mode in modes:
                    row = Row(case.name, case.family, f"{size}x{size}", batch, dtype, mode, baseline=baseline)
                    rows.append(row)
                    if dtype == "fp16" and device.type == "cpu":
                        row.note = "n/a on CPU"
                        continue
                    try:
                        if mode == "compiled":
                            compile_for_inference(ours, backend=args.compile_backend)
                        if mode == "onnxruntime":
                            run_with_onnxruntime(ours)
                        ours_s, base_s, diff, first = measure(ours_fn, base_fn, x, device, dtype, args.warmup, args.repeats)
                        if mode == "onnxruntime" and "forward" not in vars(ours):
                            row.note = "export failed: ran in torch (see the warning)"
                            continue
                        if mode == "onnxruntime":
                            row.note = "exporter " + ", ".join(sorted(set(ours.forward.onnx.exporters.values())))
                        row.ours_ms, row.baseline_ms, row.max_abs_diff = 1000 * ours_s, 1000 * base_s, diff
                        if mode != "eager":
                            row.compile_s = first  # compiling, or exporting, included
                        if args.flops and mode == "eager":
                            row.tflops = count_flops(ours, x, device, dtype) / ours_s / 1e12
                    except Exception as exc:  # one failing cell (out of memory, an unsupported dtype) leaves the others
                        row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
                    finally:
                        if mode == "compiled":
                            uncompiled(ours)
                        if mode == "onnxruntime":
                            ours.__dict__.pop("forward", None)  # the eager forward again
                    print(format_row(row), flush=True)
    del pair, ours, ours_fn, base_fn
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

HEADER = (
    "model",
    "input",
    "batch",
    "dtype",
    "mode",
    "ours (ms)",
    "baseline (ms)",
    "ratio",
    "max abs diff",
    "baseline",
    "compile s",
    "note",
)


def _f(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_row(row: Row) -> str:
    cells = (
        row.model,
        row.input,
        str(row.batch),
        row.dtype,
        row.mode,
        _f(row.ours_ms, ".1f"),
        _f(row.baseline_ms, ".1f"),
        _f(row.ratio, ".2f"),
        _f(row.max_abs_diff, ".1e"),
        row.baseline,
        _f(row.compile_s, ".1f"),
        row.note + (f" {row.tflops:.2f} TFLOP/s" if row.tflops is not None else ""),
    )
    return "| " + " | ".join(cells) + " |"


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    return "\n".join(lines + [format_row(r) for r in rows])


def cell(row: Row | None) -> str:
    """One dtype's cell of the by-dtype table."""
    if row is None:
        return "not run"
    if row.ours_ms is None:
        return row.note or "not run"
    text = f"{row.ours_ms:.1f} / {row.baseline_ms:.1f} ms = {row.ratio:.2f}x, diff {row.max_abs_diff:.0e}"
    if row.compile_s is not None:
        text += f", compile {row.compile_s:.0f} s"
    return text


def table_by_dtype(rows: list[Row], dtypes: list[str], peaks: dict[str, float], flops_models: list[str], header: list[str]) -> str:
    """The table gpu.sh writes: one row per (model, input, batch, mode, measure), a column per dtype."""
    out = list(header)
    out.append("| family | model | input | batch | measure | " + " | ".join(dtypes) + " |")
    out.append("|---|---|---|---|---|" + "|".join("---" for _ in dtypes) + "|")
    keys = []
    for r in rows:
        key = (r.family, r.model, r.input, r.batch, r.mode)
        if key not in keys:
            keys.append(key)
    for family, model, size, batch, mode in keys:
        by_dtype = {r.dtype: r for r in rows if (r.family, r.model, r.input, r.batch, r.mode) == (family, model, size, batch, mode)}
        baseline = next(iter(by_dtype.values())).baseline
        measure = f"forward {mode}: ours / {baseline} (ratio = theirs / ours)"
        out.append(f"| {family} | {model} | {size} | {batch} | {measure} | " + " | ".join(cell(by_dtype.get(d)) for d in dtypes) + " |")
        if mode == "eager" and model in flops_models:
            cells = []
            for d in dtypes:
                r = by_dtype.get(d)
                if r is None or r.tflops is None:
                    cells.append(r.note if r is not None and r.note else "not run")
                else:
                    share = f" = {100 * r.tflops / peaks['bf16']:.0f}% of the bf16 matmul rate" if peaks.get("bf16") else ""
                    cells.append(f"{r.tflops:.2f} TFLOP/s{share}")
            out.append(f"| {family} | {model} | {size} | {batch} | achieved TFLOP/s (matmul + conv FLOPs) | " + " | ".join(cells) + " |")
    peak_cells = [f"{peaks[d]:.1f} TFLOP/s" if d in peaks else "n/a on CPU" for d in dtypes]
    out.append("| - | n x n matmul | - | - | attainable TFLOP/s (timed matmul) | " + " | ".join(peak_cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[c.name for c in CASES], help="registry names (default: every case)")
    parser.add_argument("--sizes", nargs="*", type=int, help="square input sides (default: each case's own, 512 or 384 and 512)")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="*", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--compile", action="store_true", help="add compiled rows (ours through compile_for_inference)")
    parser.add_argument("--compile-dtypes", nargs="*", choices=list(DTYPES), help="dtypes of the compiled rows (default: all of --dtypes)")
    parser.add_argument("--compile-models", nargs="*", help="the models with compiled rows (default: all of --models)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: checks the plumbing quickly)")
    parser.add_argument("--onnx", action="store_true", help="add onnxruntime rows (ours through models.onnx_backend; fp32, CPU)")
    parser.add_argument("--onnx-models", nargs="*", help="the models with onnxruntime rows (default: all of --models)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flops", action="store_true", help="achieved TFLOP/s of ours, and a timed matmul per dtype")
    parser.add_argument("--flops-models", nargs="*", default=["segformer-b2", "mask2former-swin-tiny"])
    parser.add_argument("--tiny", action="store_true", help="reduced-width models at --tiny-size: checks the table, measures nothing")
    parser.add_argument("--tiny-size", type=int, default=64)
    parser.add_argument("--markdown", help="also write the table, a column per dtype, to this Markdown file")
    parser.add_argument("--title", default="", help="a line above the Markdown table")
    args = parser.parse_args(argv)
    args.compile_dtypes = args.compile_dtypes or args.dtypes
    args.compile_models = args.compile_models or args.models
    args.onnx_models = args.onnx_models or args.models
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    unknown = set(args.models) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {', '.join(c.name for c in CASES)}")

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    context = (
        f"torch {torch.__version__}, {machine}, load average {load} at the start; median of {args.repeats} after {args.warmup} warm-up"
    )
    print(context)
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "|".join("---" for _ in HEADER) + "|", flush=True)
    header = ([f"# {args.title}", ""] if args.title else []) + [context, ""]
    rows: list[Row] = []
    peaks: dict[str, float] = {}
    if args.flops:
        n = 8192 if device.type == "cuda" else 1024
        for dtype in args.dtypes:
            if dtype == "fp16" and device.type == "cpu":
                continue
            peaks[dtype] = matmul_tflops(device, dtype, n)
        print("matmul " + ", ".join(f"{d} {v:.2f} TFLOP/s" for d, v in peaks.items()), flush=True)
    for case in CASES:
        if case.name in args.models:
            rows += run_case(case, args, device)
            if args.markdown:  # after every case: a run cut short still leaves its table
                Path(args.markdown).write_text(table_by_dtype(rows, args.dtypes, peaks, args.flops_models, header))
    if args.markdown:
        print(f"wrote {args.markdown}")
    return rows


if __name__ == "__main__":
    main()
