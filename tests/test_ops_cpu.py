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
