"""Checkpoint tensors as `nn.Parameter`s that remember which checkpoint keys they were built from.

Every weight of a blip2_fast model is a parameter (frozen: inference only), so `state_dict()`,
`parameters()`, quantizers and memory accounting see it. A parameter's `ckpt_keys` names the
checkpoint tensors it holds: one key for a plain tensor, several for a fused one (q/k/v stacked
into one projection, say); `Blip2.checkpoint_keys()` collects them per state_dict name.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def as_param(t: torch.Tensor, keys: Sequence[str]) -> nn.Parameter:
    p = nn.Parameter(t, requires_grad=False)
    p.ckpt_keys = tuple(keys)
    return p


def take_param(src, key: str, shape, dtype: torch.dtype | None = None) -> nn.Parameter:
    """`src.take(key, shape, dtype)` as a parameter."""
    return as_param(src.take(key, shape, dtype), (key,))


def concat_param(src, parts: Sequence[tuple[str, tuple]], dtype: torch.dtype | None = None,
                 scales: Sequence[float] | None = None) -> nn.Parameter:
    """Checkpoint tensors `parts` [(key, shape), ...] concatenated along dim 0 into one parameter;
    `scales[i]` multiplies part i (OPT folds its query scale into the q projection)."""
    ts = [src.take(k, s, dtype) for k, s in parts]
    if scales is not None:
        ts = [t * c if c != 1.0 else t for t, c in zip(ts, scales)]
    return as_param(torch.cat(ts), [k for k, _ in parts])
