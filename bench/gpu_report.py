"""Assemble bench/gpu_check.sh's pieces into one results JSON and print a short table.

    python -m bench.gpu_report --work DIR [--out-dir DIR]

Reads from DIR: kernels.json (bench.kernels), e2e-*.json (bench.e2e), steps.tsv (name, status, seconds
per line, written by gpu_check.sh), pytest.txt (its summary line). Writes <out-dir>/<date>-<gpu>.json
with keys device, date, versions, steps, tests, e2e, decode_ms_per_token_b1, hbm_floor_ms,
vision_ms_per_image, vision_floor_ms, kernels.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path


def _load(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"[gpu_report] cannot read {p}: {e}", file=sys.stderr)
        return None


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    return f"cpu-{platform.machine()}"


def _versions() -> dict:
    v = {"python": platform.python_version()}
    for mod in ("torch", "triton", "transformers", "blip2_fast"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:
            v[mod] = f"unavailable ({type(e).__name__})"
    try:
        import torch

        v["cuda"] = torch.version.cuda
    except Exception:
        pass
    return v


def assemble(work: Path) -> dict:
    now = datetime.datetime.now()
    res = {"device": _device(), "date": now.date().isoformat(), "time": now.isoformat(timespec="seconds"),
           "versions": _versions(), "steps": [], "tests": None, "e2e": [], "decode_ms_per_token_b1": None,
           "hbm_floor_ms": None, "vision_ms_per_image": None, "vision_floor_ms": None, "kernels": []}
    steps = work / "steps.tsv"
    if steps.exists():
        for line in steps.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                res["steps"].append({"step": parts[0], "status": parts[1], "seconds": float(parts[2])})
    pt = work / "pytest.txt"
    if pt.exists():
        lines = [l for l in pt.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", l)]
        res["tests"] = lines[-1].strip("= ") if lines else None
    for f in sorted(work.glob("e2e-*.json")):
        d = _load(f)
        if not d:
            continue
        rows = d.get("rows", [])
        for B in sorted({r["batch"] for r in rows}):
            get = lambda impl: next((r for r in rows if r["impl"] == impl and r["batch"] == B and r.get("images_per_s")), None)
            ours, eng, hf = get("blip2_fast.generate"), get("blip2_fast.engine"), get("transformers")
            ips = ours and ours["images_per_s"]
            hips = hf and hf["images_per_s"]
            res["e2e"].append({
                "preset": d.get("preset"), "dtype": d.get("dtype"), "batch": B, "new_tokens": d.get("new_tokens"),
                "images_per_s": ips, "engine_images_per_s": eng and eng["images_per_s"], "hf_images_per_s": hips,
                "ratio": round(ips / hips, 3) if ips and hips else None,
                "ttft_ms": eng and eng.get("ttft_ms"), "hf_ttft_ms": hf and hf.get("ttft_ms"),
                "token_ms_p50": eng and eng.get("token_ms_p50"), "hf_token_ms_p50": hf and hf.get("token_ms_p50"),
                "peak_gib": ours and ours.get("peak_gib"), "hf_peak_gib": hf and hf.get("peak_gib"),
                "errors": [r["error"] for r in rows if r["batch"] == B and r.get("error")] or None,
            })
        fl = d.get("floors") or {}
        if fl and res["decode_ms_per_token_b1"] is None:  # the first e2e run (OPT-2.7B) sets the floors
            res["e2e_floors_preset"] = d.get("preset")
            res["decode_ms_per_token_b1"] = fl.get("decode_ms_per_token_b1")
            res["hbm_floor_ms"] = fl.get("hbm_floor_ms")
            res["vision_ms_per_image"] = fl.get("vision_ms_per_image")
            res["hf_vision_ms_per_image"] = fl.get("hf_vision_ms_per_image")
            res["vision_floor_ms"] = fl.get("vision_floor_ms")
    k = work / "kernels.json"
    if k.exists() and (d := _load(k)):
        keep = ("op", "shape", "dtype", "ms", "baseline_ms", "ratio", "fraction_of_ceiling")
        res["kernels"] = [{key: r.get(key) for key in keep} for r in d.get("kernels", [])]
        res["kernels_skipped"] = d.get("skipped", [])
    return res


def print_summary(res: dict, file=sys.stdout) -> None:
    print(f"== blip2_fast gpu_check: {res['device']}  {res['date']}  torch {res['versions'].get('torch')} "
          f"triton {res['versions'].get('triton')} transformers {res['versions'].get('transformers')}", file=file)
    for s in res["steps"]:
        print(f"  step {s['step']:14s} {s['status']:8s} {s['seconds']:6.0f} s", file=file)
    if res["tests"]:
        print(f"  tests: {res['tests']}", file=file)
    if res["e2e"]:
        print(f"  {'preset':18s}{'batch':>6s}{'img/s':>10s}{'hf img/s':>10s}{'ratio':>8s}{'engine':>10s}", file=file)
        for e in res["e2e"]:
            f = lambda v: "-" if v is None else f"{v:.3g}"
            print(f"  {str(e['preset'])[:18]:18s}{e['batch']:6d}{f(e['images_per_s']):>10s}{f(e['hf_images_per_s']):>10s}"
                  f"{f(e['ratio']):>8s}{f(e['engine_images_per_s']):>10s}", file=file)
    if res["decode_ms_per_token_b1"] is not None:
        print(f"  decode b1 {res['decode_ms_per_token_b1']} ms/token (floor {res['hbm_floor_ms']} ms); "
              f"vision {res['vision_ms_per_image']} ms/image (floor {res['vision_floor_ms']} ms)", file=file)
    if res["kernels"]:
        ratios = [k["ratio"] for k in res["kernels"] if k.get("ratio")]
        worst = min(res["kernels"], key=lambda k: k.get("ratio") or 1e9)
        print(f"  kernels: {len(res['kernels'])} cases, ratio vs PyTorch median "
              f"{sorted(ratios)[len(ratios) // 2] if ratios else '-'}, worst {worst['op']} {worst['shape']} {worst.get('ratio')}",
              file=file)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder holding the step outputs")
    ap.add_argument("--out-dir", default=None, help="default: $OUT if set, else bench/results")
    a = ap.parse_args(argv)
    import os

    res = assemble(Path(a.work))
    out_dir = Path(a.out_dir or os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = re.sub(r"[^a-z0-9]+", "-", res["device"].lower()).strip("-")
    out = out_dir / f"{res['date']}-{gpu}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print_summary(res)
    print(f"  wrote {out}")
    return out


if __name__ == "__main__":
    main()
