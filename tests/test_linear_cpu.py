"""blip2_fast::linear_cpu, the prepacked small-M CPU linear (csrc/linear_cpu.cpp, blip2_fast/linear_cpu.py):
against float64, error at most twice F.linear's own plus a floor, over odd widths, 1-32 rows, every
ISA branch forced, threads 1 and 2, NaN-poisoned outputs; the bf16 form within the greedy head's bound;
the registry; opcheck; bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip2_fast import _ext, ops, reference
from blip2_fast.linear_cpu import ISA_ENV, PackedLinear, resolve_isa

# (N, K): every odd width of the brief at least once; real decode shapes (OPT-2.7B's fc2 in, the
# 512-wide cpu-mid model's fc1) among them
SHAPES = [(1, 1), (7, 13), (97, 88), (1023, 1408), (2561, 2560), (1, 2560), (2561, 1), (97, 1408), (1023, 13),
          (2048, 512)]
ROWS = list(range(1, 33))  # 1-32: across every ISA's row-tile boundaries (4, 6, 12)
FP32_ISAS = ("avx512", "avx2", "scalar")
BF16_ISAS = ("avx512_bf16", "avx512", "avx2", "scalar")
ACTS = ("none", "relu", "gelu")


@pytest.fixture(scope="module")
def ext():
    reason = _ext.unavailable_reason("cpu")
    assert reason is None, f"the C++ extension did not build: {reason}"
    return _ext


def _isa_or_skip(isa):
    """A branch this CPU lacks cannot be forced up: skip it, saying so (an AVX2-only host skips AVX-512)."""
    got = _ext.linear_isa(isa)
    if got != isa:
        pytest.skip(f"this CPU has no {isa}: the cap resolves to {got}")


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _act64(y, act):
    return F.relu(y) if act == "relu" else F.gelu(y) if act == "gelu" else y


def _case(N, K, seed=0):
    x = _rand(32, K, seed=seed)
    w = _rand(N, K, seed=seed + 1) / K ** 0.5
    b = _rand(N, seed=seed + 2)
    return x, w, b


def _check(got, want64, base, what):
    """got within twice the error of `base` (torch's own result in the same precision) plus a floor."""
    assert got.shape == want64.shape and not got.isnan().any(), f"{what}: shape {got.shape} / NaN"
    err = (got.double() - want64).abs().max().item()
    berr = (base.double() - want64).abs().max().item()
    eps = torch.finfo(got.dtype).eps
    floor = 4 * eps * max(1.0, want64.abs().max().item())
    assert err <= 2 * berr + floor, f"{what}: error {err:.3g}, torch's {berr:.3g}, floor {floor:.3g}"


@pytest.mark.parametrize("isa", FP32_ISAS)
@pytest.mark.parametrize("N,K", SHAPES, ids=lambda v: str(v))
def test_fp32_matches_float64(ext, N, K, isa):
    _isa_or_skip(isa)
    x, w, b = _case(N, K)
    lin = PackedLinear(w, b, isa=isa)
    assert lin.isa == isa and lin.packed is not None
    ref = x.double() @ w.double().t() + b.double()  # (32, N)
    base = F.linear(x, w, b)
    rows = ROWS if N * K <= 1 << 20 else [1, 2, 7, 12, 13, 25, 32]  # the big shapes at fewer row counts
    for act in ACTS:
        want, tb = _act64(ref, act), _act64(base, act)
        for M in rows:
            _check(lin(x[:M], act), want[:M], tb[:M], f"M={M} act={act}")


@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("N,K", SHAPES, ids=lambda v: str(v))
def test_bf16_weights_match_float64(ext, N, K, isa):
    """bf16(x) · bf16(W) summed in fp32, fp32 out; torch's counterpart: F.linear on the rounded values."""
    _isa_or_skip(isa)
    x, w, b = _case(N, K, seed=5)
    lin = PackedLinear(w, b, dtype=torch.bfloat16, isa=isa)
    assert lin.isa == isa
    xr, wr = x.bfloat16().float(), w.bfloat16().float()
    ref = xr.double() @ wr.double().t() + b.double()
    base = F.linear(xr, wr, b)
    for act in ACTS:
        want, tb = _act64(ref, act), _act64(base, act)
        for M in (1, 3, 4, 5, 12, 13, 31, 32):
            _check(lin(x[:M], act), want[:M], tb[:M], f"M={M} act={act}")


@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("N,K", [(97, 88), (2561, 1408), (7, 13)], ids=lambda v: str(v))
def test_bf16_model_inputs(ext, N, K, isa):
    """A bf16 model: bf16 x and weight, bf16 out rounded once, against eager bf16 F.linear's error."""
    _isa_or_skip(isa)
    x, w, b = _case(N, K, seed=9)
    x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    lin = PackedLinear(w, b, isa=isa)
    assert lin.dtype == torch.bfloat16
    ref = x.double() @ w.double().t() + b.double()
    for act in ACTS:
        got = lin(x[:9], act)
        assert got.dtype == torch.bfloat16
        _check(got, _act64(ref, act)[:9], _act64(F.linear(x, w, b), act)[:9], f"act={act}")


@pytest.mark.parametrize("isa", ["auto", "avx2"])
@pytest.mark.parametrize("prefetch", ["1", "0"], ids=["prefetch", "no-prefetch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_tiles_with_and_without_prefetch(ext, dtype, prefetch, isa, monkeypatch):
    """Up to 32 rows the weight streams once through the tiles that prefetch it (AVX-512: 8+ rows;
    AVX2: all); BLIP2_FAST_LINEAR_PREFETCH=0 takes the plain tiles: both against float64, around the
    8- and 32-row edges and past them (33 and 200 rows never prefetch), at this CPU's best ISA and AVX2."""
    if isa != "auto":
        _isa_or_skip(isa)
    monkeypatch.setenv("BLIP2_FAST_LINEAR_PREFETCH", prefetch)
    x, w, b = _case(1536, 512, seed=5)
    x = torch.cat([x] * 7)  # 224 rows
    lin = PackedLinear(w, b, dtype=dtype, isa=None if isa == "auto" else isa)
    if dtype == torch.bfloat16:
        ref = x.bfloat16().double() @ w.bfloat16().double().t() + b.double()
        base = (x.bfloat16().float() @ w.bfloat16().float().t()) + b
    else:
        ref, base = x.double() @ w.double().t() + b.double(), F.linear(x, w, b)
    for M in (1, 7, 8, 9, 12, 13, 31, 32, 33, 200):
        _check(lin(x[:M]), ref[:M], base[:M], f"M={M} prefetch={prefetch}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_threads_and_poisoned_out(ext, threads, dtype):
    """Every output element written (out starts NaN), with 1 and 2 threads, 3-D x, each ISA."""
    x, w, b = _case(2561, 88, seed=3)
    x = x[:24].view(2, 12, 88)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for isa in (BF16_ISAS if dtype == torch.bfloat16 else FP32_ISAS):
            if _ext.linear_isa(isa) != isa:
                continue  # covered (and reported as skipped) by the tests above
            lin = PackedLinear(w, b, dtype=dtype, isa=isa)
            want = lin(x, "relu")
            out = torch.full((2, 12, 2561), float("nan"))
            assert lin(x, "relu", out=out) is out
            assert not out.isnan().any(), isa
            torch.testing.assert_close(out, want, rtol=0, atol=0)  # one kernel, one summation order
            xr, wr = (x.bfloat16().float(), w.bfloat16().float()) if dtype == torch.bfloat16 else (x, w)
            _check(out, F.relu(xr.double() @ wr.double().t() + b.double()), F.relu(F.linear(xr, wr, b)), isa)
    finally:
        torch.set_num_threads(prev)


def test_strided_rows_and_no_bias(ext):
    """x as a column slice of a wider activation (row stride != K), and no bias."""
    big = _rand(5, 3 * 88, seed=4)
    x = big[:, 88:176]
    w = _rand(97, 88, seed=5)
    got = PackedLinear(w)(x)
    _check(got, x.double() @ w.double().t(), F.linear(x, w), "strided")


@pytest.mark.parametrize("isa", FP32_ISAS)
def test_rows_4kb_apart_go_through_the_padded_copy(ext, isa):
    """x rows a multiple of 4 KB apart (K = 1024, 2048; a column slice of a 2048-wide activation) are
    copied to a padded stride first: the same results, at row counts on both sides of the tiles, and
    the scratch reused by a second, smaller call."""
    _isa_or_skip(isa)
    for K, wide in ((1024, None), (2048, None), (512, 1024)):
        big = _rand(200, wide or K, seed=K)
        x = big[:, :K] if wide else big  # wide: row stride 1024 floats, K = 512
        w, b = _rand(129, K, seed=K + 1) / K ** 0.5, _rand(129, seed=K + 2)
        lin = PackedLinear(w, b, isa=isa)
        ref = x.double() @ w.double().t() + b.double()
        base = F.linear(x, w, b)
        for M in (200, 2, 13, 1):
            for act in ("none", "gelu"):
                _check(lin(x[:M], act), _act64(ref[:M], act), _act64(base[:M], act), f"K={K} M={M} {act}")


def test_nan_and_inf_propagate(ext):
    x, w, b = _case(33, 16, seed=6)
    x = x[:3].clone()
    x[1, 4] = float("nan")
    x[2, 0] = float("inf")
    w[:, 0] = w[:, 0].abs()  # +inf in row 2 makes every logit +inf
    for act in ACTS:
        got = PackedLinear(w, b)(x, act)
        want = _act64(F.linear(x, w, b), act)
        assert got[1].isnan().all() and want[1].isnan().all(), act
        assert (got[2] == float("inf")).all(), act  # GELU(+inf) = +inf (torch's CPU gelu gives NaN there)
        torch.testing.assert_close(got[0], want[0])


def test_gelu_is_exact_erf(ext):
    """The epilogue's erf across its pieces (|x| < 1, < 2.5, < 4, beyond) against float64 GELU."""
    x = torch.linspace(-9, 9, 20001).view(-1, 1)
    w = torch.ones(1, 1)
    got = PackedLinear(w)(x, "gelu").double()
    want = F.gelu(x.double())
    err = (got - want).abs() - 2 ** -24 * (want.abs() + x.double().abs())
    assert (err <= 0).all(), f"worst excess {err.max().item():.3g} at x = {x[err.argmax()].item()}"


def test_isa_resolution(ext, monkeypatch):
    best = _ext.linear_isa("auto")
    assert best in ("avx512_bf16", "avx512", "avx2", "scalar")
    assert _ext.linear_isa("scalar") == "scalar"
    assert resolve_isa("torch") == "torch" and resolve_isa(None, "meta") == "torch"
    monkeypatch.setenv(ISA_ENV, "scalar")
    assert PackedLinear(torch.ones(3, 2)).isa == "scalar"  # the environment variable caps the branch
    monkeypatch.setenv(ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=ISA_ENV):
        PackedLinear(torch.ones(3, 2))
    monkeypatch.delenv(ISA_ENV)
    with pytest.raises(ValueError, match="isa must be one of"):
        PackedLinear(torch.ones(3, 2), isa="avx1024")
    # the fp32 kernel has no bf16 instructions: the cap avx512_bf16 runs the AVX-512 fp32 tiles
    if best == "avx512_bf16":
        assert PackedLinear(torch.ones(3, 2), isa="avx512_bf16").isa == "avx512"
        assert PackedLinear(torch.ones(3, 2), dtype=torch.bfloat16).isa == "avx512_bf16"


def test_cpu_without_avx2_runs_torch(ext, monkeypatch):
    """Where cpuid finds no AVX2+FMA, "auto" (and any cap) resolves to F.linear on the unpacked weight;
    the portable C++ kernel runs only when asked for by name."""
    monkeypatch.setattr(_ext, "linear_isa", lambda isa="auto": "scalar")
    x, w, b = _case(97, 88, seed=8)
    for dtype in (torch.float32, torch.bfloat16):
        lin = PackedLinear(w, b, dtype=dtype)
        assert lin.isa == "torch" and lin.packed is None and lin.weight is not None
        xr, wr = (x.bfloat16().float(), w.bfloat16().float()) if dtype == torch.bfloat16 else (x, w)
        for act in ACTS:
            _check(lin(x, act), _act64(xr.double() @ wr.double().t() + b.double(), act),
                   _act64(F.linear(xr, wr, b), act), f"{dtype} {act}")
    assert PackedLinear(w, b, isa="scalar").isa == "scalar"


def test_forced_torch_and_fp16(ext):
    x, w, b = _case(97, 88, seed=10)
    lin = PackedLinear(w, b, isa="torch")
    assert lin.packed is None
    torch.testing.assert_close(lin(x, "gelu"), F.gelu(F.linear(x, w, b)))
    h = PackedLinear(w.half(), b.half())  # no fp16 kernel: F.linear in fp16
    assert h.isa == "torch" and h(x.half()).dtype == torch.float16
    out = torch.full((32, 97), float("nan"))
    assert lin(x, "relu", out=out) is out and not out.isnan().any()


def test_greedy_head_bound_covers_the_bf16_kernel(ext):
    """The screened greedy head's per-row bound (greedy_head._bound) still holds when its screening
    logits come from this kernel (fp32 out, chunked fp32 sums) on every bf16 branch."""
    from blip2_fast.models.greedy_head import ScreenedArgmax

    V, E = 5003, 2560
    w = _rand(V, E, seed=11) / E ** 0.5
    head = ScreenedArgmax(w)
    h = _rand(20, E, seed=12) * torch.logspace(-2, 2, 20)[:, None]
    hb = h.bfloat16()
    exact = h.double() @ w.double().t()
    ran = 0
    for isa in BF16_ISAS:
        if _ext.linear_isa(isa) != isa:
            continue
        a = PackedLinear(w, dtype=torch.bfloat16, isa=isa)(h)  # (20, V) fp32
        err = (exact - a.double()).abs().amax(1)
        bound = head._bound(h, hb, a).double()
        assert (err <= bound).all(), (isa, (err / bound).max().item())
        ran += 1
    assert ran >= 2  # at least the scalar and one vector branch, on any x86-64 host


def test_registry(ext):
    assert ops.get("linear", "reference") is reference.LinearRef
    assert ops.get("linear", "fast", "cpu") is PackedLinear
    bound = ops.bind("fast", None, "cpu")
    assert bound.linear is PackedLinear and bound.impls["linear"] == "fast"
    x, w, b = _case(7, 13, seed=13)
    ref = ops.bind("reference", None, "cpu").linear(w, b)
    torch.testing.assert_close(ref(x, "gelu"), reference.linear_ref(x, w, b, "gelu"))
    torch.testing.assert_close(bound.linear(w, b)(x, "gelu"), ref(x, "gelu"))


def test_linear_ref_against_float64():
    x, w, b = _case(7, 13, seed=14)
    for act in ACTS:
        got = reference.linear_ref(x, w, b, act)
        want = _act64(x.double() @ w.double().t() + b.double(), act)
        assert got.dtype == x.dtype
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert reference.linear_ref(x.double(), w.double(), None).dtype == torch.float64
    with pytest.raises(ValueError, match="activation"):
        reference.linear_ref(x, w, b, "tanh")


def test_opcheck(ext):
    x, w, b = _case(97, 88, seed=15)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.blip2_fast.linear_pack_cpu.default, (w, dtype))
        p = _ext.linear_pack(w, dtype)
        args = (x[:5], p, b, 97, "gelu", "auto")
        torch.library.opcheck(torch.ops.blip2_fast.linear_cpu.default, args)
        torch.library.opcheck(torch.ops.blip2_fast.linear_cpu_out.default, (*args, torch.empty(5, 97)))


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(x=a["x"][:, :-1]), "x must have shape"),
    (lambda a: a.update(x=a["x"].double()), "x must be float32"),
    (lambda a: a.update(n=200), "does not fit packed"),
    (lambda a: a.update(n=0), "does not fit packed"),
    (lambda a: a.update(bias=torch.zeros(96)), "bias must be"),
    (lambda a: a.update(act="tanh"), "activation must be"),
    (lambda a: a.update(isa="avx3"), "isa must be"),
    (lambda a: a.update(p=a["p"][:, :, :16]), "packed must come from linear_pack"),
    (lambda a: a.update(p=a["p"].transpose(0, 1)), "contiguous"),
])
def test_bad_input_names_the_argument(ext, mutate, match):
    x, w, b = _case(97, 88, seed=16)
    a = dict(x=x[:3], p=_ext.linear_pack(w), bias=b, n=97, act="none", isa="auto")
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        _ext.linear(a["x"], a["p"], a["bias"], a["n"], a["act"], a["isa"])


def test_bad_input_bf16_and_out(ext):
    x, w, b = _case(97, 87, seed=17)
    p = _ext.linear_pack(w, torch.bfloat16)
    assert p.shape == (4, 44, 32, 2)
    with pytest.raises(RuntimeError, match="bf16 packed weight"):
        _ext.linear(x[:3, :80], p, b, 97)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        _ext.linear(x[:3].half(), p, b, 97)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        _ext.linear(x[:3], p, b, 97, out=torch.empty(97, 3).t())
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        _ext.linear(x[:3], p, b, 97, out=torch.empty(3, 97, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="weight must have shape"):
        _ext.linear_pack(torch.zeros(0, 5))
    with pytest.raises(RuntimeError, match="dtype must be"):
        _ext.linear_pack(w, torch.float16)


def test_packed_linear_door(ext):
    w = torch.ones(4, 3)
    with pytest.raises(TypeError, match="weight must be a float tensor"):
        PackedLinear(w.long())
    with pytest.raises(ValueError, match=r"bias must be a float tensor \[N\] = \[4\]"):
        PackedLinear(w, torch.ones(3))
    with pytest.raises(ValueError, match="dtype must be"):
        PackedLinear(w, dtype=torch.float16)
    lin = PackedLinear(w)
    with pytest.raises(ValueError, match="K = 3"):
        lin(torch.ones(2, 4))
    with pytest.raises(ValueError, match="activation must be"):
        lin(torch.ones(2, 3), "silu")
    assert "in_features=3" in repr(lin) and lin.out_features == 4


def test_benchmarks_run_quick(ext, tmp_path):
    """bench.bench_linear and bench.cpu_limits at toy sizes: every row and field there (no timings checked)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "limits.json"
    env = {**os.environ, "PYTHONPATH": str(root)}
    stdout = []
    for args in (["bench.bench_linear", "--quick", "--device", "cpu"],
                 ["bench.cpu_limits", "--quick", "--threads", "1", "--presets", "blip2-cpu-mid", "--rows", "1", "8",
                  "--json", str(out)]):
        p = subprocess.run([sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        stdout.append(p.stdout)
    assert "linear/toy " in stdout[0] and "linear/toy_bf16" in stdout[0], stdout[0]
    res = json.loads(out.read_text())
    (m,) = res["by_threads"]
    assert m["threads"] == 1 and len(m["cases"]) == 5 * 2 and len(m["decode_step_linears"]) == 2
    assert all(r["floor_bound"] in ("bandwidth", "compute") and r["floor_ms"] > 0 for r in m["cases"])
    assert res["cpu"]["linear_isa"]["fp32"] == PackedLinear(torch.ones(1, 1)).isa
