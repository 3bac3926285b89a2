#!/usr/bin/env bash
# The GPU check in one command: writes ONE Markdown table (default benchmarks/gpu-results.md).
#
#   bash benchmarks/gpu.sh [OUT.md]         # a CUDA machine, under 8 minutes
#   bash benchmarks/gpu.sh --cpu [OUT.md]   # the same table from tiny models on CPU, under a minute
#
# Rows: every family's forward (SegFormer-B0/B2, MaskFormer and Mask2Former Swin-T, DETR against
# transformers' with the same weights; SETR and Segmenter against our reference decoder / eager),
# batch 8 at 512x512, in fp32, bf16 and fp16 (autocast, as the pipeline runs them), eager and, in
# bf16, through torch.compile (compile time in the cell); the achieved TFLOP/s of SegFormer-B2 and
# Mask2Former (torch.utils.flop_counter) next to a timed 8192^3 matmul of each dtype; the
# pipeline against the bare loop (benchmarks/pipeline_throughput.py on synthetic images, the GPU
# actor against a plain loop on the GPU, wall and steady rates, and the share of the actor's time
# its forward ran), at CamVid's size and at Cityscapes' (synthetic 1024 x 2048, SegFormer-B2, 19
# classes; not in --cpu, whose one pipeline run gives the busy share); and the stitcher on the
# device against on the CPU (benchmarks/stitch_device.py; --cpu: the same code with both on the CPU).
# The table is rewritten after every model, so a run cut short keeps its rows.
# Python: $PYTHON, else .venv/bin/python where there is one, else python.
set -euo pipefail
cd "$(dirname "$0")/.."

cpu=0
out=benchmarks/gpu-results.md
for arg in "$@"; do
    case "$arg" in
        --cpu) cpu=1 ;;
        -h | --help) sed -n '2,18p' "$0" && exit 0 ;;
        *) out=$arg ;;
    esac
done
python=${PYTHON:-python}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi

models=(segformer-b0 segformer-b2 maskformer-swin-tiny mask2former-swin-tiny setr-naive-vit-base setr-pup-vit-base setr-mla-vit-base segmenter-linear-vit-base segmenter-mask-vit-base detr-resnet50-panoptic)
if [ "$cpu" = 1 ]; then
    # tiny widths, one CPU thread, fp16 reported as n/a; the compiled row through aot_eager (the
    # plumbing, not inductor: its C++ builds take minutes on a small CPU), in fp32 only (2 s of tracing less)
    args=(--device cpu --threads 1 --tiny --batches 1 --warmup 1 --repeats 1 --compile --compile-backend aot_eager
        --compile-dtypes fp32 --compile-models segformer-b0)
    title="segpipe models: gpu.sh --cpu (tiny models on CPU: checks the table, measures nothing)"
    pipeline=(--device cpu --synthetic 2 --size 64x96 --window 64 --stride 48 --precisions fp32 --no-fixed-cost)
    cityscapes=()
    stitch=(--device cpu --size 256x512 --window 128 --stride 96 --threads 1 --repeats 1)
else
    args=(--device cuda --threads 0 --sizes 512 --batches 8 --warmup 2 --repeats 5 --compile --compile-dtypes bf16
        --compile-models segformer-b2 maskformer-swin-tiny mask2former-swin-tiny setr-naive-vit-base segmenter-mask-vit-base)
    pipeline=(--device cuda --synthetic 300 --batch 8 --precisions fp32 bf16 fp16)
    cityscapes=(--device cuda --synthetic 100 --size 1024x2048 --classes 19 --model segformer-b2 --window 1024 --stride 768
        --batch 2 --precisions fp32 bf16 --no-fixed-cost)
    stitch=(--device cuda --size 1024x2048 --classes 19 --window 1024 --stride 768)
    title="segpipe models on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'a CUDA GPU')"
fi

"$python" benchmarks/model_speed.py "${args[@]}" --models "${models[@]}" --dtypes fp32 bf16 fp16 --flops --markdown "$out" --title "$title"

# the pipeline against the bare loop on the GPU: one more row of the same table (a local Ray of its own)
RAY_ADDRESS=local "$python" benchmarks/pipeline_throughput.py "${pipeline[@]}" --markdown "$out"
if [ "${#cityscapes[@]}" -gt 0 ]; then # at Cityscapes' size: one more row
    RAY_ADDRESS=local "$python" benchmarks/pipeline_throughput.py "${cityscapes[@]}" --markdown "$out"
fi
# the stitcher on the device against on the CPU
"$python" benchmarks/stitch_device.py "${stitch[@]}" --markdown "$out"
echo "wrote $out"
