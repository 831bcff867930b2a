"""Fused attention (kernels/attention.py) vs F.scaled_dot_product_attention: `python -m bench.bench_attention`.

Cases (H200 targets, bf16): ViT-g self-attention (B=64, H=16, S=257, D=88) and OPT-2.7B causal
prefill (B=16, H=32, S=512, D=80), both with q/k/v as views of one fused qkv projection as the
models produce them; plus Q-Former cross-attention (32 queries over 257 patches, padding mask) and
a T5 encoder layer with its relative-position bias [1, H, S, S]. Compute ceiling: FLOPs counted
without the causal half (4·B·H·Sq·Sk·D, halved for causal).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bench.common import cli, row, time_ms, with_tactic


def _fused_qkv(B, H, S, D, device, dtype):
    qkv = torch.randn(B, S, 3, H, D, device=device, dtype=dtype)  # (B, S, 3, H, D): one projection
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))  # each (B, H, S, D), strided


def run(device="cuda", dtype=torch.bfloat16, quick=False) -> Iterator[dict]:
    from blip2_fast.kernels.attention import attention

    torch.manual_seed(0)
    if quick:
        cases = [("vitg", 2, 2, 33, 33, 88, False), ("opt-prefill", 1, 2, 40, 40, 80, True),
                 ("qformer-cross", 2, 2, 32, 33, 64, False), ("t5-bias", 1, 2, 24, 24, 64, False)]
    else:
        cases = [("vitg", 64, 16, 257, 257, 88, False), ("opt-prefill", 16, 32, 512, 512, 80, True),
                 ("qformer-cross", 64, 12, 32, 257, 64, False), ("t5-bias", 16, 32, 512, 512, 64, False)]
    for name, B, H, Sq, Sk, D, causal in cases:
        kw, sdpa_kw = {}, {}
        if name == "qformer-cross":
            q = torch.randn(B, H, Sq, D, device=device, dtype=dtype)
            _, k, v = _fused_qkv(B, H, Sk, D, device, dtype)
            kpm = torch.ones(B, Sk, dtype=torch.bool, device=device)
            kpm[: B // 2, Sk - 7:] = False
            kw["key_padding_mask"] = kpm
            sdpa_kw["attn_mask"] = kpm[:, None, None, :]
        else:
            q, k, v = _fused_qkv(B, H, Sq, D, device, dtype)
            if name == "t5-bias":
                bias = torch.randn(1, H, Sq, Sk, device=device, dtype=dtype)
                kw["bias"], kw["scale"] = bias, 1.0  # T5 applies no 1/sqrt(d) scaling
                sdpa_kw["attn_mask"], sdpa_kw["scale"] = bias, 1.0
        ms = time_ms(lambda: attention(q, k, v, causal=causal, **kw), device=device)
        base_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, **sdpa_kw), device=device)
        flops = 4 * B * H * Sq * Sk * D * (0.5 if causal else 1.0)
        r = row(f"attention/{name}", (B, H, Sq, Sk, D), dtype, ms, "F.scaled_dot_product_attention", base_ms,
                flops=flops, device=device)
        r["causal"] = causal
        with_tactic(r, "attention", ("triton", attention), (q, k, v), dict(causal=causal, **kw), device=device)
        r["max_abs_diff"] = (attention(q, k, v, causal=causal, **kw).float()
                             - F.scaled_dot_product_attention(q, k, v, is_causal=causal, **sdpa_kw).float()).abs().max().item()
        yield r


def main(argv=None) -> list[dict]:
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
