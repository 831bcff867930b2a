"""The one answer to "are the Triton kernels interpreted on the CPU?" (and "do they autotune?"),
importable without Triton.

Both the op registry (which must not import Triton to decide) and the kernels ask `interpreting()`.
"""
from __future__ import annotations

import os

# What Triton's own getenv_bool reads as true (checked against Triton 3.6 and 3.9): any case, no
# surrounding spaces; everything else ("0", "false", "off", "2", "") is false.
_TRUE = ("1", "true", "yes", "on", "y")


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set to a value Triton treats as on.

    Triton reads the variable when a function is decorated with @triton.jit, i.e. when a kernel
    module is imported, so it must be set before `blip2_fast.kernels.<op>` is imported (the test
    suite's conftest.py sets it first thing).
    """
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


def autotuning() -> bool:
    """Whether the GPU kernels autotune their tile configs (default) or launch one fixed config per
    shape class: BLIP2_FAST_AUTOTUNE=0 (also off/false/no/n), which the test suite sets so that a GPU
    test compiles one kernel per case instead of timing dozens."""
    return os.environ.get("BLIP2_FAST_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no", "n")
