"""LayerNorm → GEMM → bias → GELU in one GEMM (kernels/ln_linear_gelu.py) vs float64 `ln_linear_gelu_ref`.

Rule: the kernel's max error vs float64 is at most twice eager PyTorch's (F.layer_norm, F.linear
and GELU in the same dtype) plus a small floor. Runs interpreted on the CPU (TRITON_INTERPRET=1, set
before the kernels are imported); bfloat16 runs on the GPU only (the interpreter's bf16 tl.dot is wrong).
"""
from kernel_setup import DEVICE, INTERPRET, needs_cuda, poison_outputs, as_double as _d  # noqa: E402,F401 (before the kernel modules; autouse fixture)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from blip2_fast.kernels import ln_linear_gelu as LLG  # noqa: E402
from blip2_fast.reference import gelu_ref, ln_linear_gelu_ref  # noqa: E402

FLOOR = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def eager(x, lnw, lnb, eps, w, b, approximate):
    cast = (lambda t: None if t is None else t.to(x.dtype))
    h = F.layer_norm(x, x.shape[-1:], cast(lnw), cast(lnb), eps)
    return gelu_ref(F.linear(h, w, cast(b)), approximate)


def check(x, lnw, lnb, eps, w, b, approximate="none", fast=None):
    y = (fast or LLG.ln_linear_gelu)(x, lnw, lnb, eps, w, b, approximate)
    N = w.shape[0]
    assert y.shape == (*x.shape[:-1], N) and y.dtype == x.dtype and y.is_contiguous()
    assert not y.isnan().any(), "NaN in output (unwritten element?)"
    K = x.shape[-1]
    lnw64 = torch.ones(K, dtype=torch.float64, device=x.device) if lnw is None else lnw.double()  # the ref needs both
    lnb64 = torch.zeros(K, dtype=torch.float64, device=x.device) if lnb is None else lnb.double()
    ref = ln_linear_gelu_ref(x.double(), lnw64, lnb64, eps, w.double(), _d(b), approximate)
    err = (y.double() - ref).abs().max().item()
    err_eager = (eager(x, lnw, lnb, eps, w, b, approximate).double() - ref).abs().max().item()
    tol = 2 * err_eager + FLOOR[x.dtype]
    assert err <= tol, f"fast err {err:.3g} > 2 x eager err {err_eager:.3g} + {FLOOR[x.dtype]:.0e} ({x.dtype}, x {tuple(x.shape)}, w {tuple(w.shape)}, {approximate})"
    return y


def make(M, K, N, dtype, lead=(), ln_weight=True, ln_bias=True, bias=True, offset=0.5):
    x = (2 * torch.randn(*lead, M, K, device=DEVICE) + offset).to(dtype)  # non-zero row means
    lnw = (1 + 0.3 * torch.randn(K, device=DEVICE)).to(dtype) if ln_weight else None
    lnb = (0.3 * torch.randn(K, device=DEVICE)).to(dtype) if ln_bias else None
    w = (torch.randn(N, K, device=DEVICE) * K ** -0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    return x, lnw, lnb, 1e-6, w, b


def test_kernel_mode_matches_env():
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(LLG._row_stats_kernel, InterpretedFunction) == INTERPRET, (
        "blip2_fast.kernels.ln_linear_gelu was imported before TRITON_INTERPRET was set")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,K,N", [
    pytest.param(37, 59, 97, id="primes"),
    pytest.param(1, 1, 3, id="k1"),  # a single column: var = 0, y = ln_bias
    pytest.param(33, 96, 129, id="tails"),
])
def test_ln_linear_gelu_shapes(M, K, N, approximate, dtype):
    torch.manual_seed(M * 7 + K * 3 + N)
    check(*make(M, K, N, dtype), approximate)


# ViT-g's layer_norm2 -> fc1 (1408 -> 6144); few rows and one dtype each: the interpreter is slow.
@pytest.mark.parametrize("N,dtype,approximate", [(6144, torch.float16, "none"), (768, torch.float32, "tanh")],
                         ids=["fp16-6144", "fp32-tanh-768"])
def test_vitg_mlp_width(N, dtype, approximate):
    torch.manual_seed(1)
    check(*make(5, 1408, N, dtype, lead=(2,)), approximate)


@pytest.mark.parametrize("ln_weight,ln_bias,bias", [(False, False, False), (True, False, True), (False, True, False)])
def test_optional_params(ln_weight, ln_bias, bias):
    torch.manual_seed(2)
    check(*make(19, 72, 80, torch.float16, ln_weight=ln_weight, ln_bias=ln_bias, bias=bias))


def test_float32_ln_params_and_strided_x():
    torch.manual_seed(3)
    x, lnw, lnb, eps, w, b = make(20, 96, 72, torch.float16)
    big = torch.randn(2, 20, 300, device=DEVICE, dtype=torch.float16)
    check(big[:, :, 50:146], lnw.float(), lnb.float(), 1e-5, w, b.float())  # rows with stride 300
    check(torch.randn(96, 21, device=DEVICE, dtype=torch.float16).t(), lnw, lnb, eps, w.t().contiguous().t(), b)


def test_large_row_mean():
    # rows far from zero mean: the statistics must not cancel
    torch.manual_seed(4)
    check(*make(9, 200, 64, torch.float32, offset=500.0))


@pytest.mark.parametrize("group_m", [1, 3])
def test_launch_order_groups(group_m):
    torch.manual_seed(5)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": group_m}
    check(*make(100, 80, 150, torch.float32),
          fast=lambda *a: LLG._ln_linear_gelu_impl(*a, config=cfg))


@pytest.mark.parametrize("persistent", [False, True])
def test_tma_and_persistent_configs(persistent):
    torch.manual_seed(6)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2, "USE_TMA": True, "NUM_PROGS": 3 if persistent else 0}
    check(*make(100, 80, 150, torch.float32), fast=lambda *a: LLG._ln_linear_gelu_impl(*a, config=cfg))


def test_bad_arguments_raise():
    x, lnw, lnb, eps, w, b = make(4, 32, 16, torch.float16)
    cases = [
        ((x, lnw[:5], lnb, eps, w, b), "ln_weight must be"),
        ((x, lnw, lnb[:5], eps, w, b), "ln_bias must be"),
        ((x, lnw, lnb, eps, w[:, :5], b), "weight must be"),
        ((x, lnw, lnb, eps, w, b[:5]), "bias must be"),
        ((x, lnw, lnb, eps, w.float(), b), "weight must match"),
        ((x, lnw, lnb, -1.0, w, b), "eps"),
        ((x.double(), lnw, lnb, eps, w.double(), b), "x must be float16"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            LLG.ln_linear_gelu(*args)
    with pytest.raises(ValueError, match="approximate"):
        LLG.ln_linear_gelu(x, lnw, lnb, eps, w, b, approximate="fast")


def test_opcheck():
    torch.manual_seed(6)
    x, lnw, lnb, eps, w, b = make(6, 40, 24, torch.float32, lead=(2,))
    op = torch.ops.blip2_fast.ln_linear_gelu_fwd.default
    torch.library.opcheck(op, (x, lnw, lnb, eps, w, b, "none"))


def test_torch_compile_fullgraph():
    torch.manual_seed(7)
    x, lnw, lnb, eps, w, b = make(6, 40, 24, torch.float32, lead=(2,))
    f = lambda x: LLG.ln_linear_gelu(x, lnw, lnb, eps, w, b) + 1  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M,K,N", [(2 * 257, 1408, 6144), (16448, 1408, 6144), (37, 59, 97)])
def test_ln_linear_gelu_bf16_gpu(M, K, N):
    torch.manual_seed(8)
    for approximate in ("none", "tanh"):
        check(*make(M, K, N, torch.bfloat16), approximate)
