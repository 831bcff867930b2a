"""Helpers shared by the Triton kernels: interpreter detection, argument checks, alignment hints,
GELU epilogues, small launch pickers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpret import autotuning, interpreting  # noqa: F401  (re-exported: the kernels ask _common)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreter_index_fix() -> None:
    """Triton's interpreter (3.6 and earlier) converts a scalar to a Python int with
    `int(handle.data)`, and its scalars are 1-element 1-D arrays, which numpy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted"): every `range()` with a runtime bound then fails.
    Wrap the function that patches `tl.tensor` for interpretation so `__index__` reads the element
    with `.item()`, which every numpy accepts. Compiled kernels never see this."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - a Triton without the interpreter
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_blip2_fast_index_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._blip2_fast_index_fix = True
    interpreter._patch_lang_tensor = patched


_interpreter_index_fix()


def check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {t.device}; Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 to interpret them on the CPU)")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def dot_precision(dtype: torch.dtype) -> str:
    # float32 operands get full-precision products: tf32 (Triton's default) errs ~3e-4 relative,
    # far above eager float32, and the float32 path is the accuracy path, not the fast one.
    return "ieee" if dtype == torch.float32 else "tf32"


def head_dim_split(D: int) -> tuple[int, int]:
    """(BLOCK_D1, BLOCK_D2): a head dim as Triton's power-of-two blocks. One block (BLOCK_D2 = 0) for
    a power of two (at least 16, tl.dot's minimum) or where two would cover no less; else the largest
    power of two below D plus the next power of two (at least 16) covering the rest, which is
    narrower than padding to the next power of two: 80 = 64 + 16 (not 128), 88 -> 64 + 32 = 96,
    40 -> 32 + 16 = 48; 59 -> 64 (32 + 32 would be no narrower)."""
    full = max(16, triton.next_power_of_2(D))
    if D >= full:
        return full, 0
    d1 = full // 2
    d2 = max(16, triton.next_power_of_2(D - d1))
    return (d1, d2) if d1 + d2 < full else (full, 0)


def bucket(n: int, lo: int = 16, hi: int = 1 << 16) -> int:
    """Autotune key for a length: its next power of two, so new lengths reuse a tuned config."""
    return min(max(triton.next_power_of_2(max(int(n), 1)), lo), hi)


NORM_MAX_N = 65536  # the norm kernels hold one row in registers; wider rows would spill


def check_rows_input(x, last: str) -> None:
    """x must be a float tensor [..., last] where a Triton kernel can run (norms: N; GEMMs: K)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., {last}], got {getattr(x, 'shape', type(x).__name__)}")
    check_float("x", x)
    check_device("x", x)


def check_norm_args(x, params, residual, eps):
    """Shared by layer_norm and rms_norm: x [..., N]; params {name: (N,) tensor or None}."""
    check_rows_input(x, "N")
    n = x.shape[-1]
    if not 1 <= n <= NORM_MAX_N:
        raise ValueError(f"x's last dim N must be in 1..{NORM_MAX_N}, got {n} (x {tuple(x.shape)})")
    for name, p in params.items():
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (n,):
            raise ValueError(f"{name} must be [N] = [{n}], got {getattr(p, 'shape', type(p).__name__)}")
        check_float(name, p)
        if p.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {p.device}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {getattr(residual, 'shape', type(residual).__name__)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x's dtype {x.dtype} and device {x.device}, "
                             f"got {residual.dtype} on {residual.device}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be a non-negative float, got {eps}")


def norm_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t [..., n] as [rows, n] with unit column stride (the norm kernels' layout): a view whenever the
    leading dims collapse, a copy only otherwise."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


# Rows of at most this many (padded) elements are normalised several to a program: one 1408-wide
# ViT-g row is 2.8 KB of bf16, too little work to amortise a program's start and its cross-warp
# reductions. Compiled for sm_90 (Triton 3.6, bf16, 1408 wide): see bench/results/sm90-compile-*.json.
NORM_MULTI_ROW_MAX_N = 2048
NORM_ROW_ELEMENTS = 4096  # target elements (rows x padded width) per program for narrow rows


def norm_rows_per_program(block_n: int, n_rows: int) -> int:
    """Power-of-two rows per program: 1 for wide rows, else ~NORM_ROW_ELEMENTS elements' worth, never
    more than the rows there are (rounded up to a power of two)."""
    if block_n > NORM_MULTI_ROW_MAX_N:
        return 1
    return max(1, min(NORM_ROW_ELEMENTS // block_n, triton.next_power_of_2(max(n_rows, 1)), 64))


def norm_launch(x: torch.Tensor, residual: torch.Tensor | None):
    """What the norm kernels' host functions share: (x2, r2, y, s, block_n, rows_per_program) with x
    and residual as [rows, n] (r2 is x2 without a residual), outputs y (x's shape) and s (the sum, or
    empty), the row's power-of-two block and the rows each program takes. rows == x2.shape[0] may be
    0: then there is nothing to launch."""
    n = x.shape[-1]
    x2 = norm_rows(x, n)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape if residual is not None else (0,), dtype=x.dtype, device=x.device)
    r2 = norm_rows(residual, n) if residual is not None else x2
    block_n = triton.next_power_of_2(n)
    return x2, r2, y, s, block_n, norm_rows_per_program(block_n, x2.shape[0])


@triton.jit
def load_rows_add_residual(
    X, R, S,  # input rows base, residual rows base, sum output base (as the norm kernels describe them)
    rows, stride_x, stride_r, n_cols, cols, mask,  # rows (ROWS,) int64; cols (BLOCK_N,); mask (ROWS, BLOCK_N)
    HAS_RESIDUAL: tl.constexpr,
):
    """A (ROWS, BLOCK_N) tile of X as float32; with a residual, X + R rounded once to X's dtype, stored
    to S (the next block's residual must match an unfused model bit for bit) and returned."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * n_cols + cols[None, :], x, mask=mask)
    return x.to(tl.float32)


def norm_num_warps(elements: int) -> int:
    # enough warps that each thread holds ~8-16 elements of the program's tile
    if elements >= 32768:
        return 32
    if elements >= 8192:
        return 16
    if elements >= 2048:
        return 8
    return 4


@triton.jit
def gelu_erf(x):
    # x is float32; exact GELU, 0.5·x·(1 + erf(x/√2)), as F.gelu(approximate="none")
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_tanh(x):
    # 0.5·x·(1 + tanh(u)) == x·sigmoid(2u), u = √(2/π)·(x + 0.044715·x³); tl has no tanh, and this
    # form saturates cleanly (exp2 overflow gives x/inf = -0, underflow gives x).
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp2(-2.8853900817779268 * u))  # -2·log2(e)·u


def alignment(*tensors: torch.Tensor) -> int:
    """Largest power of two, at most 16 bytes' worth of elements, dividing every stride but the last of
    every tensor (dims of size 1 ignored: their stride never moves a pointer): every row t[..., :] of
    each then starts a multiple of it elements after the tensor's first. 1 if a tensor is strided
    along its last dim. The kernels pass it as a constexpr so Triton can use 16-byte vector loads and
    cp.async on rows whose stride is not a multiple of 16 elements (D = 80, 88), which it cannot
    prove from integer arguments alone."""
    a = max(1, 16 // tensors[0].element_size())
    for t in tensors:
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            return 1
        for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
            if size > 1:
                while stride % a:
                    a //= 2
    return a
