"""The linear layer every model applies, and the LM head product."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..linear_cpu import resolve_isa
from .params import as_param, concat_param, take_param


ACTIVATIONS = ("none", "relu", "gelu")


class Linear(nn.Module):
    """y = act(x @ weightᵀ + bias). x [..., n_in] -> [..., n_out]; act "none", "relu" or "gelu" (erf).

    The one place where a model's linear layers are applied. `pack(ops.linear)` (done once at load by
    `pack_linears`) gives it the op layer's prepared form of the weight; on a CPU that is the small-M
    kernel's packed copy (blip2_fast/linear_cpu.py), which then runs every float32 call with the bias
    and activation fused and, with `out=`, writes into a caller's buffer. `weight` / `bias` stay the
    checkpoint's parameters (state_dict, parameters()); the packed copy is not one of them.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.packed = None  # the prepared weight when `pack` found one that helps, else F.linear

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

    def pack(self, make) -> bool:
        """Prepare the weight once with `make(weight, bias)` (the bound `linear` op's fast form).
        Kept only for a float32 CPU weight whose prepared form runs a packed kernel (not F.linear
        again: that would only add a call); returns whether it was kept."""
        w = self.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            return False
        lin = make(w, self.bias)
        if getattr(lin, "packed", None) is None:  # the reference op, or PackedLinear's "torch" fallback
            return False
        self.packed = lin
        return True

    def forward(self, x: torch.Tensor, activation: str = "none", out: torch.Tensor | None = None) -> torch.Tensor:
        p = self.packed
        if p is not None and x.dtype == torch.float32:
            return p(x, activation, out)
        y = F.linear(x, self.weight, self.bias)
        if activation != "none":
            if activation not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
            y = F.relu(y) if activation == "relu" else F.gelu(y)
        return y if out is None else out.copy_(y)


def pack_linears(root: nn.Module, ops) -> int:
    """Pack every `Linear` under `root` with the bound `linear` op (`ops.linear`), once, at load:
    only when that op is the fast one (the reference backend keeps F.linear, the spec). Returns how
    many were packed. Memory: each packed weight is a second copy of its fp32 weight (padded to 32
    output columns), beside the checkpoint parameter that state_dict() returns; when the copies of
    `root`'s layers would take more than half the memory available, none is packed (a warning says so)."""
    if ops.impls.get("linear") != "fast":
        return 0
    layers = [m for m in root.modules() if isinstance(m, Linear)]
    need = sum(_packed_bytes(m.weight) for m in layers)
    if need and resolve_isa() != "torch":  # (with "torch" nothing is packed: no copy to pay for)
        from ..engine.limits import available_memory, format_bytes  # (lazy: engine imports layers)

        avail = available_memory(torch.device("cpu"))
        if need > avail // 2:  # a second copy must not take the memory activations and the KV cache need
            warnings.warn(f"blip2_fast: not packing the {type(root).__name__}'s {len(layers)} linear layers for "
                          f"the CPU kernel: their packed copies need {format_bytes(need)} beside the weights, "
                          f"more than half of the {format_bytes(avail)} available; they run through F.linear "
                          "(BLIP2_FAST_LINEAR_ISA=torch turns packing off without this warning)", stacklevel=2)
            return 0
    with torch.no_grad():
        return sum(m.pack(ops.linear) for m in layers)


def _packed_bytes(w: torch.Tensor) -> int:
    """Bytes of a packed copy of `w` (a float32 CPU weight [N, K]; output columns padded to 32)."""
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return 0
    n, k = w.shape
    return -(-n // 32) * 32 * k * 4


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
