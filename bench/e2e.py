"""End-to-end BLIP-2 generation benchmark: blip2_fast (generate and Engine) vs transformers, same weights.

    python -m bench.e2e --preset blip2-opt-2.7b --dtype bf16 --batch 1 64 --new-tokens 30 \
        [--checkpoint DIR] [--json out.json] [--plot out.png] [--no-hf] [--quick]

Per batch size and implementation: images/s, generated tokens/s, time to first token (vision +
Q-Former + prefill + one token), per-token decode latency p50/p90, peak device memory. Greedy with
min_new_tokens = max_new_tokens, so every run decodes exactly --new-tokens steps.

Weights: with --checkpoint both sides load it (transformers: `from_pretrained`, sdpa attention, its
Q-Former kept in fp32 as transformers does). Without, transformers' `Blip2ForConditionalGeneration`
is built from the preset config directly on the device in the target dtype (its random init; the
Q-Former cast back to fp32 as `from_pretrained` would) and blip2_fast loads that live model, so both
run the same tensors. --no-hf skips transformers and builds ours with `load_preset` (no HF init).

Floors: the batch-1 decode step against the memory floor (LM weight bytes / measured copy bandwidth)
and the vision encoder per image at batch 64 against the compute floor (ViT FLOPs / measured matmul
rate), both from bench.common.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
import warnings

import torch

from bench import results_file
from bench.common import copy_bandwidth_gbs, matmul_tflops, sync

_DT = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
       "fp32": torch.float32, "float32": torch.float32}


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- model construction ----------------------------------------------------------------------------
def build_models(preset: str, checkpoint: str | None, device, dtype, with_hf: bool, backend=None):
    import blip2_fast
    from blip2_fast.presets import load_preset, preset_config

    hf = None
    if checkpoint:
        ours = blip2_fast.load(checkpoint, device=device, dtype=dtype, backend=backend, progress=False)
        if with_hf:
            import transformers

            hf = transformers.Blip2ForConditionalGeneration.from_pretrained(
                checkpoint, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        return ours, hf
    if not with_hf:
        return load_preset(preset, device=device, dtype=dtype, backend=backend), None
    import transformers

    cfg = transformers.Blip2Config(**preset_config(preset))
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.Blip2ForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    if dtype != torch.float32:  # as from_pretrained does (_keep_in_fp32_modules)
        for name in type(hf)._keep_in_fp32_modules or []:
            m = getattr(hf, name, None)
            if isinstance(m, torch.nn.Module):
                m.float()
            elif isinstance(m, torch.nn.Parameter):
                m.data = m.data.float()
    ours = blip2_fast.load(hf, device=device, dtype=dtype, backend=backend, progress=False)
    return ours, hf


def start_ids(model, B: int) -> torch.Tensor:
    """The caption prompt as Blip2Processor lays out an empty text: image tokens + BOS (OPT) or + EOS
    (T5: "</s>"). Passed explicitly to every path (transformers 5 needs a T5 BOS id otherwise)."""
    d = model.generation_defaults
    img, Q = model.cfg.image_token_id, model.cfg.num_query_tokens
    last = d.get("eos_token_id") if model.is_encoder_decoder else d.get("bos_token_id")
    if isinstance(last, (list, tuple)):
        last = last[0]
    row = ([img] * Q if img is not None else []) + ([last] if last is not None else [])
    return torch.tensor([row] * B, dtype=torch.long)


# ---- measurements ----------------------------------------------------------------------------------
def _peak_reset(device):
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def _pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _summary(impl, B, N, total_s, ttft_s, steps_s, peak):
    return {"impl": impl, "batch": B, "new_tokens": N, "total_s": round(total_s, 4),
            "images_per_s": round(B / total_s, 3), "tokens_per_s": round(B * N / total_s, 1),
            "ttft_ms": None if ttft_s is None else round(ttft_s * 1e3, 2),
            "token_ms_p50": None if not steps_s else round(_pct(steps_s, 0.5) * 1e3, 3),
            "token_ms_p90": None if not steps_s else round(_pct(steps_s, 0.9) * 1e3, 3),
            "peak_gib": peak}


def bench_generate(model, pxs, N, device, repeats):
    """blip2_fast `model.generate`: throughput from full runs, TTFT from max_new_tokens=1 runs.
    Every run gets images it has not seen: the engine caches image features by content digest."""
    gen = dict(max_new_tokens=N, min_new_tokens=N, input_ids=start_ids(model, pxs[0].shape[0]))
    model.generate(pxs[0], **gen)  # warm-up (allocates the engine pool)
    _peak_reset(device)
    totals = [_timed(lambda: model.generate(pxs[1 + k], **gen), device)[0] for k in range(repeats)]
    peak = _peak_gib(device)
    ttft = statistics.median(_timed(lambda: model.generate(pxs[1 + repeats + k], input_ids=gen["input_ids"], max_new_tokens=1), device)[0]
                             for k in range(repeats))
    total = statistics.median(totals)
    per_tok = [(total - ttft) / max(N - 1, 1)] if N > 1 else []
    return _summary("blip2_fast.generate", pxs[0].shape[0], N, total, ttft, per_tok, peak)


def bench_engine(model, pxs, N, device, repeats):
    """blip2_fast through the Engine, stepping by hand: step 1 = prefill (TTFT), the rest = decode steps."""
    from blip2_fast import Engine, SamplingParams

    B = pxs[0].shape[0]
    rows = start_ids(model, B)
    per = rows.shape[1] + model.cfg.num_query_tokens + N
    blocks = B * (math.ceil(per / 16) + 2) * (2 if model.is_encoder_decoder else 1) + 8
    eng = Engine(model, max_num_seqs=B, num_blocks=blocks)
    sp = SamplingParams(max_new_tokens=N, min_new_tokens=N)
    runs = []
    for rep in range(repeats + 1):
        for i in range(B):
            eng.add_request((rep, i), pixel_values=pxs[rep][i], prompt=rows[i], sampling=sp)
        if rep == 1:
            _peak_reset(device)
        steps = []
        sync(device)
        t0 = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
            sync(device)
            steps.append(time.perf_counter())
        if rep > 0:
            runs.append((steps[-1] - t0, steps[0] - t0, [b - a for a, b in zip(steps, steps[1:])]))
    peak = _peak_gib(device)
    total = statistics.median(r[0] for r in runs)
    ttft = statistics.median(r[1] for r in runs)
    decode = [d for r in runs for d in r[2]]
    row = _summary("blip2_fast.engine", B, N, total, ttft, decode, peak)
    # whether the decode steps replayed CUDA graphs (a failed capture falls back to eager with a warning)
    runner = getattr(eng, "runner", None)
    row["cuda_graphs"] = bool(getattr(runner, "use_graphs", False))
    row["graph_buckets"] = sorted(getattr(runner, "_graphs", {}) or {})
    return row


def bench_hf(hf, pxs, N, device, repeats, input_ids):
    """transformers generate; a logits processor stamps each step (the first stamp is the TTFT)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            sync(device)
            stamps.append(time.perf_counter())
            return scores

    vdt = next(hf.vision_model.parameters()).dtype
    pxs = [p.to(device=device, dtype=vdt) for p in pxs]
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, num_beams=1, input_ids=input_ids.to(device))
    with torch.inference_mode():
        hf.generate(pixel_values=pxs[0], **gen)
        _peak_reset(device)
        totals = [_timed(lambda: hf.generate(pixel_values=pxs[1 + k], **gen), device)[0] for k in range(repeats)]
        peak = _peak_gib(device)
        ttfts, decode = [], []
        for k in range(repeats):
            stamps.clear()
            sync(device)
            t0 = time.perf_counter()
            hf.generate(pixel_values=pxs[1 + repeats + k], **gen, logits_processor=LogitsProcessorList([Stamp()]))
            ttfts.append(stamps[0] - t0)
            decode += [b - a for a, b in zip(stamps, stamps[1:])]
    return _summary("transformers", pxs[0].shape[0], N, statistics.median(totals), statistics.median(ttfts), decode, peak)


def vit_flops(cfg, B: int) -> float:
    v = cfg.vision
    T, E, M = v.num_patches + 1, v.hidden, v.mlp
    per_layer = T * (8 * E * E + 4 * E * M) + 4 * T * T * E
    return B * (v.layers * per_layer + 2 * v.num_patches * E * 3 * v.patch * v.patch)


def floors(model, hf, device, dtype, B_vision: int, repeats: int, decode_ms_b1):
    from blip2_fast.presets import weight_bytes

    S = model.cfg.vision.image_size
    px = torch.randn(B_vision, 3, S, S, device=device, dtype=dtype)
    with torch.inference_mode():
        model.get_image_features(px)
        t = statistics.median(_timed(lambda: model.get_image_features(px), device)[0] for _ in range(max(repeats, 3)))
        hf_t = None
        if hf is not None:
            hpx = px.to(next(hf.vision_model.parameters()).dtype)
            hf.vision_model(pixel_values=hpx)
            hf_t = statistics.median(_timed(lambda: hf.vision_model(pixel_values=hpx), device)[0] for _ in range(max(repeats, 3)))
    flops = vit_flops(model.cfg, B_vision)
    tflops = matmul_tflops(device, dtype)
    bw = copy_bandwidth_gbs(device)
    lm_bytes = weight_bytes(model, "lm")
    return {
        "vision_batch": B_vision,
        "vision_ms_per_image": round(t * 1e3 / B_vision, 4),
        "hf_vision_ms_per_image": None if hf_t is None else round(hf_t * 1e3 / B_vision, 4),
        "vision_floor_ms": round(flops / (tflops * 1e12) * 1e3 / B_vision, 4),
        "vision_gflops_per_image": round(flops / B_vision / 1e9, 2),
        "matmul_tflops": round(tflops, 1),
        "decode_ms_per_token_b1": decode_ms_b1,
        "lm_weight_gb": round(lm_bytes / 1e9, 3),
        "copy_bandwidth_gbs": round(bw, 1),
        "hbm_floor_ms": round(lm_bytes / (bw * 1e9) * 1e3, 4),
    }


# ---- output ----------------------------------------------------------------------------------------
def print_table(rows, fl, file=sys.stdout):
    cols = ["impl", "batch", "images_per_s", "tokens_per_s", "ttft_ms", "token_ms_p50", "token_ms_p90", "peak_gib", "ratio"]
    w = [20, 6, 13, 13, 10, 13, 13, 9, 7]
    print("".join(f"{c:>{n}s}" if i else f"{c:<{n}s}" for i, (c, n) in enumerate(zip(cols, w))), file=file)
    for r in rows:
        cells = []
        for i, (c, n) in enumerate(zip(cols, w)):
            v = r.get(c)
            s = "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
            cells.append(f"{s:<{n}s}" if i == 0 else f"{s:>{n}s}")
        print("".join(cells), file=file)
    if fl:
        print(f"decode b1: {fl['decode_ms_per_token_b1']} ms/token vs memory floor {fl['hbm_floor_ms']} ms "
              f"({fl['lm_weight_gb']} GB LM weights at {fl['copy_bandwidth_gbs']} GB/s)", file=file)
        print(f"vision b{fl['vision_batch']}: {fl['vision_ms_per_image']} ms/image (transformers "
              f"{fl['hf_vision_ms_per_image']}) vs compute floor {fl['vision_floor_ms']} ms "
              f"({fl['vision_gflops_per_image']} GFLOP at {fl['matmul_tflops']} TFLOP/s)", file=file)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed; no plot")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    impls = sorted({r["impl"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        for ax, key in zip(axes, ("images_per_s", "token_ms_p50")):
            vals = [next((r[key] or 0 for r in rows if r["impl"] == impl and r["batch"] == b), 0) for b in batches]
            ax.bar([i + k * width for i in range(len(batches))], vals, width, label=impl)
    for ax, title in zip(axes, ("images / s (higher is better)", "decode ms / step p50 (lower is better)")):
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="BLIP-2 end-to-end generation: blip2_fast vs transformers")
    ap.add_argument("--preset", default="blip2-opt-2.7b")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint directory instead of a random preset")
    ap.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--new-tokens", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3; 1 with --quick)")
    ap.add_argument("--backend", default=None, help="blip2_fast backend (fast / reference)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-engine", action="store_true", help="skip the hand-stepped Engine measurement")
    ap.add_argument("--quick", action="store_true", help="toy sizes: tiny preset, batch <= 2, 4 new tokens")
    ap.add_argument("--no-floors", action="store_true", help="skip the vision and decode floor measurements")
    ap.add_argument("--json", default=None, help="write this run's results here at the end")
    ap.add_argument("--results", default=None, help="a shared results JSON to update after every row (bench/results_file.py)")
    ap.add_argument("--section", default=None, help="this run's key under the results JSON's 'e2e' (default: the preset)")
    ap.add_argument("--plot", default=None)
    a = ap.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DT[a.dtype] if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if a.quick:
        if not a.checkpoint and a.preset not in ("blip2-opt-tiny", "blip2-t5-tiny"):
            a.preset = "blip2-t5-tiny" if "t5" in a.preset else "blip2-opt-tiny"
        a.batch = sorted({min(b, 2) for b in a.batch})
        a.new_tokens = min(a.new_tokens, 4)
    repeats = a.repeats or (1 if a.quick else 3)
    N = a.new_tokens
    log(f"building {a.checkpoint or a.preset} on {device} in {str(dtype).replace('torch.', '')}"
        f"{'' if a.no_hf else ' (with transformers)'}")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours, hf = build_models(a.preset, a.checkpoint, device, dtype, not a.no_hf, a.backend)
    log(f"built in {time.perf_counter() - t0:.1f} s; blip2_fast ops: "
        + ", ".join(f"{k}={v}" for k, v in sorted(ours.impls.items())))
    import transformers

    import blip2_fast

    res = {"preset": a.checkpoint or a.preset, "dtype": str(dtype).replace("torch.", ""), "device": _device_name(device),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "new_tokens": N, "repeats": repeats,
           "batches": list(a.batch),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "blip2_fast": blip2_fast.__version__},
           "impls": ours.impls, "rows": [], "floors": None, "status": "running"}
    rows = res["rows"]

    def save():  # after every row: a run cut short keeps what it measured
        if a.results:
            snap = json.loads(json.dumps(res, default=str))
            results_file.update(a.results, lambda d: d.setdefault("e2e", {}).__setitem__(a.section or res["preset"], snap))

    save()
    S = ours.cfg.vision.image_size
    g = torch.Generator().manual_seed(0)
    for B in a.batch:
        # distinct images for every run (blip2_fast caches image features by content)
        pxs = [torch.randn(B, 3, S, S, generator=g).to(device=device, dtype=dtype) for _ in range(2 * repeats + 1)]
        # in order of value: ours against transformers first, the hand-stepped engine after
        cases = [("blip2_fast.generate", lambda: bench_generate(ours, pxs, N, device, repeats))]
        if hf is not None:
            cases.append(("transformers", lambda: bench_hf(hf, pxs, N, device, repeats, start_ids(ours, B))))
        if not a.no_engine:
            cases.append(("blip2_fast.engine", lambda: bench_engine(ours, pxs, N, device, repeats)))
        for name, fn in cases:
            log(f"batch {B}: {name} ...")
            try:
                r = fn()
            except Exception as e:  # one failing path should not sink the others
                log(f"batch {B}: {name} failed: {type(e).__name__}: {str(e)[:300]}")
                r = {"impl": name, "batch": B, "new_tokens": N, "error": f"{type(e).__name__}: {str(e)[:300]}",
                     "images_per_s": None}
            rows.append(r)
            hf_row = next((r for r in rows if r["impl"] == "transformers" and r["batch"] == B and r.get("images_per_s")), None)
            for r in rows:
                if r["batch"] == B and hf_row and r.get("images_per_s"):
                    r["ratio"] = round(r["images_per_s"] / hf_row["images_per_s"], 3)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    b1 = next((r for r in rows if r["impl"] == "blip2_fast.engine" and r["batch"] == min(a.batch) and r.get("token_ms_p50")),
              next((r for r in rows if r["impl"] == "blip2_fast.generate" and r["batch"] == min(a.batch) and r.get("token_ms_p50")), None))
    fl = None
    if not a.no_floors:
        log("floors ...")
        try:
            fl = floors(ours, hf, device, dtype, 2 if a.quick else 64, repeats, b1 and b1["token_ms_p50"])
            fl["decode_batch"] = min(a.batch)
        except Exception as e:
            log(f"floors failed: {type(e).__name__}: {str(e)[:300]}")
            fl = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    res["floors"] = fl
    res["status"] = "done"
    save()
    print_table(rows, fl if fl and "error" not in fl else None)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
        log(f"wrote {a.json}")
    if a.plot and plot([r for r in rows if r.get("images_per_s")], a.plot):
        log(f"wrote {a.plot}")
    return res


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
