"""bench/gpu_check.py: the results JSON is valid at every moment, and every planned figure is either
"ok" with its numbers or "failed" with a reason (never a quiet "ok")."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_report, results_file

ROOT = Path(__file__).resolve().parents[1]
PLAN = {"steps": ["build", "kernels", "e2e-opt", "tests", "e2e-t5"], "e2e_batches": [1, 64],
        "kernel_ops": ["attention", "layer_norm"]}


def _status(d):
    return {f["figure"]: f["status"] for f in gpu_report.figures(d)}


def test_nothing_run_is_all_failed_with_reasons():
    d = {"plan": PLAN, "steps": {s: {"step": s, "status": "pending", "reason": "not reached yet"} for s in PLAN["steps"]}}
    figs = gpu_report.figures(d)
    names = [f["figure"] for f in figs]
    assert names == ["build", "kernels/attention", "kernels/layer_norm", "e2e-opt/batch1", "e2e-opt/batch64",
                     "e2e-opt/floors", "tests", "e2e-t5/batch1", "e2e-t5/batch64"]
    assert all(f["status"] == "failed" and "not reached" in f["reason"] for f in figs), figs


def test_partial_results_name_what_failed():
    row = {"bench": "attention", "ratio": 1.2}
    d = {"plan": PLAN,
         "steps": {"build": {"step": "build", "status": "ok"},
                   "kernels": {"step": "kernels", "status": "ok"},
                   "e2e-opt": {"step": "e2e-opt", "status": "timeout", "reason": "killed at its 130 s limit"},
                   "tests": {"step": "tests", "status": "running", "reason": "the run ended while this step was running"}},
         "kernels": {"ops": {"attention": {"status": "ok"}, "layer_norm": {"status": "failed", "reason": "ValueError: x"}},
                     "rows": [row]},
         "e2e": {"e2e-opt": {"rows": [
             {"impl": "blip2_fast.generate", "batch": 1, "images_per_s": 10.0, "ratio": 2.0},
             {"impl": "transformers", "batch": 1, "images_per_s": 5.0},
             {"impl": "blip2_fast.generate", "batch": 64, "error": "OutOfMemoryError: boom", "images_per_s": None}]}},
         "tests": {"status": "running", "collected": 10, "passed": 4, "skipped": 0, "failed": []}}
    st = _status(d)
    assert st["build"] == st["kernels/attention"] == st["e2e-opt/batch1"] == "ok"
    figs = {f["figure"]: f for f in gpu_report.figures(d)}
    assert "ValueError: x" in figs["kernels/layer_norm"]["reason"]
    assert "OutOfMemoryError" in figs["e2e-opt/batch64"]["reason"]
    assert "timeout" in figs["e2e-opt/floors"]["reason"]
    assert figs["tests"]["status"] == "failed" and "4 of 10" in figs["tests"]["reason"]
    assert figs["e2e-t5/batch1"]["status"] == "failed" and "not run" in figs["e2e-t5/batch1"]["reason"]
    assert figs["kernels/attention"]["value"] == {"rows": 1, "median_ratio_vs_pytorch": 1.2}


def test_update_is_atomic_and_merges(tmp_path):
    p = tmp_path / "r.json"
    results_file.update(p, lambda d: d.setdefault("rows", []).append(1))
    results_file.update(p, lambda d: d["rows"].append(2))
    assert json.loads(p.read_text()) == {"rows": [1, 2]}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]  # no temporary or lock file left beside it


def test_unknown_step_is_refused():
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--only", "build,nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope" in r.stderr


@pytest.mark.slow
def test_a_dry_run_killed_mid_step_leaves_a_valid_json(tmp_path):
    """Kill the whole dry run (process group, SIGKILL) while its kernel benchmarks run: the JSON on
    disk parses, lists build as finished and the kernel step as running, keeps every kernel row
    written so far, and reports every unfinished figure as failed."""
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--only", "build,kernels,tests"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    data = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            files = list(tmp_path.glob("*.json"))
            if files:
                data = json.loads(files[0].read_text())  # must parse at any moment
                if (data.get("kernels") or {}).get("rows"):
                    break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert data is not None and data["kernels"]["rows"], "the kernels step never wrote a row"
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["steps"]["build"]["status"] == "ok"
    assert data["steps"]["kernels"]["status"] == "running"
    assert data["steps"]["tests"]["status"] == "pending"
    figs = {f["figure"]: f for f in gpu_report.figures(data)}
    assert figs["build"]["status"] == "ok"
    assert figs["tests"]["status"] == "failed"
    assert any(f["status"] == "failed" for k, f in figs.items() if k.startswith("kernels/"))
