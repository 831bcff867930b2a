"""EVA ViT-g vision encoder (as transformers' `Blip2VisionModel`): patch + class embeddings, pre-LN
blocks with one fused qkv projection, and a post-LayerNorm."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig
from ..ops import BoundOps
from ..layers import Linear, pack_linears, take_param
from ..layers.params import as_param
from ..weights import WeightSource


class _LayerNorm(nn.Module):
    def __init__(self, src: WeightSource, name: str, E: int):
        super().__init__()
        self.weight, self.bias = take_param(src, name + ".weight", (E,)), take_param(src, name + ".bias", (E,))


def _reused(ws: dict | None, key: str, lin: Linear, shape, like: torch.Tensor) -> torch.Tensor | None:
    """An output buffer for a packed linear that every block of one forward reuses: the MLP and qkv
    intermediates are megabytes (batch 8: 12.6 MB), and a fresh one is a fresh mmap whose pages all
    fault on first touch, in every block. None (a new tensor) where the linear is not packed."""
    if ws is None or lin.packed is None:
        return None
    t = ws.get(key)
    if t is None or t.shape != shape:
        t = ws[key] = like.new_empty(shape)
    return t


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, ops: BoundOps, src: WeightSource, p: str):
        super().__init__()
        E, M = cfg.hidden, cfg.mlp
        self.ops, self.eps, self.heads = ops, cfg.eps, cfg.heads
        self.gelu_approx = "none" if cfg.act == "gelu" else "tanh"
        self.layer_norm1 = _LayerNorm(src, p + "layer_norm1", E)
        a = p + "self_attn."
        if src.has(a + "qkv.bias") or not cfg.qkv_bias:
            self.qkv = Linear.load(src, a + "qkv", 3 * E, E, bias=src.has(a + "qkv.bias"))
        else:  # older checkpoints keep q_bias / v_bias apart (k has no bias)
            qb, vb = src.take(a + "q_bias", (E,)), src.take(a + "v_bias", (E,))
            self.qkv = Linear(take_param(src, a + "qkv.weight", (3 * E, E)),
                              as_param(torch.cat([qb, torch.zeros_like(qb), vb]), (a + "q_bias", a + "v_bias")))
        self.projection = Linear.load(src, a + "projection", E, E)
        self.layer_norm2 = _LayerNorm(src, p + "layer_norm2", E)
        self.fc1 = Linear.load(src, p + "mlp.fc1", M, E)
        self.fc2 = Linear.load(src, p + "mlp.fc2", E, M)

    def forward(self, x: torch.Tensor, ws: dict | None = None) -> torch.Tensor:
        """x [B, S, E] -> [B, S, E]. `ws`: the forward's workspace (see VisionEncoder.forward)."""
        B, S, E = x.shape
        H = self.heads
        n1, n2 = self.layer_norm1, self.layer_norm2
        h = self.ops.layer_norm(x, n1.weight, n1.bias, self.eps)
        qkv = self.qkv(h, out=_reused(ws, "qkv", self.qkv, (B, S, 3 * E), x)).view(B, S, 3, H, E // H)
        # strided views of the fused projection, (B, H, S, D) each: no copies
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        a = self.ops.attention(q, k, v)  # (B, H, S, D)
        # the residual stream ping-pongs between two reused buffers ("res_a" here, "res_b" after the MLP:
        # each is dead by the time it is written again), the residual added in place (x + y == y + x
        # exactly): no fresh multi-megabyte tensor per add, whose pages would fault on first touch
        y = self.projection(a.transpose(1, 2).reshape(B, S, E), out=_reused(ws, "res_a", self.projection, (B, S, E), x))
        x = y.add_(x)
        if self.fc1.packed is not None and self.gelu_approx == "none":
            h = self.ops.layer_norm(x, n2.weight, n2.bias, self.eps)
            m = self.fc1(h, "gelu", out=_reused(ws, "fc1", self.fc1, (B, S, self.fc1.weight.shape[0]), x))
        else:
            m = self.ops.ln_linear_gelu(x, n2.weight, n2.bias, self.eps, self.fc1.weight, self.fc1.bias, self.gelu_approx)
        return self.fc2(m, out=_reused(ws, "res_b", self.fc2, (B, S, E), x)).add_(x)


class VisionEncoder(nn.Module):
    """pixel_values [B, 3, H, W] -> (last_hidden_state [B, 1 + (H/P)(W/P), E], pooled [B, E])."""

    def __init__(self, cfg: VisionConfig, ops: BoundOps, src: WeightSource, p: str = "vision_model."):
        super().__init__()
        E, P = cfg.hidden, cfg.patch
        self.cfg, self.ops = cfg, ops
        e = p + "embeddings."
        self.patch_w = take_param(src, e + "patch_embedding.weight", (E, 3, P, P))
        self.patch_b = take_param(src, e + "patch_embedding.bias", (E,))
        self.cls = take_param(src, e + "class_embedding", (1, 1, E))
        self.pos = take_param(src, e + "position_embedding", (1, cfg.num_patches + 1, E))
        self.blocks = nn.ModuleList(VisionBlock(cfg, ops, src, f"{p}encoder.layers.{i}.") for i in range(cfg.layers))
        self.post_layernorm = _LayerNorm(src, p + "post_layernorm", E)
        pack_linears(self, ops)

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
        ws = {}  # this forward's reused intermediates: nothing is kept between calls (or shared by threads)
        for blk in self.blocks:
            x = blk(x, ws)
        post = self.post_layernorm
        last = self.ops.layer_norm(x, post.weight, post.bias, self.cfg.eps)
        pooled = self.ops.layer_norm(last[:, 0], post.weight, post.bias, self.cfg.eps)
        return last, pooled
