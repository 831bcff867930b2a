"""Where the image side's time goes, ours vs transformers: `python -m bench.cpu_image_profile`.

Image -> language-model inputs (vision encoder + Q-Former + projection) of the `blip2-cpu-mid` preset at batch 8, fp32,
on the same random weights in both runtimes (transformers' default SDPA attention). Per stage (patch
embedding, each vision block, the post-LayerNorm, the Q-Former's image K/V, each Q-Former layer) the
time from forward hooks (process CPU time by default, at 1 thread: other jobs on a shared machine
then cost nothing), runs interleaved (ours, theirs, ...), medians; then one run of each
under torch.profiler, its aten ops' self CPU time summed by name, to show which kernels differ, and
each stage's FLOPs against the measured fp32 GEMM peak (the compute floor: the image side is GEMMs).
Writes bench/results/cpu-image-profile-<date>.json. The machine may be shared: medians, say so.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.cpu_compare import build
from bench.cpu_limits import cpu_info, gemm_peaks


def _clock() -> float:
    # process CPU time: immune to other jobs taking the cores (at 1 thread it is the stage's own work;
    # with more, OpenMP workers spinning at barriers count too)
    return time.process_time() if _CLOCK == "cpu" else time.perf_counter()


_CLOCK = "cpu"


def _faults() -> int:
    """Minor page faults so far: each first touch of a freshly mapped 4 KB page (a large tensor's
    allocation is a fresh mmap, so its pages fault again on every forward)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Stages:
    """Time and minor page faults per named stage of one forward, from pre/post forward hooks (or
    wrapped callables)."""

    def __init__(self):
        self.t: dict[str, float] = collections.defaultdict(float)
        self.faults: dict[str, int] = collections.defaultdict(int)
        self._t0: dict[str, tuple[float, int]] = {}

    def hook(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda m, a: self._start(name))
        module.register_forward_hook(lambda m, a, o: self._stop(name))

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            self._start(name)
            out = fn(*a, **k)
            self._stop(name)
            return out

        setattr(obj, attr, timed)

    def _start(self, name):
        self._t0[name] = (_clock(), _faults())

    def _stop(self, name):
        t0, f0 = self._t0.pop(name)
        self.t[name] += (_clock() - t0) * 1e3
        self.faults[name] += _faults() - f0

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        out = dict(self.t), dict(self.faults)
        self.t, self.faults = collections.defaultdict(float), collections.defaultdict(int)
        return out


def instrument(hf, ours) -> tuple[_Stages, _Stages]:
    s_ours, s_hf = _Stages(), _Stages()
    v, q = ours.vision, ours.qformer
    s_ours.hook(v, "vision (all)")
    s_ours.hook(q, "qformer (all)")
    s_hf.hook(hf.vision_model, "vision (all)")
    s_hf.hook(hf.qformer, "qformer (all)")
    for i, blk in enumerate(v.blocks):
        s_ours.hook(blk, f"vision.block{i}")
    for i, layer in enumerate(q.layers):
        s_ours.hook(layer, f"qformer.layer{i}")
    s_ours.wrap(q, "image_kv", "qformer.image_kv")
    hv, hq = hf.vision_model, hf.qformer
    s_hf.hook(hv.embeddings, "vision.embed")
    for i, blk in enumerate(hv.encoder.layers):
        s_hf.hook(blk, f"vision.block{i}")
    s_hf.hook(hv.post_layernorm, "vision.post_ln")
    for i, layer in enumerate(hq.encoder.layer):
        s_hf.hook(layer, f"qformer.layer{i}")
    return s_ours, s_hf


def stage_flops(cfg, B: int) -> dict[str, float]:
    """GEMM FLOPs per stage (attention's two batched GEMMs included), for the compute floor."""
    v, q, Q = cfg.vision, cfg.qformer, cfg.num_query_tokens
    S = v.num_patches + 1
    E, M = v.hidden, v.mlp
    out = {"vision.embed": 2 * B * v.num_patches * 3 * v.patch ** 2 * E}
    for i in range(v.layers):
        out[f"vision.block{i}"] = 2 * B * S * (3 * E * E + E * E + 2 * E * M) + 4 * B * S * S * E
    Hd, I, n_cross = q.hidden, q.mlp, 0
    for i in range(q.layers):
        cross = i % q.cross_every == 0
        n_cross += cross
        f = 2 * B * Q * (3 * Hd * Hd + Hd * Hd + 2 * Hd * I) + 4 * B * Q * Q * Hd
        if cross:
            f += 2 * B * Q * 2 * Hd * Hd + 4 * B * Q * S * Hd  # query + output projections, attention over S keys
        out[f"qformer.layer{i}"] = f
    out["qformer.image_kv"] = 2 * B * S * q.encoder_hidden * 2 * Hd * n_cross
    return out


def profile_ops(fn) -> dict[str, float]:
    """Self CPU ms per aten op name over one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    tot = collections.defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("blip2_fast::"):
            tot[e.key] += e.self_cpu_time_total / 1e3
    return dict(sorted(tot.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="blip2-cpu-mid")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU times are each stage's own work)")
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="process CPU time (default) or wall time")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    global _CLOCK
    _CLOCK = a.clock
    torch.set_num_threads(a.threads)
    hf, ours = build(a.preset, seed=0)
    S = ours.cfg.vision.image_size
    g = torch.Generator().manual_seed(1)
    pxs = [torch.randn(a.batch, 3, S, S, generator=g) for _ in range(a.runs + 1)]
    s_ours, s_hf = instrument(hf, ours)

    def run_ours(px):
        return ours.language_model_inputs(px)

    def run_hf(px):  # Blip2ForConditionalGeneration's image path up to the LM's input embeddings
        with torch.inference_mode():
            img = hf.vision_model(pixel_values=px).last_hidden_state
            qt = hf.query_tokens.expand(img.shape[0], -1, -1)
            return hf.language_projection(hf.qformer(query_embeds=qt, encoder_hidden_states=img).last_hidden_state)

    stages = {"blip2_fast": [], "transformers": []}
    faults = {"blip2_fast": [], "transformers": []}
    totals = {"blip2_fast": [], "transformers": []}
    for i in range(a.runs + 1):
        for name, fn, st in (("blip2_fast", run_ours, s_ours), ("transformers", run_hf, s_hf)):
            t0 = _clock()
            fn(pxs[i])
            dt = (_clock() - t0) * 1e3
            per, flt = st.take()
            if i > 0:
                totals[name].append(dt)
                stages[name].append(per)
                faults[name].append(flt)
            print(f"[cpu_image_profile] {'warm-up' if i == 0 else f'run {i}'} {name:12s} {dt:8.1f} ms",
                  file=sys.stderr)
    with torch.inference_mode():
        diff = (run_ours(pxs[0]) - run_hf(pxs[0])).abs().max().item()
    med = {n: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} for n, rs in stages.items()}
    fmed = {n: {k: int(statistics.median(r[k] for r in rs)) for k in rs[0]} for n, rs in faults.items()}
    peak = gemm_peaks()["float32"]["best_gflops"]  # at these threads, on cpu_limits.clock_for(threads)
    flops = stage_flops(ours.cfg, a.batch)
    table = []
    for k in sorted(set(med["blip2_fast"]) | set(med["transformers"]) | set(flops)):
        o, h = med["blip2_fast"].get(k), med["transformers"].get(k)
        f = flops.get(k)
        table.append({"stage": k, "blip2_fast_ms": o, "transformers_ms": h,
                      "blip2_fast_faults": fmed["blip2_fast"].get(k), "transformers_faults": fmed["transformers"].get(k),
                      "gflop": round(f / 1e9, 3) if f else None,
                      "compute_floor_ms": round(f / peak / 1e6, 3) if f else None})
    ops_ours, ops_hf = profile_ops(lambda: run_ours(pxs[1])), profile_ops(lambda: run_hf(pxs[1]))
    ops = [{"op": k, "blip2_fast_ms": round(ops_ours.get(k, 0.0), 3), "transformers_ms": round(ops_hf.get(k, 0.0), 3)}
           for k in dict.fromkeys(list(ops_ours) + list(ops_hf))]
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_info(), "preset": a.preset,
           "batch": a.batch, "runs": a.runs, "threads": a.threads, "clock": a.clock,
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
           "note": "machine may be shared: interleaved runs, medians",
           "total_ms": {n: round(statistics.median(v), 2) for n, v in totals.items()},
           "total_ms_all": {n: [round(t, 1) for t in v] for n, v in totals.items()},
           "ratio": round(statistics.median(totals["transformers"]) / statistics.median(totals["blip2_fast"]), 3),
           "max_abs_diff": diff, "fp32_gemm_peak_gflops": peak, "stages": table, "aten_self_ms": ops}
    print(f"total: blip2_fast {res['total_ms']['blip2_fast']} ms, transformers {res['total_ms']['transformers']} ms "
          f"(ratio {res['ratio']}); max |diff| {diff:.2e}")
    print(f"{'stage':20s}{'ours ms':>10s}{'hf ms':>10s}{'GFLOP':>8s}{'floor ms':>10s}{'ours flt':>10s}{'hf flt':>10s}")
    for r in table:
        fmt = lambda v: f"{v:10.2f}" if v is not None else f"{'-':>10s}"
        print(f"{r['stage']:20s}{fmt(r['blip2_fast_ms'])}{fmt(r['transformers_ms'])}"
              f"{r['gflop'] if r['gflop'] is not None else '-':>8}{fmt(r['compute_floor_ms'])}"
              f"{str(r['blip2_fast_faults']):>10s}{str(r['transformers_faults']):>10s}")
    print(f"{'aten op (self CPU)':48s}{'ours ms':>10s}{'hf ms':>10s}")
    for r in ops[:25]:
        print(f"{r['op'][:48]:48s}{r['blip2_fast_ms']:10.2f}{r['transformers_ms']:10.2f}")
    out = Path(a.json) if a.json else Path(__file__).parent / "results" / f"cpu-image-profile-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
