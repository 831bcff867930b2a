"""LayerNorm → fc1 → GELU in one GEMM (kernels/ln_linear_gelu.py) vs eager: `python -m bench.bench_ln_linear_gelu`.

Case (H200 target, bf16): ViT-g's layer_norm2 → fc1 → GELU at 64 images (16448 = 64·257 rows,
1408 → 6144), against F.layer_norm + F.linear + F.gelu (three kernels, the normalised activations
and the pre-activation round-tripping through memory). Compute ceiling: measured bf16 matmul rate,
2·M·N·K FLOPs.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bench.common import cli, row, time_ms, with_tactic


def run(device="cuda", dtype=torch.bfloat16, quick=False) -> Iterator[dict]:
    from blip2_fast.kernels.ln_linear_gelu import ln_linear_gelu

    torch.manual_seed(0)
    cases = [("vitg-mlp", 64 * 257, 1408, 6144), ("vitg-mlp-bs8", 8 * 257, 1408, 6144)]
    if quick:
        cases = [("vitg-mlp", 33, 96, 192)]
    eps = 1e-6
    for name, M, K, N in cases:
        x = torch.randn(M, K, device=device, dtype=dtype)
        lnw = 1 + 0.1 * torch.randn(K, device=device, dtype=dtype)
        lnb = 0.1 * torch.randn(K, device=device, dtype=dtype)
        w = torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5
        b = torch.randn(N, device=device, dtype=dtype)
        ms = time_ms(lambda: ln_linear_gelu(x, lnw, lnb, eps, w, b), device=device)
        base = time_ms(lambda: F.gelu(F.linear(F.layer_norm(x, (K,), lnw, lnb, eps), w, b)), device=device)
        out = row(f"ln_linear_gelu/{name}", (M, K, N), dtype, ms, "F.layer_norm; F.linear; F.gelu", base,
                  flops=2 * M * N * K, device=device)
        out["max_abs_diff"] = (ln_linear_gelu(x, lnw, lnb, eps, w, b).float()
                               - F.gelu(F.linear(F.layer_norm(x, (K,), lnw, lnb, eps), w, b)).float()).abs().max().item()
        yield with_tactic(out, "ln_linear_gelu", ("triton", ln_linear_gelu), (x, lnw, lnb, eps, w, b), device=device)


def main(argv=None) -> list[dict]:
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
