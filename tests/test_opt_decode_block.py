"""blip2_fast::opt_decode_block_cpu, one pre-LayerNorm OPT decoder layer at decode in one C++ call
(csrc/opt_decode_block_cpu.cpp): against reference.opt_decode_block_ref in float64, error at most
twice the reference's own in float32 plus a floor, over real and awkward head dims, ffn widths,
batch sizes and context lengths, both activations, with and without biases and affine norms, at 1
and 2 threads; the K/V it writes; the model taking it only where it is exact; opcheck; bad input."""
from __future__ import annotations

import pytest
import torch

import blip2_fast
from blip2_fast import _ext, ops, reference
from blip2_fast.linear_cpu import PackedLinear

BS = 16  # block size


@pytest.fixture(scope="module")
def ext():
    reason = _ext.unavailable_reason("cpu")
    assert reason is None, f"the C++ extension did not build: {reason}"
    return _ext


def _rand(*shape, g):
    return torch.randn(*shape, generator=g)


def _layer(E, ffn, bias, affine, seed):
    """float32 weights of one layer: (ln1, qkv, out, ln2, fc1, fc2) as (weight, bias) pairs."""
    g = torch.Generator().manual_seed(seed)

    def lin(n_out, n_in):
        return _rand(n_out, n_in, g=g) / n_in ** 0.5, (_rand(n_out, g=g) * 0.1 if bias else None)

    def norm():
        return (1 + 0.1 * _rand(E, g=g), 0.1 * _rand(E, g=g)) if affine else (None, None)

    return norm(), lin(3 * E, E), lin(E, E), norm(), lin(ffn, E), lin(E, ffn)


def _cache_case(N, H, D, lens, seed):
    """Caches holding each sequence's earlier tokens (every slot else NaN: never read), scattered
    blocks, and the new token's slot at position len - 1."""
    g = torch.Generator().manual_seed(seed)
    W = max(-(-L // BS) for L in lens)
    num_blocks = N * W + 3
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(N, W, dtype=torch.int32)
    kc = torch.full((num_blocks, BS, H, D), float("nan"))
    vc = torch.full_like(kc, float("nan"))
    slots = []
    for n, L in enumerate(lens):
        nb = -(-L // BS)
        tables[n, :nb] = order[n * W: n * W + nb].to(torch.int32)
        for t in range(L - 1):  # the earlier tokens; the new one is written by the op
            kc[tables[n, t // BS], t % BS] = _rand(H, D, g=g)
            vc[tables[n, t // BS], t % BS] = _rand(H, D, g=g)
        slots.append(int(tables[n, (L - 1) // BS]) * BS + (L - 1) % BS)
    return kc, vc, torch.tensor(slots), tables, torch.tensor(lens, dtype=torch.int32)


def _run(impl, x, layer, caches, heads, act, dtype, packed):
    (l1w, l1b), qkv, out, (l2w, l2b), fc1, fc2 = layer
    cast = (lambda t: None if t is None else t.to(dtype))
    make = (lambda wb: PackedLinear(wb[0], wb[1])) if packed else (lambda wb: reference.LinearRef(cast(wb[0]), cast(wb[1])))
    kc, vc, slots, tables, lens = caches
    kc, vc = kc.to(dtype).clone(), vc.to(dtype).clone()
    y = impl(x.to(dtype), (cast(l1w), cast(l1b)), make(qkv), make(out), (cast(l2w), cast(l2b)), make(fc1), make(fc2),
             kc, vc, slots, tables, lens, heads, 1e-5, act)
    return y, kc, vc


# (E, heads, ffn): OPT-like 8 x 64, BLIP-2's head dims 80 and 88, an odd ffn, one head
SHAPES = [(512, 8, 2048), (160, 2, 97), (176, 2, 200), (48, 1, 33)]
LENS = [[1], [17, 3, 40], [33] * 8]


@pytest.mark.parametrize("E,heads,ffn", SHAPES)
@pytest.mark.parametrize("lens", LENS, ids=lambda v: f"N{len(v)}")
@pytest.mark.parametrize("act,bias,affine", [("relu", True, True), ("gelu", False, False), ("relu", True, False)])
def test_against_float64(ext, E, heads, ffn, lens, act, bias, affine):
    N, D = len(lens), E // heads
    layer = _layer(E, ffn, bias, affine, seed=E + ffn)
    caches = _cache_case(N, heads, D, lens, seed=N)
    x = torch.randn(N, E, generator=torch.Generator().manual_seed(7))
    y, kc, vc = _run(_ext.opt_decode_block, x, layer, caches, heads, act, torch.float32, packed=True)
    y64, kc64, vc64 = _run(reference.opt_decode_block_ref, x, layer, caches, heads, act, torch.float64, packed=False)
    y32, _, _ = _run(reference.opt_decode_block_ref, x, layer, caches, heads, act, torch.float32, packed=False)
    assert y.shape == (N, E) and y.dtype == torch.float32 and y.is_contiguous()
    err, base = (y.double() - y64).abs().max().item(), (y32.double() - y64).abs().max().item()
    floor = 8 * torch.finfo(torch.float32).eps * y64.abs().max().item()
    assert err <= 2 * base + floor, f"error {err:.3g}, the float32 reference's {base:.3g}, floor {floor:.3g}"
    slots = caches[2]
    for got, want in ((kc, kc64), (vc, vc64)):  # the new token's K/V, written where slot_mapping says
        g, w = got.view(-1, heads, D)[slots], want.view(-1, heads, D)[slots]
        assert not g.isnan().any()
        assert torch.allclose(g.double(), w, rtol=1e-4, atol=1e-4), (g.double() - w).abs().max()


@pytest.mark.parametrize("threads", [1, 2])
def test_threads(ext, threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        test_against_float64(ext, 160, 2, 97, [17, 3, 40], "relu", True, True)
        test_against_float64(ext, 512, 8, 2048, [1], "gelu", False, True)  # batch 1: heads split between threads
    finally:
        torch.set_num_threads(prev)


def test_opcheck(ext):
    E, heads, ffn = 64, 2, 96
    layer = _layer(E, ffn, True, True, seed=1)
    kc, vc, slots, tables, lens = _cache_case(3, heads, E // heads, [5, 17, 2], seed=2)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()  # opcheck compares the mutated caches; NaN != NaN
    (l1w, l1b), qkv, out, (l2w, l2b), fc1, fc2 = [((a, b) if i in (0, 3) else PackedLinear(a, b))
                                                  for i, (a, b) in enumerate(layer)]
    args = (torch.randn(3, E), l1w, l1b, qkv.packed, qkv.bias, out.packed, out.bias, l2w, l2b, fc1.packed, fc1.bias,
            fc2.packed, fc2.bias, kc, vc, slots, tables, lens, heads, ffn, 1e-5, "relu", qkv.isa)
    torch.library.opcheck(torch.ops.blip2_fast.opt_decode_block_cpu.default, args)


def test_bad_input(ext):
    E, heads, ffn = 64, 2, 96
    (ln1, qkv, out, ln2, fc1, fc2) = _layer(E, ffn, True, True, seed=1)
    kc, vc, slots, tables, lens = _cache_case(2, heads, E // heads, [5, 9], seed=2)
    x = torch.randn(2, E)
    lins = [PackedLinear(*wb) for wb in (qkv, out, fc1, fc2)]

    def call(x=x, lins=lins, heads=heads, lens=lens, act="relu"):
        q, o, f1, f2 = lins
        return _ext.opt_decode_block(x, ln1, q, o, ln2, f1, f2, kc, vc, slots, tables, lens, heads, 1e-5, act)

    assert call().shape == (2, E)
    with pytest.raises(ValueError, match="opt_decode_block: qkv must be a PackedLinear"):
        call(lins=[reference.LinearRef(*qkv)] + lins[1:])
    with pytest.raises(ValueError, match="opt_decode_block: fc2 must be a PackedLinear"):
        call(lins=lins[:3] + [PackedLinear(*out)])  # fc2 must take ffn inputs
    with pytest.raises(RuntimeError, match="opt_decode_block: x must be a contiguous float32"):
        call(x=x.double())
    with pytest.raises(RuntimeError, match="opt_decode_block: heads = 3 must divide E = 64"):
        call(heads=3)
    with pytest.raises(RuntimeError, match=r"paged_attention: seq_lens\[1\] = 99"):
        call(lens=torch.tensor([5, 99], dtype=torch.int32))  # past the block table's width
    with pytest.raises(RuntimeError, match="activation"):
        call(act="tanh")


def test_registry():
    assert ops.get("opt_decode_block", "reference") is reference.opt_decode_block_ref
    assert ops.get("opt_decode_block", "fast", "cpu") is _ext.opt_decode_block
    assert ops.get("opt_decode_block", "fast", "cuda") is reference.opt_decode_block_ref  # no packed layers there


@pytest.mark.parametrize("backend,overrides,fused", [
    ("fast", None, True),
    ("reference", None, False),
    ("fast", {"paged_attention": "reference"}, False),  # the fused op would run the C++ attention instead
    ("fast", {"linear": "reference"}, False),  # nothing packed
    ("fast", {"opt_decode_block": "reference"}, False),
])
def test_model_takes_it_only_where_exact(ext, ckpt, backend, overrides, fused):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend=backend, ops=overrides, progress=False)
    assert [b.decode_op is not None for b in m.lm.blocks] == [fused] * len(m.lm.blocks)


def decode_with_and_without(m, blocks, **gen):
    """Greedy decode with the fused layers and with the layers' Python forward (the same kernels in
    the same order): every step's scores within float32 rounding of each other, and the same token
    wherever the Python path's best score leads its second by 1e-4 or more. A closer tie could fall
    either way on another CPU; after the first token that differs the inputs differ, so the
    comparison stops there. Returns how many steps were compared."""
    fused = [b.decode_op for b in blocks]
    assert all(f is not None for f in fused)
    outs = []
    try:
        for on in (True, False):
            for b, f in zip(blocks, fused):
                b.decode_op = f if on else None
            outs.append(m.generate(**gen, return_dict_in_generate=True, output_scores=True))
    finally:
        for b, f in zip(blocks, fused):
            b.decode_op = f
    a, b = outs
    T = len(b.scores)
    toks_a, toks_b = a.sequences[:, -T:], b.sequences[:, -T:]  # the generated tokens
    for t in range(T):
        torch.testing.assert_close(a.scores[t], b.scores[t], rtol=1e-5, atol=1e-5)
        differ = (toks_a[:, t] != toks_b[:, t]).nonzero().flatten().tolist()
        if differ:
            top2 = b.scores[t][differ].topk(2, dim=-1).values
            lead = (top2[:, 0] - top2[:, 1]).min().item()
            assert lead < 1e-4, f"step {t}: rows {differ} took other tokens at a clear lead of {lead:.3g}"
            return t
    return T


def test_engine_tokens_with_and_without(ext, ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="fast", progress=False)
    S = m.cfg.vision.image_size
    px = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(3))
    assert decode_with_and_without(m, m.lm.blocks, pixel_values=px, max_new_tokens=12, min_new_tokens=12) > 0
