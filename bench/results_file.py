"""One results JSON that every benchmark step updates in place, so a run killed at any moment has
already left a valid file holding everything it finished.

    from bench.results_file import update
    update(path, lambda d: d.setdefault("kernels", {}).setdefault("rows", []).append(row))

`update` reads the file (or starts from {}), applies the edit, and replaces the file atomically
(write a temporary file beside it, fsync, rename), under an exclusive lock (a file in the temporary
directory, keyed by the path, so nothing but the JSON lands beside it), so several processes (the
step runner and the benchmark it started) can update one file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


@contextlib.contextmanager
def _locked(path: Path):
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"blip2_fast-results-{key}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}


def update(path, edit: Callable[[dict], object]) -> dict:
    """Apply `edit` to the JSON at `path` (in place on the dict) and write it back atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        data = read(path)
        edit(data)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, default=str)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return data
