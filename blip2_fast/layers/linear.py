"""The linear layer every model applies, and the LM head product."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .params import as_param, concat_param, take_param


class Linear(nn.Module):
    """y = x @ weightᵀ + bias. x [..., n_in] -> [..., n_out].

    The one place where a model's linear layers are applied: a faster linear (a prepacked small-M
    CPU GEMM, a quantized weight) replaces `forward` here, for every layer at once.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    @classmethod
    def load(cls, src, name: str, n_out: int, n_in: int, *, bias: bool = True, dtype=None) -> Linear:
        """From checkpoint keys `name.weight` [n_out, n_in] and (with bias) `name.bias` [n_out]."""
        w = take_param(src, name + ".weight", (n_out, n_in), dtype)
        return cls(w, take_param(src, name + ".bias", (n_out,), dtype) if bias else None)

    @classmethod
    def fused(cls, src, names: Sequence[str], n_outs: Sequence[int], n_in: int, *, bias: bool = True,
              scales: Sequence[float] | None = None, dtype=None) -> Linear:
        """Several checkpoint linears over the same input stacked into one: output rows are name 0's,
        then name 1's, ...; `scales[i]` multiplies name i's weight and bias."""
        w = concat_param(src, [(n + ".weight", (o, n_in)) for n, o in zip(names, n_outs)], dtype, scales)
        b = concat_param(src, [(n + ".bias", (o,)) for n, o in zip(names, n_outs)], dtype, scales) if bias else None
        return cls(w, b)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, keys: Sequence[str]) -> Linear:
        """From tensors already built (e.g. a legacy checkpoint's split biases); `keys` they came from."""
        return cls(as_param(weight, keys), as_param(bias, keys) if bias is not None else None)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def lm_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [..., E] @ weight[V, E]ᵀ -> [..., V].

    Computed as (weight @ hiddenᵀ)ᵀ: with few rows (decode) and a large vocabulary, BLAS runs the
    tall-skinny product faster than the short-wide one (on 2 CPU cores, 7.6 vs 9.8 ms for
    8 x 512 x 50304) and the head is about half of a CPU decode step. The same product (only the
    BLAS kernel, and so the rounding order of its sums, differs).
    """
    shape = hidden.shape
    h = hidden.reshape(-1, shape[-1])  # (n, E)
    return torch.mm(weight, h.t()).t().reshape(*shape[:-1], weight.shape[0])  # (..., V)
