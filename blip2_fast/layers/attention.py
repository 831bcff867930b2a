"""Attention over the paged KV cache: one layer for OPT's decoder and T5's decoder (self- and
cross-attention), and plain attention when there is no cache (the T5 encoder, `Blip2.forward`).

What a forward needs to know about the cache is one `AttnMeta`; nothing here allocates cache memory.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn


@dataclasses.dataclass
class AttnMeta:
    """Attention metadata for one forward of a language model over the paged KV cache.

    prefill: inputs are [B, S, E], left- or right-padded; `key_padding_mask` [B, S] (True = real token);
        `slot_mapping` [B*S] gives each token's flat cache slot (block * block_size + offset), -1 for
        padding; slot_mapping None means "no cache" (a plain forward).
    prefill over a cached prefix (decoder-only): the inputs are only each row's uncached tokens;
        `key_slots` [B, C + S] are the flat cache slots of every key the rows attend to (the first C
        columns: each row's cached prefix, then the S new tokens, which are written first), and
        `key_mask` [B, C + S] marks the real ones. Causal masking stays bottom-right aligned.
    decode: inputs are [N, 1, E], one new token per sequence; `slot_mapping` [N]; `block_tables`
        int32 [N, max_blocks]; `seq_lens` int32 [N] counts the new token.
    T5's decoder also carries its cross-attention cache: `cross_slot_mapping` [B*Se] where prefill
        writes the encoder K/V, `cross_block_tables` / `cross_seq_lens` where decode reads them, and
        `encoder_mask` [B, Se] for prefill's cross-attention; `rel_bias` [H, max_len] is its decode
        self-attention bias by distance.
    """

    prefill: bool
    key_padding_mask: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    key_slots: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    cross_slot_mapping: torch.Tensor | None = None
    cross_block_tables: torch.Tensor | None = None
    cross_seq_lens: torch.Tensor | None = None
    encoder_mask: torch.Tensor | None = None
    rel_bias: torch.Tensor | None = None


def gather_keys(cache, key_slots: torch.Tensor):
    """K and V of the flat cache slots `key_slots` [B, Sk]: (B, H, Sk, D) each, one gather per pool."""
    k_cache, v_cache = cache
    H, D = k_cache.shape[2:]
    flat = key_slots.reshape(-1)
    k = k_cache.view(-1, H, D).index_select(0, flat).view(*key_slots.shape, H, D)  # (B, Sk, H, D)
    v = v_cache.view(-1, H, D).index_select(0, flat).view(*key_slots.shape, H, D)
    return k.transpose(1, 2), v.transpose(1, 2)


class PagedAttention(nn.Module):
    """Multi-head attention whose K/V live in the paged cache. No weights: the projections stay in
    the model; this layer writes K/V, attends, and merges heads.

    q, k, v: [B, S, H, D] (strided views of a fused projection are fine); returns [B, S, H * D].
    `scale` multiplies the scores (OPT folds its scale into the q projection and T5 has none: 1.0).
    """

    def __init__(self, ops, causal: bool, scale: float = 1.0):
        super().__init__()
        self.ops, self.causal, self.scale = ops, causal, scale

    def forward(self, q, k, v, meta: AttnMeta | None, cache=None, *, bias=None) -> torch.Tensor:
        B, S, H, D = q.shape
        ops = self.ops
        if meta is not None and not meta.prefill:
            assert S == 1 and meta.slot_mapping.numel() == B
            ops.write_kv(k[:, 0], v[:, 0], cache[0], cache[1], meta.slot_mapping)
            a = ops.paged_attention(q[:, 0], cache[0], cache[1], meta.block_tables, meta.seq_lens, self.scale,
                                    rel_bias=meta.rel_bias)
            return a.reshape(B, 1, H * D)
        if cache is not None and meta.slot_mapping is not None:
            ops.write_kv(k.reshape(B * S, H, D), v.reshape(B * S, H, D), cache[0], cache[1], meta.slot_mapping)
        mask = None if meta is None else meta.key_padding_mask
        if meta is not None and meta.key_slots is not None:
            # a cached prefix: every key (prefix and the tokens just written) read back from the blocks
            kh, vh = gather_keys(cache, meta.key_slots)  # (B, H, C + S, D) each
            mask = meta.key_mask
        else:
            kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D) views
        a = ops.attention(q.transpose(1, 2), kh, vh, causal=self.causal, key_padding_mask=mask, scale=self.scale,
                          bias=bias)
        return a.transpose(1, 2).reshape(B, S, H * D)

    def cross(self, q, kv, meta: AttnMeta, cache=None) -> torch.Tensor:
        """Attention to an encoder's output (T5). q [B, S, H, D]. Prefill: `kv` = (k, v) [B, Se, H, D]
        of the encoder output, written into `cache` at meta.cross_slot_mapping (when given) for the
        decode steps; decode: `kv` None, read from the cache through meta.cross_block_tables."""
        B, S, H, D = q.shape
        ops = self.ops
        if not meta.prefill:
            a = ops.paged_attention(q[:, 0], cache[0], cache[1], meta.cross_block_tables, meta.cross_seq_lens,
                                    self.scale)
            return a.reshape(B, 1, H * D)
        k, v = kv
        Se = k.shape[1]
        if cache is not None and meta.cross_slot_mapping is not None:
            ops.write_kv(k.reshape(B * Se, H, D), v.reshape(B * Se, H, D), cache[0], cache[1], meta.cross_slot_mapping)
        a = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_padding_mask=meta.encoder_mask,
                          scale=self.scale)
        return a.transpose(1, 2).reshape(B, S, H * D)
