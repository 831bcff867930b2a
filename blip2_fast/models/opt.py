"""OPT decoder (transformers' `OPTForCausalLM`) over a paged KV cache."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import OPTConfig
from ..ops import BoundOps
from ..weights import WeightSource
from .kv import AttnMeta, gather_context, lm_head


class OPTBlock(nn.Module):
    def __init__(self, cfg: OPTConfig, ops: BoundOps, src: WeightSource, p: str):
        super().__init__()
        E, F_ = cfg.hidden, cfg.ffn
        self.ops, self.heads, self.pre_norm = ops, cfg.heads, cfg.pre_norm
        self.relu = cfg.act == "relu"
        a = p + "self_attn."
        scale = (E // cfg.heads) ** -0.5

        def lin(name, n_out, n_in):
            w = src.take(name + ".weight", (n_out, n_in))
            b = src.take(name + ".bias", (n_out,)) if cfg.bias else None
            return w, b

        wq, bq = lin(a + "q_proj", E, E)
        wk, bk = lin(a + "k_proj", E, E)
        wv, bv = lin(a + "v_proj", E, E)
        # OPT scales q after its projection; folding the scale into the weights saves a pass
        self.wqkv = torch.cat([wq * scale, wk, wv])
        self.bqkv = torch.cat([bq * scale, bk, bv]) if cfg.bias else None
        self.wo, self.bo = lin(a + "out_proj", E, E)
        self.w1, self.b1 = lin(p + "fc1", F_, E)
        self.w2, self.b2 = lin(p + "fc2", E, F_)
        ln = (lambda n: (src.take(n + ".weight", (E,)), src.take(n + ".bias", (E,)))) if cfg.ln_affine else (lambda n: (None, None))
        self.ln1_w, self.ln1_b = ln(p + "self_attn_layer_norm")
        self.ln2_w, self.ln2_b = ln(p + "final_layer_norm")

    def attn(self, h, meta: AttnMeta, cache):
        B, S, E = h.shape
        H = self.heads
        qkv = F.linear(h, self.wqkv, self.bqkv).view(B, S, 3, H, E // H)
        if meta.prefill:
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views
            if cache is not None and meta.slot_mapping is not None:
                self.ops.write_kv(qkv[:, :, 1].reshape(B * S, H, -1), qkv[:, :, 2].reshape(B * S, H, -1),
                                  cache[0], cache[1], meta.slot_mapping)
            mask = meta.key_padding_mask
            if meta.ctx_len:  # a cached prefix: its K/V come from the blocks (written before this read)
                kc, vc = gather_context(cache, meta.block_tables, meta.ctx_len)  # (B, H, C, D) each
                k, v = torch.cat([kc, k], 2), torch.cat([vc, v], 2)  # (B, H, C + S, D)
                mask = torch.cat([meta.ctx_mask, mask], 1)  # causal stays bottom-right aligned
            a = self.ops.attention(q, k, v, causal=True, key_padding_mask=mask, scale=1.0)
            a = a.transpose(1, 2).reshape(B, S, E)
        else:
            assert S == 1 and meta.slot_mapping.numel() == B
            self.ops.write_kv(qkv[:, 0, 1], qkv[:, 0, 2], cache[0], cache[1], meta.slot_mapping)
            a = self.ops.paged_attention(qkv[:, 0, 0], cache[0], cache[1], meta.block_tables, meta.seq_lens, 1.0)
            a = a.reshape(B, 1, E)
        return F.linear(a, self.wo, self.bo)

    def ffn(self, h):
        h = F.linear(h, self.w1, self.b1)
        h = F.relu(h) if self.relu else F.gelu(h)
        return F.linear(h, self.w2, self.b2)

    def forward(self, x, meta, cache, eps):
        ln = self.ops.layernorm
        if self.pre_norm:
            x = x + self.attn(ln(x, self.ln1_w, self.ln1_b, eps), meta, cache)
            return x + self.ffn(ln(x, self.ln2_w, self.ln2_b, eps))
        x = ln(self.attn(x, meta, cache), self.ln1_w, self.ln1_b, eps, x)[0]
        return ln(self.ffn(x), self.ln2_w, self.ln2_b, eps, x)[0]


class OPT(nn.Module):
    """embeds [B, S, word_embed_proj_dim] + positions [B, S] -> hidden [B, S, E]; `logits(hidden)`."""

    EPS = 1e-5

    def __init__(self, cfg: OPTConfig, ops: BoundOps, src: WeightSource, p: str = "language_model."):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        E, W = cfg.hidden, cfg.word_embed_proj_dim
        d = p + "model.decoder."
        self.embed = src.take(d + "embed_tokens.weight", (cfg.vocab, W))
        self.pos = src.take(d + "embed_positions.weight", (cfg.max_positions + 2, E))
        self.proj_in = src.take(d + "project_in.weight", (E, W)) if W != E else None
        self.proj_out = src.take(d + "project_out.weight", (W, E)) if W != E else None
        self.blocks = nn.ModuleList(OPTBlock(cfg, ops, src, f"{d}layers.{i}.") for i in range(cfg.layers))
        if cfg.final_norm and cfg.ln_affine:
            self.lnf_w, self.lnf_b = src.take(d + "final_layer_norm.weight", (E,)), src.take(d + "final_layer_norm.bias", (E,))
        self.final_norm = cfg.final_norm
        head = p + "lm_head.weight"
        self.lm_head = src.take(head, (cfg.vocab, W)) if src.has(head) else self.embed

    @property
    def num_layers(self):
        return self.cfg.layers

    @property
    def kv_heads_dim(self):
        return self.cfg.heads, self.cfg.hidden // self.cfg.heads

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    def forward(self, embeds, positions, meta: AttnMeta, caches=None):
        if self.proj_in is not None:
            embeds = F.linear(embeds, self.proj_in)
        # OPT's learned positions are offset by 2 (a fairseq legacy); padding sits at position -1 -> 1
        x = embeds + F.embedding(positions + 2, self.pos)
        for i, blk in enumerate(self.blocks):
            x = blk(x, meta, None if caches is None else caches[i], self.EPS)
        if self.final_norm:
            x = self.ops.layernorm(x, getattr(self, "lnf_w", None), getattr(self, "lnf_b", None), self.EPS)
        return x

    def head_input(self, hidden):
        """The final hidden states as the LM head multiplies them: [..., E] -> [..., E_vocab]."""
        return F.linear(hidden, self.proj_out) if self.proj_out is not None else hidden

    def logits(self, hidden):
        return lm_head(self.head_input(hidden), self.lm_head)
