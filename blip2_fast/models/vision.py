"""EVA ViT-g vision encoder (as transformers' `Blip2VisionModel`): patch + class embeddings, pre-LN
blocks with one fused qkv projection, and a post-LayerNorm."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig
from ..ops import BoundOps
from ..weights import WeightSource


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, ops: BoundOps, src: WeightSource, p: str):
        super().__init__()
        E, M = cfg.hidden, cfg.mlp
        self.ops, self.eps, self.heads = ops, cfg.eps, cfg.heads
        self.gelu_approx = "none" if cfg.act == "gelu" else "tanh"
        self.ln1_w, self.ln1_b = src.take(p + "layer_norm1.weight", (E,)), src.take(p + "layer_norm1.bias", (E,))
        self.wqkv = src.take(p + "self_attn.qkv.weight", (3 * E, E))
        self.bqkv = src.take(p + "self_attn.qkv.bias", (3 * E,)) if src.has(p + "self_attn.qkv.bias") else None
        if cfg.qkv_bias and self.bqkv is None:  # older checkpoints keep q_bias / v_bias apart
            qb, vb = src.take(p + "self_attn.q_bias", (E,)), src.take(p + "self_attn.v_bias", (E,))
            self.bqkv = torch.cat([qb, torch.zeros_like(qb), vb])
        self.wo, self.bo = src.take(p + "self_attn.projection.weight", (E, E)), src.take(p + "self_attn.projection.bias", (E,))
        self.ln2_w, self.ln2_b = src.take(p + "layer_norm2.weight", (E,)), src.take(p + "layer_norm2.bias", (E,))
        self.w1, self.b1 = src.take(p + "mlp.fc1.weight", (M, E)), src.take(p + "mlp.fc1.bias", (M,))
        self.w2, self.b2 = src.take(p + "mlp.fc2.weight", (E, M)), src.take(p + "mlp.fc2.bias", (E,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, E = x.shape
        H = self.heads
        h = self.ops.layernorm(x, self.ln1_w, self.ln1_b, self.eps)
        qkv = F.linear(h, self.wqkv, self.bqkv).view(B, S, 3, H, E // H)
        # strided views of the fused projection, (B, H, S, D) each: no copies
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        a = self.ops.attention(q, k, v)  # (B, H, S, D)
        x = x + F.linear(a.transpose(1, 2).reshape(B, S, E), self.wo, self.bo)
        m = self.ops.ln_linear_gelu(x, self.ln2_w, self.ln2_b, self.eps, self.w1, self.b1, self.gelu_approx)
        return x + F.linear(m, self.w2, self.b2)


class VisionEncoder(nn.Module):
    """pixel_values [B, 3, H, W] -> (last_hidden_state [B, 1 + (H/P)(W/P), E], pooled [B, E])."""

    def __init__(self, cfg: VisionConfig, ops: BoundOps, src: WeightSource, p: str = "vision_model."):
        super().__init__()
        E, P = cfg.hidden, cfg.patch
        self.cfg, self.ops = cfg, ops
        e = p + "embeddings."
        self.patch_w = src.take(e + "patch_embedding.weight", (E, 3, P, P))
        self.patch_b = src.take(e + "patch_embedding.bias", (E,))
        self.cls = src.take(e + "class_embedding", (1, 1, E))
        self.pos = src.take(e + "position_embedding", (1, cfg.num_patches + 1, E))
        self.blocks = nn.ModuleList(VisionBlock(cfg, ops, src, f"{p}encoder.layers.{i}.") for i in range(cfg.layers))
        self.post_w, self.post_b = src.take(p + "post_layernorm.weight", (E,)), src.take(p + "post_layernorm.bias", (E,))

    def check_pixels(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape [batch, 3, height, width], got {list(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a float tensor (normalised pixels), got {pixel_values.dtype}")
        size, P = self.cfg.image_size, self.cfg.patch
        h, w = pixel_values.shape[-2:]
        if interpolate_pos_encoding:
            if h < P or w < P:
                raise ValueError(f"image of {h}x{w} pixels is smaller than one {P}x{P} patch")
        elif (h, w) != (size, size):
            raise ValueError(f"pixel_values are {h}x{w} but this model expects {size}x{size} images "
                             "(resize them with the checkpoint's processor, or pass interpolate_pos_encoding=True)")

    def positions(self, h: int, w: int) -> torch.Tensor:
        n = self.cfg.num_patches
        gh, gw = h // self.cfg.patch, w // self.cfg.patch
        if gh * gw == n and gh == gw:
            return self.pos
        side = int(round(n ** 0.5))
        E = self.pos.shape[-1]
        grid = self.pos[:, 1:].reshape(1, side, side, E).permute(0, 3, 1, 2)  # (1, E, side, side)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(self.pos.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, E)  # (1, gh*gw, E)
        return torch.cat([self.pos[:, :1], grid], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
        self.check_pixels(pixel_values, interpolate_pos_encoding)
        B, _, h, w = pixel_values.shape
        x = F.conv2d(pixel_values.to(self.patch_w.dtype), self.patch_w, self.patch_b, stride=self.cfg.patch)
        x = x.flatten(2).transpose(1, 2)  # (B, N, E)
        x = torch.cat([self.cls.expand(B, 1, -1), x], dim=1)  # (B, 1 + N, E)
        pos = self.positions(h, w) if interpolate_pos_encoding else self.pos
        x = x + pos[:, : x.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        last = self.ops.layernorm(x, self.post_w, self.post_b, self.cfg.eps)
        pooled = self.ops.layernorm(last[:, 0], self.post_w, self.post_b, self.cfg.eps)
        return last, pooled
