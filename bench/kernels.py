"""Run every kernel micro-benchmark: `python -m bench.kernels [--quick] [--json F] [--results F] [--device D] [--dtype T]`.

Imports each `bench/bench_<op>.py` and iterates its `run(device, dtype, quick)` (see bench/common.py
for the row format). Every row of an op with a tactic choice also records each candidate's time
(ours and PyTorch's path, `candidates_ms`) and the one a model load would bind (`tactic`). Each op ends "ok" (every case ran) or "failed" with its reason (a module that is
missing or fails to import, or a case that raised: the rows it finished are kept); never a silent
skip. With --results, the shared results JSON (bench/results_file.py) is rewritten after every row,
so a run cut short keeps every finished row and says which op was running. Exit status 1 if any op
failed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback

import torch

from bench import results_file

OPS = ["attention", "layer_norm", "rms_norm", "ln_linear_gelu", "linear_gelu", "paged_attention", "cross_attention"]
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _log(msg: str) -> None:
    print(f"[kernels] {msg}", file=sys.stderr, flush=True)


def run_all(device, dtype, quick: bool, ops=OPS, results=None) -> tuple[list[dict], dict]:
    """(rows, status): status[op] = {"status": "ok" | "failed", "reason", "rows", "seconds"}."""
    rows, status = [], {}

    def record(op, **st):
        status[op] = {**status.get(op, {}), **st}
        if results:
            results_file.update(results, lambda d: d.setdefault("kernels", {}).setdefault("ops", {}).update(
                {op: status[op]}))

    def add_row(r):
        rows.append(r)
        if results:
            results_file.update(results, lambda d: d.setdefault("kernels", {}).setdefault("rows", []).append(r))

    for op in ops:
        t0 = time.perf_counter()
        n = 0
        record(op, status="running", reason=None, rows=0, seconds=0.0)
        try:
            mod = importlib.import_module(f"bench.bench_{op}")
            for r in mod.run(device=device, dtype=dtype, quick=quick):
                r.setdefault("op", op)
                r["bench"] = op
                add_row(r)
                n += 1
                record(op, rows=n, seconds=round(time.perf_counter() - t0, 2))
            if n == 0:
                raise RuntimeError("the benchmark produced no rows")
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e)[:400]}"
            _log(f"{op} FAILED after {n} rows: {reason}")
            traceback.print_exc(limit=4, file=sys.stderr)
            record(op, status="failed", reason=reason, rows=n, seconds=round(time.perf_counter() - t0, 2))
            continue
        record(op, status="ok", rows=n, seconds=round(time.perf_counter() - t0, 2))
        _log(f"{op}: {n} rows in {time.perf_counter() - t0:.1f} s")
    return rows, status


def print_table(rows, file=sys.stdout):
    """One line per row; `bound` is the candidate tactic choice binds for the row's shape class, with
    every candidate's time (blip2_fast/tactics.py)."""
    print(f"{'op':18s}{'shape':34s}{'dtype':>9s}{'ms':>10s}{'base ms':>10s}{'ratio':>8s}{'ceiling':>9s}  "
          f"{'achieved':16s}bound (candidates ms)", file=file)
    for r in rows:
        f = r.get("fraction_of_ceiling")
        cands = ", ".join(f"{n} {t:.4g}" if t is not None else f"{n} failed" for n, t in (r.get("candidates_ms") or {}).items())
        bound = f"{r['tactic']} ({cands})" if r.get("tactic") else "-"
        print(f"{r['op'][:18]:18s}{str(r.get('shape'))[:33]:34s}{r.get('dtype', ''):>9s}{r.get('ms', float('nan')):10.4f}"
              f"{r.get('baseline_ms', float('nan')):10.4f}{r.get('ratio', float('nan')):8.2f}"
              f"{'-' if f is None else f'{f:.2f}':>9s}  {r.get('achieved', ''):16s}{bound}", file=file)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="blip2_fast kernel micro-benchmarks")
    ap.add_argument("--quick", action="store_true", help="toy sizes (smoke test; CPU with TRITON_INTERPRET=1)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--ops", nargs="+", default=OPS)
    ap.add_argument("--json", default=None, help="write this run's rows and op statuses here at the end")
    ap.add_argument("--results", default=None, help="a shared results JSON to update after every row")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DT[a.dtype] if a.dtype else (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    dev_name = device if torch.device(device).type != "cuda" else torch.cuda.get_device_name()
    meta = {"device": dev_name, "dtype": str(dtype).replace("torch.", ""), "quick": a.quick, "ops_planned": list(a.ops)}
    if a.results:
        results_file.update(a.results, lambda d: d.setdefault("kernels", {}).update(meta))
    rows, status = run_all(device, dtype, a.quick, a.ops, a.results)
    print_table(rows)
    for op, st in status.items():
        if st["status"] != "ok":
            print(f"FAILED {op}: {st['reason']}")
    res = {**meta, "kernels": rows, "ops": status}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    if any(st["status"] != "ok" for st in status.values()):
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
