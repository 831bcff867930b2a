"""The prepacked small-M CPU linear (csrc/linear_cpu.cpp) vs F.linear: `python -m bench.bench_linear`.

Cases: every linear of a decode step of the `blip2-cpu-mid` and `blip2-opt-2.7b` presets (fused qkv,
out_proj, fc1 with its ReLU, fc2; the bf16 screening head's GEMM against the `torch.mm` of bf16 that
greedy_head.py runs), at 1, 8 and 32 rows. A decode step streams every layer's weights once, far more
than the L3 cache holds, so each case cycles through enough distinct copies of its weight (>= 96 MB)
that every call reads from DRAM, as in the model. Timings interleave the two implementations call by
call (the machine may be shared) and report medians. CPU only.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import cli

ROWS = (1, 8, 32)
PRESETS = ("blip2-cpu-mid", "blip2-opt-2.7b")
_COLD_BYTES = 96e6  # > 2x a 32 MB L3: cycling this much weight makes every call read DRAM


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # e.g. "fc1"
    N: int
    K: int
    per_step: int  # how many of it one decode step runs (the layer count; 1 for the head)
    activation: str = "none"
    bf16: bool = False  # the screening head: bf16 weights, fp32 sums

    def weight_bytes(self) -> int:
        return self.N * self.K * (2 if self.bf16 else 4)


def decode_cases(preset: str) -> list[Case]:
    """The linear layers one decode step of `preset`'s OPT runs, from its config."""
    from blip2_fast.presets import preset_config

    t = preset_config(preset)["text_config"]
    E, Fd, L, V = t["hidden_size"], t["ffn_dim"], t["num_hidden_layers"], t["vocab_size"]
    act = "relu" if t.get("activation_function", "relu") == "relu" else "gelu"
    return [Case("qkv", 3 * E, E, L), Case("out_proj", E, E, L), Case("fc1", Fd, E, L, act), Case("fc2", E, Fd, L),
            Case("lm_head_bf16", V, t.get("word_embed_proj_dim", E), 1, bf16=True)]


def time_interleaved(fns: dict, rounds: int, warmup: int = 2, clock=time.perf_counter) -> dict[str, list[float]]:
    """{name: [ms per call]}: each round calls every fn once, in an order that alternates per round.
    clock: time.perf_counter (wall), or time.process_time, which at one thread counts only the call's
    own work (stalls on memory included) and not the time other jobs hold the core."""
    names = list(fns)
    out = {n: [] for n in names}
    for r in range(warmup + rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = clock()
            fns[n]()
            dt = (clock() - t0) * 1e3
            if r >= warmup:
                out[n].append(dt)
    return out


def _cycle(calls: list):
    it = [0]

    def fn():
        i = it[0] = (it[0] + 1) % len(calls)
        return calls[i]()

    return fn


def measure_case(case: Case, M: int, rounds: int, cold_bytes: float = _COLD_BYTES, seed: int = 0,
                 clock=time.perf_counter) -> dict:
    """Median (and min) ms of torch's path and ours for one case, weights cycled from DRAM."""
    from blip2_fast.linear_cpu import PackedLinear

    g = torch.Generator().manual_seed(seed)
    copies = max(1, int(-(-cold_bytes // case.weight_bytes())))
    ws = [torch.randn(case.N, case.K, generator=g) * case.K ** -0.5 for _ in range(copies)]
    b = None if case.bf16 else torch.randn(case.N, generator=g)
    x = torch.randn(M, case.K, generator=g)
    if case.bf16:  # greedy_head.ScreenedArgmax: (wb @ hbᵀ)ᵀ in bf16, read back as fp32
        wbs = [w.bfloat16() for w in ws]
        xb = x.bfloat16()
        torch_calls = [lambda wb=wb: torch.mm(wb, xb.t()).t().float() for wb in wbs]
        baseline = "torch.mm(bf16)"
    else:
        act = {"none": lambda y: y, "relu": F.relu, "gelu": F.gelu}[case.activation]
        torch_calls = [lambda w=w: act(F.linear(x, w, b)) for w in ws]
        baseline = "F.linear" if case.activation == "none" else f"F.{case.activation}(F.linear)"
    packed = [PackedLinear(w, b, dtype=torch.bfloat16 if case.bf16 else torch.float32) for w in ws]
    ours_calls = [lambda p=p: p(x, case.activation) for p in packed]
    del ws  # the packed copies (and wbs) are what the calls read
    t = time_interleaved({"torch": _cycle(torch_calls), "ours": _cycle(ours_calls)}, rounds, clock=clock)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"case": case.name, "M": M, "N": case.N, "K": case.K, "weight_dtype": "bf16" if case.bf16 else "fp32",
            "activation": case.activation, "weight_bytes": case.weight_bytes(), "copies_cycled": copies,
            "baseline": baseline, "isa": packed[0].isa, "torch_ms": round(med["torch"], 4),
            "ours_ms": round(med["ours"], 4), "torch_min_ms": round(min(t["torch"]), 4),
            "ours_min_ms": round(min(t["ours"]), 4), "speedup": round(med["torch"] / med["ours"], 3),
            "rounds": rounds}


def run(device="cpu", dtype=torch.float32, quick=False) -> list[dict]:
    """Rows in bench/common.py's format (op, shape, ms, baseline_ms, ratio, achieved ...)."""
    if torch.device(device).type != "cpu":
        return []  # a CPU kernel: on a GPU, F.linear is the linear
    if quick:
        cases = [(Case("toy", 97, 88, 1), 3), (Case("toy_bf16", 130, 64, 1, bf16=True), 3)]
        rounds, cold = 3, 1e5
    else:
        cases = [(c, M) for p in PRESETS for c in decode_cases(p) for M in ROWS]
        rounds, cold = 10, _COLD_BYTES
    rows = []
    for case, M in cases:
        r = measure_case(case, M, rounds, cold)
        rows.append({"op": f"linear/{case.name}", "shape": str((M, case.K, case.N)), "dtype": r["weight_dtype"],
                     "ms": r["ours_ms"], "baseline": r["baseline"], "baseline_ms": r["torch_ms"],
                     "ratio": r["speedup"], "achieved": f"{case.weight_bytes() / r['ours_ms'] / 1e6:.1f} GB/s",
                     "fraction_of_ceiling": None, "isa": r["isa"]})
    return rows


def main(argv=None) -> list[dict]:
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
