"""The sm_90 compile check (bench/sm90_compile.py) as a test: every kernel's default config (what an
untuned launch, and every GPU test, runs) compiles for an H100/H200 without register spills and on
the fast path: wgmma or tensor-core mma and cp.async for the attention and GEMM tiles, 16-byte loads
for decode attention, mma.sync and cp.async in the CUDA cross-attention. No GPU needed (Triton's
bundled ptxas; nvcc for csrc/*.cu); skipped where ptxas is missing. The full report, every autotune
candidate and the dropped configs included, is `python -m bench.sm90_compile` (committed as
bench/results/sm90-compile-<date>.json)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report(tmp_path) -> dict:
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas is not installed")
    out = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run([sys.executable, "-m", "bench.sm90_compile", "--defaults-only", "--no-write", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_default_configs_compile_spill_free_on_the_fast_path(tmp_path):
    """One test (one compile run, ~1-2 minutes): a report per xdist worker would double it."""
    report = _report(tmp_path)
    check_every_kernel_has_default_configs(report)
    check_no_default_config_spills(report)
    check_default_configs_are_on_the_fast_path(report)
    check_cuda_kernels(report)


def check_every_kernel_has_default_configs(report):
    kernels = {r["kernel"] for r in report["triton_kernels"]}
    assert kernels == {"attention", "paged_attention", "write_kv", "norms", "gemm_gelu"}
    assert all(r["default"] for r in report["triton_kernels"])


def check_no_default_config_spills(report):
    for r in report["triton_kernels"]:
        assert "error" not in r, r
        assert r["stack_bytes"] == 0 and r["local_ld_st"] == 0, f"spills: {r}"


def check_default_configs_are_on_the_fast_path(report):
    for r in report["triton_kernels"]:
        what = f"{r['kernel']} {r['case']} {r['config']}"
        if r["kernel"] in ("attention", "gemm_gelu") and "fp32" not in r["case"]:
            tensor_cores = r["wgmma"] > 0 if r["config"].get("BLOCK_M", 64) >= 64 else r["hmma"] > 0
            assert tensor_cores, f"no tensor-core instructions: {what}"
            assert r["cp_async"] > 0 or r["tma"] > 0, f"tiles not loaded asynchronously: {what}"
        if r["kernel"] == "attention":
            # non-power-of-two head dims run at their two-block width, not padded to a power of two
            if r["config"]["head_dim"] in (80, 88):
                assert r["config"]["dot_width"] < r["config"]["padded_width"], what
        if r["kernel"] in ("paged_attention", "write_kv") and "merge" not in r["case"]:
            assert r["ld_global_v4"] > 0, f"cache rows not loaded as 16-byte vectors: {what}"


def check_cuda_kernels(report):
    rows = report["cuda_kernels"]
    if rows and rows[0].get("error") == "nvcc not found":
        return  # no CUDA toolkit here: csrc/check_nvcc.sh says so too; the Triton checks above stand
    assert rows and not any("error" in r for r in rows), rows
    assert all(r["stack_bytes"] == 0 and r["local_ld_st"] == 0 for r in rows), rows
    mma = [r for r in rows if "cross_attention_mma_kernel" in r["function"]]
    assert len(mma) == 6, [r["function"] for r in rows]  # fp16 and bf16 at head dims up to 32, 64, 128
    assert all(r["hmma"] > 0 and r["ldgsts"] > 0 for r in mma), mma
