"""Q-Former cross-attention (csrc/, torch.ops.blip2_fast.cross_attention_fwd) vs eager and SDPA:
`python -m bench.bench_cross_attention [--device cpu]`.

Cases: the Q-Former's shape (B = 64 on GPU, 8 on CPU; H = 12, Nq = 32 queries, Nk = 257 patches,
D = 64) against eager matmul-softmax-matmul and F.scaled_dot_product_attention, once on contiguous
tensors and once on the strided views the model really has (queries from a [B, 32, 768] projection,
K/V sliced out of the batched projection below). Bandwidth ceiling: at Nq = 32 the kernel does ~32
FLOP per byte of K/V, well under the GPU's ridge point, so bytes = q, k, v read once + out written once.

Plus the K/V projection of all six cross-attention layers (every other Q-Former layer) as one GEMM,
[B·257, 1408] x [1408, 6·2·768], against twelve separate K and V projections; compute ceiling.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bench.common import cli, row, time_ms, with_tactic

H, NQ, NK, D = 12, 32, 257, 64
VISION, HIDDEN, LAYERS = 1408, 768, 6  # EVA ViT-g width, Q-Former width, cross-attention layers


def _eager(q, k, v):
    s = (q @ k.transpose(-1, -2)) * D**-0.5  # (B, H, Nq, Nk)
    return torch.softmax(s, dim=-1) @ v


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def run(device="cuda", dtype=torch.bfloat16, quick=False) -> Iterator[dict]:
    from blip2_fast import _ext
    from blip2_fast.reference import cross_attention_ref

    torch.manual_seed(0)
    cpu = torch.device(device).type == "cpu"
    B = (2 if quick else 8) if cpu else (2 if quick else 64)
    timing = {"device": device, **({"warmup": 1, "iters": 3} if cpu else {})}  # CPU GEMMs take ~0.1 s each

    # K/V projection for all six cross-attention layers: one GEMM vs twelve.
    Bp = (1 if quick else 2) if cpu else B
    M = Bp * NK
    x = torch.randn(M, VISION, device=device, dtype=dtype)
    w = torch.randn(LAYERS * 2 * HIDDEN, VISION, device=device, dtype=dtype) * VISION**-0.5
    b = torch.randn(LAYERS * 2 * HIDDEN, device=device, dtype=dtype)
    ws, bs = w.split(HIDDEN), b.split(HIDDEN)
    flops = 2 * M * VISION * LAYERS * 2 * HIDDEN
    ms = time_ms(lambda: F.linear(x, w, b), **timing)
    base = time_ms(lambda: [F.linear(x, wi, bi) for wi, bi in zip(ws, bs)], **timing)
    yield row("kv_proj/6_layers_batched", (M, VISION, LAYERS * 2 * HIDDEN), dtype, ms,
              "12 separate F.linear", base, flops=flops, device=device)

    reason = _ext.unavailable_reason(device)
    if reason is not None:  # a missing kernel is a failed benchmark, never a quietly shorter table
        raise RuntimeError(f"the cross_attention kernel cannot run on {device}: {reason}")

    shape = (B, H, NQ, NK, D)
    el = torch.empty((), dtype=dtype).element_size()
    nbytes = (2 * B * H * NQ * D + 2 * B * H * NK * D) * el
    q = torch.randn(B, H, NQ, D, device=device, dtype=dtype)
    k = torch.randn(B, H, NK, D, device=device, dtype=dtype)
    v = torch.randn(B, H, NK, D, device=device, dtype=dtype)
    # The model's layout: q from a [B, 32, 768] projection, K/V columns of the batched projection.
    qs = torch.randn(B, NQ, H * D, device=device, dtype=dtype).view(B, NQ, H, D).transpose(1, 2)
    kv = torch.randn(B, NK, LAYERS * 2 * HIDDEN, device=device, dtype=dtype)
    ks = kv[..., :HIDDEN].view(B, NK, H, D).transpose(1, 2)  # layer 0's K: (B, H, Nk, D), row stride 9216
    vs = kv[..., HIDDEN:2 * HIDDEN].view(B, NK, H, D).transpose(1, 2)

    for tag, (qq, kk, vv) in (("qformer", (q, k, v)), ("qformer_strided", (qs, ks, vs))):
        ms = time_ms(lambda: _ext.cross_attention(qq, kk, vv), **timing)
        ref = cross_attention_ref(qq, kk, vv).float()
        diff = (_ext.cross_attention(qq, kk, vv).float() - ref).abs().max().item()
        for name, fn in (("eager matmul-softmax-matmul", _eager), ("F.scaled_dot_product_attention", _sdpa)):
            base = time_ms(lambda: fn(qq, kk, vv), **timing)
            r = row(f"cross_attention/{tag}", shape, dtype, ms, name, base, nbytes=nbytes, device=device)
            r["max_abs_diff"] = diff
            r["baseline_max_abs_diff"] = (fn(qq, kk, vv).float() - ref).abs().max().item()
            if name.startswith("F.scaled"):
                label = "cuda" if torch.device(device).type == "cuda" else "cpp"
                with_tactic(r, "cross_attention", (label, _ext.cross_attention), (qq, kk, vv), device=device)
            yield r


def main(argv=None) -> list[dict]:
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
