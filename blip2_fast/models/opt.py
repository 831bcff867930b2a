"""OPT decoder (transformers' `OPTForCausalLM`) over a paged KV cache.

Parameters (state_dict names -> checkpoint keys under `language_model.model.decoder.`):
`blocks.{i}.qkv` <- layers.{i}.self_attn.{q,k,v}_proj (stacked; q's weight and bias scaled by
head_dim**-0.5, which OPT applies after the projection), every other name as in the checkpoint's
module (`out_proj`, `fc1`, `fc2`, `ln1` = self_attn_layer_norm, `ln2` = final_layer_norm,
`embed` = embed_tokens, `pos` = embed_positions, `lnf` = final_layer_norm); `lm_head` is
`language_model.lm_head.weight`, or the embedding when tied. `Blip2.checkpoint_keys()` lists them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import OPTConfig
from ..layers import AttnMeta, Linear, PagedAttention, lm_head, pack_linears, take_param
from ..ops import BoundOps
from ..weights import WeightSource


class _Norm(nn.Module):
    """LayerNorm weights (none when OPT's layer norms are not elementwise-affine)."""

    def __init__(self, src: WeightSource, name: str, E: int, affine: bool):
        super().__init__()
        self.weight = take_param(src, name + ".weight", (E,)) if affine else None
        self.bias = take_param(src, name + ".bias", (E,)) if affine else None


class OPTBlock(nn.Module):
    def __init__(self, cfg: OPTConfig, ops: BoundOps, src: WeightSource, p: str):
        super().__init__()
        E, F_ = cfg.hidden, cfg.ffn
        self.ops, self.heads, self.pre_norm = ops, cfg.heads, cfg.pre_norm
        self.act = "relu" if cfg.act == "relu" else "gelu"
        a = p + "self_attn."
        # OPT scales q after its projection; folding the scale into the weights saves a pass
        self.qkv = Linear.fused(src, [a + "q_proj", a + "k_proj", a + "v_proj"], [E] * 3, E, bias=cfg.bias,
                                scales=[(E // cfg.heads) ** -0.5, 1.0, 1.0])
        self.out_proj = Linear.load(src, a + "out_proj", E, E, bias=cfg.bias)
        self.fc1 = Linear.load(src, p + "fc1", F_, E, bias=cfg.bias)
        self.fc2 = Linear.load(src, p + "fc2", E, F_, bias=cfg.bias)
        self.ln1 = _Norm(src, p + "self_attn_layer_norm", E, cfg.ln_affine)
        self.ln2 = _Norm(src, p + "final_layer_norm", E, cfg.ln_affine)
        self.attention = PagedAttention(ops, causal=True)
        self.decode_op = None  # the whole layer at decode in one call, where `use_decode_op` finds it exact

    def use_decode_op(self) -> bool:
        """Take the registry's `opt_decode_block` for decode steps when its fast (C++) form runs what
        this layer's own forward would: a pre-LayerNorm layer, all four linears packed for the CPU
        kernel, and paged attention, write_kv and layer_norm bound to the CPU kernels it composes
        (an op overridden to its reference keeps the layer on the Python path). Called once, after
        the linears are packed."""
        ops = self.ops
        parts = [getattr(f, "__module__", None) for f in (ops.paged_attention, ops.write_kv, ops.layer_norm)]
        ok = (ops.impls.get("opt_decode_block") == "fast" and self.pre_norm
              and parts == ["blip2_fast._ext", "blip2_fast._ext", "blip2_fast.ops_cpu"]
              and all(lin.packed is not None for lin in (self.qkv, self.out_proj, self.fc1, self.fc2)))
        self.decode_op = ops.opt_decode_block if ok else None
        return ok

    def attn(self, h, meta: AttnMeta, cache):
        B, S, E = h.shape
        H = self.heads
        qkv = self.qkv(h).view(B, S, 3, H, E // H)
        a = self.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], meta, cache)  # (B, S, E)
        return self.out_proj(a)

    def ffn(self, h):
        return self.fc2(self.fc1(h, self.act))  # the activation fused into fc1 where it is packed

    def forward(self, x, meta, cache, eps):
        ln = self.ops.layer_norm
        n1, n2 = self.ln1, self.ln2
        if self.decode_op is not None and meta is not None and not meta.prefill and x.dtype == torch.float32:
            B, _, E = x.shape
            y = self.decode_op(x.view(B, E), (n1.weight, n1.bias), self.qkv.packed, self.out_proj.packed,
                               (n2.weight, n2.bias), self.fc1.packed, self.fc2.packed, cache[0], cache[1],
                               meta.slot_mapping, meta.block_tables, meta.seq_lens, self.heads, eps, self.act)
            return y.view(B, 1, E)  # [B, E] -> [B, 1, E]
        if self.pre_norm:
            x = x + self.attn(ln(x, n1.weight, n1.bias, eps), meta, cache)
            return x + self.ffn(ln(x, n2.weight, n2.bias, eps))
        x = ln(self.attn(x, meta, cache), n1.weight, n1.bias, eps, x)[0]
        return ln(self.ffn(x), n2.weight, n2.bias, eps, x)[0]


class OPT(nn.Module):
    """embeds [B, S, word_embed_proj_dim] + positions [B, S] -> hidden [B, S, E]; `logits(hidden)`."""

    EPS = 1e-5

    def __init__(self, cfg: OPTConfig, ops: BoundOps, src: WeightSource, p: str = "language_model."):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        E, W = cfg.hidden, cfg.word_embed_proj_dim
        d = p + "model.decoder."
        self.embed = take_param(src, d + "embed_tokens.weight", (cfg.vocab, W))
        self.pos = take_param(src, d + "embed_positions.weight", (cfg.max_positions + 2, E))
        self.proj_in = Linear.load(src, d + "project_in", E, W, bias=False) if W != E else None
        self.proj_out = Linear.load(src, d + "project_out", W, E, bias=False) if W != E else None
        self.blocks = nn.ModuleList(OPTBlock(cfg, ops, src, f"{d}layers.{i}.") for i in range(cfg.layers))
        self.final_norm = cfg.final_norm
        self.lnf = _Norm(src, d + "final_layer_norm", E, cfg.final_norm and cfg.ln_affine)
        head = p + "lm_head.weight"
        # tied (transformers' default): the head is the embedding, whatever copy of it the checkpoint saved
        self.lm_head = self.embed if cfg.tie_embeddings else take_param(src, head, (cfg.vocab, W))
        pack_linears(self, ops)  # on a CPU: every projection through the small-M kernel (decode)
        for blk in self.blocks:
            blk.use_decode_op()

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
            embeds = self.proj_in(embeds)
        # OPT's learned positions are offset by 2 (a fairseq legacy); padding sits at position -1 -> 1
        x = embeds + F.embedding(positions + 2, self.pos)
        for i, blk in enumerate(self.blocks):
            x = blk(x, meta, None if caches is None else caches[i], self.EPS)
        if self.final_norm:
            x = self.ops.layer_norm(x, self.lnf.weight, self.lnf.bias, self.EPS)
        return x

    def head_input(self, hidden):
        """The final hidden states as the LM head multiplies them: [..., E] -> [..., E_vocab]."""
        return self.proj_out(hidden) if self.proj_out is not None else hidden

    def logits(self, hidden):
        return lm_head(self.head_input(hidden), self.lm_head)
