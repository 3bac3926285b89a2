"""benchmarks/gpu.sh --cpu: the GPU check's table, made from tiny models on CPU (it measures nothing:
this checks that the one command runs and writes a row for every family and a column per dtype)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["segformer", "maskformer", "mask2former", "setr", "segmenter", "detr"]
DTYPES = ["fp32", "bf16", "fp16"]


def _table(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows' cells) of the one Markdown table in `path`."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header, _, *body = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    return header, body


def test_gpu_script_in_cpu_mode_writes_a_row_per_family_with_every_dtype_the_busy_share_and_the_stitchers(tmp_path):
    out = tmp_path / "results.md"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--cpu", str(out)],
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    header, rows = _table(out)
    assert header[:5] == ["family", "model", "input", "batch", "measure"] and header[5:] == DTYPES
    assert all(len(row) == len(header) for row in rows)

    eager = {row[0]: row for row in rows if row[4].startswith("forward eager")}
    assert sorted(eager) == sorted(FAMILIES)
    for family, row in eager.items():
        fp32, bf16, fp16 = row[5:]
        assert " ms = " in fp32 and "x, diff" in fp32, (family, fp32)
        assert " ms = " in bf16, (family, bf16)
        assert fp16 == "n/a on CPU"
    baselines = {row[0]: row[4] for row in eager.values()}
    assert all("transformers" in baselines[f] for f in ("segformer", "maskformer", "mask2former", "detr"))

    assert any(row[4].startswith("forward compiled") and "compile" in row[5] for row in rows)
    flops = [row for row in rows if row[4].startswith("achieved TFLOP/s")]
    assert {row[1] for row in flops} == {"segformer-b2", "mask2former-swin-tiny"}
    assert all("TFLOP/s" in row[5] for row in flops)
    assert any(row[1] == "n x n matmul" and "TFLOP/s" in row[5] for row in rows)
    pipeline = [row for row in rows if row[0] == "pipeline"]
    assert len(pipeline) == 1 and "segpipe run / bare loop (cpu" in pipeline[0][4], pipeline
    assert "plain " in pipeline[0][5] and "img/s wall = " in pipeline[0][5] and "steady " in pipeline[0][5], pipeline[0][5]
    # the share of the model actor's calls its forward ran (run.json's actors.forward_busy_share), a percentage
    busy = pipeline[0][5].split("forward busy ")[1]
    assert busy.endswith("%") and 0 < int(busy[:-1]) <= 100, pipeline[0][5]
    # the stitcher on the device against on the CPU: in --cpu, the same code with both on the CPU, bit-exact
    [stitch] = [row for row in rows if row[0] == "stitch"]
    assert stitch[4].startswith("stitcher on cpu / on cpu") and " ms an image = " in stitch[5], stitch
    assert stitch[5].endswith("labels differ 0 px"), stitch


def test_model_speed_onnx_rows_run_ours_through_onnx_runtime_beside_eager(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import model_speed

    argv = ["--tiny", "--onnx", "--models", "segformer-b0", "--batches", "1", "--warmup", "1", "--repeats", "1"]
    rows = {row.mode: row for row in model_speed.main(argv)}
    assert set(rows) == {"eager", "onnxruntime"}
    onnx = rows["onnxruntime"]
    assert onnx.ours_ms > 0 and onnx.max_abs_diff <= 1e-4 and onnx.note == "exporter dynamo", onnx
    assert onnx.compile_s > 0  # the export, timed apart
