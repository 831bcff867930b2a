"""The one GPU check: every step under one time budget, one results JSON rewritten as it goes.

    python3 -m bench.gpu_check [--dry-run] [--budget S] [--only STEP[,STEP]] [--results FILE]
    bash bench/gpu_check.sh ...   (the same; picks python or python3)

Steps, in order of value (a short budget loses the least valuable last):
    build     install the package if it is not importable, build the C++/CUDA extension
    kernels   every kernel micro-benchmark (bench.kernels)
    e2e-opt   end to end, OPT-2.7B bf16, batch 1 and 64, against transformers (bench.e2e)
    tests     the GPU tests (`pytest -m gpu`, in parallel with pytest-xdist, fixed kernel configs)
    e2e-t5    end to end, Flan-T5-XL bf16, batch 1 and 64
`--dry-run` runs every step at toy sizes on the CPU (TRITON_INTERPRET=1, tiny presets).

The results JSON ($OUT/<date>-<device>.json when $OUT is set, else bench/results/) is written before
the first step and rewritten by the benchmarks after every row, by the test plugin after every test,
and here after every step and every few seconds, always atomically (bench/results_file.py): a run
killed at any point leaves a valid JSON with everything finished before the kill. Its "figures" list
names every figure the run was meant to produce, each "ok" with its value or "failed" with the
reason (a failed step, a row that raised, a step not reached in the budget, a run killed mid-step);
`python -m bench.gpu_report FILE` prints that table from any such file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import gpu_report, results_file

STEPS = ("build", "kernels", "e2e-opt", "tests", "e2e-t5")
# The most a step may take (seconds) on an H200; each also gets at most what the budget has left.
CAPS = {"build": 150, "kernels": 100, "e2e-opt": 130, "tests": 90, "e2e-t5": 200}
DRY_CAPS = {"build": 300, "kernels": 300, "e2e-opt": 240, "tests": 240, "e2e-t5": 240}
DEFAULT_BUDGET, DRY_BUDGET = 420, 1200
POLL_S = 5.0

_ENV_CODE = r"""
import json, platform, subprocess
v = {"python": platform.python_version()}
for mod in ("torch", "triton", "transformers", "numpy", "safetensors", "blip2_fast"):
    try:
        v[mod] = __import__(mod).__version__
    except Exception as e:
        v[mod] = f"unavailable ({type(e).__name__}: {e})"[:200]
dev = {"cpu": platform.processor() or platform.machine()}
try:
    import torch
    v["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dev.update(name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
except Exception as e:
    dev["error"] = f"{type(e).__name__}: {e}"[:200]
try:
    dev["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip() or None
except Exception:
    pass
print(json.dumps({"versions": v, "device": dev}))
"""

_BUILD_CODE = r"""
import sys
from blip2_fast import _ext
reason = _ext.build(verbose=True)
print("extension:", "built" if reason is None else f"FAILED: {reason}")
sys.exit(0 if reason is None else 1)
"""


def _log(msg: str) -> None:
    print(f"== {msg}  [{time.strftime('%H:%M:%S')}]", file=sys.stderr, flush=True)


def _python() -> str:
    return sys.executable or shutil.which("python3") or shutil.which("python") or "python3"


def _commands(py: str, results: Path, dry: bool, workers: int) -> dict[str, list[str]]:
    quick = ["--quick", "--device", "cpu"] if dry else []
    dt = "fp32" if dry else "bf16"
    e2e = [py, "-m", "bench.e2e", "--dtype", dt, "--batch", "1", "64", "--new-tokens", "30",
           "--results", str(results), *quick]
    return {
        "build": [py, "-c", _BUILD_CODE],
        "kernels": [py, "-m", "bench.kernels", "--results", str(results), *quick],
        "e2e-opt": [*e2e, "--preset", "blip2-opt-2.7b", "--repeats", "2", "--section", "e2e-opt"],
        "tests": [py, "-m", "pytest", "-m", "gpu", "tests/", "-q", "-p", "no:cacheprovider", "-p", "bench.pytest_progress",
                  *(["-n", str(workers)] if workers > 1 else [])],
        "e2e-t5": [*e2e, "--preset", "blip2-flan-t5-xl", "--repeats", "1", "--no-engine", "--no-floors",
                   "--section", "e2e-t5"],
    }


def _has_xdist(py: str) -> bool:
    return subprocess.run([py, "-c", "import xdist"], capture_output=True).returncode == 0


def _run_step(name: str, cmd: list[str], timeout: float, env: dict, log_dir: Path, results: Path,
              on_poll) -> dict:
    """Run one step in its own process group under `timeout`; stream its output to stderr and a log."""
    log_path = log_dir / f"{name}.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1, start_new_session=True)
        tail: list[str] = []

        def pump():
            for line in proc.stdout:
                sys.stderr.write(line)
                log.write(line)
                tail.append(line.rstrip())
                del tail[:-12]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
            on_poll()
            try:
                proc.wait(POLL_S)
            except subprocess.TimeoutExpired:
                pass
        reader.join(5)
    rc = proc.returncode
    secs = round(time.monotonic() - t0, 1)
    if timed_out:
        status, reason = "timeout", f"killed at its {timeout:.0f} s limit"
    elif rc == 0:
        status, reason = "ok", None
    else:
        status = "failed"
        last = [t for t in tail if t.strip()][-3:]
        reason = f"exit status {rc}: " + " | ".join(last)[-600:]
    return {"step": name, "status": status, "reason": reason, "seconds": secs, "limit_s": round(timeout),
            "log_tail": tail[-12:]}


def default_path(dry: bool, device_name: str) -> Path:
    out = os.environ.get("OUT")
    base = Path(out) if out else Path(__file__).parent / "results"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"
    return base / f"{datetime.date.today().isoformat()}-{'dryrun-' if dry else ''}{slug}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="every step at toy sizes on the CPU")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"total seconds for all steps (default {DEFAULT_BUDGET}; dry run {DRY_BUDGET})")
    ap.add_argument("--only", default=None, help=f"comma-separated steps to run, of {','.join(STEPS)}")
    ap.add_argument("--results", default=None, help="the results JSON to write (updated if it exists)")
    ap.add_argument("--workers", type=int, default=None, help="pytest-xdist workers for the tests step (default 4)")
    a = ap.parse_args(argv)
    dry = a.dry_run
    steps = list(STEPS)
    if a.only:
        steps = [s.strip() for s in a.only.split(",") if s.strip()]
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            ap.error(f"--only: unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
        steps = [s for s in STEPS if s in steps]  # always in order of value
    budget = a.budget if a.budget is not None else (DRY_BUDGET if dry else DEFAULT_BUDGET)
    start = time.monotonic()
    py = _python()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env["TRITON_INTERPRET"] = "0"  # the kernel test modules default it to 1 for CPU runs
    env["BLIP2_FAST_AUTOTUNE"] = env.get("BLIP2_FAST_AUTOTUNE", "1")  # benchmarks tune; tests set 0 themselves

    # Environment first (a broken torch must still leave a JSON saying so).
    info = {"versions": {}, "device": {}}
    try:
        r = subprocess.run([py, "-c", _ENV_CODE], capture_output=True, text=True, timeout=90, env=env)
        info = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else \
            {"versions": {}, "device": {"error": r.stderr.strip()[-400:]}}
    except Exception as e:
        info["device"]["error"] = f"{type(e).__name__}: {e}"
    dev_name = info["device"].get("name") or f"cpu-{info['device'].get('cpu', 'unknown')}"
    results = Path(a.results) if a.results else default_path(dry, dev_name)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    workers = a.workers if a.workers is not None else (2 if dry else 4)
    if not _has_xdist(py):
        workers = 1
    plan = {"steps": steps, "budget_s": budget, "dry_run": dry, "e2e_batches": [1, 2] if dry else [1, 64],
            "kernel_ops": __import__("bench.kernels", fromlist=["OPS"]).OPS, "test_workers": workers}

    def init(d):
        d.update(device=dev_name, device_info=info["device"], versions=info["versions"], commit=commit,
                 date=datetime.date.today().isoformat(), started=datetime.datetime.now().isoformat(timespec="seconds"))
        d.setdefault("runs", []).append(plan)
        d["plan"] = plan
        d.setdefault("steps", {})
        for s in steps:
            d["steps"][s] = {"step": s, "status": "pending", "reason": "not reached yet"}
        d["figures"] = gpu_report.figures(d)

    results_file.update(results, init)
    _log(f"gpu_check: {dev_name}; steps {', '.join(steps)}; budget {budget:.0f} s; results {results}")

    def refresh(d):
        d["figures"] = gpu_report.figures(d)
        d["elapsed_s"] = round(time.monotonic() - start, 1)

    # step logs come back with the JSON under $OUT; elsewhere they go to a temporary folder
    log_dir = Path(os.environ["OUT"]) / "logs" if os.environ.get("OUT") else Path(
        tempfile.mkdtemp(prefix="gpu_check-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    cmds = _commands(py, results, dry, workers)
    caps = DRY_CAPS if dry else CAPS
    step_env = dict(env, BLIP2_FAST_RESULTS=str(results))
    for s in steps:
        left = budget - (time.monotonic() - start)
        limit = min(caps[s], left - 5)
        if limit < 15:
            st = {"step": s, "status": "skipped", "reason": f"out of time ({max(left, 0):.0f} s of the {budget:.0f} s budget left)"}
            results_file.update(results, lambda d: (d["steps"].__setitem__(s, st), refresh(d)))
            _log(f"{s}: skipped ({st['reason']})")
            continue
        _log(f"{s}: start (limit {limit:.0f} s)")
        results_file.update(results, lambda d: (d["steps"].__setitem__(s, {"step": s, "status": "running",
                            "reason": "the run ended while this step was running", "limit_s": round(limit)}), refresh(d)))
        st = _run_step(s, cmds[s], limit, step_env, log_dir, results, lambda: results_file.update(results, refresh))
        results_file.update(results, lambda d: (d["steps"].__setitem__(s, st), refresh(d)))
        _log(f"{s}: {st['status']} in {st['seconds']:.0f} s" + (f" ({st['reason']})" if st["reason"] else ""))
    final = results_file.update(results, lambda d: (refresh(d), d.__setitem__(
        "finished", datetime.datetime.now().isoformat(timespec="seconds"))))
    gpu_report.print_table(final)
    print(f"results: {results}")
    bad = [f for f in final["figures"] if f["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
