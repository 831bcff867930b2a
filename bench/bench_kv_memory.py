"""KV-cache memory: what the paged engine reserves vs transformers' padded contiguous cache.

A batch with mixed prompt and output lengths runs through the engine; at every step we record the
bytes of the blocks in use and compare the peak with (a) the tokens actually cached rounded up to
blocks, and (b) a contiguous cache padded to the longest prompt + longest output for every row,
which is what a static or dynamic transformers cache holds for the same batch.

    python -m bench.bench_kv_memory [--preset blip2-opt-tiny] [--batch 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import random

import torch


def run(preset="blip2-opt-tiny", batch=16, block_size=16, device="cpu", seed=0) -> dict:
    from blip2_fast import Engine, SamplingParams
    from blip2_fast.engine.runner import ModelRunner
    from blip2_fast.presets import load_preset

    model = load_preset(preset, device=device, backend="reference")
    rng = random.Random(seed)
    size = model.cfg.vision.image_size
    Q = model.cfg.num_query_tokens
    prompts = [rng.randint(1, 40) for _ in range(batch)]
    outs = [rng.randint(4, 64) for _ in range(batch)]
    eng = Engine(model, max_num_seqs=batch, block_size=block_size,
                 num_blocks=batch * math.ceil((Q + 41 + 64) / block_size) + 4)
    g = torch.Generator().manual_seed(seed)
    for i in range(batch):
        ids = torch.randint(4, model.cfg.lm.vocab - 2, (prompts[i],), generator=g)
        eng.add_request(i, pixel_values=torch.randn(3, size, size, generator=g), prompt=ids,
                        sampling=SamplingParams(max_new_tokens=outs[i], min_new_tokens=outs[i]))
    per_block = ModelRunner.bytes_per_block(model, block_size)
    per_token = per_block // block_size
    peak_used, peak_need = 0, 0
    while eng.has_unfinished():
        eng.step()
        used = (eng.num_blocks - eng.num_free_blocks) * per_block
        need = sum(math.ceil(eng.blocks.num_tokens(s) / block_size) for r in eng.scheduler.running for s in r.seqs) * per_block
        assert used <= need, (used, need)
        peak_used, peak_need = max(peak_used, used), max(peak_need, need)
    lm_prompt = [Q + p for p in prompts]
    padded = batch * (max(lm_prompt) + max(outs)) * per_token
    exact = sum(lp + o for lp, o in zip(lm_prompt, outs)) * per_token
    return {"preset": preset, "batch": batch, "block_size": block_size, "kv_bytes_per_token": per_token,
            "paged_peak_bytes": peak_used, "paged_peak_tokens_rounded_bytes": peak_need,
            "padded_contiguous_bytes": padded, "all_tokens_exact_bytes": exact,
            "padded_over_paged": round(padded / max(peak_used, 1), 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="blip2-opt-tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    r = run(args.preset, args.batch, args.block_size)
    for k, v in r.items():
        print(f"{k:34s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
