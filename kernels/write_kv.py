"""Scatter new keys and values into the paged KV cache, in place (spec: `reference.write_kv_ref`).

One launch writes K and V together: program (t, j) moves token t's heads [j·BLOCK_H, (j+1)·BLOCK_H)
of both tensors to flat slot slot_mapping[t] (block = slot // block_size, offset = slot % block_size).
A negative slot skips the token (padding) with every load and store masked off. Registered as
`torch.ops.blip2_fast.write_kv_fwd` (mutates k_cache and v_cache) with a fake implementation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, alignment, check_device, interpreting

_MAX_HEAD_DIM = 256


@triton.jit
def _write_kv_kernel(
    K,  # new keys, (T, H, D), strides (stride_kt, stride_kh, stride_kd)
    V,  # new values, (T, H, D), strides (stride_vt, stride_vh, stride_vd)
    K_CACHE,  # paged keys, (num_blocks, block_size, H, D), strides (stride_ckb, stride_cks, stride_ckh, stride_ckd)
    V_CACHE,  # paged values, same shape as K_CACHE, strides (stride_cvb, stride_cvs, stride_cvh, stride_cvd)
    SLOT_MAPPING,  # int32 or int64 (T,): flat slot of each token; negative = skip
    num_heads,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ckb, stride_cks, stride_ckh, stride_ckd,
    stride_cvb, stride_cvs, stride_cvh, stride_cvd,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block (power of two)
    BLOCK_H: tl.constexpr,  # heads per program (power of two)
    HEAD_DIM: tl.constexpr,  # D; constexpr so the d-mask is known constant over 16-byte vectors
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM; the tail is masked
    IN_ALIGN: tl.constexpr,  # power of two dividing every K / V row offset, in elements
    CACHE_ALIGN: tl.constexpr,  # the same for the cache rows
):
    t = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(SLOT_MAPPING + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    # The slot test is made tensor-shaped: Triton 3.9's interpreter turns `block_mask & scalar_bool`
    # into an int32 mask and then refuses it. (tl.full, not tl.zeros: see paged_attention._SUM.)
    keep = (tl.full([BLOCK_H, 1], 0, tl.int64) + slot) >= 0
    mask = (hh[:, None] < num_heads) & (d[None, :] < HEAD_DIM) & keep
    # Alignment hints: Triton only learns 16-divisibility of integer arguments (D=88 strides are not).
    k_row = tl.multiple_of(t * stride_kt + hh * stride_kh, IN_ALIGN)
    v_row = tl.multiple_of(t * stride_vt + hh * stride_vh, IN_ALIGN)
    ck_row = tl.multiple_of(blk * stride_ckb + off * stride_cks + hh * stride_ckh, CACHE_ALIGN)
    cv_row = tl.multiple_of(blk * stride_cvb + off * stride_cvs + hh * stride_cvh, CACHE_ALIGN)
    k = tl.load(K + k_row[:, None] + d[None, :] * stride_kd, mask=mask)
    v = tl.load(V + v_row[:, None] + d[None, :] * stride_vd, mask=mask)
    ck = K_CACHE + ck_row[:, None] + d[None, :] * stride_ckd
    cv = V_CACHE + cv_row[:, None] + d[None, :] * stride_cvd
    tl.store(ck, k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(cv, v.to(V_CACHE.dtype.element_ty), mask=mask)


def launch_args(k, v, k_cache, v_cache, slot_mapping):
    """(grid, args, meta): `_write_kv_kernel`'s launch; also what bench/sm90_compile.py compiles."""
    T, H, D = k.shape
    BLOCK_D = triton.next_power_of_2(D)
    if interpreting():
        BLOCK_H, num_warps = triton.next_power_of_2(H), 1  # one fixed config: one program per token
    else:
        # <= 4096 elements per tensor per program: a [32, 128] fp16 tile is 8 KB each of K and V.
        BLOCK_H, num_warps = min(triton.next_power_of_2(H), max(1, 4096 // BLOCK_D)), 4
    args = (k, v, k_cache, v_cache, slot_mapping, H, *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride())
    meta = dict(BLOCK_SIZE=k_cache.shape[1], BLOCK_H=BLOCK_H, HEAD_DIM=D, BLOCK_D=BLOCK_D,
                IN_ALIGN=alignment(k, v), CACHE_ALIGN=alignment(k_cache, v_cache), num_warps=num_warps)
    return (T, triton.cdiv(H, BLOCK_H)), args, meta


@torch.library.custom_op("blip2_fast::write_kv_fwd", mutates_args=("k_cache", "v_cache"))
def _write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    T, H, D = k.shape
    if T == 0 or H == 0:
        return
    grid, args, meta = launch_args(k, v, k_cache, v_cache, slot_mapping)
    _write_kv_kernel[grid](*args, **meta)


@_write_kv.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


def _check(name: str, ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(f"write_kv: {name} {msg}")


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache/v_cache[slot // block_size, slot % block_size] = k/v[t] for each t with slot >= 0, in place.

    k, v: [T, H, D] (any strides, e.g. views of a fused qkv projection); k_cache, v_cache:
    [num_blocks, block_size, H, D], block_size a power of two; slot_mapping: int32/int64 [T], the flat
    slot block * block_size + offset of each token, negative = skip. Values are cast to the cache's
    dtype (fp16 / bf16 / fp32). Slots must be < num_blocks * block_size and distinct (not checked:
    that would need a device sync).
    """
    _check("k", k.dim() == 3, f"must be [T, H, D], got shape {tuple(k.shape)}")
    T, H, D = k.shape
    check_device("k", k)
    _check("v", v.shape == k.shape, f"must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    _check("k_cache", k_cache.dim() == 4 and k_cache.shape[2:] == (H, D),
           f"must be [num_blocks, block_size, H={H}, D={D}], got shape {tuple(k_cache.shape)}")
    _check("v_cache", v_cache.shape == k_cache.shape, f"must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    _check("k", 1 <= D <= _MAX_HEAD_DIM, f"head dim must be in [1, {_MAX_HEAD_DIM}], got {D}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check(name, t.dtype in FLOAT_DTYPES, f"dtype must be float16, bfloat16 or float32, got {t.dtype}")
    block_size = k_cache.shape[1]
    _check("k_cache", block_size >= 1 and block_size & (block_size - 1) == 0,
           f"block_size (dim 1) must be a power of two, got {block_size}")
    _check("slot_mapping", slot_mapping.shape == (T,), f"must be [T={T}], got shape {tuple(slot_mapping.shape)}")
    _check("slot_mapping", slot_mapping.dtype in (torch.int32, torch.int64),
           f"dtype must be int32 or int64, got {slot_mapping.dtype}")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        _check(name, t.device == k.device, f"must be on k's device {k.device}, got {t.device}")
    if slot_mapping.stride(0) != 1:
        slot_mapping = slot_mapping.contiguous()
    _write_kv(k, v, k_cache, v_cache, slot_mapping)
