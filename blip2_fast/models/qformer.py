"""The Q-Former (transformers' `Blip2QFormerModel`): learned queries (plus optional text tokens) through
post-LN BERT layers with self-attention, and cross-attention to the image patches every
`cross_every` layers. The K/V projections of the image patches for *all* cross-attention layers run
as one GEMM per image batch (`image_kv`), since they cost far more than the attention itself."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import QFormerConfig
from ..ops import BoundOps
from ..layers import Linear, pack_linears, take_param
from ..weights import WeightSource


class _AttnOut(nn.Module):
    """dense -> LayerNorm(dense + input): the post-LN residual of BERT."""

    def __init__(self, cfg: QFormerConfig, ops: BoundOps, src: WeightSource, p: str, n_in: int):
        super().__init__()
        self.ops, self.eps = ops, cfg.eps
        self.dense = Linear.load(src, p + ".dense", cfg.hidden, n_in)
        self.ln_w = take_param(src, p + ".LayerNorm.weight", (cfg.hidden,))
        self.ln_b = take_param(src, p + ".LayerNorm.bias", (cfg.hidden,))

    def forward(self, h, residual):
        return self.ops.layer_norm(self.dense(h), self.ln_w, self.ln_b, self.eps, residual)[0]


class _FFN(nn.Module):
    def __init__(self, cfg: QFormerConfig, ops: BoundOps, src: WeightSource, p_in: str, p_out: str):
        super().__init__()
        self.ops = ops
        self.approx = "none" if cfg.act == "gelu" else "tanh"
        self.dense = Linear.load(src, p_in + ".dense", cfg.mlp, cfg.hidden)
        self.out = _AttnOut(cfg, ops, src, p_out, cfg.mlp)

    def forward(self, x):
        d = self.dense
        if d.packed is not None and self.approx == "none":
            return self.out(d(x, "gelu"), x)  # GELU in the packed kernel's epilogue
        return self.out(self.ops.linear_gelu(x, d.weight, d.bias, self.approx), x)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, ops: BoundOps, src: WeightSource, p: str, has_cross: bool):
        super().__init__()
        Hd = cfg.hidden
        self.ops, self.heads, self.has_cross = ops, cfg.heads, has_cross
        a = p + "attention.attention."
        # one launch instead of three
        self.qkv = Linear.fused(src, [a + "query", a + "key", a + "value"], [Hd] * 3, Hd)
        self.attn_out = _AttnOut(cfg, ops, src, p + "attention.output", Hd)
        if has_cross:
            c = p + "crossattention.attention."
            self.cross_q = Linear.load(src, c + "query", Hd, Hd)
            # the K/V projections of the image features live in the Q-Former's one stacked GEMM
            self.cross_out = _AttnOut(cfg, ops, src, p + "crossattention.output", Hd)
        self.ffn_query = _FFN(cfg, ops, src, p + "intermediate_query", p + "output_query")
        self.ffn_text = _FFN(cfg, ops, src, p + "intermediate", p + "output") if src.has(p + "intermediate.dense.weight") else None

    def _heads(self, t, B, S):
        return t.view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, D)

    def forward(self, x, mask, image_kv, n_query):
        B, S, Hd = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.heads, Hd // self.heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views
        a = self.ops.attention(q, k, v, key_padding_mask=mask)  # (B, H, S, D)
        x = self.attn_out(a.transpose(1, 2).reshape(B, S, Hd), x)
        if n_query == 0:
            return self.ffn_text(x)
        xq = x[:, :n_query]
        if self.has_cross:
            k_img, v_img = image_kv  # (B, H, N, D) strided views
            qx = self._heads(self.cross_q(xq), B, n_query)
            c = self.ops.cross_attention(qx, k_img, v_img)  # (B, H, n_query, D)
            xq = self.cross_out(c.transpose(1, 2).reshape(B, n_query, Hd), xq)
        out = self.ffn_query(xq)
        if S > n_query:
            out = torch.cat([out, self.ffn_text(x[:, n_query:])], dim=1)
        return out


class QFormer(nn.Module):
    """query_embeds [B, S, Hd] (learned queries first, then any text embeddings) -> [B, S, Hd].

    Parameters keep the checkpoint's names (under `qformer.`) except the stacked ones: `layers.{i}.qkv`
    <- encoder.layer.{i}.attention.attention.{query,key,value}, and `image_kv` <- every cross layer's
    crossattention.attention.{key,value}, in layer order (`Blip2.checkpoint_keys()` lists them)."""

    def __init__(self, cfg: QFormerConfig, ops: BoundOps, src: WeightSource, p: str = "qformer."):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        Hd = cfg.hidden
        self.ln_w, self.ln_b = take_param(src, p + "layernorm.weight", (Hd,)), take_param(src, p + "layernorm.bias", (Hd,))
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, ops, src, f"{p}encoder.layer.{i}.", i % cfg.cross_every == 0) for i in range(cfg.layers))
        cross = [i for i, l in enumerate(self.layers) if l.has_cross]
        self.n_cross = len(cross)
        # all cross layers' K and V projections of the image features stacked: one GEMM per image batch
        names = [f"{p}encoder.layer.{i}.crossattention.attention.{n}" for i in cross for n in ("key", "value")]
        self.image_kv_proj = Linear.fused(src, names, [Hd] * len(names), cfg.encoder_hidden) if cross else None
        pack_linears(self, ops)

    def image_kv(self, image_embeds: torch.Tensor) -> list:
        """K/V of the image patches for every cross-attention layer, from one GEMM."""
        B, N, _ = image_embeds.shape
        H = self.cfg.heads
        D = self.cfg.hidden // H
        proj = self.image_kv_proj
        kv = proj(image_embeds.to(proj.weight.dtype)).view(B, N, self.n_cross, 2, H, D)
        # per layer: K and V as (B, H, N, D) strided views of the one output
        return [(kv[:, :, i, 0].transpose(1, 2), kv[:, :, i, 1].transpose(1, 2)) for i in range(self.n_cross)]
    def forward(self, query_embeds, *, n_query: int, attention_mask=None, image_embeds=None):
        x = self.ops.layer_norm(query_embeds.to(self.ln_w.dtype), self.ln_w, self.ln_b, self.cfg.eps)
        kvs = self.image_kv(image_embeds) if (image_embeds is not None and n_query > 0 and self.n_cross) else []
        j = 0
        for layer in self.layers:
            kv = None
            if layer.has_cross and n_query > 0:
                if image_embeds is None:
                    raise ValueError("the Q-Former's queries need image features for cross-attention")
                kv, j = kvs[j], j + 1
            x = layer(x, attention_mask, kv, n_query)
        return x


class TextEmbeddings(nn.Module):
    """Q-Former word + position embeddings (BERT-style, no LayerNorm: the Q-Former applies it)."""

    def __init__(self, cfg: QFormerConfig, src: WeightSource, p: str = "embeddings."):
        super().__init__()
        self.cfg = cfg
        self.word = take_param(src, p + "word_embeddings.weight", (cfg.vocab, cfg.hidden))
        self.pos = take_param(src, p + "position_embeddings.weight", (cfg.max_positions, cfg.hidden))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        S = input_ids.shape[1]
        if S > self.cfg.max_positions:
            raise ValueError(f"text of {S} tokens is longer than the Q-Former's {self.cfg.max_positions} positions")
        if int(input_ids.max()) >= self.cfg.vocab or int(input_ids.min()) < 0:
            raise ValueError(f"input_ids contain ids outside the Q-Former vocabulary [0, {self.cfg.vocab})")
        return F.embedding(input_ids, self.word) + self.pos[:S]
