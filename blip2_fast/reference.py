"""Reference implementations of every hot op: the spec and the correctness oracle.

Each function is short, eager PyTorch, computes in float32 (float64 inputs stay float64) and returns
the input's dtype. The fast implementations in `blip2_fast.kernels` and the C++/CUDA extension must
agree with these; tests compare both against a float64 run of the same function.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    # float64 stays float64 so the tests can use these functions as the float64 oracle too.
    return x if x.dtype == torch.float64 else x.float()


def attention_ref(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None):
    """softmax(q kᵀ · scale + bias + masks) v.

    q: [B, H, Sq, D]; k, v: [B, H, Sk, D] (any strides). causal is bottom-right aligned: query i may
    see keys j <= i + (Sk - Sq), so a single decode query sees every key. key_padding_mask: [B, Sk],
    nonzero/True = keep. bias: additive, broadcastable [1 or B, H, Sq, Sk] (T5's relative positions).
    A query row with no visible key returns zeros (not NaN). Returns [B, H, Sq, D] in q's dtype.
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    s = torch.matmul(_acc(q), _acc(k).transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if bias is not None:
        s = s + _acc(bias)
    if not causal and key_padding_mask is None:
        return torch.matmul(torch.softmax(s, dim=-1), _acc(v)).to(q.dtype)
    keep = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        keep = keep & (j <= i + (Sk - Sq))
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.bool()[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: softmax gives NaN -> 0
    return torch.matmul(p, _acc(v)).to(q.dtype)


def cross_attention_ref(q, k, v, *, key_padding_mask=None, scale=None):
    """Q-Former cross-attention: queries [B, H, Nq, D] over image patches k, v [B, H, Nk, D].

    key_padding_mask [B, Nk] (1 = keep). Same semantics as `attention_ref` without causality; a fully
    masked row returns zeros.
    """
    return attention_ref(q, k, v, key_padding_mask=key_padding_mask, scale=scale)


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, rel_bias=None):
    """One decode query per sequence over its paged KV cache.

    q: [N, H, D]; k_cache, v_cache: [num_blocks, block_size, H, D]; block_tables: int32 [N, max_blocks]
    (entries past a sequence's length are ignored); seq_lens: int32 [N], each >= 1. Token t of
    sequence n lives at block block_tables[n, t // block_size], slot t % block_size. Returns [N, H, D].
    rel_bias: optional [H, max_len] additive bias by distance (T5's decoder): the score of key j of a
    sequence of length L (its query sits at position L - 1) gets rel_bias[h, L - 1 - j].
    """
    N, H, D = q.shape
    block_size = k_cache.shape[1]
    L = block_tables.shape[1] * block_size  # every sequence gathered to the table's full width
    idx = block_tables.long()
    k = k_cache[idx].view(N, L, H, D).transpose(1, 2)  # (N, H, L, D)
    v = v_cache[idx].view(N, L, H, D).transpose(1, 2)
    s = torch.matmul(_acc(q).unsqueeze(2), _acc(k).transpose(-1, -2)).squeeze(2) * scale  # (N, H, L)
    j = torch.arange(L, device=q.device)
    lens = seq_lens.long()[:, None]
    if rel_bias is not None:
        dist = (lens - 1 - j).clamp(0, rel_bias.shape[1] - 1)  # (N, L): distance L-1-j of key j
        s = s + _acc(rel_bias)[:, dist].permute(1, 0, 2)  # (N, H, L)
    dead = (j >= lens)[:, None, :]  # (N, 1, L): slots past a sequence's length hold anything, NaN included
    p = torch.softmax(s.masked_fill(dead, float("-inf")), dim=-1).masked_fill(dead, 0.0)
    v = _acc(v).masked_fill(dead[..., None], 0.0)
    return torch.matmul(p.unsqueeze(2), v).squeeze(2).to(q.dtype)  # (N, H, D)


def write_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    """Scatter new keys/values into the paged cache, in place.

    k, v: [T, H, D]; k_cache, v_cache: [num_blocks, block_size, H, D]; slot_mapping: int [T], the flat
    slot (block * block_size + offset) of each token; a negative slot means "skip this token" (padding).
    """
    num_blocks, block_size, H, D = k_cache.shape
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):  # padding tokens: drop them (the common decode step has none)
        slots, k, v = slots[keep], k[keep], v[keep]
    k_cache.view(num_blocks * block_size, H, D).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, H, D).index_copy_(0, slots, v.to(v_cache.dtype))


def layer_norm_ref(x, weight, bias, eps, residual=None):
    """LayerNorm over the last dim with float32 statistics.

    With `residual`, returns (LayerNorm(x + residual), x + residual); the sum is kept in x's dtype
    (rounded once) so that the next block's residual matches an unfused model.
    """
    if residual is not None:
        x = x + residual
    y = F.layer_norm(_acc(x), x.shape[-1:], _acc(weight) if weight is not None else None,
                     _acc(bias) if bias is not None else None, eps).to(x.dtype)
    return (y, x) if residual is not None else y


def rms_norm_ref(x, weight, eps, residual=None):
    """T5-style RMSNorm: x / sqrt(mean(x²) + eps) * weight, statistics in float32, no mean removal.

    With `residual`, returns (RMSNorm(x + residual), x + residual).
    """
    if residual is not None:
        x = x + residual
    xf = _acc(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # T5 casts back to the weight's dtype before scaling (it matters in half precision).
    y = (_acc(weight) * y.to(weight.dtype)).to(x.dtype)
    return (y, x) if residual is not None else y


def gelu_ref(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    return F.gelu(x)


def linear_gelu_ref(x, weight, bias, approximate="none"):
    """GELU(x @ weightᵀ + bias). x [..., K], weight [N, K], bias [N] or None. approximate: "none" (erf) or "tanh"."""
    y = F.linear(_acc(x), _acc(weight), _acc(bias) if bias is not None else None)
    return gelu_ref(y, approximate).to(x.dtype)


_ACTIVATIONS = ("none", "relu", "gelu")


def linear_ref(x, weight, bias=None, activation="none"):
    """act(x @ weightᵀ + bias): x [..., K], weight [N, K], bias [N] or None -> [..., N] in x's dtype.

    activation: "none", "relu" or "gelu" (exact, erf). The decode step's linear layers; on a CPU the
    fast implementation streams a prepacked weight (`blip2_fast.linear_cpu.PackedLinear`).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    y = F.linear(_acc(x), _acc(weight), _acc(bias) if bias is not None else None)
    y = F.relu(y) if activation == "relu" else gelu_ref(y) if activation == "gelu" else y
    return y.to(x.dtype)


class LinearRef:
    """The `linear` op's reference in the registry's prepared form: `LinearRef(weight, bias)(x, activation)`
    is `linear_ref(x, weight, bias, activation)` (the fast form packs the weight once, at load)."""

    def __init__(self, weight, bias=None):
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def __call__(self, x, activation="none"):
        return linear_ref(x, self.weight, self.bias, activation)


def opt_decode_block_ref(x, ln1, qkv, out_proj, ln2, fc1, fc2, k_cache, v_cache, slot_mapping, block_tables,
                         seq_lens, heads, eps, activation="relu"):
    """One pre-LayerNorm OPT decoder layer at a decode step: x [N, E] (one new token per sequence) ->
    [N, E], writing the token's K/V into the paged caches at `slot_mapping` and attending over each
    sequence's cache (`block_tables`, `seq_lens` counting the new token), as `paged_attention_ref`.

    ln1, ln2: LayerNorm (weight, bias), (None, None) when not affine; qkv, out_proj, fc1, fc2: the
    registry's prepared linears, `lin(x, activation)` (LinearRef or PackedLinear): qkv [3E, E] with
    q's rows pre-scaled by head_dim**-0.5 (OPT scales q after its projection; the model folds it in);
    fc1 [ffn, E] with `activation` ("relu" or "gelu"), fc2 [E, ffn].
    """
    N, E = x.shape
    h = layer_norm_ref(x, *ln1, eps)
    q, k, v = qkv(h).view(N, 3, heads, E // heads).unbind(1)  # [N, 3E] -> 3 x [N, H, D]
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    a = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, 1.0)  # (N, H, D)
    x = x + out_proj(a.reshape(N, E))
    return x + fc2(fc1(layer_norm_ref(x, *ln2, eps), activation))


def t5_decode_block_ref(x, delta, ln_sa, qkv, o, ln_ca, q, o_cross, ln_ff, wi0, wi1, wo, k_cache, v_cache,
                        slot_mapping, block_tables, seq_lens, rel_bias, cross_k, cross_v, cross_block_tables,
                        cross_seq_lens, heads, eps, activation="gelu_tanh"):
    """One T5 decoder layer at a decode step -> (its output [N, d], the residual stream [N, d]).

    x [N, d]: the residual stream; delta: the previous layer's output, added to x first (None for the
    first layer). ln_*: RMSNorm weights; qkv, o, q, o_cross, wi0, wi1, wo: the registry's prepared
    linears without biases, `lin(x, activation)`: qkv [3 inner, d] (T5 does not scale its scores), q
    the cross-attention's [inner, d], wi1 None unless the feed-forward is gated. Self-attention writes
    the token's K/V at slot_mapping and attends with rel_bias [H, max_len] (`paged_attention_ref`);
    cross-attention reads the encoder's cached K/V (cross_k, cross_v, cross_block_tables,
    cross_seq_lens). activation: "relu", "gelu" (erf) or "gelu_tanh" (Flan-T5's gelu_new).
    """
    N = x.shape[0]
    inner = qkv.out_features // 3
    dk = inner // heads
    if delta is None:
        h = rms_norm_ref(x, ln_sa, eps)
    else:
        h, x = rms_norm_ref(delta, ln_sa, eps, x)
    qs, k, v = qkv(h).view(N, 3, heads, dk).unbind(1)  # [N, 3 inner] -> 3 x [N, H, dk]
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    a = paged_attention_ref(qs, k_cache, v_cache, block_tables, seq_lens, 1.0, rel_bias)  # (N, H, dk)
    h, x = rms_norm_ref(o(a.reshape(N, inner)), ln_ca, eps, x)
    a = paged_attention_ref(q(h).view(N, heads, dk), cross_k, cross_v, cross_block_tables, cross_seq_lens, 1.0)
    h, x = rms_norm_ref(o_cross(a.reshape(N, inner)), ln_ff, eps, x)
    g = gelu_ref(wi0(h), "tanh") if activation == "gelu_tanh" else wi0(h, activation)
    if wi1 is not None:
        g = g * wi1(h)
    return wo(g), x


def ln_linear_gelu_ref(x, ln_weight, ln_bias, eps, weight, bias, approximate="none"):
    """GELU(LayerNorm(x) @ weightᵀ + bias): the ViT MLP's layer_norm2 → fc1 → GELU."""
    h = F.layer_norm(_acc(x), x.shape[-1:], _acc(ln_weight), _acc(ln_bias), eps)
    y = F.linear(h, _acc(weight), _acc(bias) if bias is not None else None)
    return gelu_ref(y, approximate).to(x.dtype)
