"""What every Triton kernel test module shares. Import it before any kernel module:

    from kernel_setup import DEVICE, INTERPRET, needs_cuda, poison_outputs  # noqa: F401

Without a GPU the kernels run interpreted on the CPU (TRITON_INTERPRET=1, which Triton reads when a
kernel module is imported); `poison_outputs` is an autouse fixture once imported into a module: every
torch.empty is NaN-filled (integers: their maximum) while a test runs, so an element a kernel forgets
to write fails. The kernels allocate with plain torch.empty: the poisoning is torch's own
(`torch.utils.deterministic.fill_uninitialized_memory`), no hook in kernel code.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from blip2_fast.kernels.interpret import interpreting  # noqa: E402

INTERPRET = interpreting()
DEVICE = "cpu" if INTERPRET else "cuda"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                reason="needs a CUDA GPU with TRITON_INTERPRET unset")


@pytest.fixture(autouse=True)
def poison_outputs():
    # torch fills uninitialised memory only in deterministic mode; warn_only keeps ops without a
    # deterministic kernel (a GPU index_copy_, cuBLAS without a workspace config) running.
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])
        torch.utils.deterministic.fill_uninitialized_memory = state[2]


def as_double(t):
    return None if t is None else t.double()
