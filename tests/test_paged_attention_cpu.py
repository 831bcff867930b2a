"""blip2_fast::paged_attention_cpu_fwd, the extension's CPU decode attention (csrc/paged_attention_cpu.cpp):
against a float64 run of `paged_attention_ref`, error at most twice the reference's own in the same
dtype plus a floor; T5's relative bias; strided q; the registry binding it on the CPU; bad input."""
from __future__ import annotations

import pytest
import torch

from blip2_fast import _ext, ops
from blip2_fast.reference import paged_attention_ref
from conftest import paged_case

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}

# (H, D, block_size, seq_lens): OPT-2.7B (32 x 80), ViT-g-sized heads (88), Flan-T5 (64), OPT-6.7B (128);
# a batch-1 step, lengths one past a block, a single token, and an odd D with one-token blocks
CASES = [
    (32, 80, 16, [1, 17, 200]),
    (16, 88, 16, [97]),
    (32, 64, 8, [33, 1, 64, 65, 5, 9, 300, 2]),
    (4, 128, 16, [1025]),
    (3, 59, 1, [7, 1, 12]),
]


@pytest.fixture(scope="module")
def ext():
    reason = _ext.unavailable_reason("cpu")
    assert reason is None, f"the C++ extension did not build: {reason}"
    return _ext


def make(H, D, bs, lens, dtype, seed=0, bias=False):
    """conftest.paged_case (NaN in every slot no sequence owns), plus T5's bias table when asked."""
    q, kc, vc, bt, sl = paged_case(lens, H, D, bs, dtype, seed=seed)
    rel = torch.randn(H, 40, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    return q, kc, vc, bt, sl, rel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "t5-bias"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"H{c[0]}xD{c[1]}xbs{c[2]}")
def test_matches_float64_reference(ext, case, bias, dtype):
    H, D, bs, lens = case
    q, kc, vc, bt, sl, rel = make(H, D, bs, lens, dtype, bias=bias)
    scale = D ** -0.5
    out = ext.paged_attention(q, kc, vc, bt, sl, scale, rel)
    ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, sl, scale,
                              rel_bias=rel.double() if rel is not None else None)
    base = paged_attention_ref(q, kc, vc, bt, sl, scale, rel_bias=rel)  # the reference in `dtype`
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    err = (out.double() - ref).abs().max().item()
    berr = (base.double() - ref).abs().max().item()
    assert err <= 2 * berr + FLOOR[dtype], f"error {err:.3g} vs the reference in {dtype}: {berr:.3g}"


def test_strided_q_and_thread_counts(ext):
    """The model passes q as a view into the fused qkv projection; batch 1 splits heads over threads."""
    q, kc, vc, bt, sl, _ = make(8, 80, 16, [45, 3], torch.float32)
    qkv = torch.stack([q, torch.randn_like(q), torch.randn_like(q)], 1)  # (N, 3, H, D)
    want = paged_attention_ref(q, kc, vc, bt, sl, 0.1)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            for rows in (slice(0, 1), slice(0, 2)):
                got = ext.paged_attention(qkv[rows, 0], kc, vc, bt[rows], sl[rows], 0.1)
                torch.testing.assert_close(got, want[rows], rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("prefetch", ["default", "0"])
@pytest.mark.parametrize("shape", [(8, 64, [50, 17, 1, 100]), (3, 59, [7, 33]), (32, 80, [70]), (2, 16, [300, 2])],
                         ids=lambda s: f"H{s[0]}xD{s[1]}xN{len(s[2])}")
def test_prefetch_on_and_off(ext, monkeypatch, shape, prefetch):
    """The kernel asks for rows a few tokens ahead (keys, then values, then the next item's keys) where
    a row is small or split between threads: the same results either way, at 1 and 2 threads (batch 1
    splits its heads), against float64."""
    if prefetch == "0":
        monkeypatch.setenv("BLIP2_FAST_ATTN_PREFETCH", "0")
    else:
        monkeypatch.delenv("BLIP2_FAST_ATTN_PREFETCH", raising=False)
    H, D, lens = shape
    q, kc, vc, bt, sl, _ = make(H, D, 16, lens, torch.float32, seed=3)
    ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, sl, 0.125)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for rows in (slice(0, 1), slice(0, len(lens))):
                got = ext.paged_attention(q[rows], kc, vc, bt[rows], sl[rows], 0.125)
                err = (got.double() - ref[rows]).abs().max().item()
                assert err <= 2e-6, f"threads {t}, rows {rows}: error {err:.3g}"
    finally:
        torch.set_num_threads(threads)


def test_registry_binds_it_on_cpu_and_triton_on_cuda(ext):
    assert ops.get("paged_attention", "fast", "cpu") is _ext.paged_attention
    assert ops.get("paged_attention", "fast").__module__ == "blip2_fast.kernels.paged_attention"
    assert ops.bind("fast", None, "cpu").paged_attention is _ext.paged_attention


def test_opcheck(ext):
    q, kc, vc, bt, sl, rel = make(4, 64, 4, [5, 9], torch.float32, bias=True)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # opcheck compares whole outputs across runs
    torch.library.opcheck(torch.ops.blip2_fast.paged_attention_cpu_fwd.default, (q, kc, vc, bt, sl, 0.125, rel))


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(bt=a["bt"].long()), "block_tables must be int32"),
    (lambda a: a.update(sl=torch.tensor([0, 3], dtype=torch.int32)), r"seq_lens\[0\] = 0"),
    (lambda a: a.update(sl=torch.tensor([5, 999], dtype=torch.int32)), r"seq_lens\[1\] = 999"),
    (lambda a: a["bt"].__setitem__((1, 0), 10_000), "outside the pool"),
    (lambda a: a["bt"].__setitem__((0, 0), -1), "outside the pool"),
    (lambda a: a.update(q=a["q"][:, :, :-1]), "k_cache must have shape"),
    (lambda a: a.update(vc=a["vc"].half()), "must have q's dtype"),
    (lambda a: a.update(rel=torch.zeros(3, 8)), "rel_bias must have shape"),
    (lambda a: a.update(q=a["q"].long()), "q must be float32"),
])
def test_bad_input_names_the_argument(ext, mutate, match):
    q, kc, vc, bt, sl, _ = make(4, 16, 4, [5, 3], torch.float32)
    a = dict(q=q, kc=kc, vc=vc, bt=bt, sl=sl, rel=None)
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        ext.paged_attention(a["q"], a["kc"], a["vc"], a["bt"], a["sl"], 1.0, a["rel"])


@pytest.mark.parametrize("spread", [1e-3, 1.0, 10.0, 30.0])
def test_softmax_over_wide_score_ranges(ext, spread):
    """The kernel's vectorised exp (csrc/cpu_vec.h): scores from nearly equal to ~200 apart (at 30, most
    weights fall below its -87 clamp against the max), lengths on both sides of its 16-lane step.
    (Wider still, the fp32 scores' own rounding dominates: the test would measure the dot products.)"""
    H, D, bs = 4, 64, 16
    q, kc, vc, bt, sl, _ = make(H, D, bs, [1, 15, 16, 17, 47, 130], torch.float32, seed=3)
    q = q * spread
    out = ext.paged_attention(q, kc, vc, bt, sl, D ** -0.5)
    ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, sl, D ** -0.5)
    base = paged_attention_ref(q, kc, vc, bt, sl, D ** -0.5)
    err = (out.double() - ref).abs().max().item()
    berr = (base.double() - ref).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * berr + FLOOR[torch.float32], f"error {err:.3g} vs the fp32 reference's {berr:.3g}"
