"""LayerNorm over the last dim, optionally fused with the residual add before it (one pass over HBM).

Rows up to 2048 wide go several to a program (`_common.norm_rows_per_program`), wider ones one each.

Same semantics as `blip2_fast.reference.layer_norm_ref`: float32 statistics, and with a residual
the sum x + residual is rounded once to x's dtype, stored, and that rounded sum is normalised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_norm_args, load_rows_add_residual, norm_launch, norm_num_warps


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # input rows, (n_rows, n_cols), row stride stride_x, unit column stride
    R,  # residual rows, same shape as X, row stride stride_r; unused unless HAS_RESIDUAL
    Y,  # output, (n_rows, n_cols), contiguous, X's dtype
    S,  # output sum X + R, (n_rows, n_cols), contiguous, X's dtype; unused unless HAS_RESIDUAL
    W, B,  # weight and bias, (n_cols,); unused unless HAS_WEIGHT / HAS_BIAS
    stride_x, stride_r, n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program (power of two): several for narrow rows
    BLOCK_N: tl.constexpr,  # next power of two >= n_cols; the tail is masked
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    x = load_rows_add_residual(X, R, S, rows, stride_x, stride_r, n_cols, cols, mask, HAS_RESIDUAL)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / n_cols
    rstd = tl.math.rsqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def launch_args(x, weight, bias, residual, eps):
    """(y, s, grid, args, meta): outputs, and `_layer_norm_fwd_kernel`'s launch; also what
    bench/sm90_compile.py compiles."""
    x2, r2, y, s, block_n, rows = norm_launch(x, residual)
    n, n_rows = x.shape[-1], x2.shape[0]
    args = (x2, r2, y, s if residual is not None else y,
            weight if weight is not None else x2, bias if bias is not None else x2,
            x2.stride(0), r2.stride(0), n_rows, n, eps)
    meta = dict(HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                ROWS=rows, BLOCK_N=block_n, num_warps=norm_num_warps(rows * block_n))
    return y, s, (triton.cdiv(n_rows, rows),), args, meta


def _layer_norm_impl(x, weight, bias, residual, eps):
    y, s, grid, args, meta = launch_args(x, weight, bias, residual, eps)
    if grid[0] > 0:
        _layer_norm_fwd_kernel[grid](*args, **meta)
    return y, s


@torch.library.custom_op("blip2_fast::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(x [+ residual]), x + residual); the second output is empty without a residual."""
    return _layer_norm_impl(x, weight, bias, residual, eps)


@layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))


def layer_norm(x, weight, bias, eps, residual=None):
    """LayerNorm over the last dim with float32 statistics; the semantics of `layer_norm_ref`.

    x: [..., N] (float16, bfloat16 or float32; N <= 65536); weight, bias: [N] or None, any float
    dtype; residual: x's shape and dtype, or None. Returns y [..., N] in x's dtype, or
    (y, x + residual) when a residual is given (the sum rounded once to x's dtype).
    """
    check_norm_args(x, {"weight": weight, "bias": bias}, residual, eps)
    y, s = torch.ops.blip2_fast.layer_norm_fwd(x, weight, bias, residual, float(eps))
    return (y, s) if residual is not None else y
