"""Tactic choice: a fast op is never slower than PyTorch's best path on the device it runs on.

For an op with a GPU kernel of ours, `bind` wraps the kernel and PyTorch's path for that op
(`blip2_fast.ops_torch`) in a `TacticOp`. At the op's first call per shape class (dtype, head dim,
power-of-two buckets of the sizes; `KEYS` below) it times every candidate on the call's own inputs
(CUDA events, warm-up runs, the median of interleaved repeats), binds the fastest for that class and
records the choice in a JSON file keyed by the device and the versions that decide the speed, so
only the first process on a machine pays for the measurement.

    BLIP2_FAST_TACTICS=off          no timing: our kernels, as before
    load(..., ops={"attention": "fast"})   that op's kernel of ours, never PyTorch's path
    model.impls["attention"].why    what was bound and why; .choices: {shape class: Choice}
    print(model.impls)              "fast", followed by each shape class's choice once made
    $BLIP2_FAST_CACHE/tactics.json  the cache (default ~/.cache/blip2_fast/tactics.json)

Nothing is timed while torch.compile traces or a CUDA graph is being captured: those calls take a
choice already made for their class, else our kernel (the engine's graph warm-up calls run eagerly
first, so decode steps are measured there). The CPU keeps its own fast implementations and is not
timed; tests drive all of this on the CPU with a `Tuner` whose timer is fake.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import functools
import hashlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

ENV = "BLIP2_FAST_TACTICS"
_FORMAT = 1


def enabled() -> bool:
    """BLIP2_FAST_TACTICS: unset, "", on/1/true/yes = time the candidates; off/0/false/no = our kernels."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("", "on", "1", "true", "yes"):
        return True
    if v in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"{ENV}={os.environ[ENV]!r}; expected on or off")


# ---------------------------------------------------------------------------------------- keys


def _b(n: int) -> int:
    """A size's power-of-two bucket: the shape classes one choice covers."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _attention_key(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None):
    B, H, Sq, D = q.shape
    return (f"{_dt(q)} B*H~{_b(B * H)} Sq~{_b(Sq)} Sk~{_b(k.shape[2])} D{D}" + (" causal" if causal else "")
            + (" kpm" if key_padding_mask is not None else "") + (" bias" if bias is not None else ""))


def _cross_attention_key(q, k, v, *, key_padding_mask=None, scale=None):
    B, H, Nq, D = q.shape
    return f"{_dt(q)} B*H~{_b(B * H)} Nq~{_b(Nq)} Nk~{_b(k.shape[2])} D{D}" + (" kpm" if key_padding_mask is not None else "")


def _paged_attention_key(q, k_cache, v_cache, block_tables, seq_lens, scale, rel_bias=None):
    N, H, D = q.shape
    ctx = block_tables.shape[1] * k_cache.shape[1]
    return (f"{_dt(q)} N~{_b(N)} H{H} D{D} block{k_cache.shape[1]} ctx~{_b(ctx)}"
            + (" rel_bias" if rel_bias is not None else ""))


def _rows(x) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _norm_key(x, *rest, residual=None):
    return f"{_dt(x)} rows~{_b(_rows(x))} N{x.shape[-1]}" + (" residual" if residual is not None else "")


def _layer_norm_key(x, weight, bias, eps, residual=None):
    return _norm_key(x, residual=residual)


def _rms_norm_key(x, weight, eps, residual=None):
    return _norm_key(x, residual=residual)


def _linear_gelu_key(x, weight, bias, approximate="none"):
    return f"{_dt(x)} M~{_b(_rows(x))} K{x.shape[-1]} N{weight.shape[0]} gelu-{approximate}"


def _ln_linear_gelu_key(x, ln_weight, ln_bias, eps, weight, bias, approximate="none"):
    return _linear_gelu_key(x, weight, bias, approximate)


KEYS: dict[str, Callable[..., str]] = {
    "attention": _attention_key,
    "cross_attention": _cross_attention_key,
    "paged_attention": _paged_attention_key,
    "layer_norm": _layer_norm_key,
    "rms_norm": _rms_norm_key,
    "linear_gelu": _linear_gelu_key,
    "ln_linear_gelu": _ln_linear_gelu_key,
}


def _paged_probe(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Time paged decode at its class's full context (every sequence as long as its block table):
    the gather + SDPA path always costs that, ours costs less for shorter sequences, so ours wins
    only where it wins in the worst case. (A CUDA-graph warm-up runs with length-1 contexts.) Table
    entries past a length must be valid block ids, as the spec's reference also reads them; with a
    bias table, the context stops at its length."""
    names = ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "scale", "rel_bias")
    a = dict(zip(names, args), **{n: kwargs[n] for n in names if n in kwargs})
    ctx = a["block_tables"].shape[1] * a["k_cache"].shape[1]
    if a.get("rel_bias") is not None:  # the bias table covers distances below its length only
        ctx = min(ctx, a["rel_bias"].shape[1])
    full = torch.full_like(a["seq_lens"], ctx)
    if len(args) >= 5:
        return (*args[:4], full, *args[5:]), kwargs
    return args, {**kwargs, "seq_lens": full}


PROBES: dict[str, Callable] = {"paged_attention": _paged_probe}


# ------------------------------------------------------------------------------------ timing


def time_candidates(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 3,
                    reps: int = 10) -> dict[str, float]:
    """Median milliseconds of each thunk, run interleaved (a b a b ...) so drift hits all alike; CUDA
    events on a GPU, perf_counter elsewhere. The thunks have already run once (compiled, tuned)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        for f in fns.values():
            f()
    if cuda:
        torch.cuda.synchronize(device)
    times: dict[str, list] = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                f()
                end.record()
                times[n].append((start, end))
            else:
                t0 = time.perf_counter()
                f()
                times[n].append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize(device)
        return {n: statistics.median(s.elapsed_time(e) for s, e in ts) for n, ts in times.items()}
    return {n: statistics.median(ts) for n, ts in times.items()}


# ------------------------------------------------------------------------------------- cache


def default_cache_path() -> Path:
    return Path(os.environ.get("BLIP2_FAST_CACHE") or Path.home() / ".cache" / "blip2_fast") / "tactics.json"


@functools.lru_cache(maxsize=None)
def _kernels_digest() -> str:
    """A hash of our kernel sources: a changed kernel is a new candidate, never judged by old times."""
    h = hashlib.sha256()
    roots = [Path(__file__).parent / "kernels", Path(__file__).parent / "csrc"]
    try:
        from . import kernels as _k  # installed as blip2_fast.kernels; may live elsewhere (editable installs)
        roots[0] = Path(_k.__file__).parent
        from . import csrc as _c
        roots[1] = Path(_c.__file__).parent
    except Exception:  # pragma: no cover - a broken install: hash whatever is there
        pass
    for root in roots:
        for p in sorted(root.glob("*")) if root.is_dir() else []:
            if p.suffix in (".py", ".cu", ".cpp", ".h"):
                h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def device_key(device: torch.device | str) -> str:
    """What decides a candidate's speed besides the shape: the device and every version involved."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        name = f"{torch.cuda.get_device_name(idx)} sm_{major}{minor}"
    else:
        import platform

        name = f"{device.type} {platform.processor() or platform.machine()}"
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "none"
    from . import __version__

    return (f"{name} | torch {torch.__version__} cuda {torch.version.cuda} | triton {triton_v} | "
            f"blip2_fast {__version__} kernels {_kernels_digest()}")


class TacticCache:
    """The on-disk record of choices: {"format": 1, "entries": {device_key: {"op: class": entry}}}.

    Read once, lazily; each new choice re-reads the file under a lock, merges and replaces it
    atomically, so processes sharing it keep each other's entries. A corrupt file is ignored (and
    replaced at the next write); a file that cannot be written keeps the choices in memory. Each is
    warned about once.
    """

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self._entries: dict | None = None
        self._warned: set[str] = set()

    def _warn(self, what: str, msg: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"blip2_fast: tactic cache {self.path}: {msg}", RuntimeWarning, stacklevel=4)

    def _read(self) -> dict:
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):  # nothing cached yet (a write says if it cannot be)
            return {}
        except OSError as e:
            self._warn("read", f"cannot be read ({type(e).__name__}: {e}); measuring afresh")
            return {}
        try:
            data = json.loads(text)
            entries = data["entries"]
            if data.get("format") != _FORMAT or not isinstance(entries, dict):
                raise ValueError(f"format {data.get('format')!r}")
            return {d: dict(e) for d, e in entries.items() if isinstance(e, dict)}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._warn("corrupt", f"ignored, not a tactic cache ({type(e).__name__}: {e}); it is replaced at the next choice")
            return {}

    def get(self, dev: str, key: str) -> dict | None:
        if self._entries is None:
            self._entries = self._read()
        e = self._entries.get(dev, {}).get(key)
        return e if isinstance(e, dict) else None

    def put(self, dev: str, key: str, entry: dict) -> None:
        if self._entries is None:
            self._entries = self._read()
        self._entries.setdefault(dev, {})[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                merged = self._read()
                for d, es in self._entries.items():
                    merged.setdefault(d, {}).update(es)
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"format": _FORMAT, "entries": merged}, indent=1, sort_keys=True))
                os.replace(tmp, self.path)
                self._entries = merged
        except OSError as e:
            self._warn("write", f"cannot be written ({type(e).__name__}: {e}); choices are kept for this process only")


# ------------------------------------------------------------------------------------ choice


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one shape class of one op was bound to: `winner` (a candidate's name), every candidate's
    median time in ms (None if it raised; the error in `errors`), and where it came from."""

    winner: str
    times_ms: dict
    errors: dict
    source: str  # "measured", "cache", or "not measured: <why>" (our kernel, for this call only)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        times = ", ".join(f"{n} {t:.4g} ms" if t is not None else f"{n} failed" for n, t in self.times_ms.items())
        return f"{self.winner} ({self.source}{': ' + times if times else ''})"


class Tuner:
    """What the TacticOps of one `bind` share: the device, how candidates are timed, the cache."""

    def __init__(self, device: torch.device | str, *, timer: Callable | None = None,
                 cache: TacticCache | None = None, device_label: str | None = None):
        self.device = torch.device(device)
        self.timer = timer or (lambda fns: time_candidates(fns, self.device))
        self.cache = cache if cache is not None else TacticCache()
        self.device_label = device_label or device_key(self.device)


def default_tuner(device: torch.device | str) -> Tuner | None:
    """The tuner `bind` uses: on CUDA devices unless BLIP2_FAST_TACTICS=off; None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or not enabled():
        return None
    return Tuner(device)


def _not_now() -> str | None:
    """Why candidates cannot be timed at this moment, or None."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


class TacticOp:
    """One op's candidates, the first ours: called like the op, it runs the candidate chosen for the
    call's shape class, choosing (from the cache, else by timing) at the class's first call."""

    def __init__(self, op: str, candidates: list[tuple[str, Callable]], tuner: Tuner):
        if len(candidates) < 2:
            raise ValueError(f"tactic choice for {op!r} needs at least two candidates")
        self.op = op
        self.candidates = dict(candidates)
        self.ours = candidates[0][0]
        self.tuner = tuner
        self._key = KEYS[op]
        self._probe = PROBES.get(op)
        self._fns: dict[str, Callable] = {}  # shape class -> the bound candidate
        self._choices: dict[str, Choice] = {}

    @property
    def choices(self) -> dict[str, Choice]:
        """{shape class: Choice} for every class seen so far."""
        return dict(self._choices)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # a traced graph bakes one candidate in: our kernel
            return self.candidates[self.ours](*args, **kwargs)
        key = self._key(*args, **kwargs)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._choose(key, args, kwargs)
        return fn(*args, **kwargs)

    def _choose(self, key: str, args: tuple, kwargs: dict) -> Callable:
        cache_key = f"{self.op}: {key}"
        e = self.tuner.cache.get(self.tuner.device_label, cache_key)
        if e is not None and e.get("winner") in self.candidates:
            c = Choice(e["winner"], dict(e.get("times_ms") or {}), dict(e.get("errors") or {}), "cache")
            return self._bind(key, c)
        why = _not_now()
        if why is not None:
            self._choices.setdefault(key, Choice(self.ours, {}, {}, f"not measured: {why}"))
            return self.candidates[self.ours]  # not bound: the next eager call measures
        c = self._measure(args, kwargs)
        self.tuner.cache.put(self.tuner.device_label, cache_key, {
            **c.as_dict(), "source": "measured", "when": datetime.datetime.now().isoformat(timespec="seconds")})
        return self._bind(key, c)

    def _bind(self, key: str, c: Choice) -> Callable:
        self._choices[key] = c
        self._fns[key] = self.candidates[c.winner]
        return self._fns[key]

    def _measure(self, args: tuple, kwargs: dict) -> Choice:
        if self._probe is not None:
            args, kwargs = self._probe(args, kwargs)
        thunks, errors = {}, {}
        for name, fn in self.candidates.items():
            try:
                fn(*args, **kwargs)  # compiles / autotunes / builds outside the timing
            except Exception as e:  # a candidate that cannot run this class simply loses
                errors[name] = f"{type(e).__name__}: {e}"[:300]
                continue
            thunks[name] = functools.partial(fn, *args, **kwargs)
        if not thunks:
            raise RuntimeError(f"blip2_fast: every candidate of op {self.op!r} failed: {errors}")
        times = self.tuner.timer(thunks) if len(thunks) > 1 else {n: None for n in thunks}
        # ours on a tie: a PyTorch path has to be faster to be bound
        winner = min(thunks, key=lambda n: (times[n] if times[n] is not None else 0.0, n != self.ours))
        all_times = {n: (round(float(times[n]), 5) if times.get(n) is not None else None) for n in self.candidates}
        return Choice(winner, all_times, errors, "measured")


class Impl(str):
    """A `BoundOps.impls` entry: equal to "fast" or "reference" as before, plus `why` (what was bound
    and why) and, for an op chosen per shape class by timing, `choices` ({shape class: Choice})."""

    def __new__(cls, value: str, why: str = "", tactic: TacticOp | None = None):
        self = super().__new__(cls, value)
        self.why = why
        self.tactic = tactic
        return self

    @property
    def choices(self) -> dict[str, Choice]:
        return {} if self.tactic is None else self.tactic.choices

    def __repr__(self) -> str:
        # the plain string's repr, plus what each shape class got once tactics have chosen
        # (so printing `model.impls` on a GPU shows the choices; `.why` always says the rest)
        parts = [f"[{k}] -> {c}" for k, c in self.choices.items()]
        return str.__repr__(self) + (f" ({'; '.join(parts)})" if parts else "")

    def __reduce__(self):  # pickles (and deep-copies) as the plain string
        return (str, (str(self),))


def report(impls: dict) -> dict:
    """{op: {"impl", "why", "choices": {shape class: Choice as a dict}}}: `model.impls` as JSON."""
    out = {}
    for name, v in impls.items():
        out[name] = {"impl": str(v), "why": getattr(v, "why", ""),
                     "choices": {k: c.as_dict() for k, c in getattr(v, "choices", {}).items()}}
    return out
