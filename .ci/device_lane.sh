#!/usr/bin/env bash
# The device-versions lane: the GPU machine's package versions (triton 3.6, transformers 5.17,
# safetensors 0.8, the newest numpy pip gives) on the CPU. Runs the kernel tests interpreted, the
# parity tests, the server's tests (its preprocessing follows transformers' image processor) and the
# GPU check's dry run, and fails if any planned figure of the dry run is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-device
. .venv-device/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[test,serve]" -c .ci/device-constraints.txt
pip install -q --disable-pip-version-check -U numpy
python - <<'PY'
import numpy, transformers, triton, safetensors, torch
print(f"device lane: torch {torch.__version__} triton {triton.__version__} transformers {transformers.__version__} "
      f"safetensors {safetensors.__version__} numpy {numpy.__version__}")
assert triton.__version__ == "3.6.0" and transformers.__version__ == "5.17.0", "the lane must run the GPU machine's versions"
PY
python -m blip2_fast build-ext
TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider -n 2 \
    tests/test_attention.py tests/test_layer_norm.py tests/test_rms_norm.py tests/test_linear_gelu.py \
    tests/test_ln_linear_gelu.py tests/test_paged_attention.py tests/test_write_kv.py tests/test_interpret.py \
    tests/test_model_parity.py tests/test_model_fast.py tests/test_gpu_check.py \
    tests/test_serving_pixels.py tests/test_serving.py
OUT_DIR=$(mktemp -d)
# every step at toy sizes; exits non-zero if any planned figure (each kernel op, each e2e row, the
# tests) is missing or failed, and prints which
OUT=$OUT_DIR bash bench/gpu_check.sh --dry-run
python -m bench.gpu_report "$OUT_DIR"/*.json > /dev/null
echo "device lane: ok"
