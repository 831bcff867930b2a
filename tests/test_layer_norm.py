"""LayerNorm (+ fused residual add), kernels/layer_norm.py, against a float64 run of `layer_norm_ref`.

Rule: the kernel's max error vs float64 is at most twice eager PyTorch's (the reference run in the
same dtype) plus a small floor; the residual sum must equal eager `x + residual` exactly. Runs
interpreted on the CPU (TRITON_INTERPRET=1, set before the kernels are imported).
"""
from kernel_setup import DEVICE, INTERPRET, needs_cuda, poison_outputs, as_double as _d  # noqa: E402,F401 (before the kernel modules; autouse fixture)

import pytest  # noqa: E402
import torch  # noqa: E402

from blip2_fast.kernels import layer_norm as LN  # noqa: E402
from blip2_fast.reference import layer_norm_ref  # noqa: E402

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# bfloat16 runs on the GPU only: the interpreter truncates float32 -> bfloat16 instead of rounding.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def check(x, weight, bias, eps=1e-6, residual=None):
    out = LN.layer_norm(x, weight, bias, eps, residual=residual)
    if residual is not None:
        y, s = out
        s_eager = x + residual
        assert s.shape == x.shape and s.dtype == x.dtype
        assert torch.equal(s, s_eager), "residual sum differs from eager x + residual"
        x = s_eager  # the spec normalises the rounded sum
    else:
        y = out
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert not y.isnan().any(), "NaN in output (unwritten element?)"
    ref = layer_norm_ref(x.double(), _d(weight), _d(bias), eps)
    err = (y.double() - ref).abs().max().item()
    err_eager = (layer_norm_ref(x, weight, bias, eps).double() - ref).abs().max().item()
    tol = 2 * err_eager + FLOOR[x.dtype]
    assert err <= tol, f"fast err {err:.3g} > 2 x eager err {err_eager:.3g} + {FLOOR[x.dtype]:.0e} ({x.dtype}, x {tuple(x.shape)})"
    return out


def params(n, dtype, weight=True, bias=True):
    w = (1 + 0.5 * torch.randn(n, device=DEVICE)).to(dtype) if weight else None
    b = (0.5 * torch.randn(n, device=DEVICE)).to(dtype) if bias else None
    return w, b


def test_kernel_mode_matches_env():
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(LN._layer_norm_fwd_kernel, InterpretedFunction) == INTERPRET, (
        "blip2_fast.kernels.layer_norm was imported before TRITON_INTERPRET was set")


# hidden sizes: ViT-g 1408, Q-Former 768, OPT-2.7B 2560, T5-XL 2048, 4096; odd ones on purpose
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(37, 1408), (7, 768), (5, 2560), (3, 2048), (2, 4096),
                                    (11, 1), (13, 7), (3, 97), (4, 1023), (3, 1025)])
def test_layer_norm_shapes(rows, n, dtype):
    torch.manual_seed(rows * 10000 + n)
    x = (2 * torch.randn(rows, n, device=DEVICE) + 0.5).to(dtype)  # non-zero mean on purpose
    check(x, *params(n, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1408, 2560, 333])
def test_residual_fused(n, dtype):
    torch.manual_seed(n)
    x = torch.randn(3, 17, n, device=DEVICE, dtype=dtype)
    r = (3 * torch.randn(3, 17, n, device=DEVICE)).to(dtype)
    y, s = check(x, *params(n, dtype), residual=r)
    assert y.shape == (3, 17, n)


@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)])
def test_optional_affine(weight, bias):
    torch.manual_seed(5)
    x = torch.randn(9, 300, device=DEVICE, dtype=torch.float16)
    check(x, *params(300, torch.float16, weight, bias))
    check(x, *params(300, torch.float16, weight, bias), residual=torch.randn_like(x))


def test_mixed_param_dtype_and_strided_input():
    torch.manual_seed(6)
    n = 768
    w, b = params(n, torch.float32)  # float32 LayerNorm params on float16 activations
    big = torch.randn(4, 9, 2 * n, device=DEVICE, dtype=torch.float16)
    x = big[..., :n]  # rows with stride 2n: a view, no copy needed
    check(x, w, b)
    xt = torch.randn(n, 6, device=DEVICE, dtype=torch.float16).t()  # column-major: copied to rows
    check(xt, w, b)
    check(x, w, b, eps=1e-2, residual=torch.randn(4, 9, n, device=DEVICE, dtype=torch.float16))


def test_several_rows_per_program():
    # rows up to 2048 wide go several to a program; the last program here has a spare row slot
    from blip2_fast.kernels._common import norm_rows_per_program
    assert norm_rows_per_program(2048, 16448) == 2 and norm_rows_per_program(1024, 7) == 4
    assert norm_rows_per_program(4096, 99) == 1 and norm_rows_per_program(64, 3) == 4
    torch.manual_seed(11)
    for rows, n in ((7, 768), (3, 1408), (5, 40)):
        big = torch.randn(rows, n + 24, device=DEVICE, dtype=torch.float16)
        check(big[:, :n], *params(n, torch.float16), residual=torch.randn(rows, n, device=DEVICE, dtype=torch.float16))


def test_large_mean_rows():
    # a large common offset: one-pass E[x²] - E[x]² would cancel catastrophically
    torch.manual_seed(7)
    x = torch.randn(5, 1408, device=DEVICE) * 0.01 + 300.0
    check(x, *params(1408, torch.float32))


def test_empty_rows():
    x = torch.randn(0, 64, device=DEVICE, dtype=torch.float16)
    assert LN.layer_norm(x, None, None, 1e-5).shape == (0, 64)


def test_bad_arguments_raise():
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.float16)
    w = torch.ones(64, device=DEVICE, dtype=torch.float16)
    cases = [
        ((x.int(), w, None, 1e-5), {}, "x must be float16"),
        ((x, w[:32], None, 1e-5), {}, "weight must be"),
        ((x, w, w[:10], 1e-5), {}, "bias must be"),
        ((x, w, w, 1e-5), {"residual": x[:2]}, "residual must have"),
        ((x, w, w, 1e-5), {"residual": x.float()}, "residual must match"),
        ((x, w, w, -1.0), {}, "eps"),
        ((torch.randn(2, 70000, device=DEVICE, dtype=torch.float16), None, None, 1e-5), {}, "last dim"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            LN.layer_norm(*args, **kw)


def test_opcheck():
    torch.manual_seed(8)
    x = torch.randn(3, 5, 40, device=DEVICE)
    w, b = params(40, torch.float32)
    op = torch.ops.blip2_fast.layer_norm_fwd.default
    torch.library.opcheck(op, (x, w, b, torch.randn_like(x), 1e-5))
    torch.library.opcheck(op, (x.half(), None, b, None, 1e-5))


def test_torch_compile_fullgraph():
    torch.manual_seed(9)
    x, r = torch.randn(2, 7, 96, device=DEVICE), torch.randn(2, 7, 96, device=DEVICE)
    w, b = params(96, torch.float32)

    def f(x, r):
        y, s = LN.layer_norm(x, w, b, 1e-6, residual=r)
        return y * 2, s

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, e in zip(compiled(x, r), f(x, r)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows,n", [(16448, 1408), (4096, 2560), (333, 4096), (1000, 1025)])
def test_layer_norm_bf16_gpu(rows, n):
    torch.manual_seed(10)
    dt = torch.bfloat16
    x = torch.randn(rows, n, device=DEVICE, dtype=dt)
    check(x, *params(n, dt), residual=torch.randn_like(x))
    check(x, *params(n, torch.float32))
