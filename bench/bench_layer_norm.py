"""Residual add + LayerNorm (kernels/layer_norm.py) vs eager PyTorch: `python -m bench.bench_layer_norm`.

Cases (H200 targets, bf16): ViT-g's residual + layer_norm (16448 = 64·257 rows, 1408) and OPT-2.7B's
(B·S = 16·512 rows, 2560), fused vs `x + r` then F.layer_norm; and plain LayerNorm at both widths.
Memory-bound: the ceiling is measured copy bandwidth, bytes = each input read once + each output
written once (x, r read; y, x + r written).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bench.common import cli, row, time_ms, with_tactic


def run(device="cuda", dtype=torch.bfloat16, quick=False) -> Iterator[dict]:
    from blip2_fast.kernels.layer_norm import layer_norm

    torch.manual_seed(0)
    cases = [("vitg", 64 * 257, 1408), ("opt-2.7b", 16 * 512, 2560)]
    if quick:
        cases = [("vitg", 33, 1408), ("opt-2.7b", 17, 2560)]
    for name, M, N in cases:
        x = torch.randn(M, N, device=device, dtype=dtype)
        r = torch.randn(M, N, device=device, dtype=dtype)
        w = torch.randn(N, device=device, dtype=dtype)
        b = torch.randn(N, device=device, dtype=dtype)
        eps = 1e-6 if name == "vitg" else 1e-5
        el = x.element_size()

        def eager_res():
            s = x + r
            return F.layer_norm(s, (N,), w, b, eps), s

        ms = time_ms(lambda: layer_norm(x, w, b, eps, residual=r), device=device)
        base = time_ms(eager_res, device=device)
        out = row(f"add_layer_norm/{name}", (M, N), dtype, ms, "x + r; F.layer_norm", base,
                  nbytes=4 * M * N * el + 2 * N * el, device=device)
        out["max_abs_diff"] = (layer_norm(x, w, b, eps, residual=r)[0].float() - eager_res()[0].float()).abs().max().item()
        yield with_tactic(out, "layer_norm", ("triton", layer_norm), (x, w, b, eps), dict(residual=r), device=device)
        ms = time_ms(lambda: layer_norm(x, w, b, eps), device=device)
        base = time_ms(lambda: F.layer_norm(x, (N,), w, b, eps), device=device)
        out = row(f"layer_norm/{name}", (M, N), dtype, ms, "F.layer_norm", base,
                  nbytes=2 * M * N * el + 2 * N * el, device=device)
        yield with_tactic(out, "layer_norm", ("triton", layer_norm), (x, w, b, eps), device=device)


def main(argv=None) -> list[dict]:
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
