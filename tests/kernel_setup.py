"""What every Triton kernel test module shares. Import it before any kernel module:

    from kernel_setup import DEVICE, INTERPRET, needs_cuda, poison_outputs  # noqa: F401

Without a GPU the kernels run interpreted on the CPU (TRITON_INTERPRET=1, which Triton reads when a
kernel module is imported); `poison_outputs` is an autouse fixture once imported into a module: kernel
outputs are NaN-filled before the kernel writes them, so an unwritten element fails.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from blip2_fast.kernels import _common  # noqa: E402

INTERPRET = _common.interpreting()
DEVICE = "cpu" if INTERPRET else "cuda"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                reason="needs a CUDA GPU with TRITON_INTERPRET unset")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def as_double(t):
    return None if t is None else t.double()
