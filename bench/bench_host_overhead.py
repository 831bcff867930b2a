"""Engine host overhead per decode step: what `Engine.step()` costs beyond the language model's math.

A batch of `--batch` greedy requests (the tiny preset, CPU, fp32) decodes `--steps` tokens each;
every decode step is timed whole, and the time spent inside the language model (its token
embedding, its forward over the paged cache, and its LM head) is timed apart by wrapping those three
methods. Overhead = step - model: scheduling, block bookkeeping, building the step's inputs,
sampling, outputs. The median over the decode steps of one run is the run's figure. Two clocks:
wall time (what a caller waits), and the calling thread's CPU time (time.thread_time), which a
machine shared with other jobs disturbs far less (the overhead is single-threaded Python).
--stub-model replaces the language model's forward and head with constant outputs of the right
shapes: the engine's host work is the same (the tokens are meaningless), and what remains of a
step is that work alone, with its data warm in the caches (after a real forward it runs colder).

    python -m bench.bench_host_overhead [--batch 64] [--steps 96] [--runs 5] [--threads N] [--stub-model]
                                        [--baseline DIR] [--json F]

--baseline DIR: also measure the blip2_fast package found in DIR (e.g. an older commit extracted
with `git archive <rev> | tar -x -C DIR`), each run in its own subprocess, alternating which goes
first, so both see the same machine load; the JSON then has both and their ratio per pair.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def measure(batch: int = 64, steps: int = 96, preset: str = "blip2-opt-tiny", seed: int = 0, threads: int = 0,
            stub: bool = False) -> dict:
    """One run in this process: per-step medians in ms (step, model, overhead)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    import blip2_fast
    from blip2_fast import Engine, SamplingParams
    from blip2_fast.presets import load_preset

    torch.manual_seed(seed)
    model = load_preset(preset, device="cpu", dtype=torch.float32, backend="reference", seed=seed)
    lm = model.lm
    in_model = [0.0, 0.0]  # wall, thread CPU
    depth = [0]

    def timed(fn):
        def wrapper(*a, **k):
            depth[0] += 1
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    in_model[0] += time.perf_counter() - t0
                    in_model[1] += time.thread_time() - c0
        return wrapper

    if stub:
        hidden = torch.zeros(batch, 1, model.cfg.lm.hidden)
        logits = torch.zeros(batch, model.cfg.lm.vocab)
        lm.forward = lambda embeds, *a, **k: hidden if embeds.shape[0] == batch and embeds.shape[1] == 1 else real_fwd(embeds, *a, **k)
        lm.logits = lambda h: logits if h.shape[0] == batch and h.dim() == 2 else real_logits(h)
        real_fwd, real_logits = type(lm).forward.__get__(lm), type(lm).logits.__get__(lm)
    for name in ("forward", "logits", "embed_tokens"):
        setattr(lm, name, timed(getattr(lm, name)))
    S = model.cfg.vision.image_size
    g = torch.Generator().manual_seed(seed)
    n_new = steps + 1
    per_seq = -(-(model.cfg.num_query_tokens + 1 + n_new) // 16)
    eng = Engine(model, max_num_seqs=batch, block_size=16, num_blocks=batch * per_seq + 8)  # no preemption
    for i in range(batch):
        eng.add_request(i, pixel_values=torch.randn(3, S, S, generator=g),
                        sampling=SamplingParams(max_new_tokens=n_new, min_new_tokens=n_new))
    eng.step()  # admission, image encoding and prefill: not a decode step
    step_ms, model_ms, cpu_over = [], [], []
    while eng.has_unfinished():
        in_model[0] = in_model[1] = 0.0
        t0, c0 = time.perf_counter(), time.thread_time()
        outs = eng.step()
        dt, dc = time.perf_counter() - t0, time.thread_time() - c0
        if len(outs) == batch and not any(o.finished for o in outs):  # a full decode step
            step_ms.append(dt * 1e3)
            model_ms.append(in_model[0] * 1e3)
            cpu_over.append((dc - in_model[1]) * 1e3)
    over = [s - m for s, m in zip(step_ms, model_ms)]
    return {"blip2_fast": str(Path(blip2_fast.__file__).parent), "batch": batch, "threads": torch.get_num_threads(),
            "stub_model": stub,
            "decode_steps": len(step_ms),
            "step_ms_p50": statistics.median(step_ms), "model_ms_p50": statistics.median(model_ms),
            "overhead_ms_p50": statistics.median(over), "overhead_cpu_ms_p50": statistics.median(cpu_over)}


def _child(tree: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--batch", str(args.batch),
           "--steps", str(args.steps), "--preset", args.preset, "--threads", str(args.threads)]
    cmd += ["--stub-model"] if args.stub_model else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--preset", default="blip2-opt-tiny")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--stub-model", action="store_true", help="constant LM outputs: the host work alone")
    ap.add_argument("--baseline", default=None, help="a directory holding another blip2_fast package to compare")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a.batch, a.steps, a.preset, threads=a.threads, stub=a.stub_model)))
        return
    trees = {"current": _ROOT} | ({"baseline": Path(a.baseline).resolve()} if a.baseline else {})
    runs = {k: [] for k in trees}
    for i in range(a.runs):
        order = list(trees) if i % 2 == 0 else list(reversed(trees))
        for k in order:
            r = _child(trees[k], a)
            runs[k].append(r)
            print(f"run {i} {k:8s} step {r['step_ms_p50']:.3f} ms  model {r['model_ms_p50']:.3f} ms  "
                  f"overhead {r['overhead_ms_p50']:.3f} ms (thread CPU {r['overhead_cpu_ms_p50']:.3f} ms)", flush=True)
    result = {"what": "engine host overhead per decode step (step time minus the LM's embedding, forward and head)",
              "command": "python -m bench.bench_host_overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
              "preset": a.preset, "device": "cpu", "dtype": "float32", "batch": a.batch, "steps": a.steps,
              "threads": a.threads or "torch default", "stub_model": a.stub_model,
              "cpus": os.cpu_count(), "note": "medians over decode steps per run; runs alternate between trees"}
    for k, rs in runs.items():
        result[k] = {"runs": rs, "overhead_ms_median": statistics.median(r["overhead_ms_p50"] for r in rs),
                     "overhead_cpu_ms_median": statistics.median(r["overhead_cpu_ms_p50"] for r in rs),
                     "step_ms_median": statistics.median(r["step_ms_p50"] for r in rs)}
    if "baseline" in runs:
        for key in ("overhead_ms_p50", "overhead_cpu_ms_p50"):
            ratios = [b[key] / c[key] for b, c in zip(runs["baseline"], runs["current"])]
            result[f"baseline_over_current_{key.split('_ms')[0]}_per_pair"] = [round(x, 2) for x in ratios]
    for k in trees:
        print(f"{k}: overhead median {result[k]['overhead_ms_median']:.3f} ms/step wall, "
              f"{result[k]['overhead_cpu_ms_median']:.3f} ms/step thread CPU")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
