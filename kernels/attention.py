"""Fused attention forward (FlashAttention-2 style) for ViT-g, Q-Former, OPT and T5.

One program owns a BLOCK_M tile of queries of one (batch, head); K and V stream through in BLOCK_N
tiles with an online softmax in the exp2 domain and float32 accumulation, so the Sq×Sk score matrix
never reaches memory. Same semantics as `blip2_fast.reference.attention_ref`.

Head dims that are not a power of two run as two power-of-two blocks (`_common.head_dim_split`):
ViT-g's 88 as 64 + 32 (96 wide: 25% fewer multiply-adds than padding to 128), OPT's 80 as 64 + 16
(exact), each product a sum of two dots. Without causality the key loop is one pipelined loop;
when Sk is not a multiple of BLOCK_N (ViT-g's 257) its tail is masked inside that loop instead of
running as a separate, unpipelined iteration after it.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (alignment, autotuning, bucket, check_device, check_float, dot_precision, head_dim_split,
                      interpreting)

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_block(
    acc1, acc2, l_i, m_i,  # running output halves (BLOCK_M, BLOCK_D1/2) f32, row sums and row maxima (BLOCK_M,) f32
    q1, q2,  # the query tile's head-dim blocks, (BLOCK_M, BLOCK_D1/2), in the input dtype (q2 unused unless SPLIT_D)
    k_base, v_base,  # K and V of this (batch, head): pointers to element (0, 0) of a (Sk, D) matrix
    kpm_base,  # key padding mask row of this batch, (Sk,); unused unless HAS_KPM
    bias_base,  # bias of this (batch, head) at query row 0, (Sq, Sk); unused unless HAS_BIAS
    start_n, offs_m, offs_n0, offs_d1, offs_d2,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_bm, stride_bn,
    Sq, Sk, qk_scale,
    HEAD_DIM: tl.constexpr, SPLIT_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,  # apply the bottom-right causal mask in this block
    MASK_N: tl.constexpr,  # the block may run past Sk
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = start_n + offs_n0
    n_ok = offs_n < Sk
    d1_ok = offs_d1 < HEAD_DIM
    d2_ok = offs_d2 < HEAD_DIM
    if MASK_N:
        kt1_mask = d1_ok[:, None] & n_ok[None, :]
        v1_mask = n_ok[:, None] & d1_ok[None, :]
        kt2_mask = d2_ok[:, None] & n_ok[None, :]
        v2_mask = n_ok[:, None] & d2_ok[None, :]
    else:
        kt1_mask = d1_ok[:, None]
        v1_mask = d1_ok[None, :]
        kt2_mask = d2_ok[:, None]
        v2_mask = d2_ok[None, :]
    kt1 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d1[:, None] * stride_kd, mask=kt1_mask, other=0.0)
    s = tl.dot(q1, kt1, input_precision=DOT_PREC)
    if SPLIT_D:
        kt2 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d2[:, None] * stride_kd, mask=kt2_mask, other=0.0)
        s = tl.dot(q2, kt2, s, input_precision=DOT_PREC)
    s = s * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
    if HAS_BIAS:
        b_mask = (offs_m[:, None] < Sq) & n_ok[None, :]
        b = tl.load(bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=b_mask, other=0.0)
        s += b.to(tl.float32) * 1.4426950408889634
    if HAS_KPM:
        keep = tl.load(kpm_base + offs_n * stride_mn, mask=n_ok, other=0) != 0
        s = tl.where(keep[None, :], s, float("-inf"))
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    if IS_CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None] + (Sk - Sq), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v1 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d1[None, :] * stride_vd, mask=v1_mask, other=0.0)
    p = p.to(v1.dtype)
    acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
    if SPLIT_D:
        v2 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d2[None, :] * stride_vd, mask=v2_mask, other=0.0)
        acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=DOT_PREC)
    return acc1, acc2, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q,  # queries, (B, H, Sq, D), any strides
    K,  # keys, (B, H, Sk, D), any strides
    V,  # values, (B, H, Sk, D), any strides
    O,  # output, (B, H, Sq, D), contiguous, q's dtype
    KPM,  # key padding mask, (B, Sk), nonzero = keep; a dummy pointer unless HAS_KPM
    BIAS,  # additive bias expanded to (B, H, Sq, Sk) (stride 0 on broadcast dims); dummy unless HAS_BIAS
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, Sq, Sk,
    qk_scale,  # softmax scale · log2(e)
    q_bucket, k_bucket,  # power-of-two buckets of Sq, Sk: autotune keys only
    HEAD_DIM: tl.constexpr,  # D
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for float32 inputs, else "tf32" (ignored for 16-bit operands)
    ALIGN: tl.constexpr,  # elements (<= 16 bytes) dividing every q/k/v/o batch/head offset and row stride
    BIAS_ALIGN: tl.constexpr,  # the same for the bias' offsets and row stride
    EVEN_N: tl.constexpr,  # Sk % BLOCK_N == 0: no key tile runs past Sk
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr,  # head dims [0, BLOCK_D1): a power of two; masked past D when it is the only block
    BLOCK_D2: tl.constexpr,  # head dims [BLOCK_D1, BLOCK_D1 + BLOCK_D2) when SPLIT_D, the tail masked past D
    SPLIT_D: tl.constexpr,  # the head dim runs as two blocks (D = 80: 64 + 16, 88: 64 + 32)
):
    # One flat grid axis, query tiles fastest: the tiles of one head run together (K/V stay in L2)
    # and B·H is not limited to the 65535 of grid axes 1 and 2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d1 = tl.arange(0, BLOCK_D1)
    offs_d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
    q_off = off_b * stride_qb + off_h * stride_qh
    k_off = off_b * stride_kb + off_h * stride_kh
    v_off = off_b * stride_vb + off_h * stride_vh
    o_off = off_b * stride_ob + off_h * stride_oh
    bias_off = off_b * stride_bb + off_h * stride_bh
    if ALIGN > 1:
        # Triton proves alignment only for integer arguments divisible by 16; D = 88 strides (88,
        # 257·88) are multiples of 8, and without proof every tile load is scalar and cp.async
        # cannot pipeline them (compiled for sm_90: 255 registers + spills, no async copies; with
        # this: 16-byte cp.async, 3 stages, 182 registers). tl.multiple_of on scalars did not
        # take; `x // A * A` states the same fact. The host checked these are multiples of ALIGN.
        q_off = q_off // ALIGN * ALIGN
        k_off = k_off // ALIGN * ALIGN
        v_off = v_off // ALIGN * ALIGN
        o_off = o_off // ALIGN * ALIGN
        stride_qm = stride_qm // ALIGN * ALIGN
        stride_kn = stride_kn // ALIGN * ALIGN
        stride_vn = stride_vn // ALIGN * ALIGN
        stride_om = stride_om // ALIGN * ALIGN
    if BIAS_ALIGN > 1:
        bias_off = bias_off // BIAS_ALIGN * BIAS_ALIGN
        stride_bm = stride_bm // BIAS_ALIGN * BIAS_ALIGN
    q_base = Q + q_off
    k_base = K + k_off
    v_base = V + v_off
    kpm_base = KPM + off_b * stride_mb
    bias_base = BIAS + bias_off

    m_ok = offs_m < Sq
    q1 = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d1[None, :] * stride_qd,
                 mask=m_ok[:, None] & (offs_d1 < HEAD_DIM)[None, :], other=0.0)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    if SPLIT_D:
        q2 = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d2[None, :] * stride_qd,
                     mask=m_ok[:, None] & (offs_d2 < HEAD_DIM)[None, :], other=0.0)
    else:
        q2 = acc2.to(q1.dtype)  # never read
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    if IS_CAUSAL:
        # Keys [0, full_end) are in bounds and visible to every row of the tile: no per-element
        # masks there. Keys [full_end, hi) need the bounds and causal masks; past hi nothing is visible.
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M + (Sk - Sq))
        hi = tl.maximum(hi, 0)
        full_end = tl.minimum(tl.maximum(pid_m * BLOCK_M + (Sk - Sq) + 1, 0), hi)
        full_end = (full_end // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc1, acc2, l_i, m_i = _attn_fwd_block(
                acc1, acc2, l_i, m_i, q1, q2, k_base, v_base, kpm_base, bias_base, start_n, offs_m, offs_n0,
                offs_d1, offs_d2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_bm, stride_bn,
                Sq, Sk, qk_scale, HEAD_DIM, SPLIT_D, False, False, HAS_KPM, HAS_BIAS, DOT_PREC, BLOCK_N)
        for start_n in range(full_end, hi, BLOCK_N):
            acc1, acc2, l_i, m_i = _attn_fwd_block(
                acc1, acc2, l_i, m_i, q1, q2, k_base, v_base, kpm_base, bias_base, start_n, offs_m, offs_n0,
                offs_d1, offs_d2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_bm, stride_bn,
                Sq, Sk, qk_scale, HEAD_DIM, SPLIT_D, True, True, HAS_KPM, HAS_BIAS, DOT_PREC, BLOCK_N)
    else:
        # One loop over every key tile, the ragged last one masked in place: it is then pipelined
        # with the rest (its loads issued while the tile before it is reduced).
        for start_n in range(0, Sk, BLOCK_N):
            acc1, acc2, l_i, m_i = _attn_fwd_block(
                acc1, acc2, l_i, m_i, q1, q2, k_base, v_base, kpm_base, bias_base, start_n, offs_m, offs_n0,
                offs_d1, offs_d2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_bm, stride_bn,
                Sq, Sk, qk_scale, HEAD_DIM, SPLIT_D, False, not EVEN_N, HAS_KPM, HAS_BIAS, DOT_PREC, BLOCK_N)

    # A row that saw no key has l = 0 and acc = 0: it outputs zeros, as the reference does.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o_rows = O + o_off + offs_m[:, None] * stride_om
    tl.store(o_rows + offs_d1[None, :], (acc1 / l_safe[:, None]).to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d1 < HEAD_DIM)[None, :])
    if SPLIT_D:
        tl.store(o_rows + offs_d2[None, :], (acc2 / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_d2 < HEAD_DIM)[None, :])


# sm_90 candidates, each kept only where the compile sweep (bench/sm90_compile.py, Triton 3.6 and
# 3.9, bf16) found it spill-free. BLOCK_M=64 may win when Sq is just past a multiple of 128 (ViT-g's
# 257 queries: 5 tiles of 64 waste 20% of rows, 3 of 128 waste 33%); 128×64 with 8 warps is the FA2
# default. 32-row tiles are for the Q-Former's 32 queries: 32×64 only up to 64-wide heads (at D=80
# causal it needs 255 registers and spilled 8 bytes), 32×32 above. Past 128-wide heads only 64×64
# with 8 warps and 32×32 stay out of spills.
_CONFIGS_16 = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
]
# float32 inputs take full-precision (FMA, not tensor-core) products, whose operand layouts need far
# more registers: every 16-bit config above spilled kilobytes at D=88. These do not: 32×32 with 4
# warps up to 128-wide heads (144 registers), 16×32 with 8 warps past them.
_CONFIGS_32 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]
_CONFIGS = _CONFIGS_16 + _CONFIGS_32
_WIDE_OK = (_CONFIGS_16[5], _CONFIGS_16[7])  # the 16-bit configs kept past 128-wide heads


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    q_bucket = args["q_bucket"]
    block_d = args["BLOCK_D"] if "BLOCK_D" in args else args["BLOCK_D1"] + args["BLOCK_D2"] * bool(args["SPLIT_D"])
    dtype = args["dtype"] if "dtype" in args else (args["Q"].dtype if "Q" in args else torch.bfloat16)
    fp32 = dtype == torch.float32
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if any(c is x for x in _CONFIGS_32) != fp32:  # identity: Configs compare equal by value
            continue
        if bm > max(q_bucket, 32):  # a tile mostly past Sq (Q-Former's 32 queries, decode)
            continue
        if fp32:
            if (block_d > 128) != (bm == 16):  # 16×32 spilled 8 bytes at D=88; 32×32 spills past 128
                continue
        elif block_d > 128:
            if not any(c is w for w in _WIDE_OK):
                continue
        elif bm == 32 and (bn == 64) != (block_d <= 64):
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_attn_fwd_tuned = triton.autotune(
    _CONFIGS, key=["q_bucket", "k_bucket", "HEAD_DIM", "IS_CAUSAL", "HAS_KPM", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(triton.heuristics({"EVEN_N": lambda a: a["Sk"] % a["BLOCK_N"] == 0})(_attn_fwd_kernel))

# Under TRITON_INTERPRET=1 (numpy, one program at a time) fewer, larger numpy ops are faster and
# autotuning would be pointless: one fixed small configuration.
_INTERP_BLOCKS = (32, 32)


def untuned_config(q_dtype: torch.dtype, Sq: int, D: int, causal: bool, has_kpm: bool, has_bias: bool):
    """The config launched without autotuning (BLIP2_FAST_AUTOTUNE=0, the tests): of the candidates
    the pruning keeps for the shape class, the first with the fewest padded query rows (ViT-g's 257
    queries: five 64-row tiles, 320 rows, not three 128-row ones, 384), among tiles of at least 64
    rows past 32 queries (a warpgroup's wgmma takes 64; 32-row tiles fall back to mma.sync)."""
    d1, d2 = head_dim_split(D)
    kept = _prune_configs(_CONFIGS, {"q_bucket": bucket(Sq), "BLOCK_D": d1 + d2, "HEAD_DIM": D,
                                     "IS_CAUSAL": causal, "HAS_KPM": has_kpm, "HAS_BIAS": has_bias,
                                     "dtype": q_dtype})
    wide = [c for c in kept if c.kwargs["BLOCK_M"] >= 64]
    kept = wide if Sq > 32 and wide else kept
    return min(kept, key=lambda c: triton.cdiv(Sq, c.kwargs["BLOCK_M"]) * c.kwargs["BLOCK_M"])


def launch_args(q, k, v, key_padding_mask, bias, causal, scale):
    """(o, args, meta): the output and `_attn_fwd_kernel`'s runtime arguments and constexprs bar the
    config's (EVEN_N, BLOCK_M, BLOCK_N); also what bench/sm90_compile.py compiles."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    o = torch.empty((B, H, Sq, D), dtype=q.dtype, device=q.device)
    if key_padding_mask is not None:
        kpm, s_mb, s_mn = key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1)
    else:
        kpm, s_mb, s_mn = q, 0, 0  # never read
    if bias is not None:
        bias_e = bias.expand(B, H, Sq, Sk)  # broadcast dims get stride 0; no copy
        bias_strides = bias_e.stride()
    else:
        bias_e, bias_strides = q, (0, 0, 0, 0)
    d1, d2 = head_dim_split(D)
    args = (
        q, k, v, o, kpm, bias_e,
        *q.stride(), *k.stride(), *v.stride(), *o.stride()[:3], s_mb, s_mn, *bias_strides,
        H, Sq, Sk, scale * LOG2E, bucket(Sq), bucket(Sk),
    )
    meta = dict(HEAD_DIM=D, IS_CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None,
                HAS_BIAS=bias is not None, DOT_PREC=dot_precision(q.dtype),
                ALIGN=alignment(q, k, v, o), BIAS_ALIGN=alignment(bias_e) if bias is not None else 1,
                BLOCK_D1=d1, BLOCK_D2=max(d2, 16), SPLIT_D=d2 > 0)
    return o, args, meta


def _attention_impl(q, k, v, key_padding_mask, bias, causal, scale, block_m=None, block_n=None):
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    o, args, meta = launch_args(q, k, v, key_padding_mask, bias, causal, scale)
    if o.numel() == 0:
        return o
    if block_m is not None or interpreting() or not autotuning():
        warps, stages = 4, 2
        if block_m is not None:
            bm, bn = block_m, block_n
        elif interpreting():
            bm, bn = _INTERP_BLOCKS
        else:
            c = untuned_config(q.dtype, Sq, D, bool(causal), key_padding_mask is not None, bias is not None)
            bm, bn, warps, stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        grid = (triton.cdiv(Sq, bm) * B * H,)
        _attn_fwd_kernel[grid](*args, **meta, EVEN_N=Sk % bn == 0, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                               num_stages=stages)
    else:
        grid = lambda META: (triton.cdiv(Sq, META["BLOCK_M"]) * B * H,)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **meta)
    return o


@torch.library.custom_op("blip2_fast::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                  bias: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    return _attention_impl(q, k, v, key_padding_mask, bias, causal, scale)


@attention_fwd.register_fake
def _(q, k, v, key_padding_mask, bias, causal, scale):
    B, H, Sq, D = q.shape
    return q.new_empty((B, H, Sq, D))


def _check_args(q, k, v, key_padding_mask, bias):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d tensor [B, H, S, D], got {shape}")
        check_float(name, t)
        check_device(name, t)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    if tuple(k.shape) != (B, H, Sk, D):
        raise ValueError(f"k must be [B, H, Sk, D] = [{B}, {H}, Sk, {D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must be [B, H, Sk, D] = {list(k.shape)} like k, got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim D must be in 1..256, got D={D} (q {tuple(q.shape)})")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != (B, Sk):
            got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
            raise ValueError(f"key_padding_mask must be [B, Sk] = [{B}, {Sk}], got {got}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on {q.device}, got {key_padding_mask.device}")
        if key_padding_mask.dtype.is_complex:
            raise ValueError(f"key_padding_mask must be bool, integer or float, got {key_padding_mask.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() > 4:
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be broadcastable to [B, H, Sq, Sk] = [{B}, {H}, {Sq}, {Sk}], got {got}")
        full = (1,) * (4 - bias.dim()) + tuple(bias.shape)
        if any(b not in (1, t) for b, t in zip(full, (B, H, Sq, Sk))):
            raise ValueError(f"bias must be broadcastable to [B, H, Sq, Sk] = [{B}, {H}, {Sq}, {Sk}], got {tuple(bias.shape)}")
        check_float("bias", bias)
        if bias.device != q.device:
            raise ValueError(f"bias must be on {q.device}, got {bias.device}")


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None):
    """softmax(q kᵀ · scale + bias + masks) v, fused; the semantics of `attention_ref`.

    q: [B, H, Sq, D]; k, v: [B, H, Sk, D]; any strides (e.g. views of one fused qkv projection), one
    dtype (float16, bfloat16 or float32), D <= 256. causal: bottom-right aligned (query i sees keys
    j <= i + Sk - Sq). key_padding_mask: [B, Sk], nonzero = keep. bias: additive, broadcastable to
    [B, H, Sq, Sk] (e.g. [1, H, Sq, Sk], T5's relative positions), any float dtype. scale defaults to
    D**-0.5. A query row with no visible key returns zeros. Returns [B, H, Sq, D], contiguous, q's dtype.
    """
    _check_args(q, k, v, key_padding_mask, bias)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return torch.ops.blip2_fast.attention_fwd(q, k, v, key_padding_mask, bias, bool(causal), scale)
