"""GEMM + bias + GELU (kernels/linear_gelu.py) against a float64 run of `linear_gelu_ref`.

Rule: the kernel's max error vs float64 is at most twice eager PyTorch's (F.linear + GELU in the
same dtype) plus a small floor. Runs interpreted on the CPU (TRITON_INTERPRET=1, set before the
kernels are imported); bfloat16 runs on the GPU only (the interpreter's bf16 tl.dot is wrong).
"""
from kernel_setup import DEVICE, INTERPRET, needs_cuda, poison_outputs, as_double as _d  # noqa: E402,F401 (before the kernel modules; autouse fixture)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from blip2_fast.kernels import linear_gelu as LG  # noqa: E402
from blip2_fast.reference import gelu_ref, linear_gelu_ref  # noqa: E402

FLOOR = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def eager(x, weight, bias, approximate):
    return gelu_ref(F.linear(x, weight, None if bias is None else bias.to(x.dtype)), approximate)


def check(x, weight, bias, approximate="none", fast=None):
    y = (fast or LG.linear_gelu)(x, weight, bias, approximate)
    N = weight.shape[0]
    assert y.shape == (*x.shape[:-1], N) and y.dtype == x.dtype and y.is_contiguous()
    assert not y.isnan().any(), "NaN in output (unwritten element?)"
    ref = linear_gelu_ref(x.double(), weight.double(), _d(bias), approximate)
    err = (y.double() - ref).abs().max().item()
    err_eager = (eager(x, weight, bias, approximate).double() - ref).abs().max().item()
    tol = 2 * err_eager + FLOOR[x.dtype]
    assert err <= tol, f"fast err {err:.3g} > 2 x eager err {err_eager:.3g} + {FLOOR[x.dtype]:.0e} ({x.dtype}, x {tuple(x.shape)}, w {tuple(weight.shape)}, {approximate})"
    return y


def make(M, K, N, dtype, bias=True, lead=()):
    x = torch.randn(*lead, M, K, device=DEVICE).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) * K ** -0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    return x, w, b


def test_kernel_mode_matches_env():
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(LG._linear_gelu_kernel, InterpretedFunction) == INTERPRET, (
        "blip2_fast.kernels.linear_gelu was imported before TRITON_INTERPRET was set")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,K,N", [
    pytest.param(37, 59, 97, id="primes"),
    pytest.param(1, 1, 1, id="1x1x1"),
    pytest.param(5, 40, 200, id="k40"),
    pytest.param(33, 96, 129, id="tails"),
])
def test_linear_gelu_shapes(M, K, N, approximate, dtype):
    torch.manual_seed(M * 7 + K * 3 + N)
    check(*make(M, K, N, dtype), approximate)


# Real BLIP-2 widths, one dtype/approximation each (the interpreter is slow at these sizes).
@pytest.mark.parametrize("M,K,N,dtype,approximate", [
    pytest.param(64, 768, 3072, torch.float16, "none", id="qformer-2x32-768x3072-fp16"),
    pytest.param(64, 768, 3072, torch.float32, "tanh", id="qformer-2x32-768x3072-fp32-tanh"),
    pytest.param(9, 2048, 1280, torch.float16, "none", id="t5-2048x5120-quarter-fp16"),
])
def test_linear_gelu_blip2_shapes(M, K, N, dtype, approximate):
    torch.manual_seed(M + K + N)
    check(*make(M, K, N, dtype), approximate)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_bias_3d_and_float32_bias(dtype):
    torch.manual_seed(2)
    x, w, _ = make(13, 96, 130, dtype, bias=False, lead=(3,))
    check(x, w, None)
    check(x, w, torch.randn(130, device=DEVICE, dtype=torch.float32), "tanh")


def test_strided_operands():
    torch.manual_seed(3)
    big = torch.randn(2, 20, 300, device=DEVICE, dtype=torch.float16)
    x = big[:, :, 100:196]  # [2, 20, 96] view, row stride 300
    w_t = (torch.randn(96, 72, device=DEVICE) * 0.1).to(torch.float16)
    w = w_t.t()  # [72, 96] with strides (1, 72): a transposed weight, no copy
    check(x, w, torch.randn(72, device=DEVICE, dtype=torch.float16))
    xt = torch.randn(96, 31, device=DEVICE, dtype=torch.float16).t()  # column-major x
    check(xt, w, None, "tanh")


@pytest.mark.parametrize("group_m", [1, 3])
def test_launch_order_groups(group_m):
    # 4 row tiles x 3 column tiles with uneven groups: every tile written exactly where it belongs
    torch.manual_seed(7)
    x, w, b = make(100, 64, 150, torch.float32)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": group_m}
    check(x, w, b, fast=lambda x, w, b, a: LG.launch_gemm_gelu(x, w, b, a, config=cfg))


@pytest.mark.parametrize("tma,persistent", [(False, True), (True, False), (True, True)])
def test_persistent_and_tma_configs(tma, persistent):
    # the sm_90 candidates: tiles through tensor descriptors (zero-filled past M, N, K: no masks),
    # and persistent programs that each walk several tiles (the interpreter's notional 3 SMs)
    torch.manual_seed(8)
    x, w, b = make(100, 72, 150, torch.float32)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2, "USE_TMA": tma, "NUM_PROGS": 3 if persistent else 0}
    check(x, w, b, fast=lambda x, w, b, a: LG.launch_gemm_gelu(x, w, b, a, config=cfg))
    assert LG._prune_configs(LG._CONFIGS, {"m_bucket": 4096, "N": 6144, "tma_ok": 0})  # pointer configs remain
    assert all(not c.kwargs["USE_TMA"] for c in LG._prune_configs(LG._CONFIGS, {"m_bucket": 4096, "N": 6144, "tma_ok": 0}))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's exp2 -> inf is intended
def test_gelu_saturation():
    # large |pre-activation|: the exp2-based tanh form must give x and -0, not NaN
    torch.manual_seed(4)
    x, w, b = make(8, 64, 64, torch.float32)
    check(x * 300, w, b, "tanh")
    check(x * 300, w, b, "none")


def test_bad_arguments_raise():
    x, w, b = make(4, 32, 16, torch.float16)
    cases = [
        ((x, w[:, :8], b), {}, "weight must be"),
        ((x, w.float(), b), {}, "weight must match"),
        ((x, w, b[:3]), {}, "bias must be"),
        ((x.int(), w, b), {}, "x must be float16"),
        ((x, w, b), {"approximate": "sigmoid"}, "approximate"),
        ((x[:, :0], w[:, :0], b), {}, "K must be"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            LG.linear_gelu(*args, **kw)


def test_opcheck():
    torch.manual_seed(5)
    x, w, b = make(6, 40, 24, torch.float32, lead=(2,))
    op = torch.ops.blip2_fast.linear_gelu_fwd.default
    torch.library.opcheck(op, (x, w, b, "none"))
    torch.library.opcheck(op, (x.half(), w.half(), None, "tanh"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M,K,N", [(64 * 32, 768, 3072), (512, 2048, 5120), (37, 59, 97), (4000, 1408, 6144)])
def test_linear_gelu_bf16_gpu(M, K, N):
    torch.manual_seed(6)
    for approximate in ("none", "tanh"):
        check(*make(M, K, N, torch.bfloat16), approximate)
