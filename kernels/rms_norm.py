"""T5's RMSNorm (no mean removal, no bias), optionally fused with the residual add before it.

Same semantics as `blip2_fast.reference.rms_norm_ref`: float32 statistics; the normalised row is cast
to the weight's dtype before the weight multiplies it (T5 does this, and it matters in half
precision); with a residual, x + residual is rounded once to x's dtype, stored and normalised.
Rows up to 2048 wide go several to a program, as in kernels/layer_norm.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_norm_args, load_rows_add_residual, norm_launch, norm_num_warps


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # input rows, (n_rows, n_cols), row stride stride_x, unit column stride
    R,  # residual rows, same shape as X, row stride stride_r; unused unless HAS_RESIDUAL
    Y,  # output, (n_rows, n_cols), contiguous, X's dtype
    S,  # output sum X + R, (n_rows, n_cols), contiguous, X's dtype; unused unless HAS_RESIDUAL
    W,  # weight, (n_cols,)
    stride_x, stride_r, n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program (power of two): several for narrow rows
    BLOCK_N: tl.constexpr,  # next power of two >= n_cols; the tail is masked
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    x = load_rows_add_residual(X, R, S, rows, stride_x, stride_r, n_cols, cols, mask, HAS_RESIDUAL)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0)
    y = (x * rstd[:, None]).to(w.dtype).to(tl.float32) * w.to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def launch_args(x, weight, residual, eps):
    """(y, s, grid, args, meta): outputs, and `_rms_norm_fwd_kernel`'s launch; also what
    bench/sm90_compile.py compiles."""
    x2, r2, y, s, block_n, rows = norm_launch(x, residual)
    n, n_rows = x.shape[-1], x2.shape[0]
    args = (x2, r2, y, s if residual is not None else y, weight, x2.stride(0), r2.stride(0), n_rows, n, eps)
    meta = dict(HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK_N=block_n, num_warps=norm_num_warps(rows * block_n))
    return y, s, (triton.cdiv(n_rows, rows),), args, meta


def _rms_norm_impl(x, weight, residual, eps):
    y, s, grid, args, meta = launch_args(x, weight, residual, eps)
    if grid[0] > 0:
        _rms_norm_fwd_kernel[grid](*args, **meta)
    return y, s


@torch.library.custom_op("blip2_fast::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x [+ residual]), x + residual); the second output is empty without a residual."""
    return _rms_norm_impl(x, weight, residual, eps)


@rms_norm_fwd.register_fake
def _(x, weight, residual, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))


def rms_norm(x, weight, eps, residual=None):
    """T5 RMSNorm, x / sqrt(mean(x²) + eps) · weight; the semantics of `rms_norm_ref`.

    x: [..., N] (float16, bfloat16 or float32; N <= 65536); weight: [N], any float dtype (required:
    its dtype sets the rounding step); residual: x's shape and dtype, or None. Returns y [..., N] in
    x's dtype, or (y, x + residual) when a residual is given.
    """
    if weight is None:
        raise ValueError("weight must be a tensor [N]; T5's RMSNorm always has one")
    check_norm_args(x, {"weight": weight}, residual, eps)
    y, s = torch.ops.blip2_fast.rms_norm_fwd(x, weight, residual, float(eps))
    return (y, s) if residual is not None else y
