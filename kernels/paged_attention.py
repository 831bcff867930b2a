"""Paged decode attention: one query per sequence over a vLLM-style paged KV cache (flash-decoding).

Spec: `blip2_fast.reference.paged_attention_ref`. Two kernels:
  1. `_paged_attention_split_kernel`, grid (N, H, num_splits): each program walks one partition of
     one sequence's context for one head, gathering keys/values through the block table, and keeps an
     online softmax in fp32. With one split it normalises and writes the output directly; with more it
     writes an unnormalised partial output plus its running max and sum (the log-sum-exp).
  2. `_paged_attention_merge_kernel`, grid (N, H): rescales the partials to a common max and sums them.
Decode reads K and V once and does ~2 FLOPs per byte, so the kernel is bandwidth-bound: splitting the
context exists only to give a small batch (N·H programs < a wave) enough programs to fill the GPU.
Scores are sum(q * k) reductions rather than `tl.dot`: with one query row a dot would pad M to 16
and waste the tensor cores anyway.

Triton software-pipelines only loads that feed `tl.dot`, so this kernel double-buffers by hand: the
next tile's block ids, keys and values are loaded before the current tile is reduced (on sm_90 the
loads of tile i+1 are issued ahead of tile i's arithmetic). Head dims that are not a power of two run
as two power-of-two blocks (80 = 64 + 16, 88 -> 64 + 32; `_common.head_dim_split`), so the tiles
hold 80 of 80 lanes instead of 80 of 128.

The op is registered as `torch.ops.blip2_fast.paged_attention_fwd` with a fake implementation, so
torch.compile traces through it as one opaque node.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, alignment, check_device, head_dim_split, interpreting

_MAX_HEAD_DIM = 256
_MAX_SPLITS = 64
# A split shorter than this costs more in its partial write and the merge than it saves.
_MIN_TOKENS_PER_SPLIT = 256
# Split programs one SM keeps resident at once (8 warps at ~128 registers a thread, the compile
# report's figures for D <= 128: 2 of them fill the register file) and a split's fixed cost in
# tokens' worth of work (its prologue, the partial it writes, its share of the merge): the inputs
# of choose_num_splits' wave model.
_PROGRAMS_PER_SM = 2
_SPLIT_COST_TOKENS = 64


@triton.jit
def _load_kv_tile(
    K_CACHE, V_CACHE, bt_row,  # the caches, and this sequence's block-table row
    tok0, end, h, d1, d2,  # the tile's first token, the partition's end, the head, the dims' offsets
    stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT_D: tl.constexpr,
    BLOCK_D2: tl.constexpr, KV_ALIGN: tl.constexpr,
):
    """Tokens [tok0, tok0 + BLOCK_N) of the partition ending at `end`: K and V as (BLOCK_N, BLOCK_D1)
    and (BLOCK_N, BLOCK_D2) tiles in the cache's dtype (the second pair zeros unless SPLIT_D); lanes
    past `end` are masked off, so a tile wholly past it moves no memory."""
    tok = tok0 + tl.arange(0, BLOCK_N)
    t_mask = tok < end
    blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
    slot = (tok % BLOCK_SIZE).to(tl.int64)
    # Triton only learns 16-divisibility of integer arguments; the hint lets rows whose stride is not
    # a multiple of 16 elements (D=88: stride_kh = 88) still load in 16-byte vectors.
    k_row = tl.multiple_of(blk * stride_kb + slot * stride_ks + h * stride_kh, KV_ALIGN)
    v_row = tl.multiple_of(blk * stride_vb + slot * stride_vs + h * stride_vh, KV_ALIGN)
    m1 = t_mask[:, None] & (d1 < HEAD_DIM)[None, :]
    k1 = tl.load(K_CACHE + k_row[:, None] + d1[None, :] * stride_kd, mask=m1, other=0.0)
    v1 = tl.load(V_CACHE + v_row[:, None] + d1[None, :] * stride_vd, mask=m1, other=0.0)
    if SPLIT_D:
        m2 = t_mask[:, None] & (d2 < HEAD_DIM)[None, :]
        k2 = tl.load(K_CACHE + k_row[:, None] + d2[None, :] * stride_kd, mask=m2, other=0.0)
        v2 = tl.load(V_CACHE + v_row[:, None] + d2[None, :] * stride_vd, mask=m2, other=0.0)
    else:
        k2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=k1.dtype)  # never read
        v2 = k2
    return k1, k2, v1, v2


@triton.jit
def _paged_attention_split_kernel(
    Q,  # queries, (N, H, D), strides (stride_qn, stride_qh, stride_qd)
    K_CACHE,  # paged keys, (num_blocks, block_size, H, D), strides (stride_kb, stride_ks, stride_kh, stride_kd)
    V_CACHE,  # paged values, same shape as K_CACHE, strides (stride_vb, stride_vs, stride_vh, stride_vd)
    BLOCK_TABLES,  # int32 (N, max_blocks): physical block of each logical block, row stride stride_bt
    SEQ_LENS,  # int32 (N,): context length of each sequence
    REL_BIAS,  # HAS_BIAS: additive score bias by distance (H, >= max seq_len), strides (stride_rh, stride_rd)
    OUT,  # SINGLE_SPLIT: output (N, H, D) contiguous, q's dtype; else fp32 partials (N, H, num_splits, D) contiguous, unnormalised
    PART_M,  # fp32 (N, H, num_splits): running max of the scores in log2 units (unused when SINGLE_SPLIT)
    PART_L,  # fp32 (N, H, num_splits): sum of exp2(score - max) (unused when SINGLE_SPLIT)
    qk_scale,  # softmax scale * log2(e): scores go straight to exp2
    num_splits, tokens_per_split,
    stride_qn, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    stride_rh, stride_rd,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block (power of two)
    BLOCK_N: tl.constexpr,  # tokens per loop iteration; may span several cache blocks
    HEAD_DIM: tl.constexpr,  # D; constexpr so the d-mask is known constant over 16-byte vectors (D=80, 88)
    BLOCK_D1: tl.constexpr,  # head dims [0, BLOCK_D1): a power of two, masked past D when it is the only block
    BLOCK_D2: tl.constexpr,  # head dims [BLOCK_D1, BLOCK_D1 + BLOCK_D2) when SPLIT_D, masked past D
    SPLIT_D: tl.constexpr,  # the head dim runs as two blocks
    KV_ALIGN: tl.constexpr,  # a power of two dividing every cache row offset, in elements (16 bytes' worth when possible)
    SINGLE_SPLIT: tl.constexpr,  # num_splits == 1: normalise and write OUT directly
    HAS_BIAS: tl.constexpr,  # add REL_BIAS[h, seq_len - 1 - t] to the score of key t (T5's decoder)
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + n)
    start = split * tokens_per_split
    # The last split runs to the end of the sequence whatever tokens_per_split says, so a wrong
    # max_seq_len hint costs speed, never correctness.
    end = tl.where(split == num_splits - 1, seq_len, tl.minimum(start + tokens_per_split, seq_len))

    d1 = tl.arange(0, BLOCK_D1)
    d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
    q_row = Q + n * stride_qn + h * stride_qh
    q1 = tl.load(q_row + d1 * stride_qd, mask=d1 < HEAD_DIM, other=0.0).to(tl.float32) * qk_scale
    if SPLIT_D:
        q2 = tl.load(q_row + d2 * stride_qd, mask=d2 < HEAD_DIM, other=0.0).to(tl.float32) * qk_scale
    else:
        q2 = tl.zeros([BLOCK_D2], tl.float32)  # never read

    # fp32 scalars (not Python floats), so the loop-carried types match from the first iteration.
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc1 = tl.zeros([BLOCK_D1], tl.float32)
    acc2 = tl.zeros([BLOCK_D2], tl.float32)
    bt_row = BLOCK_TABLES + n.to(tl.int64) * stride_bt
    k1, k2, v1, v2 = _load_kv_tile(K_CACHE, V_CACHE, bt_row, start, end, h, d1, d2, stride_kb, stride_ks, stride_kh,
                                   stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                                   BLOCK_SIZE, BLOCK_N, HEAD_DIM, SPLIT_D, BLOCK_D2, KV_ALIGN)
    for tok0 in range(start, end, BLOCK_N):
        # Double buffering: the next tile's loads go out before this tile's arithmetic.
        nk1, nk2, nv1, nv2 = _load_kv_tile(K_CACHE, V_CACHE, bt_row, tok0 + BLOCK_N, end, h, d1, d2, stride_kb,
                                           stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh,
                                           stride_vd, BLOCK_SIZE, BLOCK_N, HEAD_DIM, SPLIT_D, BLOCK_D2, KV_ALIGN)
        tok = tok0 + tl.arange(0, BLOCK_N)
        t_mask = tok < end
        s = tl.sum(q1[None, :] * k1.to(tl.float32), 1)  # (BLOCK_N,)
        if SPLIT_D:
            s += tl.sum(q2[None, :] * k2.to(tl.float32), 1)
        if HAS_BIAS:
            rb = tl.load(REL_BIAS + h * stride_rh + (seq_len - 1 - tok) * stride_rd, mask=t_mask, other=0.0)
            s += rb.to(tl.float32) * 1.4426950408889634  # log2(e): scores are in log2 units
        s = tl.where(t_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))  # finite: every iteration has at least one valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc1 = acc1 * alpha + tl.sum(p[:, None] * v1.to(tl.float32), 0)
        if SPLIT_D:
            acc2 = acc2 * alpha + tl.sum(p[:, None] * v2.to(tl.float32), 0)
        m_i = m_new
        k1, k2, v1, v2 = nk1, nk2, nv1, nv2

    if SINGLE_SPLIT:
        # An empty context (seq_len 0, a padded batch row) gives zeros, like the reference.
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        o_row = OUT + (n * tl.num_programs(1) + h).to(tl.int64) * HEAD_DIM
        tl.store(o_row + d1, (acc1 * inv).to(OUT.dtype.element_ty), mask=d1 < HEAD_DIM)
        if SPLIT_D:
            tl.store(o_row + d2, (acc2 * inv).to(OUT.dtype.element_ty), mask=d2 < HEAD_DIM)
    else:
        # Empty partitions still write (-inf, 0, zeros) so the merge never reads unwritten memory.
        row = (n * tl.num_programs(1) + h).to(tl.int64) * num_splits + split
        tl.store(OUT + row * HEAD_DIM + d1, acc1, mask=d1 < HEAD_DIM)
        if SPLIT_D:
            tl.store(OUT + row * HEAD_DIM + d2, acc2, mask=d2 < HEAD_DIM)
        tl.store(PART_M + row, m_i)
        tl.store(PART_L + row, l_i)


@triton.jit
def _paged_attention_merge_kernel(
    OUT,  # output (N, H, D) contiguous, q's dtype
    PART_O,  # fp32 partials (N, H, num_splits, D) contiguous, unnormalised
    PART_M,  # fp32 (N, H, num_splits): each partial's max score (log2 units), -inf when empty
    PART_L,  # fp32 (N, H, num_splits): each partial's sum of exp2(score - max)
    num_splits,
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_S: tl.constexpr,  # next power of two >= num_splits
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
):
    row = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)  # n * H + h
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    m = tl.load(PART_M + row * num_splits + s, mask=s_mask, other=float("-inf"))
    l = tl.load(PART_L + row * num_splits + s, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all partitions empty: weights become 0
    w = tl.exp2(m - m_max)  # (BLOCK_S,), 0 for empty partitions
    o = tl.load(PART_O + (row * num_splits + s[:, None]) * HEAD_DIM + d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    denom = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(OUT + row * HEAD_DIM + d, out.to(OUT.dtype.element_ty), mask=d_mask)


_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a notional small GPU, so the split heuristic still splits long contexts
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def choose_num_splits(num_seqs: int, num_heads: int, max_seq_len: int, num_sms: int, block_n: int = 64) -> int:
    """Context partitions per (sequence, head), from a wave model of the GPU: `num_sms` SMs each run
    `_PROGRAMS_PER_SM` split programs at once; s splits give N·H·s programs of ~L/s tokens (whole
    BLOCK_N tiles) plus a fixed cost each, in ceil(N·H·s / slots) waves. The s with the least
    (waves × tokens per program) wins, the smallest on a tie: enough programs to fill every SM, and
    no nearly empty last wave (N·H = 32 on 132 SMs x 2: 8 splits fill 256 of 264 slots in one wave,
    9 would need a second). Each split keeps at least `_MIN_TOKENS_PER_SPLIT` tokens, so short
    contexts never split.
    """
    programs = max(1, num_seqs * num_heads)
    most = min(_MAX_SPLITS, max(1, max_seq_len // _MIN_TOKENS_PER_SPLIT))
    slots = max(1, num_sms * _PROGRAMS_PER_SM)
    best, best_cost = 1, None
    for s in range(1, most + 1):
        tokens = triton.cdiv(triton.cdiv(max(max_seq_len, 1), s), block_n) * block_n
        cost = triton.cdiv(programs * s, slots) * (tokens + _SPLIT_COST_TOKENS)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def _config(head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for the split kernel."""
    if interpreting():
        return 32, 1  # one fixed small config: the interpreter is numpy-backed and its cost is per op
    # Two tiles of K and V live in registers (double buffering). Compiled for sm_90 (bf16): 64 tokens
    # with 8 warps take 80-146 registers at D = 64..128 (4 warps: 170-237, half the programs per SM;
    # 32 tokens with 4 warps spilled at D = 80 and 88 under Triton 3.6); D = 256 halves the tokens.
    return (64 if head_dim <= 128 else 32), 8


def launch_args(q, k_cache, v_cache, block_tables, seq_lens, scale, rel_bias, num_splits, max_seq_len):
    """(out, grid, split_args, split_meta, merge): what `_paged_attention_fwd` launches (merge is None
    for one split, else (grid, args, meta) of the merge kernel); also what bench/sm90_compile.py
    compiles."""
    N, H, D = q.shape
    block_size = k_cache.shape[1]
    out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    if max_seq_len <= 0:
        max_seq_len = block_tables.shape[1] * block_size  # a bound that needs no device sync
    BLOCK_N, num_warps = _config(D)
    if num_splits <= 0:
        num_splits = choose_num_splits(N, H, max_seq_len, _num_sms(q.device), BLOCK_N)
    d1, d2 = head_dim_split(D)
    # Splits are whole BLOCK_N tiles; rounding up may leave fewer splits than asked for.
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_seq_len, 1), num_splits), BLOCK_N) * BLOCK_N
    num_splits = max(1, min(num_splits, triton.cdiv(max_seq_len, tokens_per_split)))
    single = num_splits == 1
    if single:
        part_o, part_m, part_l = out, out, out  # PART_M / PART_L are never touched
    else:
        part_o = torch.empty((N, H, num_splits, D), dtype=torch.float32, device=q.device)
        part_m = torch.empty((N, H, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty((N, H, num_splits), dtype=torch.float32, device=q.device)
    has_bias = rel_bias is not None
    args = (q, k_cache, v_cache, block_tables, seq_lens, rel_bias if has_bias else q, part_o, part_m, part_l,
            scale * math.log2(math.e), num_splits, tokens_per_split,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
            *(rel_bias.stride() if has_bias else (0, 0)))
    meta = dict(BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, HEAD_DIM=D, BLOCK_D1=d1, BLOCK_D2=max(d2, 16),
                SPLIT_D=d2 > 0, KV_ALIGN=alignment(k_cache, v_cache), SINGLE_SPLIT=single, HAS_BIAS=has_bias,
                num_warps=num_warps)
    merge = None
    if not single:
        merge = ((N, H), (out, part_o, part_m, part_l, num_splits),
                 dict(HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(D),
                      num_warps=1 if interpreting() else 4))
    return out, (N, H, num_splits), args, meta, merge


@torch.library.custom_op("blip2_fast::paged_attention_fwd", mutates_args=())
def _paged_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         rel_bias: torch.Tensor | None, num_splits: int, max_seq_len: int) -> torch.Tensor:
    N, H, D = q.shape
    if N == 0 or H == 0:
        return torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    out, grid, args, meta, merge = launch_args(q, k_cache, v_cache, block_tables, seq_lens, scale, rel_bias,
                                               num_splits, max_seq_len)
    _paged_attention_split_kernel[grid](*args, **meta)
    if merge is not None:
        _paged_attention_merge_kernel[merge[0]](*merge[1], **merge[2])
    return out


@_paged_attention_fwd.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, rel_bias, num_splits, max_seq_len):
    return q.new_empty(q.shape)


def _check(name: str, ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(f"paged_attention: {name} {msg}")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, rel_bias: torch.Tensor | None = None, *,
                    max_seq_len: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """softmax(q · kᵀ · scale + bias) · v for one decode query per sequence over its paged KV cache.

    q: [N, H, D] (any strides); k_cache, v_cache: [num_blocks, block_size, H, D], block_size a power
    of two, D <= 256; block_tables: int32 [N, max_blocks], entries past a sequence's length ignored;
    seq_lens: int32 [N], each in [0, max_blocks * block_size] (0 gives zeros). fp16 / bf16 / fp32,
    fp32 accumulation. Returns a new contiguous [N, H, D] tensor in q's dtype.
    rel_bias: optional [H, max_len] additive bias by distance (T5's decoder), any float dtype and
    strides: key j of a length-L sequence gets rel_bias[h, L - 1 - j]; max_len >= max(seq_lens) (not
    checked: that needs a device sync).

    max_seq_len: optional host-side bound on seq_lens (the scheduler knows it) used only to choose
    the split; default block_tables.shape[1] * block_size, which needs no device sync. num_splits:
    force the number of context partitions (tests, benchmarks); default chosen from N·H and
    max_seq_len.
    """
    _check("q", q.dim() == 3, f"must be [N, H, D], got shape {tuple(q.shape)}")
    N, H, D = q.shape
    check_device("q", q)
    _check("q", q.dtype in FLOAT_DTYPES, f"dtype must be float16, bfloat16 or float32, got {q.dtype}")
    _check("q", 1 <= D <= _MAX_HEAD_DIM, f"head dim must be in [1, {_MAX_HEAD_DIM}], got {D}")
    _check("k_cache", k_cache.dim() == 4 and k_cache.shape[2:] == (H, D),
           f"must be [num_blocks, block_size, H={H}, D={D}], got shape {tuple(k_cache.shape)}")
    _check("v_cache", v_cache.shape == k_cache.shape, f"must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    _check("k_cache", k_cache.dtype == q.dtype, f"dtype must match q ({q.dtype}), got {k_cache.dtype}")
    _check("v_cache", v_cache.dtype == q.dtype, f"dtype must match q ({q.dtype}), got {v_cache.dtype}")
    block_size = k_cache.shape[1]
    _check("k_cache", block_size >= 1 and block_size & (block_size - 1) == 0,
           f"block_size (dim 1) must be a power of two, got {block_size}")
    _check("block_tables", block_tables.dim() == 2 and block_tables.shape[0] == N,
           f"must be [N={N}, max_blocks], got shape {tuple(block_tables.shape)}")
    _check("block_tables", block_tables.dtype == torch.int32, f"dtype must be int32, got {block_tables.dtype}")
    _check("block_tables", block_tables.stride(1) == 1 or block_tables.shape[1] <= 1, "must be contiguous along dim 1")
    _check("seq_lens", seq_lens.shape == (N,), f"must be [N={N}], got shape {tuple(seq_lens.shape)}")
    _check("seq_lens", seq_lens.dtype == torch.int32, f"dtype must be int32, got {seq_lens.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        _check(name, t.device == q.device, f"must be on q's device {q.device}, got {t.device}")
    _check("num_splits", num_splits is None or 1 <= num_splits <= 4096, f"must be None or in [1, 4096], got {num_splits}")
    _check("max_seq_len", max_seq_len is None or max_seq_len >= 1, f"must be None or >= 1, got {max_seq_len}")
    if rel_bias is not None:
        _check("rel_bias", rel_bias.dim() == 2 and rel_bias.shape[0] == H,
               f"must be [H={H}, max_len], got shape {tuple(rel_bias.shape)}")
        _check("rel_bias", rel_bias.dtype in FLOAT_DTYPES, f"dtype must be float16, bfloat16 or float32, got {rel_bias.dtype}")
        _check("rel_bias", rel_bias.device == q.device, f"must be on q's device {q.device}, got {rel_bias.device}")
    if seq_lens.stride(0) != 1:
        seq_lens = seq_lens.contiguous()
    return _paged_attention_fwd(q, k_cache, v_cache, block_tables, seq_lens, float(scale), rel_bias,
                                num_splits or 0, max_seq_len or 0)
