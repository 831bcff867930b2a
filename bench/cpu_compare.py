"""blip2_fast vs transformers on CPU, same random weights: `python -m bench.cpu_compare`.

The `blip2-cpu-mid` preset (224 px -> 257 vision tokens, 32 queries, 6-layer OPT with a 50304 vocab)
generates 24 tokens greedily at batch 8 (min_new_tokens = max_new_tokens, so both run every step).
Runs are interleaved (ours, theirs, ours, ...) so drift in machine load hits both alike; the reported
ratio is median(transformers) / median(blip2_fast) (> 1: blip2_fast is faster). Outputs must be
token-identical. Writes bench/results/cpu-compare-<date>.json (`--dtype bf16`: both runtimes in bf16,
cpu-compare-bf16-<date>.json; bf16 tokens need not match).
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
import warnings
from pathlib import Path

import torch


def build(preset: str, seed: int, dtype: torch.dtype = torch.float32):
    import transformers

    import blip2_fast
    from blip2_fast.presets import preset_config
    from blip2_fast.testing import randomize_

    cfg = transformers.Blip2Config(**preset_config(preset))
    torch.manual_seed(seed)
    hf = transformers.Blip2ForConditionalGeneration(cfg).eval()
    randomize_(hf, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fast ops falling back to the reference on CPU
        ours = blip2_fast.load(hf, device="cpu", dtype=dtype, progress=False)  # a copy of the weights
    if dtype != torch.float32:
        hf = hf.to(dtype)  # transformers in the same dtype (its fp16 Q-Former rule applies at from_pretrained only)
    return hf, ours


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="blip2-cpu-mid")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="both runtimes' dtype (bf16: the CPU's bf16 matrix units; tokens need not be identical)")
    ap.add_argument("--json", default=None, help="output path (default bench/results/cpu-compare-<date>.json)")
    ap.add_argument("--profile", action="store_true", help="cProfile one blip2_fast run and print the top entries")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from blip2_fast.models.greedy_head import screen_supported

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    hf, ours = build(a.preset, seed=0, dtype=dtype)
    S = ours.cfg.vision.image_size
    g = torch.Generator().manual_seed(1)
    # a fresh image batch per round: blip2_fast's engine caches image features by content digest
    pxs = [torch.randn(a.batch, 3, S, S, generator=g).to(dtype) for _ in range(a.runs + 2)]
    N = a.new_tokens
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, num_beams=1)

    def run_ours(px):
        return ours.generate(px, **gen)

    def run_hf(px):
        with torch.inference_mode():
            return hf.generate(pixel_values=px, **gen)

    times = {"blip2_fast": [], "transformers": []}
    cpu = {"blip2_fast": [], "transformers": []}  # process CPU time: less sensitive to other jobs on the machine
    outs = {}
    for i in range(a.runs + 1):  # the first round is the warm-up
        for name, fn in (("blip2_fast", run_ours), ("transformers", run_hf)):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(pxs[i])
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            outs[name] = out
            if i > 0:
                times[name].append(dt)
                cpu[name].append(dc)
            print(f"[cpu_compare] {'warm-up' if i == 0 else f'run {i}'} {name:12s} {dt:7.2f} s wall {dc:7.2f} s cpu",
                  file=sys.stderr)
    ours_new, hf_new = outs["blip2_fast"][:, -N:], outs["transformers"][:, -N:]
    identical = bool(torch.equal(ours_new.cpu(), hf_new.cpu()))
    m_ours, m_hf = statistics.median(times["blip2_fast"]), statistics.median(times["transformers"])
    ratios = [h / o for o, h in zip(times["blip2_fast"], times["transformers"])]
    res = {
        "preset": a.preset, "dtype": a.dtype, "batch": a.batch, "new_tokens": N, "runs": a.runs,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "versions": _versions(),
        "impls": ours.impls,
        # which implementation each op resolved to (on a CPU "fast" means the C++ extension or torch's SDPA)
        "impl_modules": {n: f"{getattr(ours.ops, n).__module__}.{getattr(ours.ops, n).__name__}" for n in ours.impls},
        # the exact bf16-screened greedy head (blip2_fast/models/greedy_head.py): "on", or why not
        "greedy_screen": screen_supported(ours.lm.lm_head) or "on",
        "blip2_fast_s": [round(t, 3) for t in times["blip2_fast"]],
        "transformers_s": [round(t, 3) for t in times["transformers"]],
        "blip2_fast_median_s": round(m_ours, 3), "transformers_median_s": round(m_hf, 3),
        "ratio": round(m_hf / m_ours, 3),
        "blip2_fast_cpu_s": [round(t, 3) for t in cpu["blip2_fast"]],
        "transformers_cpu_s": [round(t, 3) for t in cpu["transformers"]],
        "cpu_time_ratio": round(statistics.median(cpu["transformers"]) / statistics.median(cpu["blip2_fast"]), 3), "ratio_per_pair": [round(r, 3) for r in ratios],
        "tokens_per_s": {"blip2_fast": round(a.batch * N / m_ours, 1), "transformers": round(a.batch * N / m_hf, 1)},
        "token_identical": identical,
    }
    if not identical:
        diff = (ours_new.cpu() != hf_new.cpu())
        res["mismatch_rows"] = int(diff.any(1).sum())
        res["first_mismatch_step"] = int(diff.any(0).nonzero()[0])
    print(f"{'':14s}{'median s':>10s}{'tok/s':>9s}")
    print(f"{'blip2_fast':14s}{m_ours:10.2f}{res['tokens_per_s']['blip2_fast']:9.1f}")
    print(f"{'transformers':14s}{m_hf:10.2f}{res['tokens_per_s']['transformers']:9.1f}")
    print(f"ratio (transformers / blip2_fast): {res['ratio']:.2f}x  per pair {res['ratio_per_pair']}  "
          f"token-identical: {identical}")
    print(f"CPU-time ratio (transformers / blip2_fast): {res['cpu_time_ratio']:.2f}x  "
          f"(process CPU seconds, medians {statistics.median(cpu['blip2_fast']):.2f} vs {statistics.median(cpu['transformers']):.2f})")
    if a.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        run_ours(pxs[-1])
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
        pstats.Stats(pr).sort_stats("tottime").print_stats(20)
    tag = "" if a.dtype == "fp32" else f"-{a.dtype}"
    out = Path(a.json) if a.json else Path(__file__).parent / "results" / f"cpu-compare{tag}-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return res


def _versions() -> dict:
    import transformers

    import blip2_fast

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "blip2_fast": blip2_fast.__version__}


if __name__ == "__main__":
    main()
