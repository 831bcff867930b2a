"""The figures a gpu_check run was meant to produce, from its results JSON, and the final table.

    python -m bench.gpu_report FILE      # print the table of any results JSON, finished or not

`figures(results)` lists every planned figure as {"figure", "status": "ok" | "failed", "value",
"reason"}: a figure is "ok" only when its numbers are in the file; everything else (its step failed,
timed out, was skipped for time, is still running or was killed, a row raised, a benchmark produced
nothing) is "failed" with the reason. Never a quiet "ok".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _step_reason(d: dict, step: str) -> str:
    st = (d.get("steps") or {}).get(step)
    if not st:
        return f"step {step} was not run"
    if st.get("status") == "ok":
        return f"step {step} finished without producing it"
    return f"step {step} {st.get('status')}: {st.get('reason')}"


def _fig(name, ok, value=None, reason=None) -> dict:
    return {"figure": name, "status": "ok" if ok else "failed", "value": value, "reason": None if ok else reason}


def _kernel_figures(d: dict) -> list[dict]:
    k = d.get("kernels") or {}
    ops, rows = k.get("ops") or {}, k.get("rows") or []
    out = []
    for op in (d.get("plan") or {}).get("kernel_ops", []):
        st = ops.get(op)
        mine = [r for r in rows if r.get("bench") == op]
        ratios = [r["ratio"] for r in mine if isinstance(r.get("ratio"), (int, float))]
        value = {"rows": len(mine), "median_ratio_vs_pytorch": round(statistics.median(ratios), 3) if ratios else None}
        if st and st.get("status") == "ok" and mine:
            out.append(_fig(f"kernels/{op}", True, value))
        elif st and st.get("status") == "failed":
            out.append(_fig(f"kernels/{op}", False, value, f"benchmark raised after {len(mine)} rows: {st.get('reason')}"))
        elif st and st.get("status") == "running":
            out.append(_fig(f"kernels/{op}", False, value, f"running when the file was last written ({len(mine)} rows); "
                            + _step_reason(d, "kernels")))
        else:
            out.append(_fig(f"kernels/{op}", False, None, _step_reason(d, "kernels")))
    return out


def _e2e_figures(d: dict, section: str, batches) -> list[dict]:
    sec = (d.get("e2e") or {}).get(section) or {}
    rows = sec.get("rows") or []
    out = []
    for B in batches:
        ours = next((r for r in rows if r.get("impl") == "blip2_fast.generate" and r.get("batch") == B), None)
        hf = next((r for r in rows if r.get("impl") == "transformers" and r.get("batch") == B), None)
        name = f"{section}/batch{B}"
        if ours and hf and ours.get("images_per_s") and hf.get("images_per_s"):
            out.append(_fig(name, True, {"images_per_s": ours["images_per_s"], "hf_images_per_s": hf["images_per_s"],
                                         "ratio": ours.get("ratio"), "ttft_ms": ours.get("ttft_ms"),
                                         "peak_gib": ours.get("peak_gib")}))
        else:
            errs = [f"{r.get('impl')}: {r['error']}" for r in (ours, hf) if r and r.get("error")]
            missing = [n for n, r in (("blip2_fast.generate", ours), ("transformers", hf)) if r is None]
            reason = "; ".join(errs) or (f"no {' / '.join(missing)} row; " + _step_reason(d, section))
            out.append(_fig(name, False, None, reason))
    if section == "e2e-opt":
        fl = sec.get("floors")
        if fl and "error" not in fl:
            out.append(_fig(f"{section}/floors", True, {k: fl.get(k) for k in (
                "decode_ms_per_token_b1", "hbm_floor_ms", "vision_ms_per_image", "hf_vision_ms_per_image", "vision_floor_ms")}))
        else:
            out.append(_fig(f"{section}/floors", False, None, (fl or {}).get("error") or _step_reason(d, section)))
    return out


def _test_figure(d: dict) -> dict:
    t = d.get("tests")
    st = (d.get("steps") or {}).get("tests") or {}
    if not t:
        return _fig("tests", False, None, _step_reason(d, "tests"))
    value = {k: t.get(k) for k in ("collected", "passed", "skipped", "errors", "seconds")}
    value["failed"] = len(t.get("failed") or [])
    if t.get("failed"):
        return _fig("tests", False, value, "failed: " + "; ".join(f"{f['test']}: {f['reason']}" for f in t["failed"][:5]))
    if t.get("status") != "done" or st.get("status") != "ok":
        done = (t.get("passed") or 0) + (t.get("skipped") or 0)
        return _fig("tests", False, value, f"{done} of {t.get('collected')} finished; " + _step_reason(d, "tests"))
    return _fig("tests", True, value)


def figures(d: dict) -> list[dict]:
    plan = d.get("plan") or {}
    steps = plan.get("steps", [])
    out = []
    if "build" in steps:
        st = (d.get("steps") or {}).get("build") or {}
        out.append(_fig("build", st.get("status") == "ok", None, _step_reason(d, "build")))
    if "kernels" in steps:
        out += _kernel_figures(d)
    batches = plan.get("e2e_batches", [1, 64])
    if "e2e-opt" in steps:
        out += _e2e_figures(d, "e2e-opt", batches)
    if "tests" in steps:
        out.append(_test_figure(d))
    if "e2e-t5" in steps:
        out += _e2e_figures(d, "e2e-t5", batches)
    return out


def print_table(d: dict, file=sys.stdout) -> None:
    v = d.get("versions") or {}
    print(f"== blip2_fast gpu_check: {d.get('device')}  {d.get('date')}  torch {v.get('torch')} triton {v.get('triton')} "
          f"transformers {v.get('transformers')}  commit {d.get('commit')}", file=file)
    for s in (d.get("steps") or {}).values():
        secs = s.get("seconds")
        print(f"  step {s['step']:9s} {s['status']:8s} {'' if secs is None else f'{secs:6.0f} s'}"
              f"{'' if s['status'] == 'ok' else '  ' + str(s.get('reason'))[:160]}", file=file)
    for f in figures(d):
        val = "" if f["value"] is None else json.dumps(f["value"])[:150]
        print(f"  {f['status']:6s} {f['figure']:22s} {val if f['status'] == 'ok' else f['reason'][:200]}", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="a results JSON written by bench/gpu_check.py")
    a = ap.parse_args(argv)
    d = json.loads(Path(a.file).read_text())
    print_table(d)
    return 0 if all(f["status"] == "ok" for f in figures(d)) else 1


if __name__ == "__main__":
    sys.exit(main())
