"""blip2_fast::cross_attention_fwd, the C++/CUDA extension (csrc/): CPU kernel, CUDA kernels, build, registry.

The CPU kernel is compared with a float64 run of `cross_attention_ref`; its error may be at most twice
that of eager PyTorch in the same dtype, plus a small floor. Without a GPU the CUDA kernels are
checked twice: `csrc/check_nvcc.sh` compiles them for sm_80/sm_90a, and an emulation harness compiles
the same kernel source as C++ and runs it on CPU threads (one std::thread per CUDA thread, a barrier
for __syncthreads, NaN-poisoned shared memory and output; mma.sync emulated warp-wide from the PTX
manual's fragment layouts, cp.async copies deferred until the wait that retires them), which catches
indexing, fragment-layout, masking and missing barrier / wait bugs. Tests marked `gpu` run the real
kernels.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blip2_fast import _ext, ops
from blip2_fast.reference import cross_attention_ref

CSRC = Path(__file__).resolve().parents[1] / "csrc"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}  # absolute, on top of 2x eager

# (B, H, Nq, Nk, D): the Q-Former's shape, then edge cases and awkward sizes.
SHAPES = [
    (2, 12, 32, 257, 64),  # Q-Former: 32 queries over 16 x 16 patches + CLS
    (1, 12, 1, 257, 64),  # a single query
    (2, 3, 32, 1, 64),  # a single key
    (2, 4, 32, 300, 64),  # Nk past a multiple of the 64-key tile
    (1, 2, 33, 97, 32),  # D = 32; Nq one past the 32-query CUDA tile
    (1, 2, 17, 200, 128),  # D = 128, the CUDA maximum
    (3, 2, 7, 65, 59),  # odd D: scalar tails, no 16-byte loads
    (2, 2, 5, 129, 40),  # D = 40: one 16-lane tail chunk
]


def _ids(shapes):
    return ["x".join(map(str, s)) for s in shapes]


def eager(q, k, v, key_padding_mask=None, scale=None):
    """matmul-softmax-matmul in q's dtype: the error budget's yardstick."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v


def make(B, H, Nq, Nk, D, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(device, dtype) for n in (Nq, Nk, Nk))
    return q, k, v


def make_mask(B, Nk, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Nk, generator=g) > 0.3
    mask[:, 0] = True
    if B > 1:
        mask[-1] = False  # a fully masked batch row: its queries must come out as zeros
    return mask.to(device)


def check(out, q, k, v, mask=None, scale=None, baseline=eager, name="eager"):
    """out vs float64 reference; error <= 2x the baseline's error in q's dtype + floor."""
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert not out.isnan().any(), "NaN in the output"
    ref = cross_attention_ref(q.double(), k.double(), v.double(), key_padding_mask=mask, scale=scale)
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    base = (baseline(q, k, v, key_padding_mask=mask, scale=scale).double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base + FLOOR[q.dtype], f"fast error {err:.3g} vs {name} error {base:.3g} ({q.dtype}, {tuple(q.shape)})"
    if mask is not None:
        dead = ~mask.bool().any(dim=1)  # batch rows with every key masked
        assert (out[dead] == 0).all(), "a fully masked row must give zeros"


@pytest.fixture(scope="module")
def ext():
    reason = _ext.unavailable_reason("cpu")
    assert reason is None, f"the C++ extension did not build: {reason}"
    return _ext


def via_registry(q, k, v, mask=None, scale=None):
    return ops.get("cross_attention", "fast")(q, k, v, key_padding_mask=mask, scale=scale)


def via_torch_ops(q, k, v, mask=None, scale=None):
    return torch.ops.blip2_fast.cross_attention_fwd(q, k, v, mask, scale)


ENTRIES = {"registry": via_registry, "torch.ops": via_torch_ops}


# ---------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_cpu_matches_reference(ext, shape, dtype):
    B, H, Nq, Nk, D = shape
    q, k, v = make(*shape, dtype)
    check(via_registry(q, k, v), q, k, v)
    mask = make_mask(B, Nk)
    check(via_torch_ops(q, k, v, mask), q, k, v, mask)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cpu_strided_inputs(ext, entry, dtype):
    fn = ENTRIES[entry]
    B, H, Nq, Nk, D = 2, 3, 32, 257, 64
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, Nq, H, D, generator=g).to(dtype).transpose(1, 2)  # (B, H, Nq, D) from a (B, Nq, H, D) projection
    kv = torch.randn(B, Nk, 2, H, D, generator=g).to(dtype)  # a fused K/V projection
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, Nk, D), row stride 2 * H * D
    mask = (torch.rand(B, 2 * Nk, generator=g) > 0.2)[:, ::2]  # non-contiguous mask
    assert not (q.is_contiguous() or k.is_contiguous() or mask.is_contiguous())
    check(fn(q, k, v, mask), q, k, v, mask)
    # unit stride broken along D, and an odd storage offset (no aligned fp32 rows)
    q2 = torch.randn(B, H, Nq, 2 * D, generator=g).to(dtype)[..., ::2]
    k2 = torch.randn(B * H * Nk * D + 1, generator=g).to(dtype)[1:].view(B, H, Nk, D)
    check(fn(q2, k2, v, None, 0.3), q2, k2, v, None, 0.3)
    # a mask broadcast over the batch (stride 0)
    m1 = mask[:1].expand(B, Nk)
    check(fn(q, k, v, m1), q, k, v, m1)


@pytest.mark.parametrize("mask_dtype", (torch.bool, torch.int64, torch.float32), ids=str)
def test_cpu_mask_dtypes_and_fully_masked(ext, mask_dtype):
    q, k, v = make(3, 2, 5, 70, 64, torch.float32)
    mask = make_mask(3, 70).to(mask_dtype)
    out = via_registry(q, k, v, mask)
    check(out, q, k, v, mask)
    assert (out[2] == 0).all()
    everything_masked = torch.zeros(3, 70, dtype=mask_dtype)
    out = via_torch_ops(q, k, v, everything_masked)
    assert (out == 0).all() and not out.isnan().any()


def test_cpu_no_keys_and_empty(ext):
    q, k, v = make(2, 2, 3, 0, 64, torch.float32)
    assert (via_registry(q, k, v) == 0).all()  # no key to attend to: zeros, like the reference
    q, k, v = make(0, 2, 3, 5, 64, torch.float32)
    assert via_registry(q, k, v).shape == (0, 2, 3, 64)


def test_cpu_independent_of_thread_count(ext):
    # The query blocks depend on the thread count (33 = 2 x 17 or 8 x 5 here): results must not.
    q, k, v = make(1, 2, 33, 257, 59, torch.bfloat16)
    mask = make_mask(1, 257)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = via_registry(q, k, v, mask)
        torch.set_num_threads(max(threads, 4))  # more threads than (b, h) pairs: the queries get split
        many = via_registry(q, k, v, mask)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("with_mask", (False, True))
def test_opcheck(ext, with_mask):
    q, k, v = make(2, 3, 5, 7, 32, torch.float32)
    mask = make_mask(2, 7) if with_mask else None
    torch.library.opcheck(torch.ops.blip2_fast.cross_attention_fwd.default, (q, k, v, mask, None))
    torch.library.opcheck(torch.ops.blip2_fast.cross_attention_fwd.default, (q, k, v, mask, 0.25))


def test_torch_compile_traces_the_op(ext):
    q, k, v = make(2, 3, 5, 7, 32, torch.float32)
    f = torch.compile(lambda q, k, v: _ext.cross_attention(q, k, v) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q, k, v), 2 * _ext.cross_attention(q, k, v))


BAD = [
    ("q must have shape", lambda q, k, v, m: (q[0], k, v, m)),
    ("k must have shape", lambda q, k, v, m: (q, k[..., :16], v, m)),
    ("k must have shape", lambda q, k, v, m: (q, k[:1], v, m)),
    ("v must have k's shape", lambda q, k, v, m: (q, k, v[:, :, :3], m)),
    ("key_padding_mask must have shape", lambda q, k, v, m: (q, k, v, m[:, :3])),
    ("key_padding_mask must have shape", lambda q, k, v, m: (q, k, v, m[0])),
    ("q must be float32, float16 or bfloat16", lambda q, k, v, m: (q.double(), k.double(), v.double(), m)),
    ("k and v must have q's dtype", lambda q, k, v, m: (q, k.half(), v, m)),
]


@pytest.mark.parametrize("match,bad", BAD, ids=[f"{i}-{m.split()[0]}" for i, (m, _) in enumerate(BAD)])
def test_bad_arguments_name_the_argument(ext, match, bad):
    q, k, v = make(2, 3, 5, 7, 32, torch.float32)
    args = bad(q, k, v, make_mask(2, 7))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.blip2_fast.cross_attention_fwd(*args, None)


def test_registry_binds_the_extension(ext):
    assert ops.unavailable_reason("cross_attention", "cpu") is None
    bound = ops.bind(backend="fast", device="cpu")
    assert bound.cross_attention is _ext.cross_attention and bound.impls["cross_attention"] == "fast"
    assert _ext.unavailable_reason("meta") is not None


# -------------------------------------------------------------------- build, cache and loading


def _python(code: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_loads_next_to_python_custom_ops_in_the_same_namespace(ext):
    # Fresh processes, so the load order is ours: Triton ops are custom_op("blip2_fast::...") from Python.
    code = """
        import torch
        from blip2_fast import _ext
        def define(name):
            @torch.library.custom_op(f"blip2_fast::{name}", mutates_args=())
            def f(x: torch.Tensor) -> torch.Tensor:
                return x + 1
        {before}
        _ext.build()
        define("dummy_after")
        q = torch.randn(1, 2, 3, 8)
        out = torch.ops.blip2_fast.cross_attention_fwd(q, q, q, None, None)
        assert out.shape == q.shape and torch.ops.blip2_fast.dummy_after(q).shape == q.shape
        print("ok")
    """
    for before in ('define("dummy_before")',
                   'lib = torch.library.Library("blip2_fast", "DEF"); lib.define("dummy_def(Tensor x) -> Tensor")'):
        r = _python(code.replace("{before}", before))
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_failed_build_warns_once_and_falls_back(tmp_path):
    broken = tmp_path / "csrc"
    shutil.copytree(CSRC, broken, ignore=shutil.ignore_patterns("*.cu", "*.sh", "__pycache__"))
    (broken / "cross_attention_cpu.cpp").write_text('#error "deliberately broken for the test"\n')
    code = f"""
        import warnings
        from pathlib import Path
        from blip2_fast import _ext, ops, reference
        _ext._csrc = lambda: Path({str(broken)!r})
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            reason = _ext.unavailable_reason("cpu")
            assert _ext.unavailable_reason("cpu") == reason  # asked twice, built and warned once
            bound = ops.bind(backend="fast", device="cpu")
        built = [x for x in w if "building the CPU extension" in str(x.message)]
        assert len(built) == 1 and "deliberately broken" in str(built[0].message), [str(x.message) for x in w]
        assert "failed to build" in reason and "deliberately broken" in reason, reason
        assert bound.cross_attention is reference.cross_attention_ref
        print("REASON", reason)
    """
    env = {"BLIP2_FAST_CACHE": str(tmp_path / "cache")}
    r = _python(code, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("(once)...") >= 1  # it printed that it was building
    assert list((tmp_path / "cache").glob("ext-*/FAILED"))
    # A second process reads the remembered failure instead of rebuilding; build() retries and reports.
    r = _python(code, env)
    assert r.returncode == 0 and "REASON" in r.stdout, r.stderr[-3000:]
    assert "(once)..." not in r.stderr, r.stderr[-3000:]
    r = _python(f"""
        from pathlib import Path
        from blip2_fast import _ext
        _ext._csrc = lambda: Path({str(broken)!r})
        reason = _ext.build()
        assert "deliberately broken" in reason, reason
        print("reported")
    """, env)
    assert r.returncode == 0 and "reported" in r.stdout, r.stderr[-3000:]
    assert "(once)..." in r.stderr  # build() retried instead of reading FAILED


def test_openmp_build_failure_falls_back_to_a_serial_build(tmp_path):
    """A compiler that rejects the OpenMP flags must not cost the whole extension; the serial build is
    then cached like any other (a second process loads it without building or a word), while an
    interrupted OpenMP build is an error until build(), not a reason to go serial."""
    code = """
        import os, torch
        from blip2_fast import _ext
        _ext._OPENMP_FLAGS = ("-fopenmp", "-fno-such-flag-for-the-test")
        reason = _ext.unavailable_reason("cpu")
        assert reason is None, reason
        assert os.path.exists(_ext._path) and _ext._path.endswith("_serial.so") and _ext._openmp is False, _ext._path
        q = torch.randn(1, 2, 3, 8)
        assert torch.ops.blip2_fast.cross_attention_fwd(q, q, q, None, None).shape == q.shape
        print("ok")
    """
    env = {"BLIP2_FAST_CACHE": str(tmp_path)}
    r = _python(code, env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert "without OpenMP" in r.stderr and r.stderr.count("(once)...") == 2, r.stderr[-3000:]
    r = _python(code, env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert "(once)..." not in r.stderr and "without OpenMP" not in r.stderr, r.stderr[-3000:]
    # an interrupted OpenMP build (no compiler verdict) with no serial build: unavailable, not serial
    code2 = """
        from blip2_fast import _ext
        name, src, cf, ccf, ld = _ext._config(False, True)
        d = _ext._build_dir(name, src, cf, ccf, ld)
        d.mkdir(parents=True, exist_ok=True)
        (d / "FAILED").write_text(_ext._INTERRUPTED)
        reason = _ext.unavailable_reason("cpu")
        assert reason is not None and "interrupted" in reason and _ext._loaded is None, reason
        print("ok")
    """
    r = _python(code2, {"BLIP2_FAST_CACHE": str(tmp_path / "other")})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert "(once)..." not in r.stderr, r.stderr[-3000:]


def test_failed_cuda_build_names_a_toolkit_without_headers(monkeypatch, tmp_path):
    """torch takes CUDA_HOME from nvcc's place on PATH: a wrapper script in /usr/local/bin makes it
    /usr/local, where no CUDA header is, and every CUDA source then fails on cuda_runtime.h."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    hint = _ext._cuda_home_hint()
    assert str(tmp_path) in hint and "include/cuda_runtime.h" in hint and "set CUDA_HOME" in hint, hint
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert _ext._cuda_home_hint() == ""
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert _ext._cuda_home_hint() == ""


@pytest.mark.slow
def test_concurrent_cold_builds_share_one_cache(tmp_path):
    env = {"BLIP2_FAST_CACHE": str(tmp_path)}
    code = "from blip2_fast import _ext; assert _ext.build() is None; print(_ext._path)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **env}) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]
    assert sum("building the CPU" in o[1] for o in outs) == 1  # the second waited on the lock, then loaded


# ------------------------------------------------------------------------------ CUDA, compiled


def _nvcc() -> str | None:
    cands = [os.environ.get("NVCC"), shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")]
    return next((c for c in cands if c and os.path.isfile(c)), None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the CUDA kernel's compile check needs a CUDA toolkit")
def test_cuda_kernel_compiles_with_nvcc():
    r = subprocess.run(["bash", str(CSRC / "check_nvcc.sh")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NVCC": _nvcc()})
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr
    assert "OK   cross_attention.cu" in r.stdout, r.stdout


# ------------------------------------------------------------- CUDA kernel, emulated on CPU threads

_HARNESS = r"""
// cross_attention.cu's kernels on CPU threads; see tests/test_cross_attention.py.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {
thread_local uint3 tid, bid;
std::barrier<>* block_bar;
std::barrier<>* warp_bar[32];
float xchg[32][32];
inline void sync() { block_bar->arrive_and_wait(); }
inline float shfl_xor(float v, int off) {
  const unsigned w = tid.x / 32, lane = tid.x % 32;
  xchg[w][lane] = v;
  warp_bar[w]->arrive_and_wait();
  const float r = xchg[w][lane ^ off];
  warp_bar[w]->arrive_and_wait();
  return r;
}

// mma.sync.m16n8k16.row.col with fp32 accumulation, from the PTX ISA's fragment layouts (lane =
// 4 * groupID + threadID_in_group): A (16 x 16) reg i holds rows {g, g+8, g, g+8}[i], columns
// 2t + {0, 8, 0, 8}[i] (+1 in the high half); B (16 x 8) reg i holds rows 2t + 8i (+1), column g;
// C (16 x 8) elements 0-3 are rows g, g, g+8, g+8 and columns 2t, 2t+1, 2t, 2t+1. Warp-collective.
uint32_t xa[32][32][4], xb[32][32][2];
inline float half_bits(uint16_t b, __half*) { __half x; std::memcpy(static_cast<void*>(&x), &b, 2); return __half2float(x); }
inline float half_bits(uint16_t b, __nv_bfloat16*) {
  __nv_bfloat16 x;
  std::memcpy(static_cast<void*>(&x), &b, 2);
  return __bfloat162float(x);
}
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const unsigned w = tid.x / 32, lane = tid.x % 32;
  for (int i = 0; i < 4; ++i) xa[w][lane][i] = a[i];
  xb[w][lane][0] = b[0], xb[w][lane][1] = b[1];
  warp_bar[w]->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, t = L % 4;
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[rows[i]][cols[i]] = half_bits(xa[w][L][i] & 0xffffu, (T*)nullptr);
      A[rows[i]][cols[i] + 1] = half_bits(xa[w][L][i] >> 16, (T*)nullptr);
    }
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = half_bits(xb[w][L][i] & 0xffffu, (T*)nullptr);
      B[2 * t + 8 * i + 1][g] = half_bits(xb[w][L][i] >> 16, (T*)nullptr);
    }
  }
  warp_bar[w]->arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[e] = acc;
  }
}

// cp.async: a copy is performed only when a wait retires its group, so a read of shared memory
// before the right wait sees the poison, as it would see stale data on a GPU.
struct Copy { void* dst; const void* src; int n; };
thread_local std::vector<Copy> pending;
thread_local std::deque<std::vector<Copy>> groups;
inline void cp_async_16(void* dst, const void* src, int n) { pending.push_back({dst, src, n}); }
inline void cp_async_commit() { groups.push_back(std::move(pending)); pending.clear(); }
inline void cp_async_wait(int n) {
  while (static_cast<int>(groups.size()) > n) {
    for (const Copy& c : groups.front()) {
      std::memcpy(c.dst, c.src, c.n);
      std::memset(static_cast<char*>(c.dst) + c.n, 0, 16 - c.n);
    }
    groups.pop_front();
  }
}
}  // namespace emu
#define threadIdx emu::tid
#define blockIdx emu::bid
#define __syncthreads() emu::sync()
#define __shfl_xor_sync(mask, v, off) emu::shfl_xor(v, off)

namespace blip2_fast {
namespace {
alignas(16) float4 smem4[96 * 1024 / 16];  // >= both kernels' shared memory at D = 128, checked below
}
}  // namespace blip2_fast

#define BLIP2_FAST_CUDA_EMULATION
#include "cross_attention.cu"

namespace blip2_fast {
namespace {
static_assert(sizeof(smem4) >= smem_floats<128>() * sizeof(float), "emulated shared memory too small");
static_assert(sizeof(smem4) >= mma_smem_bytes<128>(), "emulated shared memory too small");

// One block at a time, one std::thread per CUDA thread; shared memory poisoned (all-ones bytes:
// NaN as fp32, fp16 and bf16) before each block.
template <typename F>
void run_blocks(int64_t blocks, int threads, size_t smem_bytes, F kernel) {
  for (int64_t blk = 0; blk < blocks; ++blk) {
    std::memset(static_cast<void*>(smem4), 0xff, smem_bytes);
    std::barrier<> bar(threads);
    emu::block_bar = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    for (int w = 0; w < threads / 32; ++w) {
      wb.push_back(std::make_unique<std::barrier<>>(32));
      emu::warp_bar[w] = wb.back().get();
    }
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t] {
        emu::tid = make_uint3(t, 0, 0);
        emu::bid = make_uint3(static_cast<unsigned>(blk), 0, 0);
        kernel();
        if (!emu::pending.empty() || !emu::groups.empty()) std::abort();  // a copy never waited for
      });
    for (auto& th : ts) th.join();
  }
}

template <typename T, int DM>
void run(const CrossAttnParams& p, bool mma) {
  if constexpr (!std::is_same_v<T, float>) {
    if (mma) {
      const int n_qtiles = static_cast<int>((p.Nq + kMmaQT - 1) / kMmaQT);
      run_blocks(n_qtiles * p.B * p.H, kMmaThreads, mma_smem_bytes<DM>(),
                 [&] { cross_attention_mma_kernel<T, DM>(p, n_qtiles); });
      return;
    }
  }
  const int n_qtiles = static_cast<int>((p.Nq + kQT - 1) / kQT);
  const int64_t elem = sizeof(T);
  const bool qv = can_vectorize(p.q, p.q_stride, p, elem), kv = can_vectorize(p.k, p.k_stride, p, elem),
             vv = can_vectorize(p.v, p.v_stride, p, elem);
  run_blocks(n_qtiles * p.B * p.H, kThreads, smem_floats<DM>() * sizeof(float),
             [&] { cross_attention_kernel<T, DM>(p, n_qtiles, qv, kv, vv); });
}

template <typename T>
int run_dtype(const CrossAttnParams& p, bool mma) {
  if (p.D <= 32) run<T, 32>(p, mma);
  else if (p.D <= 64) run<T, 64>(p, mma);
  else if (p.D <= 128) run<T, 128>(p, mma);
  else return 1;
  return 0;
}
}  // namespace
}  // namespace blip2_fast

// Flags: bit 0 = q, 1 = k, 2 = v could be read in 16-byte chunks, bit 3 = the tensor-core kernel ran
// (as the launcher picks it; force_fma = 1 runs the FMA kernel regardless).
extern "C" int emu_cross_attention(const void* q, const void* k, const void* v, const uint8_t* mask, void* out,
                                   const int64_t* qs, const int64_t* ks, const int64_t* vs, const int64_t* ms,
                                   const int64_t* shape, float scale, int dtype, int force_fma, int* vec_flags) {
  using namespace blip2_fast;
  CrossAttnParams p{};
  p.q = q, p.k = k, p.v = v, p.mask = mask, p.out = out;
  for (int i = 0; i < 4; ++i) p.q_stride[i] = qs[i], p.k_stride[i] = ks[i], p.v_stride[i] = vs[i];
  p.mask_stride[0] = ms[0], p.mask_stride[1] = ms[1];
  p.B = shape[0], p.H = shape[1], p.Nq = shape[2], p.Nk = shape[3], p.D = shape[4];
  p.scale = scale;
  p.dtype = static_cast<CrossAttnDtype>(dtype);
  const int64_t elem = dtype == 0 ? 4 : 2;
  const bool mma = !force_fma && mma_ok(p);
  *vec_flags = can_vectorize(q, p.q_stride, p, elem) | can_vectorize(k, p.k_stride, p, elem) << 1 |
               can_vectorize(v, p.v_stride, p, elem) << 2 | static_cast<int>(mma) << 3;
  if (dtype == 0) return run_dtype<float>(p, false);
  if (dtype == 1) return run_dtype<__half>(p, mma);
  return run_dtype<__nv_bfloat16>(p, mma);
}
"""


def _cuda_include() -> str | None:
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")]
    if _nvcc():
        cands.append(os.path.join(os.path.dirname(os.path.realpath(_nvcc())), "..", "include"))
    return next((c for c in cands if os.path.isfile(os.path.join(c, "cuda_bf16.h"))), None)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    inc, cxx = _cuda_include(), shutil.which("g++")
    if inc is None or cxx is None:
        pytest.skip("the CUDA kernel's CPU emulation needs g++ and the CUDA headers (cuda_bf16.h)")
    d = tmp_path_factory.mktemp("cuda_emulation")
    (d / "harness.cpp").write_text(_HARNESS)
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
                        "-I", inc, "-I", str(CSRC), str(d / "harness.cpp"), "-o", str(d / "emu.so"), "-pthread"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(d / "emu.so"))
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

    def run(q, k, v, mask=None, scale=None, force_fma=False):
        B, H, Nq, D = q.shape
        out = torch.full((B, H, Nq, D), float("nan"), dtype=q.dtype)  # poisoned: an unwritten element fails
        keep = None if mask is None else mask.bool()
        arr = lambda xs: (ctypes.c_int64 * len(xs))(*xs)  # noqa: E731
        flags = ctypes.c_int(0)
        rc = lib.emu_cross_attention(
            ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(k.data_ptr()), ctypes.c_void_p(v.data_ptr()),
            ctypes.c_void_p(keep.data_ptr() if keep is not None else 0), ctypes.c_void_p(out.data_ptr()),
            arr(q.stride()), arr(k.stride()), arr(v.stride()), arr(keep.stride() if keep is not None else (0, 0)),
            arr([B, H, Nq, k.shape[2], D]), ctypes.c_float(D ** -0.5 if scale is None else scale), code[q.dtype],
            int(force_fma), ctypes.byref(flags))
        assert rc == 0
        run.vec_flags = flags.value
        return out

    return run


EMU_SHAPES = [(1, 2, 32, 257, 64), (1, 1, 1, 1, 64), (2, 1, 33, 70, 59), (1, 1, 5, 300, 128), (2, 2, 3, 65, 32),
              (1, 1, 4, 10, 16), (1, 1, 40, 129, 40)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=_ids(EMU_SHAPES))
def test_cuda_kernel_emulated(emulator, shape, dtype):
    """fp16 / bf16 with D % 8 == 0 run the tensor-core kernel (and, forced, the FMA one too); fp32
    and odd D the FMA kernel."""
    B, H, Nq, Nk, D = shape
    q, k, v = make(*shape, dtype)
    check(emulator(q, k, v), q, k, v)
    assert bool(emulator.vec_flags & 0b1000) == (dtype != torch.float32 and D % 8 == 0)
    mask = make_mask(B, Nk)
    check(emulator(q, k, v, mask), q, k, v, mask)
    if emulator.vec_flags & 0b1000:
        check(emulator(q, k, v, mask, force_fma=True), q, k, v, mask)
        assert not emulator.vec_flags & 0b1000


def test_cuda_mma_kernel_on_the_qformer_layout(emulator):
    """The Q-Former's real operands: q a view of a [B, 32, 768] projection, K and V views of the one
    GEMM that projects the image for every cross-attention layer ([B, 257, 6 * 2 * 768], row stride
    9216): the tensor-core kernel reads them in place, for every layer's slice."""
    B, Nk, L, H, D = 2, 257, 3, 4, 64
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, 32, H * D, generator=g).to(torch.bfloat16).view(B, 32, H, D).transpose(1, 2)
    kv = torch.randn(B, Nk, L * 2 * H * D, generator=g).to(torch.bfloat16).view(B, Nk, L, 2, H, D)
    for layer in range(L):
        k, v = kv[:, :, layer, 0].transpose(1, 2), kv[:, :, layer, 1].transpose(1, 2)  # (B, H, Nk, D)
        assert k.stride(2) == L * 2 * H * D
        check(emulator(q, k, v), q, k, v)
        assert emulator.vec_flags == 0b1111


def test_cuda_kernel_emulated_strided(emulator):
    B, H, Nq, Nk, D = 2, 2, 32, 130, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, Nq, H, D, generator=g).to(torch.bfloat16).transpose(1, 2)
    kv = torch.randn(B, Nk, 2, H, D, generator=g).to(torch.bfloat16)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    mask = (torch.rand(B, 2 * Nk, generator=g) > 0.2)[:, ::2]
    check(emulator(q, k, v, mask), q, k, v, mask)
    assert emulator.vec_flags == 0b1111  # all three read in 16-byte chunks: the tensor-core kernel
    q2 = torch.randn(B, H, Nq, 2 * D, generator=g).to(torch.bfloat16)[..., ::2]  # stride 2 along D
    k2 = torch.randn(B * H * Nk * D + 1, generator=g).to(torch.bfloat16)[1:].view(B, H, Nk, D)  # misaligned
    check(emulator(q2, k2, v, None, 0.3), q2, k2, v, None, 0.3)
    assert emulator.vec_flags == 0b100  # q and k fall back to element loads, in the FMA kernel


# ---------------------------------------------------------------------------------- CUDA, on a GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def sdpa(q, k, v, key_padding_mask=None, scale=None):
    attn_mask = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return out.nan_to_num(0.0)


@pytest.mark.gpu
@cuda
def test_gpu_extension_available():
    assert _ext.unavailable_reason("cuda") is None, _ext.unavailable_reason("cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_gpu_matches_reference(shape, dtype):
    B, H, Nq, Nk, D = shape
    q, k, v = make(*shape, dtype, device="cuda")
    check(via_registry(q, k, v), q, k, v)
    mask = make_mask(B, Nk, device="cuda")
    check(via_torch_ops(q, k, v, mask), q, k, v, mask)
    if dtype == torch.bfloat16:
        check(via_registry(q, k, v, mask), q, k, v, mask, baseline=sdpa, name="SDPA")


@pytest.mark.gpu
@cuda
def test_gpu_strided_bad_arguments_and_graphs():
    B, H, Nq, Nk, D = 4, 12, 32, 257, 64
    q = torch.randn(B, Nq, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    kv = torch.randn(B, Nk, 2, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    mask = make_mask(B, Nk, device="cuda")
    check(via_torch_ops(q, k, v, mask), q, k, v, mask)
    torch.library.opcheck(torch.ops.blip2_fast.cross_attention_fwd.default, (q, k, v, mask, None))
    big = torch.randn(1, 1, 2, 160, device="cuda")
    with pytest.raises(RuntimeError, match="D <= 128"):
        via_torch_ops(big, big, big)
    with pytest.raises(RuntimeError, match="must be on q's device"):
        via_torch_ops(q, k.cpu(), v, None)
    # the kernel runs on the current stream, so it can be captured in a CUDA graph
    out = via_torch_ops(q, k, v, mask)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = via_torch_ops(q, k, v, mask)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)
