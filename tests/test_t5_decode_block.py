"""blip2_fast::t5_decode_block_cpu, one T5 decoder layer at decode in one C++ call
(csrc/t5_decode_block_cpu.cpp): against reference.t5_decode_block_ref in float64, error at most twice
the reference's own in float32 plus a floor, over head dims 64 / 80 / an odd one, gated and plain
feed-forwards with each activation, the first layer (no delta) and later ones, 1-8 sequences, at 1
and 2 threads; the K/V it writes; the model taking it only where it is exact; opcheck; bad input."""
from __future__ import annotations

import pytest
import torch

import blip2_fast
from blip2_fast import _ext, ops, reference
from blip2_fast.linear_cpu import PackedLinear
from test_opt_decode_block import _cache_case, decode_with_and_without, ext  # noqa: F401  (ext: the fixture)


def _layer(d, heads, dk, d_ff, gated, seed):
    """float32 weights: norms (ln_sa, ln_ca, ln_ff) and linears (qkv, o, q, o_cross, wi0, wi1 or None, wo)."""
    g = torch.Generator().manual_seed(seed)
    inner = heads * dk

    def lin(n_out, n_in):
        return torch.randn(n_out, n_in, generator=g) / n_in ** 0.5

    norms = [1 + 0.1 * torch.randn(d, generator=g) for _ in range(3)]
    lins = [lin(3 * inner, d), lin(d, inner), lin(inner, d), lin(d, inner), lin(d_ff, d),
            lin(d_ff, d) if gated else None, lin(d, d_ff)]
    return norms, lins


def _cross_case(N, H, D, lens, seed):
    """Encoder K/V already in a cache of their own (every slot filled: the op only reads them)."""
    kc, vc, _, tables, seq_lens = _cache_case(N, H, D, [L + 1 for L in lens], seed)
    return kc.nan_to_num(), vc.nan_to_num(), tables, torch.tensor(lens, dtype=torch.int32)


def _run(impl, x, delta, layer, caches, cross, rel, heads, act, dtype, packed):
    (ln_sa, ln_ca, ln_ff), ws = layer
    make = (lambda w: None if w is None else PackedLinear(w)) if packed else (
        lambda w: None if w is None else reference.LinearRef(w.to(dtype)))
    qkv, o, q, o_cross, wi0, wi1, wo = [make(w) for w in ws]
    kc, vc, slots, tables, lens = caches
    kc, vc = kc.to(dtype).clone(), vc.to(dtype).clone()
    ck, cv, ctables, clens = cross
    y, s = impl(x.to(dtype), None if delta is None else delta.to(dtype), ln_sa.to(dtype), qkv, o, ln_ca.to(dtype), q,
                o_cross, ln_ff.to(dtype), wi0, wi1, wo, kc, vc, slots, tables, lens, rel.to(dtype), ck.to(dtype),
                cv.to(dtype), ctables, clens, heads, 1e-6, act)
    return y, s, kc, vc


def _check(got, want64, base, what):
    err, berr = (got.double() - want64).abs().max().item(), (base.double() - want64).abs().max().item()
    floor = 8 * torch.finfo(torch.float32).eps * want64.abs().max().item()
    assert err <= 2 * berr + floor, f"{what}: error {err:.3g}, the float32 reference's {berr:.3g}, floor {floor:.3g}"


# (d_model, heads, d_kv, d_ff): the cpu-mid T5's 8 x 64, an 80-wide head, an odd one and odd widths
SHAPES = [(512, 8, 64, 1536), (160, 2, 80, 97), (48, 3, 13, 40)]
LENS = [([1], [7]), ([17, 3, 40], [33, 5, 20]), ([33] * 8, [9] * 8)]


@pytest.mark.parametrize("d,heads,dk,d_ff", SHAPES)
@pytest.mark.parametrize("lens,enc_lens", LENS, ids=lambda v: f"N{len(v)}")
@pytest.mark.parametrize("gated,act,first", [(True, "gelu_tanh", False), (True, "gelu_tanh", True), (False, "relu", False),
                                             (True, "gelu", False)])
def test_against_float64(ext, d, heads, dk, d_ff, lens, enc_lens, gated, act, first):
    N = len(lens)
    layer = _layer(d, heads, dk, d_ff, gated, seed=d + d_ff)
    caches = _cache_case(N, heads, dk, lens, seed=N)
    cross = _cross_case(N, heads, dk, enc_lens, seed=N + 1)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, d, generator=g)
    delta = None if first else torch.randn(N, d, generator=g)
    rel = torch.randn(heads, 64, generator=g)  # distances past 63 share the last column
    args = (x, delta, layer, caches, cross, rel, heads, act)
    y, s, kc, vc = _run(_ext.t5_decode_block, *args, torch.float32, packed=True)
    y64, s64, kc64, vc64 = _run(reference.t5_decode_block_ref, *args, torch.float64, packed=False)
    y32, s32, _, _ = _run(reference.t5_decode_block_ref, *args, torch.float32, packed=False)
    assert y.shape == s.shape == (N, d) and y.dtype == s.dtype == torch.float32
    _check(y, y64, y32, "output")
    _check(s, s64, s32, "residual stream")
    slots = caches[2]
    for got, want in ((kc, kc64), (vc, vc64)):
        w, gg = want.view(-1, heads, dk)[slots], got.view(-1, heads, dk)[slots]
        assert not gg.isnan().any() and torch.allclose(gg.double(), w, rtol=1e-4, atol=1e-4), (gg.double() - w).abs().max()


@pytest.mark.parametrize("threads", [1, 2])
def test_threads(ext, threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        test_against_float64(ext, 160, 2, 80, 97, [17, 3, 40], [33, 5, 20], True, "gelu_tanh", False)
        test_against_float64(ext, 512, 8, 64, 1536, [1], [7], True, "gelu_tanh", True)  # heads split between threads
    finally:
        torch.set_num_threads(prev)


def _packed_args(gated=True):
    d, heads, dk, d_ff = 64, 2, 32, 96
    (ln_sa, ln_ca, ln_ff), ws = _layer(d, heads, dk, d_ff, gated, seed=1)
    qkv, o, q, o_cross, wi0, wi1, wo = [None if w is None else PackedLinear(w) for w in ws]
    kc, vc, slots, tables, lens = _cache_case(3, heads, dk, [5, 17, 2], seed=2)
    ck, cv, ctables, clens = _cross_case(3, heads, dk, [4, 9, 6], seed=3)
    x, delta = torch.randn(3, d), torch.randn(3, d)
    rel = torch.randn(heads, 32)
    return dict(x=x, delta=delta, ln_sa=ln_sa, qkv=qkv, o=o, ln_ca=ln_ca, q=q, o_cross=o_cross, ln_ff=ln_ff, wi0=wi0,
                wi1=wi1, wo=wo, k_cache=kc.nan_to_num(), v_cache=vc.nan_to_num(), slot_mapping=slots,
                block_tables=tables, seq_lens=lens, rel_bias=rel, cross_k=ck, cross_v=cv, cross_block_tables=ctables,
                cross_seq_lens=clens, heads=heads, eps=1e-6, activation="gelu_tanh")


def test_opcheck(ext):
    a = _packed_args()
    lin = ("qkv", "o", "q", "o_cross", "wi0", "wi1", "wo")
    args = tuple(a[k].packed if k in lin else a[k] for k in
                 ("x", "delta", "ln_sa", "qkv", "o", "ln_ca", "q", "o_cross", "ln_ff", "wi0", "wi1", "wo", "k_cache",
                  "v_cache", "slot_mapping", "block_tables", "seq_lens", "rel_bias", "cross_k", "cross_v",
                  "cross_block_tables", "cross_seq_lens", "heads"))
    args += (a["qkv"].out_features // 3 // a["heads"], a["wi0"].out_features, 1e-6, "gelu_tanh", a["qkv"].isa)
    torch.library.opcheck(torch.ops.blip2_fast.t5_decode_block_cpu.default, args)


def test_bad_input(ext):
    a = _packed_args()
    assert [t.shape for t in _ext.t5_decode_block(**a)] == [(3, 64), (3, 64)]
    with pytest.raises(ValueError, match="t5_decode_block: qkv must be a PackedLinear"):
        _ext.t5_decode_block(**{**a, "qkv": reference.LinearRef(torch.randn(192, 64))})
    with pytest.raises(ValueError, match="t5_decode_block: wo must be a PackedLinear"):
        _ext.t5_decode_block(**{**a, "wo": PackedLinear(torch.randn(64, 64))})  # wo must take d_ff inputs
    with pytest.raises(ValueError, match="t5_decode_block: o must be a PackedLinear .* no bias"):
        _ext.t5_decode_block(**{**a, "o": PackedLinear(torch.randn(64, 64), torch.zeros(64))})
    with pytest.raises(RuntimeError, match="t5_decode_block: x must be a contiguous float32"):
        _ext.t5_decode_block(**{**a, "x": a["x"].double()})
    with pytest.raises(RuntimeError, match="t5_decode_block: delta must have x's shape"):
        _ext.t5_decode_block(**{**a, "delta": a["delta"][:2]})
    with pytest.raises(RuntimeError, match='t5_decode_block: activation must be "relu", "gelu" or "gelu_tanh"'):
        _ext.t5_decode_block(**{**a, "activation": "silu"})
    with pytest.raises(RuntimeError, match=r"paged_attention: seq_lens\[1\] = 99"):
        _ext.t5_decode_block(**{**a, "cross_seq_lens": torch.tensor([4, 99, 6], dtype=torch.int32)})


def test_registry():
    assert ops.get("t5_decode_block", "reference") is reference.t5_decode_block_ref
    assert ops.get("t5_decode_block", "fast", "cpu") is _ext.t5_decode_block
    assert ops.get("t5_decode_block", "fast", "cuda") is reference.t5_decode_block_ref  # no packed layers there


@pytest.mark.parametrize("backend,overrides,fused", [
    ("fast", None, True),
    ("reference", None, False),
    ("fast", {"rms_norm": "reference"}, False),  # the fused op would run the C++ RMSNorm instead
    ("fast", {"linear": "reference"}, False),  # nothing packed
    ("fast", {"t5_decode_block": "reference"}, False),
])
def test_model_takes_it_only_where_exact(ext, ckpt, backend, overrides, fused):
    d, hf = ckpt("t5")
    m = blip2_fast.load(d, backend=backend, ops=overrides, progress=False)
    assert [b.decode_op is not None for b in m.lm.dec] == [fused] * len(m.lm.dec)
    assert all(b.decode_op is None for b in m.lm.enc)  # the encoder runs at prefill only


def test_engine_tokens_with_and_without(ext, ckpt):
    d, hf = ckpt("t5")
    m = blip2_fast.load(d, backend="fast", progress=False)
    S = m.cfg.vision.image_size
    px = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[100, 200, 1]] * 3)
    assert decode_with_and_without(m, m.lm.dec, pixel_values=px, input_ids=ids, max_new_tokens=12,
                                   min_new_tokens=12) > 0
