"""blip2_fast vs transformers on CPU, same random weights: `python -m bench.cpu_compare`.

Presets `blip2-cpu-mid` (224 px -> 257 vision tokens, 32 queries, 6-layer OPT with a 50304 vocab) and
`blip2-cpu-mid-t5` (the same image side, a 6+6-layer Flan-T5 of width 512, vocab 32128) generate
greedily (min_new_tokens = max_new_tokens, so both run every step) at every batch x token count of
the sweep (default: batches 1, 8, 32 x 24, 96 tokens). Per case, runs are interleaved (ours, theirs,
ours, ...) after one warm-up each, so drift in machine load hits both alike; the ratio is
median(transformers) / median(blip2_fast) (> 1: blip2_fast is faster), in wall time and in process
CPU time. Outputs must be token-identical (checked per case). The CPU model and its ISA are
recorded. Writes bench/results/cpu-compare-<date>.json and a plot of ratio against batch beside it
(`--dtype bf16`: both runtimes in bf16, cpu-compare-bf16-<date>.json; bf16 tokens need not match).
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


def run_case(hf, ours, batch: int, N: int, runs: int, dtype, seed: int = 1) -> dict:
    """One preset x batch x token count: interleaved runs, medians, token identity."""
    S = ours.cfg.vision.image_size
    # images of their own per case (seeded by the case), and a fresh batch per round: blip2_fast's
    # engine caches image features by content digest, so a batch an earlier case or round already
    # encoded would skip the vision encoder (with one seed for every case, each 96-token case re-used
    # its 24-token case's images: the figures committed before 2026-12-01 16:40 gained ~0.4 s there)
    g = torch.Generator().manual_seed(seed + 1000 * batch + N)
    pxs = [torch.randn(batch, 3, S, S, generator=g).to(dtype) for _ in range(runs + 1)]
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, num_beams=1)
    if ours.cfg.lm.__class__.__name__ == "T5Config":
        # an encoder-decoder needs a prompt (transformers' BLIP-2 has no bos for T5): the image's query
        # tokens, then a short fixed text ending in eos, as Blip2Processor builds one
        Q, img = ours.cfg.num_query_tokens, hf.config.image_token_index
        V = ours.cfg.lm.vocab
        ids = torch.tensor([[img] * Q + [t % V for t in (100, 200, 300)] + [1]]).expand(batch, -1)
        gen["input_ids"] = ids

    def run_ours(px):
        return ours.generate(px, **gen)

    def run_hf(px):
        with torch.inference_mode():
            return hf.generate(pixel_values=px, **gen)

    times = {"blip2_fast": [], "transformers": []}
    cpu = {"blip2_fast": [], "transformers": []}  # process CPU time: less sensitive to other jobs on the machine
    identical = True
    mismatch = None
    for i in range(runs + 1):  # the first round is the warm-up
        outs = {}
        for name, fn in (("blip2_fast", run_ours), ("transformers", run_hf)):
            t0, c0 = time.perf_counter(), time.process_time()
            outs[name] = fn(pxs[i])[:, -N:].cpu()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i > 0:
                times[name].append(dt)
                cpu[name].append(dc)
            print(f"[cpu_compare] b{batch} x {N} {'warm-up' if i == 0 else f'run {i}'} {name:12s} {dt:7.2f} s wall "
                  f"{dc:7.2f} s cpu", file=sys.stderr)
        if not torch.equal(outs["blip2_fast"], outs["transformers"]):  # every round's tokens, not just the last
            identical = False
            diff = outs["blip2_fast"] != outs["transformers"]
            mismatch = {"round": i, "rows": int(diff.any(1).sum()), "first_step": int(diff.any(0).nonzero()[0])}
    m_ours, m_hf = statistics.median(times["blip2_fast"]), statistics.median(times["transformers"])
    c_ours, c_hf = statistics.median(cpu["blip2_fast"]), statistics.median(cpu["transformers"])
    res = {
        "batch": batch, "new_tokens": N, "runs": runs,
        "blip2_fast_s": [round(t, 3) for t in times["blip2_fast"]],
        "transformers_s": [round(t, 3) for t in times["transformers"]],
        "blip2_fast_median_s": round(m_ours, 3), "transformers_median_s": round(m_hf, 3),
        "ratio": round(m_hf / m_ours, 3),
        "ratio_per_pair": [round(h / o, 3) for o, h in zip(times["blip2_fast"], times["transformers"])],
        "blip2_fast_cpu_s": [round(t, 3) for t in cpu["blip2_fast"]],
        "transformers_cpu_s": [round(t, 3) for t in cpu["transformers"]],
        "cpu_time_ratio": round(c_hf / c_ours, 3),
        "tokens_per_s": {"blip2_fast": round(batch * N / m_ours, 1), "transformers": round(batch * N / m_hf, 1)},
        "token_identical": identical,
    }
    if mismatch:
        res["mismatch"] = mismatch
    print(f"[cpu_compare] b{batch} x {N}: ratio {res['ratio']:.2f}x wall, {res['cpu_time_ratio']:.2f}x cpu "
          f"({m_ours:.2f} vs {m_hf:.2f} s), token-identical: {identical}", file=sys.stderr)
    return res


def plot(res: dict, path: Path) -> bool:
    """Ratio (transformers / blip2_fast, wall) against batch, one line per preset x token count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[cpu_compare] matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for preset, cases in res["presets"].items():
        for N in sorted({c["new_tokens"] for c in cases}):
            pts = sorted((c["batch"], c["ratio"]) for c in cases if c["new_tokens"] == N)
            ax.plot([b for b, _ in pts], [r for _, r in pts], marker="o", label=f"{preset}, {N} tokens")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("transformers / blip2_fast (wall)")
    ax.set_title(f"{res['dtype']} greedy, {res['machine']['model']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["blip2-cpu-mid", "blip2-cpu-mid-t5"])
    ap.add_argument("--batches", "--batch", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--new-tokens", nargs="+", type=int, default=[24, 96])
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="both runtimes' dtype (bf16: the CPU's bf16 matrix units; tokens need not be identical)")
    ap.add_argument("--json", default=None, help="output path (default bench/results/cpu-compare-<date>.json)")
    ap.add_argument("--profile", action="store_true", help="cProfile one blip2_fast run and print the top entries")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from bench.cpu_limits import cpu_info
    from blip2_fast.models.greedy_head import screen_supported

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    tag = "" if a.dtype == "fp32" else f"-{a.dtype}"
    out = Path(a.json) if a.json else Path(__file__).parent / "results" / f"cpu-compare{tag}-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {
        "dtype": a.dtype, "runs": a.runs, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": cpu_info(), "versions": _versions(), "presets": {}, "impls": {},
    }
    for preset in a.presets:
        hf, ours = build(preset, seed=0, dtype=dtype)
        res["impls"][preset] = {n: str(v) for n, v in ours.impls.items()}
        # the exact bf16-screened greedy head (blip2_fast/models/greedy_head.py): "on", or why not
        res.setdefault("greedy_screen", {})[preset] = screen_supported(ours.lm.lm_head) or "on"
        cases = res["presets"][preset] = []
        for N in a.new_tokens:
            for B in a.batches:
                cases.append(run_case(hf, ours, B, N, a.runs, dtype))
                out.write_text(json.dumps(res, indent=2) + "\n")  # after every case: a killed run keeps what it did
        if a.profile:
            import cProfile
            import pstats

            px = torch.randn(a.batches[0], 3, ours.cfg.vision.image_size, ours.cfg.vision.image_size).to(dtype)
            pr = cProfile.Profile()
            pr.enable()
            ours.generate(px, max_new_tokens=a.new_tokens[0], min_new_tokens=a.new_tokens[0])
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(20)
        del hf, ours
    print(f"{'preset':18s}{'batch':>6s}{'tokens':>7s}{'ours s':>9s}{'hf s':>9s}{'wall x':>8s}{'cpu x':>8s}  identical")
    for preset, cases in res["presets"].items():
        for c in cases:
            print(f"{preset:18s}{c['batch']:6d}{c['new_tokens']:7d}{c['blip2_fast_median_s']:9.2f}"
                  f"{c['transformers_median_s']:9.2f}{c['ratio']:8.2f}{c['cpu_time_ratio']:8.2f}  {c['token_identical']}")
    if plot(res, out.with_suffix(".png")):
        res["plot"] = out.with_suffix(".png").name
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
