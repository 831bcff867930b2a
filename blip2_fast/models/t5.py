"""Flan-T5 encoder-decoder (transformers' `T5ForConditionalGeneration`): RMSNorm, relative position
bias, gated-GELU feed-forward; the decoder's self-attention and cross-attention K/V live in the paged
cache (the encoder's K/V are written once per request and read by every decode step).

In float16, as transformers: each feed-forward's output projection `wo` is kept in float32 (its
`_keep_in_fp32_modules`), which makes the residual stream float32 from the first feed-forward on;
half-precision hidden states are clamped after every sublayer when they overflow; each RMSNorm's
output is rounded to the weight's float16 for the next sublayer."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import T5Config
from ..ops import BoundOps
from ..weights import WeightSource
from .kv import AttnMeta, lm_head, heads


def relative_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's log-spaced bucket of a relative position (key - query)."""
    out = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out = out + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return out + torch.where(rel < max_exact, rel, large)


def _clamp_overflow(x: torch.Tensor) -> torch.Tensor:
    """transformers' T5 guard for float16 hidden states: when any is infinite, clamp all to
    ±(max - 1000); no host sync (a 0-dim tensor bound), so CUDA graphs can capture it."""
    big = torch.finfo(torch.float16).max
    lim = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, -lim, lim)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, ops: BoundOps, src: WeightSource, p: str, fuse_qkv: bool):
        super().__init__()
        inner = cfg.heads * cfg.d_kv
        self.ops, self.H = ops, cfg.heads
        w = {n: src.take(f"{p}.{n}.weight", (inner, cfg.d_model)) for n in "qkv"}
        if fuse_qkv:
            self.wqkv = torch.cat([w["q"], w["k"], w["v"]])
        else:  # cross-attention: q from the decoder, k/v from the encoder output
            self.wq, self.wkv = w["q"], torch.cat([w["k"], w["v"]])
        self.wo = src.take(f"{p}.o.weight", (cfg.d_model, inner))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, ops: BoundOps, src: WeightSource, p: str, decoder: bool):
        super().__init__()
        D = cfg.d_model
        self.ops, self.eps, self.decoder = ops, cfg.eps, decoder
        self.H, self.Dh = cfg.heads, cfg.d_kv
        self.self_attn = T5Attention(cfg, ops, src, p + "layer.0.SelfAttention", True)
        self.ln_sa = src.take(p + "layer.0.layer_norm.weight", (D,))
        f = 1
        if decoder:
            self.cross = T5Attention(cfg, ops, src, p + "layer.1.EncDecAttention", False)
            self.ln_ca = src.take(p + "layer.1.layer_norm.weight", (D,))
            f = 2
        d = f"{p}layer.{f}.DenseReluDense."
        self.gated = cfg.gated
        self.approx = "tanh" if cfg.act in ("gelu_new", "gelu_pytorch_tanh") else "none"
        self.relu = cfg.act == "relu"
        if cfg.gated:
            self.wi0, self.wi1 = src.take(d + "wi_0.weight", (cfg.d_ff, D)), src.take(d + "wi_1.weight", (cfg.d_ff, D))
        else:
            self.wi = src.take(d + "wi.weight", (cfg.d_ff, D))
        # float16 models keep this projection in float32 (see the module docstring)
        self.wo = src.take(d + "wo.weight", (D, cfg.d_ff), torch.float32 if src.dtype == torch.float16 else None)
        self.ln_ff = src.take(f"{p}layer.{f}.layer_norm.weight", (D,))

    def ffn(self, h):
        if self.gated:
            g = F.relu(F.linear(h, self.wi0)) if self.relu else self.ops.linear_gelu(h, self.wi0, None, self.approx)
            return F.linear((g * F.linear(h, self.wi1)).to(self.wo.dtype), self.wo)
        h = F.linear(h, self.wi)
        h = F.relu(h) if self.relu else F.gelu(h, approximate=self.approx)
        return F.linear(h.to(self.wo.dtype), self.wo)

    def self_attention(self, h, bias, meta: AttnMeta, cache, rel_table):
        B, S, _ = h.shape
        H, Dh = self.H, self.Dh
        qkv = F.linear(h, self.self_attn.wqkv).view(B, S, 3, H, Dh)
        if meta.prefill:
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views
            if cache is not None and meta.slot_mapping is not None:
                self.ops.write_kv(qkv[:, :, 1].reshape(B * S, H, Dh), qkv[:, :, 2].reshape(B * S, H, Dh),
                                  cache[0], cache[1], meta.slot_mapping)
            a = self.ops.attention(q, k, v, causal=self.decoder, key_padding_mask=meta.key_padding_mask,
                                   scale=1.0, bias=bias)
            a = a.transpose(1, 2).reshape(B, S, H * Dh)
        else:
            self.ops.write_kv(qkv[:, 0, 1], qkv[:, 0, 2], cache[0], cache[1], meta.slot_mapping)
            a = self.ops.paged_attention(qkv[:, 0, 0], cache[0], cache[1], meta.block_tables, meta.seq_lens, 1.0,
                                         rel_bias=rel_table).reshape(B, 1, H * Dh)
        return F.linear(a, self.self_attn.wo)

    def cross_attention(self, h, enc_kv, meta: AttnMeta, cross_cache):
        B, S, _ = h.shape
        H, Dh = self.H, self.Dh
        q = F.linear(h, self.cross.wq)
        if meta.prefill:
            k, v = enc_kv  # (B, H, Se, Dh) views
            a = self.ops.attention(heads(q, B, S, H), k, v, key_padding_mask=meta.encoder_mask, scale=1.0)
            a = a.transpose(1, 2).reshape(B, S, H * Dh)
        else:
            a = self.ops.paged_attention(q.view(B, H, Dh), cross_cache[0], cross_cache[1],
                                         meta.cross_block_tables, meta.cross_seq_lens, 1.0).reshape(B, 1, H * Dh)
        return F.linear(a, self.cross.wo)

    def encoder_kv(self, enc, meta: AttnMeta, cross_cache):
        """K/V of the encoder output for this layer's cross-attention; written into the cache once."""
        B, Se, _ = enc.shape
        kv = F.linear(enc, self.cross.wkv).view(B, Se, 2, self.H, self.Dh)
        if cross_cache is not None and meta.cross_slot_mapping is not None:
            self.ops.write_kv(kv[:, :, 0].reshape(B * Se, self.H, self.Dh), kv[:, :, 1].reshape(B * Se, self.H, self.Dh),
                              cross_cache[0], cross_cache[1], meta.cross_slot_mapping)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, Se, Dh) each


class T5(nn.Module):
    def __init__(self, cfg: T5Config, ops: BoundOps, src: WeightSource, p: str = "language_model.", max_len: int = 4096):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        D = cfg.d_model
        self.shared = src.take(p + "shared.weight", (cfg.vocab, D))
        self.enc = nn.ModuleList(T5Block(cfg, ops, src, f"{p}encoder.block.{i}.", False) for i in range(cfg.enc_layers))
        self.dec = nn.ModuleList(T5Block(cfg, ops, src, f"{p}decoder.block.{i}.", True) for i in range(cfg.dec_layers))
        rb = "layer.0.SelfAttention.relative_attention_bias.weight"
        self.enc_rel = src.take(f"{p}encoder.block.0.{rb}", (cfg.buckets, cfg.heads))
        self.dec_rel = src.take(f"{p}decoder.block.0.{rb}", (cfg.buckets, cfg.heads))
        self.enc_ln = src.take(p + "encoder.final_layer_norm.weight", (D,))
        self.dec_ln = src.take(p + "decoder.final_layer_norm.weight", (D,))
        head = p + "lm_head.weight"
        self.lm_head = src.take(head, (cfg.vocab, D)) if src.has(head) else self.shared
        # decode-time self-attention bias by distance (query - key), [H, max_len]
        dist = -torch.arange(max_len, device=self.shared.device)
        self.dec_rel_table = F.embedding(relative_bucket(dist, False, cfg.buckets, cfg.max_distance), self.dec_rel).t().contiguous()

    @property
    def num_layers(self):
        return self.cfg.dec_layers

    @property
    def kv_heads_dim(self):
        return self.cfg.heads, self.cfg.d_kv

    def embed_tokens(self, ids):
        return F.embedding(ids, self.shared)

    def _bias(self, table, Sq, Sk, bidirectional, offset=0):
        ctx = torch.arange(Sq, device=table.device)[:, None] + offset
        mem = torch.arange(Sk, device=table.device)[None, :]
        b = relative_bucket(mem - ctx, bidirectional, self.cfg.buckets, self.cfg.max_distance)
        return F.embedding(b, table).permute(2, 0, 1).unsqueeze(0)  # (1, H, Sq, Sk)

    def _rms(self):
        """rms(x, w, eps) / rms(delta, w, eps, residual) -> (normed, residual + delta), as the stacks use it.

        Float32 and bfloat16: the fused op. Float16: transformers' mixed precision (module docstring):
        the sum in the wider dtype of the two, clamped if it is float16, normalised, rounded to w's dtype.
        """
        rms = self.ops.rmsnorm
        if self.shared.dtype != torch.float16:
            return rms

        def mixed(x, w, eps, residual=None):
            if residual is None:
                return rms(x, w, eps).to(w.dtype)
            s = residual + x  # float32 once a float32 feed-forward output was added
            if s.dtype == torch.float16:
                s = _clamp_overflow(s)
            return rms(s, w, eps).to(w.dtype), s

        return mixed

    def _stack(self, x, blocks, final_w, step):
        rms = self._rms()
        delta = None
        for blk in blocks:
            delta, x = step(blk, delta, x, rms)
        return rms(delta, final_w, self.cfg.eps, x)[0] if delta is not None else rms(x, final_w, self.cfg.eps)

    def encode(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """embeds [B, S, D], mask [B, S] (True = real) -> encoder output [B, S, D]."""
        B, S, _ = embeds.shape
        bias = self._bias(self.enc_rel, S, S, True).to(embeds.dtype)
        meta = AttnMeta(prefill=True, key_padding_mask=mask)
        eps = self.cfg.eps

        def step(blk, delta, x, rms):
            h, x = (rms(delta, blk.ln_sa, eps, x) if delta is not None else (rms(x, blk.ln_sa, eps), x))
            d = blk.self_attention(h, bias, meta, None, None)
            h, x = rms(d, blk.ln_ff, eps, x)
            return blk.ffn(h), x

        return self._stack(embeds, self.enc, self.enc_ln, step)

    def decode(self, embeds, enc_out, meta: AttnMeta, caches=None, cross_caches=None, positions_offset=0):
        """Decoder over `embeds` [B, T, D]. Prefill (meta.prefill) attends to `enc_out` [B, Se, D] and
        writes the encoder K/V into `cross_caches`; decode reads them from the paged cache."""
        B, T, _ = embeds.shape
        eps = self.cfg.eps
        bias = self._bias(self.dec_rel, T, T, False).to(embeds.dtype) if meta.prefill else None
        it = iter(range(len(self.dec)))

        def step(blk, delta, x, rms):
            i = next(it)
            cache = None if caches is None else caches[i]
            xc = None if cross_caches is None else cross_caches[i]
            h, x = (rms(delta, blk.ln_sa, eps, x) if delta is not None else (rms(x, blk.ln_sa, eps), x))
            d = blk.self_attention(h, bias, meta, cache, self.dec_rel_table)
            h, x = rms(d, blk.ln_ca, eps, x)
            enc_kv = blk.encoder_kv(enc_out, meta, xc) if meta.prefill else None
            d = blk.cross_attention(h, enc_kv, meta, xc)
            h, x = rms(d, blk.ln_ff, eps, x)
            return blk.ffn(h), x

        return self._stack(embeds, self.dec, self.dec_ln, step)

    def head_input(self, hidden):
        """The decoder's output as the LM head multiplies it (tied heads scale it by d_model^-0.5)."""
        return hidden * self.cfg.d_model ** -0.5 if self.cfg.scale_decoder_outputs else hidden

    def logits(self, hidden):
        return lm_head(self.head_input(hidden), self.lm_head)
