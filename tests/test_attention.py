"""Fused attention (kernels/attention.py) against a float64 run of `attention_ref`.

Rule (FlashAttention's): the kernel's max error vs float64 is at most twice eager PyTorch's in the
same dtype, plus a small floor. Runs interpreted on the CPU (TRITON_INTERPRET=1, set below before
the kernels are imported); with TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled.
"""
from kernel_setup import DEVICE, INTERPRET, needs_cuda, poison_outputs  # noqa: E402,F401 (before the kernel modules; autouse fixture)

import pytest  # noqa: E402
import torch  # noqa: E402

from blip2_fast.kernels import attention as A  # noqa: E402
from blip2_fast.reference import attention_ref  # noqa: E402

gpu = pytest.mark.gpu
FLOOR = {torch.float32: 5e-7, torch.float16: 1e-4, torch.bfloat16: 2e-3}


def eager(q, k, v, causal=False, key_padding_mask=None, scale=None, bias=None):
    """Plain PyTorch attention computed in the inputs' own dtype (no upcast): the error yardstick."""
    Sq, Sk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = D ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(q.dtype)
    keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.arange(Sk, device=q.device)[None, :] <= torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
    keep = keep[None, None]
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.bool()[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def check(q, k, v, fast=None, **kw):
    """Run the kernel (or `fast`), compare with float64 and eager errors; returns the output."""
    out = (fast or A.attention)(q, k, v, **kw)
    B, H, Sq, D = q.shape
    assert out.shape == (B, H, Sq, D) and out.dtype == q.dtype and out.is_contiguous()
    assert not out.isnan().any(), "NaN in output (unwritten element or bad masking)"
    kw64 = dict(kw)
    if kw.get("bias") is not None:
        kw64["bias"] = kw["bias"].double()
    ref = attention_ref(q.double(), k.double(), v.double(), **kw64)
    err = (out.double() - ref).abs().max().item()
    err_eager = (eager(q, k, v, **kw).double() - ref).abs().max().item()
    tol = 2 * err_eager + FLOOR[q.dtype]
    assert err <= tol, f"fast err {err:.3g} > 2 x eager err {err_eager:.3g} + {FLOOR[q.dtype]:.0e} ({q.dtype}, q {tuple(q.shape)}, k {tuple(k.shape)})"
    return out


def rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def padding_mask(B, Sk, empty_row=None, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    m = torch.rand(B, Sk, generator=g) > 0.3
    m[:, 0] = True
    if empty_row is not None:
        m[empty_row] = False  # every key masked: that batch's rows must come out as zeros
    return m.to(DEVICE)


def test_kernel_mode_matches_env():
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(A._attn_fwd_kernel, InterpretedFunction) == INTERPRET, (
        "blip2_fast.kernels.attention was imported before TRITON_INTERPRET was set")


# (B, H, Sq, Sk, D, causal): real BLIP-2 shapes (ViT-g 257×88, Q-Former 32×64, OPT 80, T5 64) and
# awkward ones (primes, Sq≠Sk both ways, D 40/59/128/256/8, single decode query).
SHAPES = [
    pytest.param(1, 2, 257, 257, 88, False, id="vitg-257x88"),
    pytest.param(3, 1, 32, 32, 64, False, id="qformer-self-32x64"),
    pytest.param(1, 2, 32, 257, 64, False, id="qformer-cross-32x257"),
    pytest.param(1, 2, 97, 97, 80, True, id="opt-prefill-97x80-causal"),
    pytest.param(2, 2, 1, 97, 80, True, id="opt-decode-1x97-causal"),
    pytest.param(1, 2, 40, 97, 80, True, id="chunked-40x97-causal"),
    pytest.param(1, 2, 70, 33, 64, True, id="sq>sk-70x33-causal"),
    pytest.param(1, 1, 97, 97, 128, False, id="d128"),
    pytest.param(1, 2, 65, 47, 40, False, id="d40"),
    pytest.param(1, 2, 47, 65, 59, True, id="d59-causal"),
    pytest.param(1, 1, 40, 37, 256, False, id="d256"),
    pytest.param(3, 1, 19, 23, 8, False, id="d8"),
    pytest.param(1, 2, 33, 65, 96, False, id="d96-split-exact"),
    pytest.param(1, 1, 20, 40, 72, True, id="d72-split-masked"),
]


def test_head_dims_run_as_power_of_two_blocks():
    # 88 = 64 + 32 (96 wide, not 128), 80 = 64 + 16 (exact); powers of two and 59 stay one block
    from blip2_fast.kernels._common import head_dim_split
    assert [head_dim_split(d) for d in (88, 80, 40, 96, 72)] == [(64, 32), (64, 16), (32, 16), (64, 32), (64, 16)]
    assert [head_dim_split(d) for d in (64, 128, 59, 8, 256, 111)] == [(64, 0), (128, 0), (64, 0), (16, 0), (256, 0), (128, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,H,Sq,Sk,D,causal", SHAPES)
def test_attention_shapes(B, H, Sq, Sk, D, causal, dtype):
    torch.manual_seed(Sq * 1000 + Sk + D)
    q, k, v = rand(B, H, Sq, D, dtype=dtype), rand(B, H, Sk, D, dtype=dtype), rand(B, H, Sk, D, dtype=dtype)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_t5_bias_and_padding(dtype, causal):
    # T5: relative-position bias [1, H, Sq, Sk] shared over the batch (stride 0), key padding with
    # one batch entry fully masked.
    torch.manual_seed(1 + causal)
    B, H, Sq, Sk, D = 3, 2, 21, 37 if not causal else 21, 64
    q, k, v = rand(B, H, Sq, D, dtype=dtype), rand(B, H, Sk, D, dtype=dtype), rand(B, H, Sk, D, dtype=dtype)
    bias = rand(1, H, Sq, Sk, dtype=dtype)
    kpm = padding_mask(B, Sk, empty_row=1)
    out = check(q, k, v, causal=causal, bias=bias, key_padding_mask=kpm)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("bias_shape", [(3, 2, 33, 41), (2, 33, 41), (1, 1, 33, 41), (33, 41), (3, 1, 1, 41)])
def test_bias_broadcast_and_dtype(bias_shape):
    torch.manual_seed(2)
    q, k, v = rand(3, 2, 33, 32, dtype=torch.float16), rand(3, 2, 41, 32, dtype=torch.float16), rand(3, 2, 41, 32, dtype=torch.float16)
    bias = rand(*bias_shape, dtype=torch.float32)  # float32 bias with float16 q/k/v
    check(q, k, v, bias=bias)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
def test_key_padding_mask_dtypes_and_empty_rows(mask_dtype):
    torch.manual_seed(3)
    B, H, Sq, Sk, D = 3, 2, 17, 45, 64
    q, k, v = rand(B, H, Sq, D, dtype=torch.float32), rand(B, H, Sk, D, dtype=torch.float32), rand(B, H, Sk, D, dtype=torch.float32)
    kpm = padding_mask(B, Sk, empty_row=2).to(mask_dtype)
    out = check(q, k, v, key_padding_mask=kpm)
    assert (out[2] == 0).all()
    # causal with Sq > Sk: the first Sq - Sk query rows see no key at all
    out = check(q[:, :, :, :], k[:, :, :9], v[:, :, :9], causal=True)
    assert (out[:, :, : Sq - 9] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_qkv_strided_views(dtype):
    # q, k, v as views into one fused projection [B, S, 3·H·D]: no copies, strides passed through.
    torch.manual_seed(4)
    B, S, H, D = 2, 57, 2, 88
    qkv = rand(B, S, 3 * H * D, dtype=dtype).view(B, S, 3, H, D)  # (B, S, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each (B, H, S, D), non-contiguous
    assert not q.is_contiguous()
    check(q, k, v, causal=True)
    # T5-style cross attention: q from one tensor, k/v from a fused kv projection, Sq != Sk
    kv = rand(B, 73, 2, H, D, dtype=dtype)
    check(q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2))
    # a non-unit stride on the head dim (a transposed buffer)
    qt = rand(B, H, D, S, dtype=dtype).transpose(-1, -2)  # (B, H, S, D), stride_d = S
    check(qt, k, v, scale=0.3)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (64, 16), (16, 64)])
def test_block_shapes_causal_boundaries(blocks):
    # The masked/unmasked loop split depends on BLOCK_M vs BLOCK_N and on Sk - Sq: sweep both.
    torch.manual_seed(5)
    bm, bn = blocks

    def fast(q, k, v, **kw):
        return A._attention_impl(q, k, v, kw.get("key_padding_mask"), kw.get("bias"), kw.get("causal", False),
                                 kw.get("scale") or q.shape[-1] ** -0.5, block_m=bm, block_n=bn)

    for Sq, Sk in ((67, 67), (23, 90), (90, 23), (1, 50)):
        q, k, v = rand(1, 1, Sq, 40, dtype=torch.float32), rand(1, 1, Sk, 40, dtype=torch.float32), rand(1, 1, Sk, 40, dtype=torch.float32)
        check(q, k, v, fast=fast, causal=True)
    kpm = padding_mask(1, 90)
    q, k, v = rand(1, 1, 23, 40, dtype=torch.float32), rand(1, 1, 90, 40, dtype=torch.float32), rand(1, 1, 90, 40, dtype=torch.float32)
    check(q, k, v, fast=fast, causal=True, key_padding_mask=kpm, bias=rand(1, 1, 23, 90, dtype=torch.float32))


def test_empty_inputs():
    q = rand(2, 2, 0, 64, dtype=torch.float16)
    k = rand(2, 2, 5, 64, dtype=torch.float16)
    assert A.attention(q, k, k).shape == (2, 2, 0, 64)
    q = rand(1, 2, 3, 64, dtype=torch.float16)
    k0 = rand(1, 2, 0, 64, dtype=torch.float16)
    out = A.attention(q, k0, k0)
    assert out.shape == (1, 2, 3, 64) and (out == 0).all()


def test_bad_arguments_raise():
    q, k = rand(1, 2, 8, 64, dtype=torch.float16), rand(1, 2, 9, 64, dtype=torch.float16)
    cases = [
        ((q[0], k, k), {}, "q must be"),
        ((q, k[..., :32], k), {}, "k must be"),
        ((q, k, k[:, :, :5]), {}, "v must be"),
        ((q, k.float(), k), {}, "share a dtype"),
        ((q.int(), k.int(), k.int()), {}, "q must be float16"),
        ((rand(1, 1, 4, 300, dtype=torch.float16),) + (rand(1, 1, 4, 300, dtype=torch.float16),) * 2, {}, "head dim"),
        ((q, k, k), {"key_padding_mask": torch.ones(1, 8, dtype=torch.bool)}, "key_padding_mask must be"),
        ((q, k, k), {"bias": rand(2, 2, 8, 9, dtype=torch.float16)}, "bias must be"),
        ((q, k, k), {"bias": rand(1, 2, 8, 9, 1, dtype=torch.float16)}, "bias must be"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            A.attention(*args, **kw)


def test_opcheck():
    torch.manual_seed(6)
    q, k, v = rand(1, 2, 20, 16, dtype=torch.float32), rand(1, 2, 24, 16, dtype=torch.float32), rand(1, 2, 24, 16, dtype=torch.float32)
    kpm = padding_mask(1, 24)
    bias = rand(1, 2, 20, 24, dtype=torch.float32)
    op = torch.ops.blip2_fast.attention_fwd.default
    torch.library.opcheck(op, (q, k, v, kpm, bias, True, 0.25))
    torch.library.opcheck(op, (q.half(), k.half(), v.half(), None, None, False, 0.25))


def test_torch_compile_fullgraph():
    torch.manual_seed(7)
    qkv = rand(2, 24, 3, 2, 16, dtype=torch.float32)
    kpm = padding_mask(2, 24)

    def f(qkv, kpm):
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views
        return A.attention(q, k, v, causal=True, key_padding_mask=kpm)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(qkv, kpm), f(qkv, kpm), rtol=0, atol=0)


@gpu
@needs_cuda
@pytest.mark.parametrize("B,H,Sq,Sk,D,causal", [
    (4, 16, 257, 257, 88, False), (2, 32, 512, 512, 80, True), (2, 12, 32, 257, 64, False),
    (3, 4, 1, 300, 80, True), (2, 2, 97, 200, 128, True), (1, 2, 111, 111, 256, False),
])
def test_attention_bf16_gpu(B, H, Sq, Sk, D, causal):
    torch.manual_seed(8)
    dt = torch.bfloat16
    q, k, v = rand(B, H, Sq, D, dtype=dt), rand(B, H, Sk, D, dtype=dt), rand(B, H, Sk, D, dtype=dt)
    check(q, k, v, causal=causal)
    check(q, k, v, causal=causal, key_padding_mask=padding_mask(B, Sk, empty_row=0), bias=rand(1, H, Sq, Sk, dtype=dt))
