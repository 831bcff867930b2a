"""The op layer: every hot op by name, with a reference and a fast implementation.

    ops.get("attention", "reference")    -> blip2_fast.reference.attention_ref
    ops.get("attention", "fast")         -> the Triton kernel's host function
    ops.get("attention", "fast", "cpu")  -> blip2_fast.ops_cpu.attention (torch's fused SDPA)

An op may have one fast implementation per device type (Triton or CUDA on the GPU; the C++
extension or torch's own fused kernels on the CPU); `bind` picks the device's native one, and Triton
interpreted on the CPU only where there is no native one.

On a GPU, "fast" means the faster of our kernel and PyTorch's best path (`blip2_fast.ops_torch`):
`bind` wraps both in a `tactics.TacticOp`, which times them at the first call of each shape class
and binds the winner (cached on disk; see blip2_fast/tactics.py). `ops={name: "fast"}` forces our
kernel; BLIP2_FAST_TACTICS=off takes our kernels everywhere. `BoundOps.impls[name].why` says what
was bound and why.

Names: `layer_norm` and `rms_norm` (as their kernels, tests and benchmarks are named); the old
registry names `layernorm` / `rmsnorm` are accepted for one release with a DeprecationWarning.

`get` never touches global state, so tests call implementations directly. Models never look ops up
per call: `bind(...)` resolves the choice once (at `load()` time) into a frozen `BoundOps` whose
attributes are plain callables, which the modules keep. That keeps CUDA graphs and torch.compile
possible.

Falling back is the registry's job and only happens in `bind`: when a fast implementation cannot run
on the target device (Triton on a CPU without TRITON_INTERPRET=1, the C++/CUDA extension without a
build), the reference is bound instead and one warning names the op and the reason. Asking for an
op's fast implementation explicitly through `overrides` makes that an error instead of a warning.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from typing import Callable

import torch

from . import reference, tactics
from .kernels.interpret import interpreting

OP_NAMES = (
    "attention",
    "cross_attention",
    "paged_attention",
    "write_kv",
    "layer_norm",
    "rms_norm",
    "ln_linear_gelu",
    "linear_gelu",
    "linear",
    "opt_decode_block",
    "t5_decode_block",
)
IMPLS = ("reference", "fast")
# Deprecated registry names (until 0.2): accepted by get / bind / overrides / BoundOps attributes.
ALIASES = {"layernorm": "layer_norm", "rmsnorm": "rms_norm"}
_alias_warned: set[str] = set()


def canonical(name: str) -> str:
    """`name`, or the op a deprecated alias stands for (warned about once per alias)."""
    if name in ALIASES:
        new = ALIASES[name]
        if name not in _alias_warned:
            _alias_warned.add(name)
            warnings.warn(f"blip2_fast: op name {name!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
        return new
    return name

_REFERENCE: dict[str, Callable] = {
    "attention": reference.attention_ref,
    "cross_attention": reference.cross_attention_ref,
    "paged_attention": reference.paged_attention_ref,
    "write_kv": reference.write_kv_ref,
    "layer_norm": reference.layer_norm_ref,
    "rms_norm": reference.rms_norm_ref,
    "ln_linear_gelu": reference.ln_linear_gelu_ref,
    "linear_gelu": reference.linear_gelu_ref,
    # prepared once per weight at load: ops.linear(weight, bias) -> lin, then lin(x, activation)
    "linear": reference.LinearRef,
    "opt_decode_block": reference.opt_decode_block_ref,
    "t5_decode_block": reference.t5_decode_block_ref,
}


@dataclasses.dataclass(frozen=True)
class _Fast:
    module: str  # imported lazily, so `import blip2_fast` never needs triton or a compiler
    attr: str
    kind: str  # "triton", "ext" or "torch" (built on torch's own kernels): decides how availability is checked
    devices: tuple[str, ...]  # device types it runs on natively (Triton also runs interpreted on the CPU)


# name -> its fast implementations, in order of preference. An op missing here has no fast
# implementation yet and binds its reference under "fast" (no warning: nothing was lost).
_FAST: dict[str, list[_Fast]] = {}


def register_fast(name: str, module: str, attr: str, kind: str, devices: tuple[str, ...] | None = None) -> None:
    """Declare a fast implementation of `name` (done once per implementation, below, at import).

    devices: the device types it runs on natively; default ("cuda",) for Triton and ("cpu", "cuda")
    for the extension. An op may have one implementation per device type (paged_attention: Triton on
    the GPU, the extension on the CPU); the first registered is the one `get(name, "fast")` returns.
    """
    name = canonical(name)
    if name not in _REFERENCE:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(OP_NAMES)}")
    if kind not in ("triton", "ext", "torch"):
        raise ValueError(f"kind must be 'triton', 'ext' or 'torch', got {kind!r}")
    if kind == "torch" and not devices:
        raise ValueError("a 'torch' implementation must name its devices")
    devices = devices or (("cuda",) if kind == "triton" else ("cpu", "cuda"))
    _FAST.setdefault(name, []).append(_Fast(module, attr, kind, tuple(devices)))


def _check(name: str, impl: str) -> str:
    """The op's canonical name, after checking it and `impl`."""
    name = canonical(name)
    if name not in _REFERENCE:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(OP_NAMES)}")
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r} for op {name!r}; expected one of {IMPLS}")
    return name


def has_fast(name: str) -> bool:
    name = _check(name, "fast")
    return name in _FAST


def _candidates(name: str, device: torch.device) -> list[_Fast]:
    """`name`'s fast implementations for `device`, preferred first: native ones, then Triton
    interpreted on a CPU (a correctness tool, slower than any native kernel)."""
    native = [f for f in _FAST[name] if device.type in f.devices]
    return native + [f for f in _FAST[name] if f.kind == "triton" and f not in native and device.type != "cuda"]


def get(name: str, impl: str = "reference", device: torch.device | str | None = None) -> Callable:
    """The callable implementing op `name` with `impl` ("reference" or "fast"). No fallback here.

    With `device`, the fast implementation that `bind` would pick for it (e.g. paged_attention: the
    Triton kernel on cuda, the C++ kernel on cpu); without, the first registered one.
    """
    name = _check(name, impl)
    if impl == "reference" or name not in _FAST:
        return _REFERENCE[name]
    if device is None:
        f = _FAST[name][0]
    else:
        device = torch.device(device)
        f, _ = _pick(name, device)
        if f is None:  # none can run: return the preferred one anyway (no fallback here), if any
            cands = _candidates(name, device)
            if not cands:
                raise ValueError(f"op {name!r} has no fast implementation for device type {device.type!r}")
            f = cands[0]
    return getattr(importlib.import_module(f.module), f.attr)


def _reason(f: _Fast, device: torch.device) -> str | None:
    if f.kind == "triton":
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            return f"triton is not importable ({type(e).__name__}: {e})"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        if device.type != "cuda" and not interpreting():
            return f"Triton kernels need a CUDA device (got {device.type}); set TRITON_INTERPRET=1 to interpret them on the CPU"
    elif device.type not in f.devices:
        return f"{f.module}.{f.attr} has no kernel for device type {device.type!r}"
    elif f.kind == "ext":
        from . import _ext

        reason = _ext.unavailable_reason(device)
        if reason is not None:
            return reason
    try:
        getattr(importlib.import_module(f.module), f.attr)
    except Exception as e:
        return f"its module failed to import ({type(e).__name__}: {e})"
    return None


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why none of op `name`'s fast implementations can run on `device`, or None if one can."""
    name = _check(name, "fast")
    if name not in _FAST:
        return None
    device = torch.device(device)
    f, reasons = _pick(name, device)
    if f is not None:
        return None
    return "; ".join(reasons) or f"it has no fast implementation for device type {device.type!r}"


def _pick(name: str, device: torch.device) -> tuple[_Fast | None, list[str]]:
    """The first of `name`'s candidates for `device` that can run there, and why those before it cannot."""
    reasons = []
    for f in _candidates(name, device):
        r = _reason(f, device)
        if r is None:
            return f, reasons
        reasons.append(r)
    return None, reasons


@dataclasses.dataclass(frozen=True)
class BoundOps:
    """Op callables resolved once for one model; `impls` records what each name resolved to
    ("fast" or "reference", each a `tactics.Impl` whose `.why` says why and, for an op chosen per
    shape class by timing, `.choices` what each class got)."""

    attention: Callable
    cross_attention: Callable
    paged_attention: Callable
    write_kv: Callable
    layer_norm: Callable
    rms_norm: Callable
    ln_linear_gelu: Callable
    linear_gelu: Callable
    linear: Callable
    opt_decode_block: Callable
    t5_decode_block: Callable
    impls: dict = dataclasses.field(default_factory=dict)

    @property
    def layernorm(self) -> Callable:
        """Deprecated: `layer_norm`."""
        return getattr(self, canonical("layernorm"))

    @property
    def rmsnorm(self) -> Callable:
        """Deprecated: `rms_norm`."""
        return getattr(self, canonical("rmsnorm"))


_warned: set[tuple[str, str]] = set()

# The PyTorch path each op with a GPU kernel of ours is timed against (blip2_fast/ops_torch.py).
# write_kv has none: a scatter into the cache is one index_copy_ either way, and it mutates.
TORCH_PATHS = {name: ("blip2_fast.ops_torch", name) for name in
               ("attention", "cross_attention", "paged_attention", "layer_norm", "rms_norm", "ln_linear_gelu", "linear_gelu")}


def default_backend() -> str:
    backend = os.environ.get("BLIP2_FAST_BACKEND") or "fast"  # unset or empty: the default
    if backend not in IMPLS:
        raise ValueError(f"BLIP2_FAST_BACKEND={backend!r}; expected one of {IMPLS}")
    return backend


_TUNER_DEFAULT = object()


def check_choice(backend: str | None = None, overrides: dict | None = None) -> tuple[str, dict]:
    """`bind`'s argument checks alone, which resolve no op and build nothing (`load` runs them before
    reading a checkpoint): -> (the backend, default applied; the overrides as a dict). Raises
    ValueError / TypeError as `bind` would."""
    backend = default_backend() if backend is None else backend
    if backend not in IMPLS:
        raise ValueError(f"backend must be one of {IMPLS}, got {backend!r}")
    given = dict(overrides or {})
    for name, impl in given.items():
        _check(name, impl)
    return backend, given


def bind(backend: str | None = None, overrides: dict | None = None, device="cpu", *,
         tuner: tactics.Tuner | None = _TUNER_DEFAULT) -> BoundOps:
    """Resolve every op for `device`: `backend` for all, `overrides` ({"attention": "reference"}) per op.

    An op that falls back from "fast" to the reference warns once per (op, reason). An op named in
    `overrides` as "fast" that cannot run raises RuntimeError instead: it was asked for explicitly,
    and it is our kernel, never PyTorch's path.

    tuner: how ops with a kernel of ours choose between it and PyTorch's path (`blip2_fast.tactics`);
    default `tactics.default_tuner(device)`: on CUDA devices unless BLIP2_FAST_TACTICS=off, none on
    the CPU (which keeps its own fast implementations). None: no choice, our kernels.
    """
    backend, given = check_choice(backend, overrides)  # given: as the caller spelled them (aliases)
    overrides = {canonical(name): impl for name, impl in given.items()}
    device = torch.device(device)
    if tuner is _TUNER_DEFAULT:
        tuner = tactics.default_tuner(device)
    fns, impls = {}, {}
    for name in OP_NAMES:
        impl = overrides.get(name, backend)
        asked = name in overrides
        why = "asked for with ops=" if asked else f"backend {backend!r}"
        if impl == "fast" and name in _FAST:
            reason = unavailable_reason(name, device)
            if reason is not None:
                if asked:
                    alias = [a for a, n in ALIASES.items() if n == name and a in given]
                    named = f"op {name!r}" + (f" (asked for as {alias[0]!r})" if alias else "")
                    raise RuntimeError(f"{named} was asked for with impl 'fast' but cannot run: {reason}")
                if (name, reason) not in _warned:
                    _warned.add((name, reason))
                    warnings.warn(f"blip2_fast: op {name!r} falls back to the reference: {reason}", RuntimeWarning, stacklevel=3)
                impl, why = "reference", f"fell back to the reference: {reason}"
        elif impl == "fast":
            impl, why = "reference", "no fast implementation exists"  # nothing to warn about
        fn = get(name, impl, device)
        tactic = None
        if impl == "fast":
            f, _ = _pick(name, device)
            mine = f is not None and f.kind in ("triton", "ext")
            label = "triton" if f is not None and f.kind == "triton" else (device.type if device.type != "cpu" else "cpp")
            if not mine:
                why = f"{f.module}.{f.attr}: the {device.type.upper()}'s fast implementation"
            elif asked:
                why = f"our {label} kernel, asked for with ops=: no tactic choice"
            elif name not in TORCH_PATHS:
                why = f"our {label} kernel"
            elif tuner is None:
                why = f"our {label} kernel: " + (f"{tactics.ENV}=off" if device.type == "cuda" else
                                                 "tactic choice times candidates on CUDA devices only")
            else:
                torch_fn = getattr(importlib.import_module(TORCH_PATHS[name][0]), TORCH_PATHS[name][1])
                fn = tactic = tactics.TacticOp(name, [(label, fn), ("torch", torch_fn)], tuner)
                why = f"per shape class, the faster of our {label} kernel and torch (timed at first use)"
        fns[name] = fn
        impls[name] = tactics.Impl(impl, why, tactic)
    return BoundOps(**fns, impls=impls)


register_fast("attention", "blip2_fast.kernels.attention", "attention", "triton")
register_fast("paged_attention", "blip2_fast.kernels.paged_attention", "paged_attention", "triton")
register_fast("write_kv", "blip2_fast.kernels.write_kv", "write_kv", "triton")
register_fast("layer_norm", "blip2_fast.kernels.layer_norm", "layer_norm", "triton")
register_fast("rms_norm", "blip2_fast.kernels.rms_norm", "rms_norm", "triton")
register_fast("ln_linear_gelu", "blip2_fast.kernels.ln_linear_gelu", "ln_linear_gelu", "triton")
register_fast("linear_gelu", "blip2_fast.kernels.linear_gelu", "linear_gelu", "triton")
register_fast("cross_attention", "blip2_fast._ext", "cross_attention", "ext")
register_fast("paged_attention", "blip2_fast._ext", "paged_attention", "ext", devices=("cpu",))
register_fast("rms_norm", "blip2_fast._ext", "rms_norm", "ext", devices=("cpu",))
register_fast("write_kv", "blip2_fast._ext", "write_kv", "ext", devices=("cpu",))
register_fast("linear", "blip2_fast.linear_cpu", "PackedLinear", "ext", devices=("cpu",))
register_fast("linear", "blip2_fast.linear_cpu", "PackedLinear", "torch", devices=("cuda",))  # F.linear there
register_fast("opt_decode_block", "blip2_fast._ext", "opt_decode_block", "ext", devices=("cpu",))
register_fast("t5_decode_block", "blip2_fast._ext", "t5_decode_block", "ext", devices=("cpu",))
# the layers as the models run them there (no packed CPU linears to compose): nothing to fall back from
register_fast("opt_decode_block", "blip2_fast.reference", "opt_decode_block_ref", "torch", devices=("cuda",))
register_fast("t5_decode_block", "blip2_fast.reference", "t5_decode_block_ref", "torch", devices=("cuda",))
for _name, _attr in (("attention", "attention"), ("layer_norm", "layer_norm"), ("linear_gelu", "linear_gelu"),
                     ("ln_linear_gelu", "ln_linear_gelu")):
    register_fast(_name, "blip2_fast.ops_cpu", _attr, "torch", devices=("cpu",))
# Where the C++ extension cannot build, these two run as plain PyTorch on the CPU (the K/V scatter is
# one index_copy_, wrapped as a custom op so it traces; RMSNorm is the reference's few vector passes),
# so a default CPU load binds them without a fallback warning, and never through the Triton interpreter.
register_fast("write_kv", "blip2_fast.ops_cpu", "write_kv", "torch", devices=("cpu",))
register_fast("rms_norm", "blip2_fast.reference", "rms_norm_ref", "torch", devices=("cpu",))
