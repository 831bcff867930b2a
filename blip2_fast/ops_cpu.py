"""Fast CPU implementations built on torch's own fused kernels (bound by `ops` on the CPU only).

    attention: torch's scaled_dot_product_attention, whose CPU kernel tiles the keys with an online
        softmax and never forms the [Sq, Sk] probabilities in memory. Against `attention_ref` on 2
        cores: ViT-g's 8 x 16 heads x 257 x 88 takes 22 ms instead of 57, the 6-head D=64 encoder of
        the CPU benchmark 7 ms instead of 10, a causal 8 x 8 x 40 x 64 prefill 0.4 ms instead of 0.8.

    layer_norm, linear_gelu, ln_linear_gelu: torch's own CPU kernels in the input's dtype. The
        references compute in float32 (weights upcast on every call), which in bfloat16 costs a
        weight copy per call and keeps the GEMM off the bf16 matrix units; here a bf16 GEMM
        accumulates in fp32 and rounds once, then GELU rounds again, as eager bf16 does. In
        float32 they run the same ops as the references.

    write_kv: the reference's scatter (index_copy_); under torch.compile one custom op, so a decode
        step still traces with fullgraph=True: the reference's "any padding slots?" check is
        data-dependent. Bound only where the C++ extension cannot build (its `_ext.write_kv` comes
        first, as `_ext.rms_norm` does before the reference's RMSNorm).

The GPU runs the Triton kernels (kernels/); the specs are in `blip2_fast.reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None):
    """softmax(q kᵀ · scale + bias + masks) v, with `reference.attention_ref`'s semantics.

    q: [B, H, Sq, D]; k, v: [B, H, Sk, D] (any strides). causal is bottom-right aligned (query i sees
    keys j <= i + Sk - Sq). key_padding_mask: [B, Sk], nonzero = keep. bias: additive, broadcastable
    to [B, H, Sq, Sk]; SDPA takes it in q's dtype, so a bf16/fp16 call rounds it there (the reference
    adds it in fp32; eager attention in that dtype rounds it too). A query with no visible key returns
    zeros. Returns [B, H, Sq, D] in q's dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[-1] != k.shape[-1] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"attention: q must be [B, H, Sq, D] and k, v [B, H, Sk, D] alike; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    keep = None  # bool, broadcastable to (B, H, Sq, Sk)
    if causal and Sq != Sk:  # SDPA's is_causal is top-left aligned; ours is bottom-right
        i = torch.arange(Sq, device=q.device)[:, None]
        keep = torch.arange(Sk, device=q.device)[None, :] <= i + (Sk - Sq)  # (Sq, Sk)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Sk):
            raise ValueError(f"attention: key_padding_mask must be [B, Sk] = [{B}, {Sk}], got {tuple(key_padding_mask.shape)}")
        kpm = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Sk)
        keep = kpm if keep is None else keep & kpm
    is_causal = causal and Sq == Sk
    mask = keep
    if bias is not None:
        if is_causal:  # SDPA takes either a mask or is_causal: fold causality into the float mask
            tri = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
            keep = tri if keep is None else keep & tri
            is_causal = False
        bias = bias.to(q.dtype)
        mask = bias if keep is None else torch.where(keep, bias, float("-inf"))  # broadcasts both
    elif is_causal and keep is not None:
        mask, is_causal = keep & torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(), False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    if keep is not None:  # rows with no visible key: zeros, whatever the backend made of -inf rows
        # unconditionally (no data-dependent branch, so torch.compile traces it as one graph)
        out = out.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)  # mask (B or 1, 1, Sq or 1, 1)
    return out


def layer_norm(x, weight, bias, eps, residual=None):
    """`reference.layer_norm_ref`'s semantics (statistics in fp32: torch's CPU kernel accumulates
    half-precision rows in fp32); with `residual`, returns (LayerNorm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual  # rounded once to x's dtype, as the spec keeps it
    y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return (y, x) if residual is not None else y


def linear_gelu(x, weight, bias, approximate="none"):
    """GELU(x @ weightᵀ + bias), `reference.linear_gelu_ref`'s semantics."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def ln_linear_gelu(x, ln_weight, ln_bias, eps, weight, bias, approximate="none"):
    """GELU(LayerNorm(x) @ weightᵀ + bias), `reference.ln_linear_gelu_ref`'s semantics."""
    return linear_gelu(F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps), weight, bias, approximate)


@torch.library.custom_op("blip2_fast::write_kv_cpu", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def _write_kv_cpu(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    reference.write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


@_write_kv_cpu.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """`reference.write_kv_ref`'s semantics, in place: k/v [T, H, D] into the paged caches
    [num_blocks, block_size, H, D] at slot_mapping [T] (negative = skip). Eagerly it is the
    reference itself (the custom op's Python dispatch cost 2.5x the scatter: 49 vs 20 us for a
    decode step's 8 rows); under torch.compile it is one opaque op, since the padding check is
    data-dependent."""
    if torch.compiler.is_compiling():
        _write_kv_cpu(k, v, k_cache, v_cache, slot_mapping)
    else:
        reference.write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
