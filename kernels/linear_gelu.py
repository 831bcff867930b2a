"""GELU(x @ weightᵀ + bias): a Triton GEMM with bias and GELU in the epilogue (Q-Former / T5 MLPs).

The same kernel, with NORM_A, serves `ln_linear_gelu`: it then LayerNorms each A tile as it is
loaded, from per-row mean/rstd computed by a small pre-pass (see kernels/ln_linear_gelu.py).
Same semantics as `blip2_fast.reference.linear_gelu_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (autotuning, bucket, check_float, check_rows_input, dot_precision, gelu_erf, gelu_tanh,
                      interpreting)


@triton.jit
def _linear_gelu_kernel(
    X,  # activations, (M, K), strides stride_xm, stride_xk
    W,  # weight in nn.Linear layout, (N, K), strides stride_wn, stride_wk
    BIAS,  # bias, (N,); unused unless HAS_BIAS
    Y,  # output, (M, N), contiguous, X's dtype
    MEAN, RSTD,  # per-row LayerNorm statistics of X, (M,) float32; unused unless NORM_A
    LNW, LNB,  # LayerNorm weight and bias, (K,); unused unless NORM_A and HAS_LNW / HAS_LNB
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    m_bucket,  # power-of-two bucket of M: autotune key only
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,  # GELU's tanh approximation instead of erf
    NORM_A: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for float32 inputs, else "tf32" (ignored for 16-bit operands)
    GROUP_M: tl.constexpr,  # row tiles per group in the L2-friendly launch order
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep the column tiles together, so their A rows and the
    # shared W columns are reused from L2.
    num_in_group = GROUP_M * num_pid_n
    group = pid // num_in_group
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_m
    pid_n = (pid % num_in_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrap out-of-range rows/columns onto valid ones: loads need no row/column mask, and the
    # store below drops them.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + rn[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N) = Wᵀ tile
    if NORM_A:
        mean = tl.load(MEAN + rm)
        rstd = tl.load(RSTD + rm)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if NORM_A:
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if HAS_LNW:
                a = a * tl.load(LNW + k * BLOCK_K + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_LNB:
                a = a + tl.load(LNB + k * BLOCK_K + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            # Past K the W tile is zero, so the (finite) values of a there do not matter.
            a = a.to(W.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(BIAS + rn).to(tl.float32)[None, :]
    if APPROX_TANH:
        acc = gelu_tanh(acc)
    else:
        acc = gelu_erf(acc)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    m_bucket, n = args["m_bucket"], args["N"]
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(m_bucket, 64) and c.kwargs["BLOCK_N"] <= max(triton.next_power_of_2(n), 64)]
    return keep or configs[-1:]


# sm_90 candidates for bf16/fp16 (from Triton's matmul tutorial's Hopper set). Compiled for sm_90
# with Triton 3.9: 128×128 with 8 warps fits in registers with and without NORM_A (153 / 217
# registers); 128×256 spills 72-112 bytes in the GELU epilogue but is kept for autotuning to judge;
# 256×128 and 128×128 with 4 warps spilled more and were dropped. 64×128 is the small-M fallback
# (Q-Former: B·32 rows).
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_linear_gelu_tuned = triton.autotune(
    _CONFIGS, key=["m_bucket", "N", "K", "NORM_A", "HAS_BIAS", "APPROX_TANH"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_linear_gelu_kernel)

# Under TRITON_INTERPRET=1: one fixed configuration (numpy runs one program at a time).
_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}


def launch_gemm_gelu(x2, weight, bias, approximate, *, mean=None, rstd=None, ln_weight=None, ln_bias=None,
                     config=None):
    """GELU(A @ weightᵀ + bias) for x2 [M, K], A = x2 or (with mean/rstd) LayerNorm(x2). Returns [M, N]."""
    M, K = x2.shape
    N = weight.shape[0]
    y = _common.new_empty((M, N), x2.dtype, x2.device)
    if M == 0 or N == 0:
        return y
    assert K >= 1 and tuple(weight.shape) == (N, K), (tuple(x2.shape), tuple(weight.shape))
    norm_a = mean is not None
    dummy = x2
    args = (
        x2, weight, bias if bias is not None else dummy, y,
        mean if norm_a else dummy, rstd if norm_a else dummy,
        ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
        M, N, K, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), bucket(M, 16, 1 << 14),
    )
    meta = dict(HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", NORM_A=norm_a,
                HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None, DOT_PREC=dot_precision(x2.dtype))
    if config is not None or interpreting() or not autotuning():
        c, warps, stages = config or _INTERP_CONFIG, 4, 2
        if config is None and not interpreting():  # no autotuning: the first candidate the pruning keeps
            best = _prune_configs(_CONFIGS, {"m_bucket": bucket(M, 16, 1 << 14), "N": N})[0]
            c, warps, stages = best.kwargs, best.num_warps, best.num_stages
        grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)
        _linear_gelu_kernel[grid](*args, **meta, **c, num_warps=warps, num_stages=stages)
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        _linear_gelu_tuned[grid](*args, **meta)
    return y


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] without copying when the leading dims collapse (any strides otherwise kept)."""
    return x.reshape(-1, x.shape[-1])


@torch.library.custom_op("blip2_fast::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    y = launch_gemm_gelu(as_rows(x), weight, bias, approximate)
    return y.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_fwd.register_fake
def _(x, weight, bias, approximate):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def check_gemm_args(x, weight, bias, approximate):
    """Shared with ln_linear_gelu: x [..., K], weight [N, K], bias [N] or None."""
    check_rows_input(x, "K")
    K = x.shape[-1]
    if K < 1:
        raise ValueError(f"x's last dim K must be >= 1, got x {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must be [N, K] = [N, {K}] (nn.Linear layout), got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must match x's dtype {x.dtype} and device {x.device}, got {weight.dtype} on {weight.device}")
    N = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be [N] = [{N}], got {getattr(bias, 'shape', type(bias).__name__)}")
        check_float("bias", bias)
        if bias.device != x.device:
            raise ValueError(f"bias must be on {x.device}, got {bias.device}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def linear_gelu(x, weight, bias, approximate="none"):
    """GELU(x @ weightᵀ + bias); the semantics of `linear_gelu_ref`.

    x: [..., K], any strides (float16, bfloat16 or float32); weight: [N, K] (nn.Linear layout), x's
    dtype; bias: [N] or None, any float dtype; approximate: "none" (erf) or "tanh". Accumulates in
    float32; float32 inputs use full-precision (not tf32) products. Returns [..., N] in x's dtype.
    """
    check_gemm_args(x, weight, bias, approximate)
    return torch.ops.blip2_fast.linear_gelu_fwd(x, weight, bias, approximate)
