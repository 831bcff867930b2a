"""PyTorch's best path for every op with a GPU kernel of ours: what tactic choice times it against.

Each function has its op's semantics (`blip2_fast.reference`, the spec) and runs on any device on
torch's own kernels in the input's dtype (on a GPU: SDPA's flash / memory-efficient kernels, cuBLAS,
torch's fused norms). `blip2_fast.tactics` times them against our Triton / CUDA kernels per shape
class at first use and binds whichever is faster, so a fast op is never slower than this path.

    attention, layer_norm, linear_gelu, ln_linear_gelu: the CPU's fast implementations
        (`blip2_fast.ops_cpu`), which are plain torch and device-agnostic.
    cross_attention: SDPA with the key padding mask.
    paged_attention: gather the block tables' keys and values into [N, H, L, D], then SDPA.
    rms_norm: F.rms_norm where it rounds as the spec does, else the reference's vector passes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops_cpu, reference

attention = ops_cpu.attention
layer_norm = ops_cpu.layer_norm
linear_gelu = ops_cpu.linear_gelu
ln_linear_gelu = ops_cpu.ln_linear_gelu


def cross_attention(q, k, v, *, key_padding_mask=None, scale=None):
    """`reference.cross_attention_ref`'s semantics through SDPA: q [B, H, Nq, D] over k, v [B, H, Nk, D];
    key_padding_mask [B, Nk] (nonzero = keep); a query whose keys are all masked gets zeros."""
    return ops_cpu.attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, rel_bias=None):
    """`reference.paged_attention_ref`'s semantics as a gather + SDPA in the cache's dtype.

    Every sequence is gathered to the block table's full width L = max_blocks · block_size (what a
    contiguous cache would hold), and slots past a sequence's length are zeroed: they may hold
    anything, NaN included, and SDPA's masked score would still multiply a NaN value by 0.
    """
    N, H, D = q.shape
    block_size = k_cache.shape[1]
    L = block_tables.shape[1] * block_size
    idx = block_tables.long()
    live = torch.arange(L, device=q.device)[None, :] < seq_lens.long()[:, None]  # (N, L)
    keep = live[:, None, :, None]  # (N, 1, L, 1)
    k = torch.where(keep, k_cache[idx].view(N, L, H, D).transpose(1, 2), 0)  # (N, H, L, D)
    v = torch.where(keep, v_cache[idx].view(N, L, H, D).transpose(1, 2), 0)
    if rel_bias is None:
        mask = live[:, None, None, :]  # (N, 1, 1, L)
    else:
        j = torch.arange(L, device=q.device)
        dist = (seq_lens.long()[:, None] - 1 - j).clamp(0, rel_bias.shape[1] - 1)  # (N, L): L-1-j of key j
        b = rel_bias.to(q.dtype)[:, dist].permute(1, 0, 2)  # (N, H, L)
        mask = torch.where(live[:, None, :], b, float("-inf"))[:, :, None, :]  # (N, H, 1, L)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale)  # (N, H, 1, D)
    out = out.masked_fill(~live.any(dim=1)[:, None, None, None], 0.0)  # an empty context gives zeros
    return out[:, :, 0]


def rms_norm(x, weight, eps, residual=None):
    """`reference.rms_norm_ref`'s semantics. With x and weight in one dtype, F.rms_norm (one fused
    kernel on a GPU, float32 statistics; it rounds the product once where the spec rounds the
    normalised row to the weight's dtype first, a difference below that dtype's rounding); with
    mixed dtypes (T5's float16 scheme) the reference."""
    if weight.dtype != x.dtype:
        return reference.rms_norm_ref(x, weight, eps, residual)
    if residual is not None:
        x = x + residual  # rounded once to x's dtype, as the spec keeps it
    y = F.rms_norm(x, x.shape[-1:], weight, eps)
    return (y, x) if residual is not None else y
