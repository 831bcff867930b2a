"""GELU(x @ weightᵀ + bias): a Triton GEMM with bias and GELU in the epilogue (Q-Former / T5 MLPs).

The same kernel, with NORM_A, serves `ln_linear_gelu`: it then LayerNorms each A tile as it is
loaded, from per-row mean/rstd computed by a small pre-pass (see kernels/ln_linear_gelu.py).

On sm_90 some autotune candidates load tiles through the copy engine (TMA tensor descriptors) and
run persistent (one program per SM looping over the tiles, so a tile's epilogue overlaps the next
tile's loads); the rest load through pointers (cp.async), one tile per program.
Same semantics as `blip2_fast.reference.linear_gelu_ref`.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (autotuning, bucket, check_float, check_rows_input, dot_precision, gelu_erf, gelu_tanh,
                      interpreting)


@triton.jit
def _gemm_gelu_tile(
    tile,  # which output tile, in the grouped launch order
    X, W, BIAS, Y, MEAN, RSTD, LNW, LNB, X_DESC, W_DESC,  # as _linear_gelu_kernel describes them
    M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, NORM_A: tl.constexpr, HAS_LNW: tl.constexpr,
    HAS_LNB: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep the column tiles together, so their A rows and the
    # shared W columns are reused from L2.
    num_in_group = GROUP_M * num_pid_n
    group = tile // num_in_group
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % num_in_group) % group_m
    pid_n = (tile % num_in_group) // group_m

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
        if USE_TMA:
            # the copy engine zero-fills past M, N and K: no masks, no wrapped rows
            a = X_DESC.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = W_DESC.load([pid_n * BLOCK_N, k * BLOCK_K]).T
        else:
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


@triton.jit
def _linear_gelu_kernel(
    X,  # activations, (M, K), strides stride_xm, stride_xk
    W,  # weight in nn.Linear layout, (N, K), strides stride_wn, stride_wk
    BIAS,  # bias, (N,); unused unless HAS_BIAS
    Y,  # output, (M, N), contiguous, X's dtype
    MEAN, RSTD,  # per-row LayerNorm statistics of X, (M,) float32; unused unless NORM_A
    LNW, LNB,  # LayerNorm weight and bias, (K,); unused unless NORM_A and HAS_LNW / HAS_LNB
    X_DESC, W_DESC,  # USE_TMA: tensor descriptors of X and W, blocks (BLOCK_M, BLOCK_K), (BLOCK_N, BLOCK_K); else unused
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    m_bucket,  # power-of-two bucket of M: autotune key only
    tma_ok,  # 1 if X_DESC / W_DESC are descriptors (configs with USE_TMA may run): autotune key only
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,  # GELU's tanh approximation instead of erf
    NORM_A: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for float32 inputs, else "tf32" (ignored for 16-bit operands)
    USE_TMA: tl.constexpr,  # tiles come through the copy engine (sm_90), else through pointers
    NUM_PROGS: tl.constexpr,  # persistent: this many programs loop over the tiles; 0: one tile per program
    GROUP_M: tl.constexpr,  # row tiles per group in the L2-friendly launch order
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    if NUM_PROGS == 0:
        _gemm_gelu_tile(pid, X, W, BIAS, Y, MEAN, RSTD, LNW, LNB, X_DESC, W_DESC, M, N, K, stride_xm, stride_xk,
                        stride_wn, stride_wk, stride_ym, HAS_BIAS, APPROX_TANH, NORM_A, HAS_LNW, HAS_LNB, DOT_PREC,
                        USE_TMA, GROUP_M, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        # Persistent: one program per SM walks the tiles; with the loops flattened, the pipeliner
        # issues the next tile's first loads while this tile's epilogue (bias, GELU, store) runs.
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(pid, num_tiles, NUM_PROGS, flatten=True):
            _gemm_gelu_tile(tile, X, W, BIAS, Y, MEAN, RSTD, LNW, LNB, X_DESC, W_DESC, M, N, K, stride_xm,
                            stride_xk, stride_wn, stride_wk, stride_ym, HAS_BIAS, APPROX_TANH, NORM_A, HAS_LNW,
                            HAS_LNB, DOT_PREC, USE_TMA, GROUP_M, BLOCK_M, BLOCK_N, BLOCK_K)


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    m_bucket, n = args["m_bucket"], args["N"]
    tma_ok = bool(args.get("tma_ok", 0))
    norm_a = bool(args.get("NORM_A", False))
    fp32 = args.get("DOT_PREC") == "ieee"
    configs = [c for c in configs if getattr(c, "fp32_only", False) == fp32]
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(m_bucket, 64) and c.kwargs["BLOCK_N"] <= max(triton.next_power_of_2(n), 64)
            and (tma_ok or not c.kwargs["USE_TMA"])
            # persistent with the LayerNorm prologue: 255 registers under Triton 3.6, 72-208 bytes of
            # spills under 3.9 (the non-persistent TMA config stays)
            and not (norm_a and c.kwargs["NUM_PROGS"])]
    return keep or [c for c in configs if not c.kwargs["USE_TMA"]][-1:]


def _set_tma_blocks(nargs) -> None:
    """Autotune pre-hook: a config's tile shape is its descriptors' block shape."""
    if nargs.get("USE_TMA"):
        nargs["X_DESC"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["W_DESC"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _configs(num_sms: int) -> list:
    """sm_90 candidates for bf16/fp16 (from Triton's matmul tutorial's Hopper set), each spill-free
    in the compile sweep (bench/results/sm90-compile-*.json, Triton 3.6 and 3.9): 128×128 with 8
    warps fits with and without NORM_A; 128×256 spilled in the GELU epilogue (160-192 bytes under
    3.6) and was dropped, as were 256×128 and 128×128 with 4 warps. 64×128 is the small-M fallback
    (Q-Former: B·32 rows). The TMA configs load tiles through the copy engine, the persistent ones
    with one program per SM (`num_sms`) walking the tiles; they run only where descriptors can be
    made (16-byte aligned rows), and autotuning judges them against the pointer ones; the persistent
    ones not with the LayerNorm prologue (NORM_A), where they reach the register limit."""
    def c(bm, bn, warps, stages, tma=False, persistent=False, bk=64):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": tma,
                              "NUM_PROGS": num_sms if persistent else 0},
                             num_warps=warps, num_stages=stages, pre_hook=_set_tma_blocks)

    return [c(128, 128, 8, 4), c(128, 128, 8, 3), c(128, 64, 4, 4), c(64, 128, 4, 4),
            c(128, 128, 8, 4, tma=True, persistent=True), c(128, 128, 8, 3, tma=True, persistent=True),
            c(128, 128, 8, 4, tma=True)] + _configs_32()


def _configs_32() -> list:
    """float32 inputs take full-precision FMA products (not tensor cores), whose operand layouts need
    far more registers: 128×128 spilled 1352 bytes (Triton 3.6). These 64×64 tiles with 4 warps do
    not, with or without the LayerNorm prologue (128-192 registers)."""
    out = []
    for bk, w in ((32, 4), (16, 4)):  # (32, 8 warps) spilled 16 bytes under Triton 3.9
        c = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": False, "NUM_PROGS": 0},
                          num_warps=w, num_stages=2, pre_hook=_set_tma_blocks)
        c.fp32_only = True  # a tag, not a kernel argument: the pruning keeps these for float32 alone
        out.append(c)
    return out


_CONFIGS = _configs(132)  # as an H100 / H200 gets them (tests, the compile report)


@functools.lru_cache(maxsize=None)
def _tuned(num_sms: int):
    return triton.autotune(
        _configs(num_sms), key=["m_bucket", "N", "K", "tma_ok", "NORM_A", "HAS_BIAS", "APPROX_TANH"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_linear_gelu_kernel)


# Under TRITON_INTERPRET=1: one fixed configuration (numpy runs one program at a time).
_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4, "USE_TMA": False, "NUM_PROGS": 0}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 3  # interpreted: a notional GPU of 3 SMs, so a persistent program takes several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma_ok(*ts: torch.Tensor) -> bool:
    """Tensor descriptors need a 16-byte aligned base, unit stride along K and 16-byte aligned rows."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in ts)


def launch_args(x2, weight, bias, approximate, *, mean=None, rstd=None, ln_weight=None, ln_bias=None, tma=None):
    """(y, args, meta): the output and `_linear_gelu_kernel`'s runtime arguments and constexprs bar
    the config's; also what bench/sm90_compile.py compiles. tma: make tensor descriptors (default:
    on an sm_90+ GPU where the strides allow them), so configs with USE_TMA can run."""
    M, K = x2.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    norm_a = mean is not None
    if tma is None:
        tma = x2.is_cuda and torch.cuda.get_device_capability(x2.device)[0] >= 9
    tma = bool(tma) and _tma_ok(x2, weight)
    dummy = x2
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        # block shapes are placeholders until a config sets them (_set_tma_blocks)
        x_desc, w_desc = TensorDescriptor.from_tensor(x2, [16, 16]), TensorDescriptor.from_tensor(weight, [16, 16])
    else:
        x_desc = w_desc = dummy
    args = (
        x2, weight, bias if bias is not None else dummy, y,
        mean if norm_a else dummy, rstd if norm_a else dummy,
        ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy, x_desc, w_desc,
        M, N, K, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), bucket(M, 16, 1 << 14),
        int(tma),
    )
    meta = dict(HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", NORM_A=norm_a,
                HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None, DOT_PREC=dot_precision(x2.dtype))
    return y, args, meta


def launch_gemm_gelu(x2, weight, bias, approximate, *, mean=None, rstd=None, ln_weight=None, ln_bias=None,
                     config=None, tma=None):
    """GELU(A @ weightᵀ + bias) for x2 [M, K], A = x2 or (with mean/rstd) LayerNorm(x2). Returns [M, N].

    config: a fixed config dict (tests): BLOCK_M/N/K, GROUP_M, and optionally USE_TMA (descriptors are
    then made, `tma=True`) and NUM_PROGS (> 0: persistent, that many programs)."""
    M, K = x2.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    assert K >= 1 and tuple(weight.shape) == (N, K), (tuple(x2.shape), tuple(weight.shape))
    if config is not None and config.get("USE_TMA"):
        tma = True
    y, args, meta = launch_args(x2, weight, bias, approximate, mean=mean, rstd=rstd, ln_weight=ln_weight,
                                ln_bias=ln_bias, tma=tma)
    if config is not None or interpreting() or not autotuning():
        c, warps, stages = {**_INTERP_CONFIG, **(config or {})}, 4, 2
        if config is None and not interpreting():  # no autotuning: the first candidate the pruning keeps
            best = _prune_configs(_CONFIGS, {"m_bucket": args[-2], "N": N, "tma_ok": args[-1], **meta})[0]
            c, warps, stages = dict(best.kwargs), best.num_warps, best.num_stages
        if c["USE_TMA"]:
            if not args[-1]:
                raise ValueError("a USE_TMA config needs 16-byte aligned rows of x and weight")
            _set_tma_blocks({"X_DESC": args[8], "W_DESC": args[9], **c})
        tiles = triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])
        grid = (min(tiles, c["NUM_PROGS"]) if c["NUM_PROGS"] else tiles,)
        _linear_gelu_kernel[grid](*args, **meta, **c, num_warps=warps, num_stages=stages)
    else:
        def grid(META):
            tiles = triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"])
            return (min(tiles, META["NUM_PROGS"]) if META["NUM_PROGS"] else tiles,)

        _tuned(_num_sms(x2.device))[grid](*args, **meta)
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
