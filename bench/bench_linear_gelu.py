"""GEMM + bias + GELU (kernels/linear_gelu.py) vs F.linear + F.gelu: `python -m bench.bench_linear_gelu`.

Cases (H200 targets, bf16): the Q-Former MLP's fc1 (B·32 query rows, B = 64: 768 → 3072) and a
Flan-T5-XL-sized 2048 → 5120 projection at B·S = 16·512 rows, erf GELU. Compute ceiling: measured
bf16 matmul rate, 2·M·N·K FLOPs.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bench.common import cli, row, time_ms, with_tactic


def run(device="cuda", dtype=torch.bfloat16, quick=False) -> Iterator[dict]:
    from blip2_fast.kernels.linear_gelu import linear_gelu

    torch.manual_seed(0)
    cases = [("qformer-fc1", 64 * 32, 768, 3072), ("t5-2048x5120", 16 * 512, 2048, 5120)]
    if quick:
        cases = [("qformer-fc1", 2 * 32, 96, 128), ("t5-2048x5120", 33, 128, 160)]
    for name, M, K, N in cases:
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5
        b = torch.randn(N, device=device, dtype=dtype)
        ms = time_ms(lambda: linear_gelu(x, w, b), device=device)
        base = time_ms(lambda: F.gelu(F.linear(x, w, b)), device=device)
        out = row(f"linear_gelu/{name}", (M, K, N), dtype, ms, "F.gelu(F.linear)", base,
                  flops=2 * M * N * K, device=device)
        out["max_abs_diff"] = (linear_gelu(x, w, b).float() - F.gelu(F.linear(x, w, b)).float()).abs().max().item()
        yield with_tactic(out, "linear_gelu", ("triton", linear_gelu), (x, w, b), device=device)


def main(argv=None) -> list[dict]:
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
