#!/usr/bin/env bash
# One-shot GPU check: install, build the extension, GPU tests, kernel micro-benchmarks, end-to-end
# benchmark; one JSON ($OUT or bench/results/<date>-<gpu>.json) and a short table printed last.
#
#   bash bench/gpu_check.sh             # on a CUDA machine with torch/triton/transformers preinstalled; < 8 min
#   bash bench/gpu_check.sh --dry-run   # every step at toy sizes on the CPU (TRITON_INTERPRET=1, tiny preset)
#
# Every step runs under `timeout` against one overall deadline (BUDGET_S, default 450 s), so a step
# that fails or hangs costs its own slot only; its status lands in steps.tsv and the report.
set -u
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
BUDGET_S=${BUDGET_S:-$([[ $DRY == 1 ]] && echo 1200 || echo 450)}
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
: > "$WORK/steps.tsv"
export PYTHONUNBUFFERED=1
if [[ $DRY == 1 ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DEV=(--device cpu); QUICK=(--quick)
else
    # the kernel test modules default TRITON_INTERPRET to 1 for CPU runs; on the GPU compile for real
    export TRITON_INTERPRET=0
    DEV=(); QUICK=()
fi

# step NAME CAP_S RESERVE_S CMD...: run CMD under timeout min(CAP_S, time left - RESERVE_S)
step() {
    local name=$1 cap=$2 reserve=$3; shift 3
    local left=$(( BUDGET_S - (SECONDS - START) - reserve ))
    local t=$(( cap < left ? cap : left ))
    if (( t < 10 )); then
        echo "== $name: skipped (out of time)" >&2
        printf '%s\tskipped\t0\n' "$name" >> "$WORK/steps.tsv"
        return 0
    fi
    echo "== $name (timeout ${t}s) $(date +%T)" >&2
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$t" "$@" || rc=$?
    local status=ok
    if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status="rc=$rc"; fi
    printf '%s\t%s\t%d\n' "$name" "$status" $(( SECONDS - t0 )) >> "$WORK/steps.tsv"
    echo "== $name: $status in $(( SECONDS - t0 ))s" >&2
}

if [[ $DRY == 1 ]] && python -c "import blip2_fast.kernels" 2>/dev/null; then
    echo "== install: skipped (dry run; blip2_fast is already importable)" >&2
    printf 'install\tskipped\t0\n' >> "$WORK/steps.tsv"
else
    # no build isolation: an isolated build would fetch setuptools from an index, and there is no network
    step install 90 330 python -m pip install -e . --no-deps --no-build-isolation -q
fi
python -c "import blip2_fast.kernels, blip2_fast.csrc" 2>/dev/null \
    || echo "== WARNING: blip2_fast.kernels is not importable: every fast op will fall back to the reference" >&2
command -v nvidia-smi >/dev/null && [[ $DRY == 0 ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
step build-ext 150 300 python -c "from blip2_fast import _ext; print(_ext.build(verbose=True))"
step tests 100 240 bash -c "set -o pipefail; python -m pytest -m gpu tests/ -q -p no:cacheprovider 2>&1 | tee '$WORK/pytest.txt' | tail -25"
step kernels 90 180 python -m bench.kernels "${QUICK[@]}" "${DEV[@]}" --json "$WORK/kernels.json"
step e2e-opt 170 20 python -m bench.e2e --preset blip2-opt-2.7b --dtype "$([[ $DRY == 1 ]] && echo fp32 || echo bf16)" \
    --batch 1 64 --new-tokens 30 --repeats 2 "${QUICK[@]}" "${DEV[@]}" --json "$WORK/e2e-1-opt.json"
left=$(( BUDGET_S - (SECONDS - START) ))
if (( left > 120 )); then
    step e2e-t5 $(( left - 20 )) 20 python -m bench.e2e --preset blip2-flan-t5-xl \
        --dtype "$([[ $DRY == 1 ]] && echo fp32 || echo bf16)" --batch 1 64 --new-tokens 30 --repeats 1 --no-engine \
        "${QUICK[@]}" "${DEV[@]}" --json "$WORK/e2e-2-t5.json"
else
    echo "== e2e-t5: skipped (${left}s left)" >&2
    printf 'e2e-t5\tskipped\t0\n' >> "$WORK/steps.tsv"
fi
echo "== total $(( SECONDS - START ))s; step outputs in $WORK" >&2
if [[ $DRY == 1 ]]; then
    python -m bench.gpu_report --work "$WORK" --out-dir "${OUT:-$WORK}"
else
    python -m bench.gpu_report --work "$WORK"
fi
