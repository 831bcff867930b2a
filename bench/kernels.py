"""Run every kernel micro-benchmark: `python -m bench.kernels [--quick] [--json F] [--device D] [--dtype T]`.

Imports each `bench/bench_<op>.py` and calls its `run(device, dtype, quick)` (see bench/common.py for
the row format). A module that is missing or raises is skipped with a note on stderr and in the
JSON's "skipped" list; the others still run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback

import torch

OPS = ["attention", "layer_norm", "rms_norm", "ln_linear_gelu", "linear_gelu", "paged_attention", "cross_attention"]
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_all(device, dtype, quick: bool, ops=OPS) -> tuple[list[dict], list[dict]]:
    rows, skipped = [], []
    for op in ops:
        mod_name = f"bench.bench_{op}"
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                note = "no benchmark module"
            else:
                note = f"import failed: {e}"
            skipped.append({"op": op, "reason": note})
            print(f"[kernels] skip {op}: {note}", file=sys.stderr, flush=True)
            continue
        except Exception as e:
            skipped.append({"op": op, "reason": f"import failed: {type(e).__name__}: {str(e)[:300]}"})
            print(f"[kernels] skip {op}: import failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        try:
            got = mod.run(device=device, dtype=dtype, quick=quick)
        except Exception as e:
            skipped.append({"op": op, "reason": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"[kernels] skip {op}: run raised {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
            traceback.print_exc(limit=3, file=sys.stderr)
            continue
        for r in got:
            r.setdefault("op", op)
        rows += got
        print(f"[kernels] {op}: {len(got)} rows in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return rows, skipped


def print_table(rows, file=sys.stdout):
    print(f"{'op':18s}{'shape':34s}{'dtype':>9s}{'ms':>10s}{'base ms':>10s}{'ratio':>8s}{'ceiling':>9s}  achieved", file=file)
    for r in rows:
        f = r.get("fraction_of_ceiling")
        print(f"{r['op'][:18]:18s}{str(r.get('shape'))[:33]:34s}{r.get('dtype', ''):>9s}{r.get('ms', float('nan')):10.4f}"
              f"{r.get('baseline_ms', float('nan')):10.4f}{r.get('ratio', float('nan')):8.2f}"
              f"{'-' if f is None else f'{f:.2f}':>9s}  {r.get('achieved', '')}", file=file)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="blip2_fast kernel micro-benchmarks")
    ap.add_argument("--quick", action="store_true", help="toy sizes (smoke test; CPU with TRITON_INTERPRET=1)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--ops", nargs="+", default=OPS)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DT[a.dtype] if a.dtype else (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    rows, skipped = run_all(device, dtype, a.quick, a.ops)
    print_table(rows)
    for s in skipped:
        print(f"skipped {s['op']}: {s['reason']}")
    res = {"device": device if torch.device(device).type != "cuda" else torch.cuda.get_device_name(),
           "dtype": str(dtype).replace("torch.", ""), "quick": a.quick, "kernels": rows, "skipped": skipped}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
