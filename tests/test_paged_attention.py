"""paged_attention (Triton) against a float64 run of paged_attention_ref.

Runs interpreted on the CPU (TRITON_INTERPRET=1, set below before the kernel module is imported); with
TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled, plus the bf16 ones.

Caches are NaN everywhere a sequence has no token, and block-table entries past a sequence's length
point at an all-NaN block, so reading anything outside the context shows up as NaN. Outputs and
split-K partials are NaN-poisoned before the kernels write them.
"""
from kernel_setup import DEVICE, INTERPRET, needs_cuda, poison_outputs  # noqa: E402,F401 (before the kernel modules; autouse fixture)

import functools

import pytest
import torch

from blip2_fast.kernels import paged_attention as P  # noqa: E402
from blip2_fast.kernels.paged_attention import choose_num_splits, paged_attention
from blip2_fast.reference import paged_attention_ref
from conftest import paged_case

# Error rule: fast error vs float64 <= 2 x the eager reference's error in the same dtype + this floor.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 2e-3}


# random q and a NaN-poisoned paged cache (conftest.paged_case), on the kernels' device
make_case = functools.partial(paged_case, device=DEVICE)


def check(q, kc, vc, bt, seq_lens, scale, rel_bias=None, **kw):
    out = paged_attention(q, kc, vc, bt, seq_lens, scale, rel_bias, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    rb64 = None if rel_bias is None else rel_bias.double().cpu()
    ref64 = paged_attention_ref(q.double().cpu(), kc.double().cpu(), vc.double().cpu(), bt.cpu(), seq_lens.cpu(), scale, rb64)
    eager = paged_attention_ref(q, kc, vc, bt, seq_lens, scale, rel_bias).double().cpu()
    err = (out.double().cpu() - ref64).abs().max().item()
    eager_err = (eager - ref64).abs().max().item()
    assert not torch.isnan(out).any(), "NaN in output: an element was not written or read outside the context"
    assert err <= 2 * eager_err + FLOOR[q.dtype], f"fast err {err:.3g} vs eager err {eager_err:.3g} ({q.dtype})"
    return out


CASES = [  # (lens, H, D, block_size): ragged lengths from 1 token to many blocks
    ([1, 17, 83, 200], 2, 64, 16),
    ([5, 64, 130], 2, 80, 16),
    ([33, 1, 97], 1, 88, 16),
    ([150, 16, 2], 2, 128, 16),
    ([40, 9], 2, 80, 8),
    ([70, 3, 129], 1, 88, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lens,H,D,block_size", CASES, ids=[f"D{c[2]}-bs{c[3]}" for c in CASES])
def test_matches_reference(lens, H, D, block_size, dtype):
    check(*make_case(lens, H, D, block_size, dtype), D ** -0.5)


@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_k(num_splits, dtype):
    # One long context and short ones: many partitions of the short sequences are empty.
    check(*make_case([700, 3, 260], 2, 80, 16, dtype, seed=num_splits), 80 ** -0.5, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rel_bias(num_splits, dtype):
    # T5's decoder self-attention: a bias by distance, here a strided view longer than any context.
    q, kc, vc, bt, lens = make_case([300, 1, 45], 2, 64, 16, dtype, seed=11)
    rel_bias = (torch.randn(400, 2, generator=torch.Generator().manual_seed(1)) * 3).to(DEVICE).t()  # (H, max_len)
    check(q, kc, vc, bt, lens, 1.0, rel_bias, num_splits=num_splits)


def test_split_k_chosen_automatically():
    q, kc, vc, bt, lens = make_case([600], 2, 64, 16, torch.float32, seed=4)
    assert choose_num_splits(1, 2, bt.shape[1] * 16, 4) > 1  # the interpreter's notional 4 SMs
    check(q, kc, vc, bt, lens, 0.125)


def test_max_seq_len_hint_too_small_stays_correct():
    # The last split runs to the end of its sequence, so a wrong hint costs speed, not correctness.
    check(*make_case([500, 20], 1, 64, 16, torch.float32, seed=5), 0.125, max_seq_len=100, num_splits=4)


def test_choose_num_splits():
    assert choose_num_splits(64, 32, 1024, 132) == 1  # 2048 programs fill an H100 already
    assert choose_num_splits(1, 32, 4096, 132) > 4  # one long sequence: split-K
    assert choose_num_splits(1, 32, 200, 132) == 1  # short contexts never split
    assert choose_num_splits(1, 1, 10 ** 6, 132) <= 64
    # the wave model: as many splits as fill one wave of the SMs' program slots, not one more
    slots = 132 * P._PROGRAMS_PER_SM
    assert choose_num_splits(1, 32, 4096, 132) == slots // 32
    assert choose_num_splits(2, 32, 4096, 132) == slots // 64
    assert choose_num_splits(slots, 1, 4096, 132) == 1  # one full wave already


@pytest.mark.parametrize("num_splits", [1, 3])
def test_empty_context_gives_zeros(num_splits):
    # seq_len 0 (a padded batch row) is outside the reference's contract (>= 1); it gives zeros, as
    # the reference does for an empty context, and must not disturb the other rows.
    q, kc, vc, bt, lens = make_case([300, 4], 1, 64, 16, torch.float32, seed=6)
    lens[1] = 0
    out = paged_attention(q, kc, vc, bt, lens, 0.125, num_splits=num_splits).cpu()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = paged_attention_ref(q[:1].double(), kc.double(), vc.double(), bt[:1], lens[:1], 0.125)
    torch.testing.assert_close(out[:1].double(), ref.cpu(), atol=1e-5, rtol=0)


def test_other_strides():
    q, kc, vc, bt, lens = make_case([50, 7], 2, 64, 16, torch.float32, seed=7)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # [N, H, D] with H outermost in memory
    wide = torch.zeros((bt.shape[0], bt.shape[1] + 5), dtype=torch.int32, device=bt.device)
    wide[:, :bt.shape[1]] = bt
    check(q, kc, vc, wide[:, :bt.shape[1]], lens, 0.125)  # block table with a row stride > width


def test_validation_names_the_argument():
    q, kc, vc, bt, lens = make_case([5], 1, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(q, kc, vc, bt.long(), lens, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention(q, kc, vc, bt, lens.long(), 0.1)
    with pytest.raises(ValueError, match="k_cache"):
        paged_attention(q, kc[:, :, :, :32], vc, bt, lens, 0.1)
    with pytest.raises(ValueError, match="v_cache"):
        paged_attention(q, kc, vc.half(), bt, lens, 0.1)
    with pytest.raises(ValueError, match="q"):
        paged_attention(q[0], kc, vc, bt, lens, 0.1)
    with pytest.raises(ValueError, match="block_size"):
        paged_attention(q, kc[:, :12], vc[:, :12], bt, lens, 0.1)
    with pytest.raises(ValueError, match="rel_bias"):
        paged_attention(q, kc, vc, bt, lens, 0.1, rel_bias=torch.zeros(3, 8, device=q.device))


def test_opcheck_and_compile():
    q, kc, vc, bt, lens = make_case([20, 3], 1, 64, 16, torch.float32, seed=8)
    for rel_bias, splits in ((None, 0), (torch.randn(1, 32, device=q.device), 2)):
        torch.library.opcheck(torch.ops.blip2_fast.paged_attention_fwd.default,
                              (q, kc, vc, bt, lens, 0.125, rel_bias, splits, 0), test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda *a: paged_attention(*a, 0.125) * 2, backend="aot_eager", fullgraph=True)
    out = fn(q, kc, vc, bt, lens)
    torch.testing.assert_close(out, 2 * paged_attention(q, kc, vc, bt, lens, 0.125))


def test_kernel_mode_matches_env():
    from triton.runtime.interpreter import InterpretedFunction
    for kernel in (P._paged_attention_split_kernel, P._paged_attention_merge_kernel):
        assert isinstance(kernel, InterpretedFunction) == INTERPRET, (
            "blip2_fast.kernels.paged_attention was imported before TRITON_INTERPRET was set")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("D", [64, 80, 88, 128])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
@pytest.mark.parametrize("bias", [False, True], ids=["", "rel_bias"])
def test_bf16_gpu(D, num_splits, bias):
    rel_bias = torch.randn(4, 1100, device=DEVICE, dtype=torch.bfloat16) if bias else None
    check(*make_case([1, 33, 700, 1030], 4, D, 16, torch.bfloat16), D ** -0.5, rel_bias, num_splits=num_splits)
