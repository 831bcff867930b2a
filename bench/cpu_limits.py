"""This CPU's limits, and each decode-step linear against its floor: `python -m bench.cpu_limits`.

Reports the CPU model and ISA (and the kernel `PackedLinear` picks), then measures
at one thread and at torch's thread count (`--threads`), each with its own floors:
  - memory bandwidth: copy (dst.copy_(src) over 256 MB, counted as 2 x 256 MB per copy) and read (the
    best of sum / amax over 256 MB);
  - GEMM peaks: torch.mm of 2048 x 2048 x 2048 in fp32 (MKL) and bf16 (oneDNN), best of 4;
    both sampled before each preset's cases and after the last (the machine may be shared: the best
    sample sets the floors, every sample is reported);
  - every linear of a decode step of blip2-cpu-mid and blip2-opt-2.7b (bench/bench_linear.py: weights
    cycled from DRAM, torch's path and ours interleaved call by call, medians) at 1, 8 and 32 rows,
    each against its floor max(weight bytes / read bandwidth, 2 M N K / GEMM peak);
  - per preset and row count, the step's linears summed (each case x its count per step) against the
    floor of all their bytes: the part of the issue-16 decode target the linears decide.
At one thread every time is process CPU time (a shared machine's other jobs then cost nothing but
their share of the memory bus); with more threads, wall time.
Writes bench/results/cpu-limits-<date>.json (`--json` to choose).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.bench_linear import PRESETS, ROWS, decode_cases, measure_case


def cpu_info() -> dict:
    """Model name, the ISA flags that decide the kernels, core count, torch's threads and versions."""
    model, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:  # not Linux: the flags stay unknown
        pass
    from blip2_fast.linear_cpu import PackedLinear

    want = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    one = torch.ones(1, 1)
    return {"model": model or platform.processor() or platform.machine(), "isa_flags": [f for f in want if f in flags], "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "linear_isa": {"fp32": PackedLinear(one).isa, "bf16": PackedLinear(one, dtype=torch.bfloat16).isa},
            "torch": torch.__version__, "mkldnn": torch.backends.mkldnn.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _best_ms(fn, n: int, clock=time.perf_counter) -> list[float]:
    ts = []
    for _ in range(n):
        t0 = clock()
        fn()
        ts.append((clock() - t0) * 1e3)
    return ts


def clock_for(threads: int):
    """Process CPU time at one thread (other jobs holding the core do not count; memory stalls do),
    wall time with more (CPU time would count OpenMP workers spinning at barriers)."""
    return time.process_time if threads == 1 else time.perf_counter


def bandwidth(nbytes: int = 256 << 20, reps: int = 8, thread_counts=None) -> dict:
    """GB/s of copy and read at each thread count (default: 1 and torch's), best and median of `reps`."""
    a = torch.empty(nbytes // 4)
    a.uniform_()
    b = torch.empty_like(a)
    out, threads = {}, torch.get_num_threads()
    try:
        for t in thread_counts or sorted({1, threads}):
            torch.set_num_threads(t)
            for name, fn, factor in (("copy", lambda: b.copy_(a), 2), ("read_sum", lambda: a.sum(), 1),
                                     ("read_amax", lambda: a.amax(), 1)):
                fn()
                ts = _best_ms(fn, reps, clock_for(t))
                out[f"{name}_t{t}"] = {"best_gbs": round(factor * nbytes / min(ts) / 1e6, 1),
                                       "median_gbs": round(factor * nbytes / statistics.median(ts) / 1e6, 1)}
    finally:
        torch.set_num_threads(threads)
    return out


def gemm_peaks(n: int = 2048, reps: int = 5) -> dict:
    """Best GFLOP/s of an n^3 torch.mm in fp32 and in bf16 at torch's thread count."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        ts = _best_ms(lambda: torch.mm(a, b), reps, clock_for(torch.get_num_threads()))
        out[str(dtype).replace("torch.", "")] = _gflops(2 * n ** 3, ts)
    return out


def _gflops(flops: float, ts: list[float]) -> dict:
    """Best and median GFLOP/s of `flops` per call, from call times `ts` in ms."""
    return {"best_gflops": round(flops / min(ts) / 1e6, 1), "median_gflops": round(flops / statistics.median(ts) / 1e6, 1)}


def kernel_peaks(rows: int = 12, reps: int = 200) -> dict:
    """Best GFLOP/s of the packed kernel itself at `rows` rows (its widest AVX-512 tile) on a weight
    that stays in cache: this core's FMA (fp32) and vdpbf16ps (bf16) rate as the decode step's
    linears can use it, the compute side of a decode step's floor (torch's n^3 GEMM peak is lower
    than what the small-M kernel reaches on some CPUs, so it would not be a floor)."""
    from blip2_fast.linear_cpu import PackedLinear

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        lin = PackedLinear(torch.randn(2048, 512), dtype=dtype)
        x = torch.randn(rows, 512)
        lin(x)
        ts = _best_ms(lambda: lin(x), reps, clock_for(torch.get_num_threads()))
        out[str(dtype).replace("torch.", "")] = _gflops(2 * rows * 2048 * 512, ts)
    return out


def _floor_ms(r: dict, read_gbs: float, peaks: dict) -> tuple[float, str]:
    mem = r["weight_bytes"] / read_gbs / 1e6
    peak = peaks["bfloat16" if r["weight_dtype"] == "bf16" else "float32"]["best_gflops"]
    comp = 2 * r["M"] * r["N"] * r["K"] / peak / 1e6
    return (mem, "bandwidth") if mem >= comp else (comp, "compute")


def measure_at(threads: int, a, cold: float, bw_bytes: int, reps: int) -> dict:
    """Bandwidth, GEMM peaks, every case and the step sums with torch.set_num_threads(threads)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    clock = clock_for(threads)
    samples = []  # the limits, sampled before, between and after the presets' cases

    def sample():
        samples.append({"bandwidth": bandwidth(bw_bytes, reps, (threads,)),
                        "gemm_peaks": gemm_peaks(256 if a.quick else 2048, 2 if a.quick else 4)})
        print(f"[cpu_limits] {threads} threads: limits {samples[-1]}", file=sys.stderr)

    try:
        cases = []
        for preset in a.presets:
            sample()
            for case in decode_cases(preset):
                if a.quick:  # toy widths, same code path
                    case = type(case)(case.name, min(case.N, 130), min(case.K, 96), case.per_step, case.activation,
                                      case.bf16)
                for M in a.rows:
                    r = measure_case(case, M, 2 if a.quick else a.rounds, cold, clock=clock)
                    r.update(preset=preset, per_step=case.per_step)
                    cases.append(r)
                    print(f"[cpu_limits] t{threads} {preset:15s} {r['case']:13s} M={M:3d} torch {r['torch_ms']:8.3f} ms  "
                          f"ours {r['ours_ms']:8.3f} ms  ({r['speedup']:.2f}x)", file=sys.stderr, flush=True)
        sample()
    finally:
        torch.set_num_threads(prev)
    read_gbs = max(v["best_gbs"] for s in samples for k, v in s["bandwidth"].items() if k.startswith("read"))
    peaks = {d: {"best_gflops": max(s["gemm_peaks"][d]["best_gflops"] for s in samples)} for d in ("float32", "bfloat16")}
    for r in cases:
        floor, bound = _floor_ms(r, read_gbs, peaks)
        r.update(floor_ms=round(floor, 4), floor_bound=bound, torch_over_floor=round(r["torch_ms"] / floor, 2),
                 ours_over_floor=round(r["ours_ms"] / floor, 2), ours_min_over_floor=round(r["ours_min_ms"] / floor, 2))
    steps = []
    for preset in a.presets:
        for M in a.rows:
            rs = [r for r in cases if r["preset"] == preset and r["M"] == M]
            tot = {k: sum(r[k] * r["per_step"] for r in rs) for k in ("torch_ms", "ours_ms", "ours_min_ms", "floor_ms")}
            steps.append({"preset": preset, "M": M, "weight_bytes": sum(r["weight_bytes"] * r["per_step"] for r in rs),
                          **{k: round(v, 3) for k, v in tot.items()},
                          "torch_over_floor": round(tot["torch_ms"] / tot["floor_ms"], 2),
                          "ours_over_floor": round(tot["ours_ms"] / tot["floor_ms"], 2),
                          "speedup": round(tot["torch_ms"] / tot["ours_ms"], 2)})
    return {"threads": threads, "clock": "process CPU time" if clock is time.process_time else "wall",
            "limit_samples": samples, "read_gbs_for_floor": read_gbs, "gemm_peaks": peaks, "cases": cases,
            "decode_step_linears": steps}


def decode_steps(preset: str, batches, steps: int, read_gbs: float, threads: int, peaks: dict,
                 block: int = 8) -> list[dict]:
    """The whole decode step (`engine.step()`: the LM's forward, the screened greedy head, the host
    work) of `preset` at `threads` threads (`clock_for`: process CPU time at one, wall time at more),
    with the packed linears and with packing off
    (BLIP2_FAST_LINEAR_ISA=torch), in blocks of `block` steps interleaved between the two engines
    (block 1: step by step); against the floor of the
    bytes a step must read: the LM's linear weights (fp32), the bf16 screening head and the KV cache
    of every context token, over `read_gbs`; and against the same step's arithmetic at `peaks`
    (`kernel_peaks`)."""
    import blip2_fast
    from blip2_fast.layers import Linear
    from blip2_fast.linear_cpu import ISA_ENV
    from bench.cpu_compare import build

    buf = torch.empty((128 << 20) // 4)
    buf.uniform_()

    def probe() -> float:
        """Read GB/s of a 128 MB sum (4x the L3 of the CPUs measured), the better of two, at `threads`."""
        ts = _best_ms(buf.sum, 2, clock)
        return buf.numel() * 4 / min(ts) / 1e6

    prev_env, prev_threads = os.environ.get(ISA_ENV), torch.get_num_threads()
    torch.set_num_threads(threads)
    clock = clock_for(threads)
    models = {}
    try:
        for name, isa in (("packed", None), ("torch", "torch")):
            if isa is None:
                os.environ.pop(ISA_ENV, None)
            else:
                os.environ[ISA_ENV] = isa
            models[name] = build(preset, seed=0)[1]
    finally:
        if prev_env is None:
            os.environ.pop(ISA_ENV, None)
        else:
            os.environ[ISA_ENV] = prev_env
    m = models["packed"]
    lm = m.lm
    lin_bytes = sum(x.weight.numel() * 4 for n, x in lm.named_modules() if isinstance(x, Linear))
    if hasattr(lm, "enc"):  # T5: the encoder runs at prefill only; cross-attention K/V come from the cache
        lin_bytes -= sum(x.weight.numel() * 4 for x in lm.enc.modules() if isinstance(x, Linear))
        lin_bytes -= sum(b.cross.kv.weight.numel() * 4 for b in lm.dec)
    head_bytes = lm.lm_head.numel() * 2
    H, D = lm.kv_heads_dim
    S = m.cfg.vision.image_size
    prompt = [2, 100, 200] if not hasattr(lm, "enc") else [100, 200, 1]
    rows = []
    try:
        for B in batches:
            g = torch.Generator().manual_seed(B)
            px = torch.randn(B, 3, S, S, generator=g)
            engines = {}
            for name, mod in models.items():
                eng = blip2_fast.Engine(mod, max_num_seqs=B, num_blocks=B * 16 + 16, block_size=16)
                for i in range(B):
                    eng.add_request(i, pixel_values=px[i], prompt=torch.tensor(prompt),
                                    sampling=blip2_fast.SamplingParams(max_new_tokens=steps + block + 8,
                                                                       min_new_tokens=steps + block + 8))
                eng.step()  # prefill
                eng.step()
                engines[name] = eng
            ts = {n: [] for n in engines}
            probes = [probe()]  # the read bandwidth between every two blocks: the machine's, then
            # blocks of `block` steps per engine, alternating which goes first: a real engine's steps
            # run back to back, and a step right after the other engine's found what its own previous
            # step leaves in the caches evicted (0.6 - 0.9 ms more per step here at batch 8)
            for b in range(-(-steps // block)):
                for name, eng in (engines.items() if b % 2 == 0 else list(engines.items())[::-1]):
                    for _ in range(block):
                        c = clock()
                        eng.step()
                        ts[name].append((clock() - c) * 1e3)
                probes.append(probe())
            steps_run = len(ts["packed"])
            if hasattr(lm, "enc"):  # T5 decode: self-attention over the generated tokens, cross over the encoder's
                ctx_self, ctx_cross = 2 + steps_run / 2, m.cfg.num_query_tokens + len(prompt)
            else:
                ctx_self, ctx_cross = m.cfg.num_query_tokens + len(prompt) + 1 + steps_run / 2, 0
            kv_bytes = lm.num_layers * 2 * B * (ctx_self + ctx_cross) * H * D * 4
            floor = (lin_bytes + head_bytes + kv_bytes) / read_gbs / 1e6
            med = {n: statistics.median(t) for n, t in ts.items()}
            blocks = [statistics.median(ts["packed"][i: i + block]) for i in range(0, len(ts["packed"]), block)]
            # the same step's arithmetic at the kernel's own peak: B rows through every fp32 weight
            # (an FMA each) and through the bf16 head (a vdpbf16ps lane each)
            compute = (2 * B * lin_bytes / 4 / peaks["float32"]["best_gflops"]
                       + 2 * B * head_bytes / 2 / peaks["bfloat16"]["best_gflops"]) / 1e6
            rows.append({"preset": preset, "batch": B, "threads": threads, "steps": steps_run, "step_block": block,
                         "packed_ms": round(med["packed"], 3),
                         "torch_linears_ms": round(med["torch"], 3), "floor_ms": round(floor, 3),
                         "packed_over_floor": round(med["packed"] / floor, 2),
                         "torch_over_floor": round(med["torch"] / floor, 2),
                         "bytes": {"linears": lin_bytes, "head_bf16": head_bytes, "kv_mean": int(kv_bytes)},
                         "compute_floor_ms": round(compute, 3),
                         "packed_samples_ms": [round(t, 3) for t in ts["packed"]],
                         "packed_block_ms": [round(t, 3) for t in blocks],
                         # read GB/s before block 0, then after each block (both engines' blocks b)
                         "probe_gbs": [round(g, 1) for g in probes]})
            print(f"[cpu_limits] step {preset} B={B}: packed {med['packed']:.2f} ms, F.linear {med['torch']:.2f} ms, "
                  f"floor {floor:.2f} ms ({med['packed'] / floor:.2f}x)", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(prev_threads)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved calls of each implementation per case")
    ap.add_argument("--threads", nargs="+", type=int, default=sorted({1, torch.get_num_threads()}),
                    help="thread counts to measure at (default: 1 and torch's)")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--rows", nargs="+", type=int, default=list(ROWS))
    ap.add_argument("--quick", action="store_true", help="small buffers and few rounds (a smoke test)")
    ap.add_argument("--json", default=None, help="output path (default bench/results/cpu-limits-<date>.json)")
    ap.add_argument("--step", action="store_true",
                    help="instead of the linears alone: the whole decode step of each --step-presets model at "
                         "--step-batches at --step-threads, against its floor (reads bandwidth at that thread count first)")
    ap.add_argument("--step-presets", nargs="+", default=["blip2-cpu-mid", "blip2-cpu-mid-t5"])
    ap.add_argument("--step-batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--step-count", type=int, default=30, help="timed decode steps per engine")
    ap.add_argument("--step-block", type=int, default=8,
                    help="--step: consecutive steps per engine before the other's (1: alternate step by step)")
    ap.add_argument("--step-threads", type=int, default=1,
                    help="torch threads for --step (1: process CPU time; more: wall time, so run it on a quiet machine)")
    a = ap.parse_args(argv)
    if a.step:
        return _main_step(a)
    cold = 1e5 if a.quick else 96e6
    bw_bytes, reps = (8 << 20, 2) if a.quick else (256 << 20, 8)

    info = cpu_info()
    print(f"[cpu_limits] {info['model']}: {' '.join(info['isa_flags'])}; {info['cores']} cores, "
          f"{info['torch_threads']} torch threads; linear kernel {info['linear_isa']}", file=sys.stderr)
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": info,
           "note": ("the machine may be shared with other jobs: medians (and minima) of calls interleaved with "
                    "torch's; bandwidth and peaks best-of; one thread timed in process CPU time; with more, wall "
                    "time, where a parallel region waits for its slowest thread, so other jobs hit it hardest"),
           "quick": a.quick, "by_threads": [measure_at(t, a, cold, bw_bytes, reps) for t in a.threads]}
    _print(res)
    out = Path(a.json) if a.json else Path(__file__).parent / "results" / f"cpu-limits-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return res


def _main_step(a) -> dict:
    info = cpu_info()
    bw_bytes, reps = (8 << 20, 2) if a.quick else (256 << 20, 8)
    T = a.step_threads
    bw = bandwidth(bw_bytes, reps, (T,))
    read_gbs = max(v["best_gbs"] for k, v in bw.items() if k.startswith("read"))
    print(f"[cpu_limits] {info['model']}: read {read_gbs} GB/s at {T} thread(s)", file=sys.stderr)
    prev = torch.get_num_threads()
    torch.set_num_threads(T)
    try:
        peaks = kernel_peaks(reps=20 if a.quick else 200)
    finally:
        torch.set_num_threads(prev)
    print(f"[cpu_limits] the packed kernel's peak at {T} thread(s): fp32 {peaks['float32']['best_gflops']}, "
          f"bf16 {peaks['bfloat16']['best_gflops']} GFLOP/s", file=sys.stderr)
    rows = [r for p in a.step_presets
            for r in decode_steps(p, a.step_batches, a.step_count, read_gbs, T, peaks, a.step_block)]
    bw_after = bandwidth(bw_bytes, reps, (T,))
    clock = "process CPU time" if T == 1 else "wall time"
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": info, "threads": T,
           "note": (f"whole decode steps (engine.step) at {T} thread(s) in {clock}, the packed engine's and the "
                    f"F.linear engine's steps interleaved in blocks of {a.step_block}; floor = bytes / the best "
                    f"{T}-thread read bandwidth of the samples before, after and between blocks (probe_gbs); "
                    "packed_best_block_over_floor: the quietest block of the packed engine's (packed_block_ms: each "
                    "block's median) against it; the machine may be shared"),
           "bandwidth_before": bw, "bandwidth_after": bw_after, "kernel_peaks": peaks,
           "read_gbs_for_floor": max(read_gbs, max(v["best_gbs"] for k, v in bw_after.items() if k.startswith("read")),
                                     max(g for r in rows for g in r["probe_gbs"])),
           "decode_steps": rows}
    for r in rows:  # the floor from the best bandwidth sampled in the whole run (before, after, between blocks)
        nbytes = sum(r["bytes"].values())
        f = nbytes / res["read_gbs_for_floor"] / 1e6
        r.update(floor_ms=round(f, 3), packed_over_floor=round(r["packed_ms"] / f, 2),
                 torch_over_floor=round(r["torch_linears_ms"] / f, 2))
        # against the larger of the two floors: neither can be beaten
        r["packed_over_max_floor"] = round(r["packed_ms"] / max(f, r["compute_floor_ms"]), 2)
        # other jobs on a shared machine take memory bandwidth in bursts of a fraction of a second (a
        # block's median moved by 45% from one block to the next here): the quietest block against the
        # same strict floor, whose bandwidth is the best of every sample, as the block is the best of
        # the blocks (pairing each block with the probes around it was tried: they did not follow it)
        r["packed_best_block_over_floor"] = round(min(r["packed_block_ms"]) / f, 2)
        print(f"{r['preset']:18s} batch {r['batch']:3d}: step {r['packed_ms']:7.2f} ms (F.linear {r['torch_linears_ms']:7.2f})"
              f"  floor {r['floor_ms']:6.2f} ms  {r['packed_over_floor']:.2f}x the floor"
              f" (its quietest block {r['packed_best_block_over_floor']:.2f}x)"
              f"  (compute at the kernel's peak {r['compute_floor_ms']:.2f} ms)")
    out = Path(a.json) if a.json else Path(__file__).parent / "results" / f"cpu-decode-step-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return res


def _print(res: dict) -> None:
    print(f"{res['cpu']['model']} ({' '.join(res['cpu']['isa_flags'])}); kernels {res['cpu']['linear_isa']}")
    for m in res["by_threads"]:
        print(f"\n{m['threads']} thread(s): read {m['read_gbs_for_floor']} GB/s, GEMM peaks fp32 "
              f"{m['gemm_peaks']['float32']['best_gflops']} / bf16 {m['gemm_peaks']['bfloat16']['best_gflops']} GFLOP/s")
        print(f"{'preset':16s}{'linear':14s}{'M':>4s}{'torch ms':>10s}{'ours ms':>10s}{'(min)':>9s}{'floor ms':>10s}"
              f"{'bound':>11s}{'torch/fl':>9s}{'ours/fl':>9s}")
        for r in m["cases"]:
            print(f"{r['preset']:16s}{r['case']:14s}{r['M']:4d}{r['torch_ms']:10.3f}{r['ours_ms']:10.3f}"
                  f"{r['ours_min_ms']:9.3f}{r['floor_ms']:10.3f}{r['floor_bound']:>11s}{r['torch_over_floor']:9.2f}"
                  f"{r['ours_over_floor']:9.2f}")
        print("decode step, all linears:")
        for s in m["decode_step_linears"]:
            print(f"{s['preset']:16s}{'':14s}{s['M']:4d}{s['torch_ms']:10.3f}{s['ours_ms']:10.3f}{s['ours_min_ms']:9.3f}"
                  f"{s['floor_ms']:10.3f}{'':>11s}{s['torch_over_floor']:9.2f}{s['ours_over_floor']:9.2f}")


if __name__ == "__main__":
    main()
