"""Every op's reference (the spec) against an independent float64 formula written out by hand."""
import math

import pytest
import torch

from blip2_fast import ops

g = torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def naive_attention(q, k, v, causal, kpm, scale, bias):
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    out = torch.zeros(B, H, Sq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Sq):
                s = []
                for j in range(Sk):
                    ok = (not causal or j <= i + Sk - Sq) and (kpm is None or bool(kpm[b, j]))
                    x = float(q[b, h, i].double() @ k[b, h, j].double()) * scale
                    if bias is not None:
                        x += float(bias[min(b, bias.shape[0] - 1), h, i, j])
                    s.append(x if ok else -math.inf)
                m = max(s)
                if m == -math.inf:
                    continue  # fully masked row: zeros
                w = [math.exp(x - m) for x in s]
                tot = sum(w)
                for j in range(Sk):
                    out[b, h, i] += w[j] / tot * v[b, h, j].double()
    return out


@pytest.mark.parametrize("Sq,Sk,causal,mask,bias", [(5, 5, False, False, False), (3, 7, True, True, False),
                                                     (7, 7, True, False, True), (1, 9, True, True, True)])
def test_attention_ref(Sq, Sk, causal, mask, bias):
    B, H, D = 2, 3, 11
    q, k, v = rnd(B, H, Sq, D), rnd(B, H, Sk, D), rnd(B, H, Sk, D)
    kpm = (torch.rand(B, Sk, generator=g) > 0.3) if mask else None
    if mask:
        kpm[1] = False  # a fully masked batch row -> zeros
    b = rnd(1, H, Sq, Sk) if bias else None
    got = ops.get("attention")(q, k, v, causal=causal, key_padding_mask=kpm, scale=0.3, bias=b)
    want = naive_attention(q, k, v, causal, kpm, 0.3, b)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()
    assert got.dtype == q.dtype and not got.isnan().any()


def test_cross_attention_ref():
    q, k, v = rnd(2, 2, 4, 8), rnd(2, 2, 9, 8), rnd(2, 2, 9, 8)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[0, 3:] = False
    got = ops.get("cross_attention")(q, k, v, key_padding_mask=kpm)
    assert torch.allclose(got.double(), naive_attention(q, k, v, False, kpm, 8 ** -0.5, None), atol=1e-5)


def test_paged_attention_ref_and_write_kv_ref():
    N, H, D, bs, nb = 3, 2, 5, 4, 12
    kc, vc = torch.full((nb, bs, H, D), float("nan")), torch.full((nb, bs, H, D), float("nan"))
    lens = [1, 6, 11]
    perm = torch.randperm(nb, generator=g).tolist()
    tables = [perm[0:1], perm[1:3], perm[3:6]]
    ks = [rnd(L, H, D) for L in lens]
    vs = [rnd(L, H, D) for L in lens]
    slots = torch.tensor([tables[n][t // bs] * bs + t % bs for n, L in enumerate(lens) for t in range(L)])
    ops.get("write_kv")(torch.cat(ks), torch.cat(vs), kc, vc, slots)
    ops.get("write_kv")(rnd(2, H, D), rnd(2, H, D), kc, vc, torch.tensor([-1, -1]))  # skipped
    q = rnd(N, H, D)
    bt = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    rel = rnd(H, 16)
    for bias in (None, rel):
        got = ops.get("paged_attention")(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), 0.5, rel_bias=bias)
        for n, L in enumerate(lens):
            b = None if bias is None else torch.stack([bias[:, L - 1 - j] for j in range(L)], -1)[None, :, None, :]
            want = naive_attention(q[n][None, :, None], ks[n].transpose(0, 1)[None], vs[n].transpose(0, 1)[None],
                                   False, None, 0.5, b)[0, :, 0]
            assert torch.allclose(got[n].double(), want, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_ref(residual):
    x, w, b = rnd(3, 7, 13), rnd(13), rnd(13)
    r = rnd(3, 7, 13) if residual else None
    out = ops.get("layer_norm")(x, w, b, 1e-5, r)
    s = x.double() + (r.double() if residual else 0)
    mu = s.mean(-1, keepdim=True)
    var = ((s - mu) ** 2).mean(-1, keepdim=True)
    want = (s - mu) / torch.sqrt(var + 1e-5) * w.double() + b.double()
    y = out[0] if residual else out
    assert torch.allclose(y.double(), want, atol=1e-5)
    if residual:
        assert torch.equal(out[1], x + r)


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_ref(residual):
    x, w = rnd(4, 9), rnd(9)
    r = rnd(4, 9) if residual else None
    out = ops.get("rms_norm")(x, w, 1e-6, r)
    s = x.double() + (r.double() if residual else 0)
    want = s / torch.sqrt((s ** 2).mean(-1, keepdim=True) + 1e-6) * w.double()
    y = out[0] if residual else out
    assert torch.allclose(y.double(), want, atol=1e-5)


@pytest.mark.parametrize("approx", ["none", "tanh"])
def test_linear_gelu_refs(approx):
    x, w, b = rnd(5, 12), rnd(7, 12), rnd(7)
    lw, lb = rnd(12), rnd(12)

    def gelu(t):
        if approx == "tanh":
            return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))

    want = gelu(x.double() @ w.double().t() + b.double())
    assert torch.allclose(ops.get("linear_gelu")(x, w, b, approx).double(), want, atol=1e-5)
    xd = x.double()
    h = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-6) * lw.double() + lb.double()
    want = gelu(h @ w.double().t() + b.double())
    assert torch.allclose(ops.get("ln_linear_gelu")(x, lw, lb, 1e-6, w, b, approx).double(), want, atol=1e-5)


def test_registry():
    assert set(ops.OP_NAMES) == {"attention", "cross_attention", "paged_attention", "write_kv", "layer_norm",
                                 "rms_norm", "ln_linear_gelu", "linear_gelu", "linear", "opt_decode_block",
                                 "t5_decode_block"}
    with pytest.raises(ValueError, match="unknown op"):
        ops.get("softmax")
    with pytest.raises(ValueError, match="unknown implementation"):
        ops.get("attention", "turbo")
    bound = ops.bind("reference", None, "cpu")
    assert all(v == "reference" for v in bound.impls.values())
