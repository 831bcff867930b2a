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


def heads(t: torch.Tensor, B: int, S: int, H: int) -> torch.Tensor:
    return t.view(B, S, H, -1).transpose(1, 2)  # (B, H, S, D)
