"""What one language-model forward needs to know about its KV cache (nothing here allocates)."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class AttnMeta:
    """Attention metadata for one forward of a language model over the paged KV cache.

    prefill: inputs are [B, S, E], left- or right-padded; `key_padding_mask` [B, S] (True = real token);
        `slot_mapping` [B*S] gives each token's flat cache slot (block * block_size + offset), -1 for
        padding; slot_mapping None means "no cache" (a plain forward).
    decode: inputs are [N, 1, E], one new token per sequence; `slot_mapping` [N]; `block_tables`
        int32 [N, max_blocks]; `seq_lens` int32 [N] counts the new token.
    T5's decoder also carries its cross-attention cache: `cross_slot_mapping` [B*Se] where prefill
    writes the encoder K/V, `cross_block_tables` / `cross_seq_lens` where decode reads them, and
    `encoder_mask` [B, Se] for prefill's cross-attention.
    prefill with a cached prefix: `ctx_len` > 0, `block_tables` [B, max_blocks] and `ctx_mask`
    [B, ctx_len]; the inputs are then only each row's uncached tokens.
    """

    prefill: bool
    key_padding_mask: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    cross_slot_mapping: torch.Tensor | None = None
    cross_block_tables: torch.Tensor | None = None
    cross_seq_lens: torch.Tensor | None = None
    encoder_mask: torch.Tensor | None = None
    # prefill after a prefix-cache hit (decoder-only): the first ctx_len keys of each row come from its
    # blocks (`block_tables`), `ctx_mask` [B, ctx_len] marks each row's cached tokens
    ctx_len: int = 0
    ctx_mask: torch.Tensor | None = None


def heads(t: torch.Tensor, B: int, S: int, H: int) -> torch.Tensor:
    return t.view(B, S, H, -1).transpose(1, 2)  # (B, H, S, D)


def lm_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [..., E] @ weight[V, E]ᵀ -> [..., V].

    Computed as (weight @ hiddenᵀ)ᵀ: with few rows (decode) and a large vocabulary, BLAS runs the
    tall-skinny product faster than the short-wide one (on 2 CPU cores, 7.6 vs 9.8 ms for
    8 x 512 x 50304) and the head is about half of a CPU decode step. The same product (only the
    BLAS kernel, and so the rounding order of its sums, differs).
    """
    shape = hidden.shape
    h = hidden.reshape(-1, shape[-1])  # (n, E)
    return torch.mm(weight, h.t()).t().reshape(*shape[:-1], weight.shape[0])  # (..., V)


def gather_context(cache, block_tables: torch.Tensor, n: int):
    """The first `n` cached tokens' K and V of each row, gathered from its blocks: (B, H, n, D) each."""
    k_cache, v_cache = cache
    B = block_tables.shape[0]
    bs, H, D = k_cache.shape[1:]
    idx = block_tables.long()
    k = k_cache[idx].view(B, -1, H, D)[:, :n]  # (B, n, H, D)
    v = v_cache[idx].view(B, -1, H, D)[:, :n]
    return k.transpose(1, 2), v.transpose(1, 2)
