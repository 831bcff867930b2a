#!/usr/bin/env bash
# The one GPU check (see bench/gpu_check.py): build, kernel benchmarks, e2e OPT-2.7B, GPU tests,
# e2e Flan-T5-XL, under one budget (default 420 s), one results JSON rewritten as it goes.
#
#   bash bench/gpu_check.sh                      # on the GPU machine; JSON under $OUT or bench/results/
#   bash bench/gpu_check.sh --dry-run            # every step at toy sizes on the CPU
#   bash bench/gpu_check.sh --budget 300 --only kernels,e2e-opt
cd "$(dirname "$0")/.." || exit 1
PY=$(command -v python || command -v python3) || { echo "gpu_check: neither python nor python3 is on PATH" >&2; exit 1; }
exec "$PY" -m bench.gpu_check "$@"
