"""write_kv (Triton) against write_kv_ref: an exact scatter, so results must be bit-identical.

Runs interpreted on the CPU (TRITON_INTERPRET=1, set below before the kernel module is imported); with
TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled, plus the bf16 ones. Caches start
NaN-filled: slots nobody writes must stay NaN, written ones must hold the new values.
"""
from kernel_setup import DEVICE, needs_cuda  # noqa: E402,F401 (before the kernel modules; autouse fixture)

import pytest
import torch

from blip2_fast.kernels.write_kv import write_kv
from blip2_fast.reference import write_kv_ref
from conftest import write_kv_case



def make_case(*args, **kw):
    return write_kv_case(*args, device=DEVICE, **kw)


def check(k, v, kc, vc, slots):
    kr, vr = kc.clone(), vc.clone()
    write_kv(k, v, kc, vc, slots)
    write_kv_ref(k, v, kr, vr, slots)
    assert torch.equal(kc.isnan(), kr.isnan()) and torch.equal(vc.isnan(), vr.isnan()), "wrong slots written"
    assert torch.equal(kc.nan_to_num(), kr.nan_to_num()) and torch.equal(vc.nan_to_num(), vr.nan_to_num())


CASES = [  # (T, H, D, block_size, num_blocks)
    (7, 2, 64, 16, 3),
    (13, 3, 80, 16, 2),
    (5, 1, 88, 8, 4),
    (11, 2, 128, 32, 1),
    (1, 5, 80, 16, 2),
]


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.float32, torch.float16)], ids=["fp32", "fp16", "fp32-to-fp16"])
@pytest.mark.parametrize("T,H,D,block_size,num_blocks", CASES, ids=[f"T{c[0]}-H{c[1]}-D{c[2]}-bs{c[3]}" for c in CASES])
def test_matches_reference(T, H, D, block_size, num_blocks, dtype, cache_dtype):
    check(*make_case(T, H, D, block_size, num_blocks, dtype, cache_dtype, seed=T))


def test_int32_slots_and_contiguous_inputs():
    k, v, kc, vc, slots = make_case(9, 2, 80, 16, 2, torch.float16, torch.float16, slot_dtype=torch.int32)
    check(k.contiguous(), v.contiguous(), kc, vc, slots)


def test_all_padding_and_empty_batch():
    k, v, kc, vc, slots = make_case(4, 2, 64, 16, 1, torch.float32, torch.float32)
    write_kv(k, v, kc, vc, torch.full_like(slots, -1))
    assert kc.isnan().all() and vc.isnan().all()
    write_kv(k[:0], v[:0], kc, vc, slots[:0])
    assert kc.isnan().all()


def test_validation_names_the_argument():
    k, v, kc, vc, slots = make_case(4, 2, 64, 16, 1, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(k, v, kc, vc, slots.float())
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(k, v, kc, vc, slots[:2])
    with pytest.raises(ValueError, match="v_cache"):
        write_kv(k, v, kc, vc[:, :8], slots)
    with pytest.raises(ValueError, match="k_cache"):
        write_kv(k, v, kc[..., :32], vc[..., :32], slots)
    with pytest.raises(ValueError, match="v"):
        write_kv(k, v[:, :1], kc, vc, slots)
    with pytest.raises(ValueError, match="k_cache"):
        write_kv(k, v, kc.double(), vc, slots)


def test_opcheck_and_compile():
    k, v, kc, vc, slots = make_case(3, 1, 64, 16, 1, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.blip2_fast.write_kv_fwd.default, (k, v, kc, vc, slots),
                          test_utils=("test_schema", "test_faketensor"))

    def step(k, v, kc, vc, slots):
        write_kv(k * 2, v * 2, kc, vc, slots)
        return kc.nan_to_num().sum()

    kr, vr = kc.clone(), vc.clone()
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(k, v, kc, vc, slots)
    write_kv_ref(k * 2, v * 2, kr, vr, slots)
    assert torch.equal(kc.nan_to_num(), kr.nan_to_num()) and out == kr.nan_to_num().sum()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("D", [64, 80, 88, 128])
def test_bf16_gpu(D):
    check(*make_case(300, 32, D, 16, 40, torch.bfloat16, torch.bfloat16, seed=D))
    check(*make_case(300, 32, D, 16, 40, torch.float32, torch.bfloat16, seed=D + 1))
