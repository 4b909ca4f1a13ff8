#!/usr/bin/env bash
# The one-shot GPU check: one H200 (or any CUDA GPU), the machine's own python3 and torch
# (>= 2.11) with its Triton, nothing installed: the project runs from this source tree.
#
#   bash benchmarks/gpu_check.sh             # about 7 minutes; JSON into $OUT (default benchmarks/results/gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps on CPU, tiny shapes, Triton interpreter (CI)
#
# Steps (each has a time limit, writes its JSON the moment it finishes, and a failure does not
# stop the next; steps.jsonl gets one line per step: name, exit code, seconds; NAME.log the output):
#   device.json               torch / Triton / CUDA versions, the GPU
#   correctness_DTYPE.json    the Triton kernels vs float64 torch, bf16 / fp16 / fp32 in parallel
#   kernel_timings.json       the kernels vs their cuBLAS + index_add / gather routes, 350M/1B/7B shapes
#   layer_bench.json          benchmarks/layer_bench.py: one decoder layer, 350M/1B/7B x 2k/8k/16k tokens,
#                             dense vs SLLinear eager and the slcompile backend as compiled by default
#   layer_autotune.json       the same at 7B x 8k tokens with mode="max-autotune": Inductor times every
#                             GEMM's Triton templates against cuBLAS and our kernels against their ATen
#                             routes (slcompile/lowering.py); one shape, as each compile tunes for minutes
#   memory_7b.json            fwd+bwd peak of a 7B layer's linears, SLLinear vs dense
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu_check}"
DRY=""
if [ "${1:-}" = "--dry-run" ]; then
  DRY="--dry-run"
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
mkdir -p "$OUT"

step() {  # step NAME LIMIT_S COMMAND...: run it under its limit, log it, record its exit code
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" | tee -a "$OUT/steps.jsonl"
}

step device 20 "$PY" benchmarks/gpu_check.py device "$OUT/device.json" $DRY
if [ -n "$DRY" ]; then
  DTYPES="float32 float16"  # the interpreter's bf16 arithmetic is wrong
  LAYER="--device cpu --shapes tiny --tokens 32 --repeats 1 --warmup 0"
  AUTOTUNE="$LAYER"
else
  DTYPES="bfloat16 float16 float32"
  LAYER="--device cuda --shapes 350m,1b,7b --tokens 2048,8192,16384 --repeats 5 --warmup 1"
  AUTOTUNE="--device cuda --shapes 7b --tokens 8192 --repeats 5 --warmup 1"
fi
for dtype in $DTYPES; do
  step "correctness_$dtype" 60 "$PY" benchmarks/gpu_check.py correctness "$OUT/correctness_$dtype.json" --dtype "$dtype" $DRY &
done
wait
step kernel_timings 90 "$PY" benchmarks/gpu_check.py timings "$OUT/kernel_timings.json" $DRY
# shellcheck disable=SC2086  # LAYER is a list of arguments
step layer_bench 150 "$PY" benchmarks/layer_bench.py $LAYER --variants dense,autograd,sllinear,backend \
  --plot none --out "$OUT/layer_bench.json"
# shellcheck disable=SC2086
step layer_autotune 120 "$PY" benchmarks/layer_bench.py $AUTOTUNE --variants dense,sllinear,backend,backend_autotune \
  --plot none --out "$OUT/layer_autotune.json"
step memory_7b 40 "$PY" benchmarks/gpu_check.py memory "$OUT/memory_7b.json" $DRY
