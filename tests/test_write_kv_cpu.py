"""blip2_fast::write_kv_cpu_fwd, the extension's CPU K/V scatter (csrc/write_kv_cpu.cpp), against
write_kv_ref: a copy (dtype casts round to nearest even, as torch's do), so results must be
bit-identical. Caches start NaN-filled: slots nobody writes must stay NaN."""
from __future__ import annotations

import pytest
import torch

from blip2_fast import _ext, ops
from blip2_fast.reference import write_kv_ref
from conftest import write_kv_case as make_case

DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32)]


@pytest.fixture(scope="module")
def ext():
    reason = _ext.unavailable_reason("cpu")
    assert reason is None, f"the C++ extension did not build: {reason}"
    return _ext


def check(k, v, kc, vc, slots):
    kr, vr = kc.clone(), vc.clone()
    _ext.write_kv(k, v, kc, vc, slots)
    write_kv_ref(k, v, kr, vr, slots)
    assert torch.equal(kc.isnan(), kr.isnan()) and torch.equal(vc.isnan(), vr.isnan()), "wrong slots written"
    assert torch.equal(kc.nan_to_num(), kr.nan_to_num()) and torch.equal(vc.nan_to_num(), vr.nan_to_num())


CASES = [  # (T, H, D, block_size, num_blocks): OPT-2.7B's 32 x 80, the CPU presets' 8 x 64, ViT-sized 88, odd ones
    (8, 32, 80, 16, 4),
    (8, 8, 64, 16, 8),
    (5, 1, 88, 8, 4),
    (300, 4, 59, 1, 400),
    (1, 5, 80, 16, 2),
]


@pytest.mark.parametrize("dtype,cache_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("T,H,D,block_size,num_blocks", CASES, ids=[f"T{c[0]}-H{c[1]}-D{c[2]}-bs{c[3]}" for c in CASES])
def test_matches_reference(ext, T, H, D, block_size, num_blocks, dtype, cache_dtype):
    check(*make_case(T, H, D, block_size, num_blocks, dtype, cache_dtype, seed=T))


def test_int32_slots_contiguous_and_transposed_inputs(ext):
    k, v, kc, vc, slots = make_case(9, 2, 80, 16, 2, torch.float32, torch.float32, slot_dtype=torch.int32)
    check(k.contiguous(), v.contiguous(), kc, vc, slots)
    # rows whose H and D strides are not one run: element by element
    kt = torch.randn(9, 80, 2).transpose(1, 2)
    check(kt, kt * 2, kc, vc, slots)


def test_all_padding_and_empty_batch(ext):
    k, v, kc, vc, slots = make_case(4, 2, 64, 16, 1, torch.float32, torch.float32)
    _ext.write_kv(k, v, kc, vc, torch.full_like(slots, -1))
    assert kc.isnan().all() and vc.isnan().all()
    _ext.write_kv(k[:0], v[:0], kc, vc, slots[:0])
    assert kc.isnan().all()


def test_non_contiguous_caches_go_through_the_reference(ext):
    k, v, kc, vc, slots = make_case(6, 2, 64, 16, 2, torch.float32, torch.float32)
    wide = torch.full((2, 16, 2, 128), float("nan"))
    kn, vn = wide[..., :64], wide.clone()[..., :64]
    check(k, v, kn, vn, slots)


def test_bad_arguments_raise_and_write_nothing(ext):
    k, v, kc, vc, slots = make_case(4, 2, 64, 16, 2, torch.float32, torch.float32)
    op = torch.ops.blip2_fast.write_kv_cpu_fwd
    bad_slot = slots.clone()
    bad_slot[-1] = 2 * 16  # one past the pool: nothing may be written, not even the good rows before it
    cases = [((k, v, kc, vc, bad_slot), "outside the cache's 32 slots"),
             ((k, v, kc, vc, slots.float()), "slot_mapping must be int32 or int64"),
             ((k, v, kc, vc, slots[:2]), "slot_mapping must be int32 or int64"),
             ((k, v[:, :1], kc, vc, slots), "v must have k's shape"),
             ((k[..., :32], v[..., :32], kc, vc, slots), "k must have shape"),
             ((k, v, kc, vc[:1], slots), "v_cache must have k_cache's shape"),
             ((k, v, kc, vc.half(), slots), "v_cache must have k_cache's dtype"),
             ((k.double(), v.double(), kc, vc, slots), "must be float32, float16 or bfloat16")]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
        assert kc.isnan().all() and vc.isnan().all(), msg


def test_registry_binds_it_on_cpu_and_triton_on_cuda(ext):
    assert ops.get("write_kv", "fast", "cpu") is _ext.write_kv
    assert ops.get("write_kv", "fast").__module__ == "blip2_fast.kernels.write_kv"
    assert ops.bind("fast", None, "cpu").write_kv is _ext.write_kv


def test_opcheck(ext):
    k, v, kc, vc, slots = make_case(5, 2, 64, 16, 2, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.blip2_fast.write_kv_cpu_fwd.default, (k, v, kc.nan_to_num(), vc.nan_to_num(), slots))
