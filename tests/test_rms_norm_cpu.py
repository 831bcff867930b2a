"""blip2_fast::rms_norm_cpu_fwd, the extension's CPU RMSNorm (csrc/rms_norm_cpu.cpp): against a float64
run of `rms_norm_ref` (T5's cast to the weight's dtype kept), error at most twice the reference's own
in the same dtypes plus a floor; the residual sum equal to eager `x + residual`; threads 1 and 2;
strided and mixed-dtype inputs; the registry binding it on the CPU; bad input."""
from __future__ import annotations

import pytest
import torch

from blip2_fast import _ext, ops
from blip2_fast.reference import rms_norm_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module")
def ext():
    reason = _ext.unavailable_reason("cpu")
    assert reason is None, f"the C++ extension did not build: {reason}"
    return _ext


def oracle(x, weight, eps):
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * y.to(weight.dtype).double()


def check(x, weight, eps=1e-6, residual=None):
    out = _ext.rms_norm(x, weight, eps, residual)
    if residual is not None:
        y, s = out
        s_eager = x + residual
        assert s.dtype == s_eager.dtype and torch.equal(s, s_eager), "the residual sum differs from eager x + residual"
        x = s_eager
    else:
        y = out
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert not y.isnan().any()
    ref = oracle(x, weight, eps)
    err = (y.double() - ref).abs().max().item()
    berr = (rms_norm_ref(x, weight, eps).double() - ref).abs().max().item()
    tol = 2 * berr + FLOOR[x.dtype]
    if weight.dtype != torch.float32:  # the rounding to the weight's dtype may go either way at a tie in fp32
        yn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
        tol += torch.finfo(weight.dtype).eps * weight.abs().max().item() * yn.abs().max().item()
    assert err <= tol, f"error {err:.3g} vs the reference's {berr:.3g} ({x.dtype}, w {weight.dtype})"


def weight(n, dtype, seed=0):
    return (1 + 0.5 * torch.randn(n, generator=torch.Generator().manual_seed(seed))).to(dtype)


# T5 widths (the CPU presets' 512, flan-t5-xl 2048, t5-base 768) and odd ones; 1 row (a batch-1 decode
# step), 8, and enough rows (x width) to cross the kernel's parallel grain
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", [(1, 512), (8, 512), (100, 768), (37, 2048), (5, 4096), (11, 1), (13, 7),
                                    (3, 1023), (70, 1025)])
def test_matches_float64_reference(ext, rows, n, dtype):
    g = torch.Generator().manual_seed(rows * 10000 + n)
    x = (2 * torch.randn(rows, n, generator=g) + 0.3).to(dtype)
    check(x, weight(n, dtype))
    check(x, weight(n, dtype), residual=(3 * torch.randn(rows, n, generator=g)).to(dtype))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.bfloat16)])
def test_weight_dtype_rounding(ext, x_dtype, w_dtype):
    """T5 rounds the normalised row to the weight's dtype before the multiply, whatever x's dtype."""
    x = torch.randn(2, 9, 2048, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    check(x, weight(2048, w_dtype))


def test_threads_strided_and_promoted_residual(ext):
    g = torch.Generator().manual_seed(5)
    big = torch.randn(64, 9, 2 * 768, generator=g)
    w = weight(768, torch.float32)
    prev = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            check(big[..., 768:], w)  # a strided view: copied, then normalised
            check(big[..., :768], w, residual=big[..., 768:])
    finally:
        torch.set_num_threads(prev)
    check(torch.randn(768, 6, generator=g).t(), w)
    # a float16 x with a float32 residual: added as eager promotes (float32), then normalised in it
    x = torch.randn(4, 768, generator=g).half()
    check(x, w, residual=torch.randn(4, 768, generator=g))


def test_registry_binds_it_on_cpu_and_triton_on_cuda(ext):
    assert ops.get("rms_norm", "fast", "cpu") is _ext.rms_norm
    assert ops.get("rms_norm", "fast").__module__ == "blip2_fast.kernels.rms_norm"
    assert ops.bind("fast", None, "cpu").rms_norm is _ext.rms_norm


def test_bad_arguments_raise(ext):
    x = torch.randn(4, 64)
    w = torch.ones(64)
    op = torch.ops.blip2_fast.rms_norm_cpu_fwd
    cases = [((x, w[:3], None, 1e-6), "weight must have shape"),
             ((x.double(), w, None, 1e-6), "x must be float32"),
             ((x, w.long(), None, 1e-6), "weight must be float32"),
             ((x, w, x[:, :3], 1e-6), "residual must have x's shape"),
             ((x, w, x.half(), 1e-6), "residual must be x's dtype"),
             ((x, w, None, -1e-6), "eps must be"),
             ((torch.zeros(4, 0), torch.ones(0), None, 1e-6), "N >= 1")]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)


def test_opcheck(ext):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 40, generator=g)
    op = torch.ops.blip2_fast.rms_norm_cpu_fwd.default
    torch.library.opcheck(op, (x, weight(40, torch.float32), torch.randn(3, 5, 40, generator=g), 1e-6))
    torch.library.opcheck(op, (x.half(), weight(40, torch.float16), None, 1e-6))
