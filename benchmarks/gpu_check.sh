#!/usr/bin/env bash
# The one short GPU run for a session that is lent a device (one H200, its own torch + triton):
# kernel correctness compiled (bf16 included), then the layer benchmark and the path timings,
# JSON into $OUT (default benchmarks/results). About 6-10 minutes; each step has its own limit so
# a hang in one still leaves the others' results.
#   bash benchmarks/gpu_check.sh            # from the repository root, on the GPU machine
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_info.txt"
# Kernels against float64 references, compiled for the GPU (tests/kernels/kernel_cases.py).
timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/kernel_cases.py 2>&1 | tail -30 | tee "$OUT/gpu_kernel_cases.txt"
# The seven linears of one decoder layer at 350M/1B/7B x 2k/8k/16k tokens, bf16.
timeout 270 python benchmarks/layer_bench.py --device cuda --repeats 10 --out "$OUT/layer_bench_cuda.json" 2>&1 | tail -40
# Materialize vs factored per linear shape at 1..16k tokens, scored against the h200-triton preset.
timeout 120 python benchmarks/paths_bench.py --device cuda --repeats 5 --out "$OUT/paths_bench_cuda.json" 2>&1 | tail -60
