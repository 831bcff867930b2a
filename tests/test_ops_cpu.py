"""blip2_fast/ops_cpu.py (the CPU's fast attention, on torch's fused SDPA kernel) against a float64 run
of `attention_ref`: error at most twice eager PyTorch's in the same dtype plus a floor, over BLIP-2's
shapes and the awkward ones, every mask combination, and rows that see no key."""
import pytest
import torch

from blip2_fast import ops, ops_cpu
from blip2_fast.reference import attention_ref

FLOOR = {torch.float32: 1e-6, torch.bfloat16: 4e-3}

# (B, H, Sq, Sk, D)
SHAPES = [
    (2, 16, 257, 257, 88),  # ViT-g self-attention
    (2, 12, 32, 32, 64),  # Q-Former self-attention over 32 queries
    (2, 32, 45, 45, 80),  # OPT-2.7B prefill: 32 queries + a short prompt
    (3, 2, 7, 19, 59),  # a prefill after a cached prefix (Sq < Sk), odd D
    (1, 3, 9, 4, 40),  # Sq > Sk: the first causal rows see no key
]


def eager(q, k, v, causal=False, key_padding_mask=None, scale=None, bias=None):
    """matmul-softmax-matmul in the inputs' dtype: the error yardstick."""
    Sq, Sk, D = q.shape[2], k.shape[2], q.shape[3]
    s = (q @ k.transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s + bias.to(q.dtype)
    keep = torch.ones(1, 1, Sq, Sk, dtype=torch.bool)
    if causal:
        keep = keep & (torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq))
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.bool()[:, None, None, :]
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0) @ v


def _inputs(B, H, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, max(Sq, Sk), 3, H, D, generator=g).to(dtype)  # strided views, as the models pass
    q = qkv[:, :Sq, 0].transpose(1, 2)
    k, v = (qkv[:, :Sk, i].transpose(1, 2) for i in (1, 2))
    mask = torch.rand(B, Sk, generator=g) > 0.3
    mask[:, -1] = True
    mask[0] = False  # batch row 0 sees nothing: zeros
    bias = torch.randn(1, H, Sq, Sk, generator=g)
    return q, k, v, mask, bias


# every combination on the small shapes; ViT-g's (slow in float64) as the vision encoder calls it
CASES = [(shape, biased, masked, causal, dtype) for shape in SHAPES[1:] for biased in (False, True)
         for masked in (False, True) for causal in (False, True) for dtype in (torch.float32, torch.bfloat16)]
CASES += [(SHAPES[0], False, False, False, dt) for dt in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("shape,biased,masked,causal,dtype", CASES,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_matches_float64_reference(shape, biased, masked, causal, dtype):
    q, k, v, mask, bias = _inputs(*shape, dtype)
    kw = dict(causal=causal, key_padding_mask=mask if masked else None, scale=0.3 if biased else None,
              bias=bias if biased else None)
    out = ops_cpu.attention(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert not out.isnan().any()
    k64 = dict(kw, bias=bias.double() if biased else None)
    ref = attention_ref(q.double(), k.double(), v.double(), **k64)
    err = (out.double() - ref).abs().max().item()
    base = (eager(q, k, v, **kw).double() - ref).abs().max().item()
    assert err <= 2 * base + FLOOR[dtype], f"error {err:.3g} vs eager {base:.3g}"
    if masked:
        assert (out[0] == 0).all(), "a batch row with every key masked must give zeros"


def test_rejects_mismatched_shapes():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="q must be"):
        ops_cpu.attention(q, torch.randn(1, 2, 4, 7), torch.randn(1, 2, 4, 7))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ops_cpu.attention(q, q, q, key_padding_mask=torch.ones(1, 5))


def test_registry_binds_it_on_cpu_only():
    assert ops.get("attention", "fast", "cpu") is ops_cpu.attention
    assert ops.get("attention", "fast").__module__ == "blip2_fast.kernels.attention"
    assert ops.unavailable_reason("attention", "cpu") is None
    assert ops.bind("fast", None, "cpu").attention is ops_cpu.attention
    assert ops.bind("reference", None, "cpu").attention is ops.get("attention")


# (rows, K, N): ViT-g's MLP entry (257 patches, 1408 -> 6144), the Q-Former's FFN (32 queries,
# 768 -> 3072), a Flan-T5 gated input (5 tokens, 2048 -> 5120), an awkward one
GEMM_SHAPES = [(257, 1408, 6144), (32, 768, 3072), (5, 2048, 5120), (7, 59, 33)]


def _bound(base, want, dtype):
    return 2 * _rel(base, want) + 1e-6 if dtype == torch.float32 else 1.5e-2  # bf16: 2^-8 = 3.9e-3 per rounding


def _rel(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _norm_gemm_inputs(M, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3 + 1  # an offset and scale LayerNorm must remove
    lw, lb = 1 + 0.1 * torch.randn(K, generator=g), 0.1 * torch.randn(K, generator=g)
    w, b = torch.randn(N, K, generator=g) / K ** 0.5, 0.1 * torch.randn(N, generator=g)
    return [t.to(dtype) for t in (x, lw, lb, w, b)]


@pytest.mark.parametrize("approx", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ln_linear_gelu_and_linear_gelu(shape, dtype, approx):
    """vs float64 references. fp32: at most twice the reference's own error (the same ops). bf16: the
    eager-bf16 ops (GEMM output and GELU each rounded to bf16, where the reference rounds once), so a
    bf16-level bound; fp32 is where a wrong eps, bias or GELU variant would show."""
    from blip2_fast.reference import linear_gelu_ref, ln_linear_gelu_ref

    x, lw, lb, w, b = _norm_gemm_inputs(*shape, dtype)
    d = [t.double() for t in (x, lw, lb, w, b)]
    want = ln_linear_gelu_ref(d[0], d[1], d[2], 1e-6, d[3], d[4], approx)
    got = ops_cpu.ln_linear_gelu(x, lw, lb, 1e-6, w, b, approx)
    base = ln_linear_gelu_ref(x, lw, lb, 1e-6, w, b, approx)
    assert got.dtype == dtype and _rel(got, want) <= _bound(base, want, dtype)
    want = linear_gelu_ref(d[0], d[3], d[4], approx)
    got = ops_cpu.linear_gelu(x, w, b, approx)
    base = linear_gelu_ref(x, w, b, approx)
    assert got.dtype == dtype and _rel(got, want) <= _bound(base, want, dtype)
    assert ops_cpu.linear_gelu(x, w, None, approx).shape == (shape[0], shape[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [1408, 768, 59])
def test_layer_norm_with_and_without_residual(N, dtype):
    from blip2_fast.reference import layer_norm_ref

    x, lw, lb, _, _ = _norm_gemm_inputs(9, N, 1, dtype)
    r = torch.randn(9, N, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = layer_norm_ref(x.double(), lw.double(), lb.double(), 1e-5)
    assert _rel(ops_cpu.layer_norm(x, lw, lb, 1e-5), want) <= 2 * _rel(layer_norm_ref(x, lw, lb, 1e-5), want) + 1e-6
    y, s = ops_cpu.layer_norm(x, lw, lb, 1e-5, r)
    y_ref, s_ref = layer_norm_ref(x, lw, lb, 1e-5, r)
    assert torch.equal(s, s_ref)  # the residual sum is rounded once, in x's dtype, as the spec says
    want = layer_norm_ref((x + r).double(), lw.double(), lb.double(), 1e-5)
    assert _rel(y, want) <= 2 * _rel(y_ref, want) + 1e-6
    assert ops_cpu.layer_norm(x, None, None, 1e-5).shape == x.shape  # non-affine (OPT's option)
    if dtype == torch.float32:  # the same ops as the reference: identical in fp32
        assert torch.equal(ops_cpu.layer_norm(x, lw, lb, 1e-5), layer_norm_ref(x, lw, lb, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cpu_matches_the_reference(dtype):
    """The CPU write_kv (the reference's scatter; a custom op under torch.compile): the same cache contents,
    padding slots (negative) skipped, strided k/v views of a fused qkv, values cast to the cache's dtype."""
    from blip2_fast.reference import write_kv_ref

    g = torch.Generator().manual_seed(0)
    T, H, D, nb, bs = 7, 3, 88, 5, 4
    qkv = torch.randn(T, 3, H, D, generator=g)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[2] = slots[5] = -1
    caches = [torch.randn(nb, bs, H, D, generator=g).to(dtype) for _ in range(2)]
    want = [c.clone() for c in caches]
    write_kv_ref(k, v, *want, slots)
    ops_cpu.write_kv(k, v, *caches, slots)
    assert all(torch.equal(a, b) for a, b in zip(caches, want))
    # the CPU's candidates: the C++ kernel first, then this one, for where the extension cannot build
    cands = [(f.module, f.attr) for f in ops._candidates("write_kv", torch.device("cpu"))]
    assert cands[:2] == [("blip2_fast._ext", "write_kv"), ("blip2_fast.ops_cpu", "write_kv")]


def test_without_the_extension_write_kv_and_rms_norm_stay_plain_pytorch(monkeypatch):
    """A CPU where the C++ extension cannot build: write_kv and rms_norm bind their plain-PyTorch
    forms with no fallback warning; the extension's other ops fall back to the reference, warned."""
    import warnings

    from blip2_fast import _ext, reference

    monkeypatch.setattr(_ext, "unavailable_reason", lambda device="cpu": "no compiler (simulated)")
    monkeypatch.setattr(ops, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bound = ops.bind("fast", None, "cpu")
    assert bound.write_kv is ops_cpu.write_kv and bound.rms_norm is reference.rms_norm_ref
    warned = " ".join(str(w.message) for w in caught)
    assert "'cross_attention' falls back" in warned
    assert "'write_kv'" not in warned and "'rms_norm'" not in warned


def test_write_kv_cpu_traces_with_fullgraph():
    """Under torch.compile(fullgraph=True) the data-dependent padding check is inside one opaque
    custom op (blip2_fast::write_kv_cpu), so a decode step traces; it still writes the cache."""
    from blip2_fast.reference import write_kv_ref

    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 5, 3, 16, generator=g).unbind(0)
    slots = torch.tensor([3, -1, 7, 0, 12])
    kc, vc = torch.zeros(4, 4, 3, 16), torch.zeros(4, 4, 3, 16)
    kr, vr = kc.clone(), vc.clone()
    torch.library.opcheck(torch.ops.blip2_fast.write_kv_cpu.default, (k, v, kc.clone(), vc.clone(), slots),
                          test_utils=("test_schema", "test_faketensor"))

    def step(k, v, kc, vc, slots):
        ops_cpu.write_kv(k * 2, v * 2, kc, vc, slots)
        return kc.sum()

    out = torch.compile(step, backend="aot_eager", fullgraph=True)(k, v, kc, vc, slots)
    write_kv_ref(k * 2, v * 2, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr) and torch.allclose(out, kr.sum())
