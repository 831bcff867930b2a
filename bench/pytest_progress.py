"""A pytest plugin that records test outcomes into the shared results JSON as each test finishes, so a
test step killed at its deadline still reports what passed and failed (a killed pytest prints no
summary). Used by bench/gpu_check.py: `pytest -p bench.pytest_progress`, with the results path in
$BLIP2_FAST_RESULTS. Under pytest-xdist it acts in the controller only, which receives every report.
"""
from __future__ import annotations

import os
import time

import pytest

from bench import results_file

_state: dict = {}


def _save() -> None:
    path = os.environ.get("BLIP2_FAST_RESULTS")
    if path:
        snap = {**_state, "failed": list(_state.get("failed", [])), "seconds": round(time.time() - _state["t0"], 1)}
        results_file.update(path, lambda d: d.__setitem__("tests", snap))


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: the controller records
        return
    _state.update(status="running", collected=None, passed=0, failed=[], skipped=0, errors=0, t0=time.time(),
                  workers=getattr(config.option, "numprocesses", None))
    config.pluginmanager.register(_Recorder(), "blip2_fast_progress_recorder")
    _save()


class _Recorder:
    def pytest_collection_finish(self, session):
        if session.items:  # without xdist; with it, the workers collect (below)
            _state["collected"] = len(session.items)
            _save()

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        _state["collected"] = max(_state.get("collected") or 0, len(ids))
        _save()

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if report.passed:
                _state["passed"] += 1
            elif report.skipped:
                _state["skipped"] += 1
            else:
                msg = str(report.longrepr).strip().splitlines()
                _state["failed"].append({"test": report.nodeid, "when": report.when,
                                         "reason": (msg[-1] if msg else "")[:300]})
            _save()
        elif report.when == "teardown" and report.failed:
            _state["errors"] += 1
            _save()

    def pytest_sessionfinish(self, session, exitstatus):
        _state["status"] = "done"
        _state["exitstatus"] = int(exitstatus)
        _save()
