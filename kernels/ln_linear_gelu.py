"""GELU(LayerNorm(x) @ weightᵀ + bias) in one GEMM: ViT-g's layer_norm2 → fc1 → GELU (1408 → 6144).

A pre-pass writes each row's float32 mean and rstd (8 bytes a row, one read of x); the GEMM
(`_linear_gelu_kernel` in kernels/linear_gelu.py with NORM_A) then normalises each A tile in
registers as it loads it and applies bias + GELU in its epilogue, so neither the normalised
activations nor the pre-activation ever reach memory. Same semantics as `ln_linear_gelu_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NORM_MAX_N, check_float, norm_num_warps, norm_rows_per_program
from .linear_gelu import as_rows, check_gemm_args, launch_gemm_gelu


@triton.jit
def _row_stats_kernel(
    X,  # input rows, (M, K), strides stride_xm, stride_xk
    MEAN,  # output row means, (M,), float32
    RSTD,  # output row 1/sqrt(var + eps), (M,), float32
    stride_xm, stride_xk, M, K, eps,
    ROWS: tl.constexpr,  # rows per program (power of two): several for narrow rows
    BLOCK_K: tl.constexpr,  # next power of two >= K; the tail is masked
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < K)[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / K
    xc = tl.where(mask, x - mean[:, None], 0.0)  # two-pass variance: no cancellation for rows with a large mean
    var = tl.sum(xc * xc, axis=1) / K
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, tl.math.rsqrt(var + eps), mask=row_ok)


def row_stats_launch(x2, eps):
    """(mean, rstd, grid, args, meta): the LayerNorm statistics pre-pass' launch; also what
    bench/sm90_compile.py compiles."""
    M, K = x2.shape
    mean = torch.empty((M,), dtype=torch.float32, device=x2.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x2.device)
    block_k = triton.next_power_of_2(K)
    rows = norm_rows_per_program(block_k, M)
    args = (x2, mean, rstd, x2.stride(0), x2.stride(1), M, K, eps)
    return mean, rstd, (triton.cdiv(M, rows),), args, dict(ROWS=rows, BLOCK_K=block_k,
                                                            num_warps=norm_num_warps(rows * block_k))


def _ln_linear_gelu_impl(x, ln_weight, ln_bias, eps, weight, bias, approximate, config=None):
    x2 = as_rows(x)
    mean, rstd, grid, args, meta = row_stats_launch(x2, eps)
    if grid[0] > 0:
        _row_stats_kernel[grid](*args, **meta)
    y = launch_gemm_gelu(x2, weight, bias, approximate, mean=mean, rstd=rstd,
                         ln_weight=ln_weight, ln_bias=ln_bias, config=config)
    return y.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("blip2_fast::ln_linear_gelu_fwd", mutates_args=())
def ln_linear_gelu_fwd(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
                       weight: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    return _ln_linear_gelu_impl(x, ln_weight, ln_bias, eps, weight, bias, approximate)


@ln_linear_gelu_fwd.register_fake
def _(x, ln_weight, ln_bias, eps, weight, bias, approximate):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def ln_linear_gelu(x, ln_weight, ln_bias, eps, weight, bias, approximate="none"):
    """GELU(LayerNorm(x) @ weightᵀ + bias); the semantics of `ln_linear_gelu_ref`.

    x: [..., K] (float16, bfloat16 or float32; K <= 65536), any strides; ln_weight, ln_bias: [K] or
    None, any float dtype; weight: [N, K] (nn.Linear layout), x's dtype; bias: [N] or None;
    approximate: "none" (erf) or "tanh". LayerNorm statistics are float32; the normalised tile is
    rounded to x's dtype for the tensor-core product (as an unfused bf16 model rounds it when it
    writes it), accumulation is float32. Returns [..., N] in x's dtype.
    """
    check_gemm_args(x, weight, bias, approximate)
    K = x.shape[-1]
    if K > NORM_MAX_N:
        raise ValueError(f"x's last dim K must be <= {NORM_MAX_N}, got x {tuple(x.shape)}")
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (K,):
            raise ValueError(f"{name} must be [K] = [{K}], got {getattr(p, 'shape', type(p).__name__)}")
        check_float(name, p)
        if p.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {p.device}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be a non-negative float, got {eps}")
    return torch.ops.blip2_fast.ln_linear_gelu_fwd(x, ln_weight, ln_bias, float(eps), weight, bias, approximate)
