#!/usr/bin/env bash
# Compiles every csrc/*.cu with `nvcc -c` for sm_80 and sm_90a, warnings as errors, without torch:
# the .cu files need only the CUDA headers and their own. The check for machines without a GPU (or
# without a CUDA build of torch): it catches what would otherwise only fail on first use on a GPU.
#
#   csrc/check_nvcc.sh            # exit 0: all compiled; 1: a compile failed; 0 + SKIP line: no nvcc
#   NVCC=/path/to/nvcc csrc/check_nvcc.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [[ -z "$nvcc" ]]; then
  echo "SKIP: nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH); no .cu file was compiled"
  exit 0
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
shopt -s nullglob
for cu in "$here"/*.cu; do
  name="$(basename "$cu" .cu)"
  start=$SECONDS
  if "$nvcc" -c "$cu" -o "$out/$name.o" -std=c++17 -O3 \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
      -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -I"$here"; then
    echo "OK   $name.cu ($((SECONDS - start)) s, $("$nvcc" --version | grep -o 'release [0-9.]*'))"
  else
    echo "FAIL $name.cu"
    status=1
  fi
done
exit $status
