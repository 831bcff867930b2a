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
from ..layers import AttnMeta, Linear, PagedAttention, lm_head, pack_linears, take_param


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
    def __init__(self, cfg: T5Config, ops: BoundOps, src: WeightSource, p: str, fuse_qkv: bool, causal: bool):
        super().__init__()
        inner = cfg.heads * cfg.d_kv
        names = [f"{p}.{n}" for n in "qkv"]
        if fuse_qkv:
            self.qkv = Linear.fused(src, names, [inner] * 3, cfg.d_model, bias=False)
        else:  # cross-attention: q from the decoder, k/v from the encoder output
            self.q = Linear.load(src, names[0], inner, cfg.d_model, bias=False)
            self.kv = Linear.fused(src, names[1:], [inner] * 2, cfg.d_model, bias=False)
        self.o = Linear.load(src, f"{p}.o", cfg.d_model, inner, bias=False)
        self.attention = PagedAttention(ops, causal=causal)  # T5 does not scale its scores


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, ops: BoundOps, src: WeightSource, p: str, decoder: bool):
        super().__init__()
        D = cfg.d_model
        self.ops, self.eps, self.decoder = ops, cfg.eps, decoder
        self.H, self.Dh = cfg.heads, cfg.d_kv
        self.self_attn = T5Attention(cfg, ops, src, p + "layer.0.SelfAttention", True, causal=decoder)
        self.ln_sa = take_param(src, p + "layer.0.layer_norm.weight", (D,))
        f = 1
        if decoder:
            self.cross = T5Attention(cfg, ops, src, p + "layer.1.EncDecAttention", False, causal=False)
            self.ln_ca = take_param(src, p + "layer.1.layer_norm.weight", (D,))
            f = 2
        d = f"{p}layer.{f}.DenseReluDense."
        self.gated = cfg.gated
        self.approx = "tanh" if cfg.act in ("gelu_new", "gelu_pytorch_tanh") else "none"
        self.relu = cfg.act == "relu"
        if cfg.gated:
            self.wi0 = Linear.load(src, d + "wi_0", cfg.d_ff, D, bias=False)
            self.wi1 = Linear.load(src, d + "wi_1", cfg.d_ff, D, bias=False)
        else:
            self.wi = Linear.load(src, d + "wi", cfg.d_ff, D, bias=False)
        # float16 models keep this projection in float32 (see the module docstring)
        self.wo = Linear.load(src, d + "wo", D, cfg.d_ff, bias=False,
                              dtype=torch.float32 if src.dtype == torch.float16 else None)
        self.ln_ff = take_param(src, f"{p}layer.{f}.layer_norm.weight", (D,))
        self.decode_op = None  # the whole layer at decode in one call, where `use_decode_op` finds it exact

    def use_decode_op(self) -> bool:
        """Take the registry's `t5_decode_block` for decode steps when its fast (C++) form runs what
        this decoder layer's own forward would: every linear packed for the CPU kernel, and paged
        attention, write_kv and rms_norm bound to the CPU kernels it composes (an op overridden to
        its reference keeps the layer on the Python path). Called once, after the linears are packed."""
        self.decode_op = None
        if not self.decoder:  # the encoder runs at prefill only
            return False
        ops = self.ops
        parts = [getattr(f, "__module__", None) for f in (ops.paged_attention, ops.write_kv, ops.rms_norm)]
        lins = [self.self_attn.qkv, self.self_attn.o, self.cross.q, self.cross.o, self.wo]
        lins += [self.wi0, self.wi1] if self.gated else [self.wi]
        ok = (ops.impls.get("t5_decode_block") == "fast" and parts == ["blip2_fast._ext"] * 3
              and all(lin.packed is not None for lin in lins))
        self.decode_op = ops.t5_decode_block if ok else None
        return ok

    def decode_step(self, x, delta, meta: AttnMeta, cache, cross_cache):
        """The layer at a decode step in one call (`decode_op`): x, delta [B, 1, d] -> (output, residual)."""
        B, _, d = x.shape
        act = "relu" if self.relu else "gelu_tanh" if self.approx == "tanh" else "gelu"
        wi0, wi1 = (self.wi0, self.wi1) if self.gated else (self.wi, None)
        y, x = self.decode_op(x.view(B, d), None if delta is None else delta.view(B, d), self.ln_sa,
                              self.self_attn.qkv.packed, self.self_attn.o.packed, self.ln_ca, self.cross.q.packed,
                              self.cross.o.packed, self.ln_ff, wi0.packed, None if wi1 is None else wi1.packed,
                              self.wo.packed, cache[0], cache[1], meta.slot_mapping, meta.block_tables, meta.seq_lens,
                              meta.rel_bias, cross_cache[0], cross_cache[1], meta.cross_block_tables,
                              meta.cross_seq_lens, self.H, self.eps, act)
        return y.view(B, 1, d), x.view(B, 1, d)  # [B, d] -> [B, 1, d]

    def ffn(self, h):
        wo_dtype = self.wo.weight.dtype
        if self.gated:
            g = self._act(self.wi0, h)
            return self.wo((g * self.wi1(h)).to(wo_dtype))
        return self.wo(self._act(self.wi, h).to(wo_dtype))

    def _act(self, lin: Linear, h):
        """act(lin(h)): fused into a packed linear where its kernel has the activation (relu, erf GELU;
        Flan-T5's tanh GELU is a second pass), else the op layer's linear_gelu."""
        if self.relu:
            return lin(h, "relu")
        if lin.packed is None:
            return self.ops.linear_gelu(h, lin.weight, lin.bias, self.approx)
        return lin(h, "gelu") if self.approx == "none" else F.gelu(lin(h), approximate=self.approx)

    def self_attention(self, h, bias, meta: AttnMeta, cache):
        B, S, _ = h.shape
        qkv = self.self_attn.qkv(h).view(B, S, 3, self.H, self.Dh)
        a = self.self_attn.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], meta, cache, bias=bias)
        return self.self_attn.o(a)

    def cross_attention(self, h, enc_out, meta: AttnMeta, cross_cache):
        """Attention to the encoder output `enc_out` [B, Se, D] (prefill; its K/V are written into
        the cache for the decode steps) or to the cached encoder K/V (decode: enc_out None)."""
        B, S, _ = h.shape
        c = self.cross
        q = c.q(h).view(B, S, self.H, self.Dh)
        kv = None
        if enc_out is not None:
            Se = enc_out.shape[1]
            kv = c.kv(enc_out).view(B, Se, 2, self.H, self.Dh)
            kv = (kv[:, :, 0], kv[:, :, 1])  # (B, Se, H, Dh) views
        return c.o(c.attention.cross(q, kv, meta, cross_cache))


class T5(nn.Module):
    """Encoder-decoder: `encode(embeds, mask)` -> encoder output; `decode(embeds, enc_out, meta, ...)`
    over the paged cache; `logits(hidden)`. Parameters keep the checkpoint's module names under
    `language_model.` (`enc.{i}` = encoder.block.{i}, `dec.{i}` = decoder.block.{i}, stacked
    `qkv` = SelfAttention.{q,k,v}, `kv` = EncDecAttention.{k,v}; `Blip2.checkpoint_keys()` lists them)."""

    def __init__(self, cfg: T5Config, ops: BoundOps, src: WeightSource, p: str = "language_model."):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        D = cfg.d_model
        self.shared = take_param(src, p + "shared.weight", (cfg.vocab, D))
        self.enc = nn.ModuleList(T5Block(cfg, ops, src, f"{p}encoder.block.{i}.", False) for i in range(cfg.enc_layers))
        self.dec = nn.ModuleList(T5Block(cfg, ops, src, f"{p}decoder.block.{i}.", True) for i in range(cfg.dec_layers))
        rb = "layer.0.SelfAttention.relative_attention_bias.weight"
        self.enc_rel = take_param(src, f"{p}encoder.block.0.{rb}", (cfg.buckets, cfg.heads))
        self.dec_rel = take_param(src, f"{p}decoder.block.0.{rb}", (cfg.buckets, cfg.heads))
        self.enc_ln = take_param(src, p + "encoder.final_layer_norm.weight", (D,))
        self.dec_ln = take_param(src, p + "decoder.final_layer_norm.weight", (D,))
        head = p + "lm_head.weight"
        # tied (transformers' default): the head is the embedding, whatever copy of it the checkpoint saved
        self.lm_head = self.shared if cfg.tie_embeddings else take_param(src, head, (cfg.vocab, D))
        pack_linears(self, ops)  # on a CPU: every projection through the small-M kernel (decode)
        for blk in self.dec:
            blk.use_decode_op()

    @property
    def num_layers(self):
        return self.cfg.dec_layers

    @property
    def kv_heads_dim(self):
        return self.cfg.heads, self.cfg.d_kv

    def embed_tokens(self, ids):
        return F.embedding(ids, self.shared)

    def decoder_rel_table(self, max_len: int) -> torch.Tensor:
        """The decoder's self-attention bias by distance (query - key) for decode steps: [H, max_len]
        (`AttnMeta.rel_bias`; distances past max_distance share the last bucket)."""
        dist = -torch.arange(max_len, device=self.shared.device)
        b = relative_bucket(dist, False, self.cfg.buckets, self.cfg.max_distance)
        return F.embedding(b, self.dec_rel).t().contiguous()

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
        rms = self.ops.rms_norm
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
            d = blk.self_attention(h, bias, meta, None)
            h, x = rms(d, blk.ln_ff, eps, x)
            return blk.ffn(h), x

        return self._stack(embeds, self.enc, self.enc_ln, step)

    def decode(self, embeds, enc_out, meta: AttnMeta, caches=None, cross_caches=None):
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
            if blk.decode_op is not None and not meta.prefill and x.dtype == torch.float32:
                return blk.decode_step(x, delta, meta, cache, xc)
            h, x = (rms(delta, blk.ln_sa, eps, x) if delta is not None else (rms(x, blk.ln_sa, eps), x))
            d = blk.self_attention(h, bias, meta, cache)
            h, x = rms(d, blk.ln_ca, eps, x)
            d = blk.cross_attention(h, enc_out if meta.prefill else None, meta, xc)
            h, x = rms(d, blk.ln_ff, eps, x)
            return blk.ffn(h), x

        return self._stack(embeds, self.dec, self.dec_ln, step)

    def head_input(self, hidden):
        """The decoder's output as the LM head multiplies it (tied heads scale it by d_model^-0.5)."""
        return hidden * self.cfg.d_model ** -0.5 if self.cfg.scale_decoder_outputs else hidden

    def logits(self, hidden):
        return lm_head(self.head_input(hidden), self.lm_head)
