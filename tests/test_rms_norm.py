"""T5 RMSNorm (+ fused residual add), kernels/rms_norm.py, against a float64 run of `rms_norm_ref`.

Rule: the kernel's max error vs float64 is at most twice eager PyTorch's (the reference run in the
same dtypes) plus a small floor; the residual sum must equal eager `x + residual` exactly. The
float64 oracle keeps T5's cast to the weight's dtype (that rounding is part of the spec). Runs
interpreted on the CPU (TRITON_INTERPRET=1, set before the kernels are imported).
"""
from kernel_setup import DEVICE, INTERPRET, needs_cuda, poison_outputs  # noqa: E402,F401 (before the kernel modules; autouse fixture)

import pytest  # noqa: E402
import torch  # noqa: E402

from blip2_fast.kernels import rms_norm as RMS  # noqa: E402
from blip2_fast.reference import rms_norm_ref  # noqa: E402

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# bfloat16 runs on the GPU only: the interpreter truncates float32 -> bfloat16 instead of rounding.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def oracle(x, weight, eps):
    """rms_norm_ref in float64, keeping the cast of the normalised row to the weight's dtype."""
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * y.to(weight.dtype).double()


def check(x, weight, eps=1e-6, residual=None):
    out = RMS.rms_norm(x, weight, eps, residual=residual)
    if residual is not None:
        y, s = out
        s_eager = x + residual
        assert s.shape == x.shape and s.dtype == x.dtype
        assert torch.equal(s, s_eager), "residual sum differs from eager x + residual"
        x = s_eager
    else:
        y = out
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert not y.isnan().any(), "NaN in output (unwritten element?)"
    ref = oracle(x, weight, eps)
    err = (y.double() - ref).abs().max().item()
    err_eager = (rms_norm_ref(x, weight, eps).double() - ref).abs().max().item()
    tol = 2 * err_eager + FLOOR[x.dtype]
    assert err <= tol, f"fast err {err:.3g} > 2 x eager err {err_eager:.3g} + {FLOOR[x.dtype]:.0e} ({x.dtype}, w {weight.dtype}, x {tuple(x.shape)})"
    return out


def weight(n, dtype):
    return (1 + 0.5 * torch.randn(n, device=DEVICE)).to(dtype)


def test_kernel_mode_matches_env():
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(RMS._rms_norm_fwd_kernel, InterpretedFunction) == INTERPRET, (
        "blip2_fast.kernels.rms_norm was imported before TRITON_INTERPRET was set")


# T5 d_model: flan-t5-xl 2048, flan-t5-xxl 4096, t5-base 768; odd ones on purpose
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(37, 2048), (5, 4096), (7, 768), (11, 1), (13, 7), (3, 1023), (3, 1025)])
def test_rms_norm_shapes(rows, n, dtype):
    torch.manual_seed(rows * 10000 + n)
    x = (2 * torch.randn(rows, n, device=DEVICE) + 0.3).to(dtype)
    check(x, weight(n, dtype))


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16], ids=["w-fp32", "w-fp16"])
def test_weight_dtype_rounding(w_dtype):
    # HF T5 keeps the weight in float32 while activations are half, or both half: the cast to the
    # weight's dtype happens before the multiply either way.
    torch.manual_seed(3)
    x = torch.randn(2, 9, 2048, device=DEVICE, dtype=torch.float16)
    check(x, weight(2048, w_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_fused(dtype):
    torch.manual_seed(4)
    x = torch.randn(3, 17, 2048, device=DEVICE, dtype=dtype)
    r = (3 * torch.randn(3, 17, 2048, device=DEVICE)).to(dtype)
    check(x, weight(2048, dtype), residual=r)


def test_strided_input():
    torch.manual_seed(5)
    big = torch.randn(4, 9, 2 * 768, device=DEVICE, dtype=torch.float16)
    check(big[..., 768:], weight(768, torch.float32))
    check(torch.randn(768, 6, device=DEVICE, dtype=torch.float16).t(), weight(768, torch.float16))


def test_bad_arguments_raise():
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.float16)
    w = torch.ones(64, device=DEVICE, dtype=torch.float16)
    cases = [
        ((x, None, 1e-6), {}, "weight must be"),
        ((x, w[:3], 1e-6), {}, "weight must be"),
        ((x.double(), w, 1e-6), {}, "x must be float16"),
        ((x, w, 1e-6), {"residual": x[:, :3]}, "residual must have"),
        ((x, w, -1e-6), {}, "eps"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            RMS.rms_norm(*args, **kw)


def test_opcheck():
    torch.manual_seed(6)
    x = torch.randn(3, 5, 40, device=DEVICE)
    op = torch.ops.blip2_fast.rms_norm_fwd.default
    torch.library.opcheck(op, (x, weight(40, torch.float32), torch.randn_like(x), 1e-6))
    torch.library.opcheck(op, (x.half(), weight(40, torch.float16), None, 1e-6))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows,n", [(16 * 512, 2048), (4096, 4096), (1000, 1025)])
def test_rms_norm_bf16_gpu(rows, n):
    torch.manual_seed(7)
    dt = torch.bfloat16
    x = torch.randn(rows, n, device=DEVICE, dtype=dt)
    check(x, weight(n, dt), residual=torch.randn_like(x))
    check(x, weight(n, torch.float32))
