"""The `linear` op's fast form: a weight packed once at load for the CPU's small-M kernel.

    lin = PackedLinear(weight, bias)            # weight [N, K], bias [N] or None; packs now, once
    y = lin(x, "relu")                          # act(x @ weightᵀ + bias), as F.linear (+ F.relu / F.gelu)
    lin(x, out=buf)                             # into a preallocated [..., N] buffer
    PackedLinear(w_head, dtype=torch.bfloat16)  # bf16 copy: bf16(x) · bf16(w), fp32 sums, fp32 out

On a CPU the kernel (csrc/linear_cpu.cpp) streams the packed weight once per call over torch's
threads, at close to memory bandwidth for the 1-32 rows of a decode step (MKL reads 5-10 GB/s there),
and fuses the bias and activation. The ISA is picked once, here: the widest of AVX-512 (with
avx512_bf16 for bf16 weights), AVX2+FMA the CPU has; `isa=` or the environment variable
BLIP2_FAST_LINEAR_ISA caps it ("avx512_bf16", "avx512", "avx2", "scalar" for the portable C++ loops,
"torch" for F.linear). A CPU without AVX2+FMA, and any other device, runs F.linear on the unpacked
weight ("torch"), as does an fp16 weight. Up to 32 rows (a decode step: the weight streams past
once) the kernels prefetch the weight a few KB ahead, in the AVX-512 tiles of 8 or more rows and in
every AVX2 tile (csrc/linear_cpu_kernels.h says why); BLIP2_FAST_LINEAR_PREFETCH=0 turns that off.

The bf16 form's error bound (what the greedy head's screen relies on): every product of two bf16
values is exact in fp32, and each is added to its running fp32 sum with one rounding (an FMA, or
vdpbf16ps's two adds, in whatever order the K chunks give), so |sum - exact| <= K u sum|products|
(u = 2^-24) for any K split, within greedy_head's 2 K u ||hb|| ||wb|| term; the output is fp32, not
rounded to bf16 (its 2^-8 term then only adds slack). vdpbf16ps flushes subnormals, which the
head's 2^-120 K term covers.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ISA_ENV = "BLIP2_FAST_LINEAR_ISA"
ISAS = ("auto", "avx512_bf16", "avx512", "avx2", "scalar", "torch")
ACTIVATIONS = ("none", "relu", "gelu")
_DTYPES = (torch.float32, torch.bfloat16)


def resolve_isa(isa: str | None = None, device: torch.device | str = "cpu") -> str:
    """The kernel `PackedLinear` runs for `isa` (None: $BLIP2_FAST_LINEAR_ISA, else "auto") on `device`:
    a cap lowered to what the CPU has; "torch" where the packed kernels cannot help or cannot load."""
    name = isa if isa is not None else (os.environ.get(ISA_ENV) or "auto")
    if name not in ISAS:
        src = "isa" if isa is not None else ISA_ENV
        raise ValueError(f"{src} must be one of {ISAS}, got {name!r}")
    if name == "torch" or torch.device(device).type != "cpu":
        return "torch"
    from . import _ext

    if _ext.unavailable_reason("cpu") is not None:
        return "torch"
    got = _ext.linear_isa(name)
    # below AVX2 torch's BLAS beats portable loops; the scalar kernel runs only when asked for by name
    return "torch" if got == "scalar" and name != "scalar" else got


class PackedLinear:
    """act(x @ weightᵀ + bias) with the weight packed once (see the module docstring).

    weight: [N, K] float tensor; bias: [N] or None (kept in fp32); dtype: the packed weight's dtype,
    default float32 for an fp32 weight and bfloat16 for a bf16 one; isa: a cap, see `resolve_isa`.
    Calling it: x [..., K] (float32; bfloat16 too with bf16 weights) -> [..., N] in x's dtype.
    Attributes: in_features, out_features, dtype, isa (the kernel it runs), packed (None under
    "torch", which keeps `weight` instead: rounded to bf16 and held in fp32 for a bf16 form).
    """

    __slots__ = ("in_features", "out_features", "dtype", "isa", "packed", "weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, dtype: torch.dtype | None = None,
                 isa: str | None = None):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"weight must be a float tensor [N, K], got {_describe(weight)}")
        N, K = weight.shape
        if N < 1 or K < 1:
            raise ValueError(f"weight must have shape [N, K] with N, K >= 1, got {tuple(weight.shape)}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)
                                 or not bias.is_floating_point() or bias.device != weight.device):
            raise ValueError(f"bias must be a float tensor [N] = [{N}] on {weight.device}, got {_describe(bias)}")
        if dtype is None:
            dtype = weight.dtype if weight.dtype in _DTYPES else None
        elif dtype not in _DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.in_features, self.out_features, self.dtype = K, N, dtype
        self.isa = "torch" if dtype is None else resolve_isa(isa, weight.device)
        if self.isa == "avx512_bf16" and dtype == torch.float32:
            self.isa = "avx512"  # the fp32 kernel has no bf16 instructions to use
        self.bias = None if bias is None else bias.detach().float().contiguous()
        with torch.no_grad():
            if self.isa == "torch":
                self.packed = None
                w = weight.detach()
                self.weight = w.bfloat16().float() if dtype == torch.bfloat16 else w
                if dtype is None:  # fp16 and others: F.linear in the weight's dtype
                    self.bias = None if bias is None else bias.detach().to(w.dtype)
            else:
                from . import _ext

                self.packed = _ext.linear_pack(weight.detach(), dtype)
                self.weight = None

    def __call__(self, x: torch.Tensor, activation: str = "none", out: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be a tensor [..., K] with K = {self.in_features}, got {_describe(x)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if self.packed is None:
            y = self._torch(x, activation)
            return y if out is None else out.copy_(y)
        # the ops directly (the extension loaded when the weight was packed): a decode step makes
        # dozens of these calls, each a few microseconds of fixed cost
        if out is None:
            return torch.ops.blip2_fast.linear_cpu(x, self.packed, self.bias, self.out_features, activation, self.isa)
        torch.ops.blip2_fast.linear_cpu_out(x, self.packed, self.bias, self.out_features, activation, self.isa, out)
        return out

    def _torch(self, x, activation):
        w = self.weight
        if self.dtype == torch.bfloat16:  # the kernel's semantics: bf16 inputs, fp32 sums, x's dtype out
            y = F.linear(x.bfloat16().float(), w, self.bias).to(x.dtype)
        else:
            y = F.linear(x, w, self.bias)
        return F.relu(y) if activation == "relu" else F.gelu(y) if activation == "gelu" else y

    def __repr__(self) -> str:
        return (f"PackedLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"dtype={self.dtype}, isa={self.isa!r}, bias={self.bias is not None})")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return type(t).__name__
