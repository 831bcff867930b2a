"""One answer to "are the Triton kernels interpreted?", the interpreter fix for numpy >= 2.4, and a
default CPU load that binds every op without a warning."""
import os
import subprocess
import sys

import pytest
import torch

from blip2_fast import ops
from blip2_fast.kernels.interpret import interpreting


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
                                      ("y", True), ("0", False), ("false", False), ("False", False), ("off", False),
                                      ("no", False), ("", False), ("2", False), (" 1", False)])
def test_interpreting_parses_as_triton_does(monkeypatch, value, on):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is on
    from triton._C.libtriton import getenv_bool

    assert getenv_bool("TRITON_INTERPRET", False) is on  # Triton's own reading of the same value
    from blip2_fast.kernels import _common

    assert _common.interpreting is interpreting  # the kernels ask the same function


def test_false_on_a_cpu_never_binds_triton(monkeypatch):
    """TRITON_INTERPRET=false: the registry must not pick Triton on a CPU (it would raise at the
    kernel's device check), and a Triton-only candidate says why it cannot run."""
    monkeypatch.setenv("TRITON_INTERPRET", "false")
    bound = ops.bind("fast", None, "cpu")
    for name in ops.OP_NAMES:
        assert not getattr(bound, name).__module__.startswith("blip2_fast.kernels"), name
    triton_attn = next(f for f in ops._FAST["attention"] if f.kind == "triton")
    assert "TRITON_INTERPRET=1" in ops._reason(triton_attn, torch.device("cpu"))


def test_runtime_bounded_loops_run_interpreted(monkeypatch):
    """Triton <= 3.6's interpreter turned scalars into ints with int(1-element array), which numpy
    >= 2.4 refuses: a kernel looping to a runtime bound must still run interpreted."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    import blip2_fast.kernels._common  # noqa: F401  (installs the fix)

    def count(X, n, B: tl.constexpr):
        acc = 0.0
        for _ in range(0, n, B):  # a runtime bound: the loop the fix is for
            acc += 1.0
        m = tl.minimum(n, 5)
        for _ in range(m):  # a computed bound
            acc += 10.0
        tl.store(X, acc)

    x = torch.zeros(1)
    InterpretedFunction(count)[(1,)](x, 7, 2)
    assert x.item() == 4 + 50
    assert triton.cdiv(7, 2) == 4


def test_default_cpu_load_is_silent(ckpt, tmp_path):
    """A default CPU load (no TRITON_INTERPRET) binds a CPU implementation for every op and prints no
    warning, nor does generating with it (the models call every op by its current name, never a
    deprecated alias); so does the CLI failing on a checkpoint that does not exist."""
    d, _ = ckpt("opt")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import warnings, blip2_fast; warnings.simplefilter('error');"
            f"m = blip2_fast.load({str(d)!r}); print(sorted(set(m.impls.values())));"
            "import torch; s = m.cfg.vision.image_size;"
            "m.generate(pixel_values=torch.rand(1, 3, s, s), input_ids=torch.tensor([[2, 5]]), max_new_tokens=2)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "['fast']" and "Warning" not in r.stderr, (r.stdout, r.stderr[-2000:])
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    r = subprocess.run([sys.executable, "-W", "error", "-m", "blip2_fast", "caption", str(tmp_path / "x.png"), "--model",
                        str(tmp_path / "missing")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "does not exist" in r.stderr and "Warning" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("0", False), ("off", False), ("false", False)])
def test_autotuning_switch(monkeypatch, value, on):
    from blip2_fast.kernels.interpret import autotuning

    if value is None:
        monkeypatch.delenv("BLIP2_FAST_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("BLIP2_FAST_AUTOTUNE", value)
    assert autotuning() is on


def test_untuned_launch_picks_a_pruned_candidate():
    """Without autotuning the GPU path launches the first config the pruning keeps for the shape
    class: one of the tuned candidates, never a tile mostly past the rows (32 Q-Former queries)."""
    from blip2_fast.kernels import attention, linear_gelu

    c = attention._prune_configs(attention._CONFIGS, {"q_bucket": 32, "BLOCK_D": 128})[0]
    assert c in attention._CONFIGS and c.kwargs["BLOCK_M"] <= 32
    c = attention._prune_configs(attention._CONFIGS, {"q_bucket": 512, "BLOCK_D": 128})[0]
    assert c is attention._CONFIGS[0]
    c = linear_gelu._prune_configs(linear_gelu._CONFIGS, {"m_bucket": 16, "N": 3072})[0]
    assert c in linear_gelu._CONFIGS and c.kwargs["BLOCK_M"] <= 64
