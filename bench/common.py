"""Shared timing helpers for the benchmarks: device timers and the hardware ceilings we compare to.

Every kernel micro-benchmark (`bench/bench_<op>.py`) exposes

    def run(device="cuda", dtype=torch.bfloat16, quick=False) -> Iterator[dict]

yielding one row per case as soon as it is measured (so a run cut short keeps what it finished) with
at least the keys
    op, shape (str), dtype (str), ms, baseline (name of the PyTorch path), baseline_ms, ratio
    (= baseline_ms / ms, > 1 means we are faster), fraction_of_ceiling (achieved / ceiling, 0..1),
    achieved (e.g. "812 GB/s" or "301 TFLOP/s").
`quick=True` runs toy sizes (the `--dry-run` of bench/gpu_check.sh, and CPU smoke tests).

Rows of an op with a tactic choice (blip2_fast/tactics.py) also carry, from `with_tactic`,
    candidates_ms ({candidate: median ms}, timed as a model load would time them), tactic (the
    candidate a load would bind for this shape class), tactic_errors (candidates that raised).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, device="cuda", warmup: int = 5, iters: int = 20) -> float:
    """Median wall time of `fn()` in milliseconds; CUDA events on GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_ceilings: dict = {}


def copy_bandwidth_gbs(device="cuda", nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), in GB/s."""
    key = ("bw", str(device))
    if key not in _ceilings:
        n = nbytes if torch.device(device).type == "cuda" else 1 << 26
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device=device, warmup=3, iters=10)
        _ceilings[key] = 2 * n / (ms * 1e-3) / 1e9
    return _ceilings[key]


def matmul_tflops(device="cuda", dtype=torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matmul rate for `dtype` (TFLOP/s): the compute ceiling."""
    key = ("mm", str(device), str(dtype))
    if key not in _ceilings:
        if torch.device(device).type != "cuda":
            n = 512
            dtype = torch.float32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_ms(lambda: a @ b, device=device, warmup=3, iters=10)
        _ceilings[key] = 2 * n**3 / (ms * 1e-3) / 1e12
    return _ceilings[key]


def row(op, shape, dtype, ms, baseline, baseline_ms, *, flops=None, nbytes=None, device="cuda") -> dict:
    """One benchmark row; the ceiling is compute (flops given) or bandwidth (nbytes given)."""
    r = {"op": op, "shape": str(shape), "dtype": str(dtype).replace("torch.", ""), "ms": round(ms, 4),
         "baseline": baseline, "baseline_ms": round(baseline_ms, 4), "ratio": round(baseline_ms / ms, 3)}
    if flops is not None:
        achieved = flops / (ms * 1e-3) / 1e12
        r["achieved"] = f"{achieved:.1f} TFLOP/s"
        r["fraction_of_ceiling"] = round(achieved / matmul_tflops(device, dtype), 3)
    elif nbytes is not None:
        achieved = nbytes / (ms * 1e-3) / 1e9
        r["achieved"] = f"{achieved:.0f} GB/s"
        r["fraction_of_ceiling"] = round(achieved / copy_bandwidth_gbs(device), 3)
    else:
        r["fraction_of_ceiling"] = None
    return r


_TACTIC_CACHE = None


def with_tactic(r: dict, op: str, ours: tuple[str, Callable], args: tuple, kwargs: dict | None = None,
                *, device="cuda") -> dict:
    """Add to row `r` what tactic choice makes of this call: every candidate (ours, then PyTorch's
    path from blip2_fast.ops_torch) timed by `blip2_fast.tactics` exactly as at a model's first call
    of the shape class, and the winner it would bind. Nothing is read from or written to the user's
    tactic cache. On a CPU (the dry run) the timing is a short perf_counter median."""
    import tempfile

    from blip2_fast import ops_torch, tactics

    global _TACTIC_CACHE
    if _TACTIC_CACHE is None:
        _TACTIC_CACHE = tempfile.mkdtemp(prefix="blip2_fast_bench_tactics_")
    dev = torch.device(device)
    timer = None if dev.type == "cuda" else (lambda fns: tactics.time_candidates(fns, dev, warmup=1, reps=3))
    tuner = tactics.Tuner(dev, timer=timer, device_label="bench",
                          cache=tactics.TacticCache(f"{_TACTIC_CACHE}/{len(r)}-{id(r)}.json"))
    top = tactics.TacticOp(op, [ours, ("torch", getattr(ops_torch, op))], tuner)
    top(*args, **(kwargs or {}))
    (choice,) = top.choices.values()
    r["candidates_ms"] = {n: (round(t, 4) if t is not None else None) for n, t in choice.times_ms.items()}
    r["tactic"] = choice.winner
    if choice.errors:
        r["tactic_errors"] = choice.errors
    return r


_COLUMNS = ["op", "shape", "dtype", "ms", "baseline", "baseline_ms", "ratio", "achieved", "fraction_of_ceiling",
            "tactic"]


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def print_table(rows: list[dict]) -> None:
    """The standard columns, then any other keys the rows carry (num_splits, max_abs_diff, ...)."""
    if not rows:
        print("(no rows)")
        return
    cols = _COLUMNS + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in _COLUMNS]
    widths = [max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))


def cli(run: Callable, doc: str, argv=None) -> list[dict]:
    """The command line every `bench/bench_<op>.py` shares: --device, --dtype, --quick, a table."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="toy sizes (smoke test)")
    a = ap.parse_args(argv)
    rows = list(run(a.device, getattr(torch, a.dtype), a.quick))
    print_table(rows)
    return rows
