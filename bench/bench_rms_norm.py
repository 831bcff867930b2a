"""T5 RMSNorm (+ residual add), kernels/rms_norm.py, vs eager PyTorch: `python -m bench.bench_rms_norm`.

Cases (H200 targets, bf16): Flan-T5-XL (d_model 2048) and -XXL (4096) at B·S = 16·512 rows, plain
and fused with the residual add; eager is HF T5LayerNorm's math (float32 variance, cast to the
weight's dtype, scale). Memory-bound: the ceiling is measured copy bandwidth, bytes = inputs read
once + outputs written once.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from bench.common import cli, row, time_ms, with_tactic


def _t5_layer_norm(x, w, eps):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return w * (x.float() * torch.rsqrt(var + eps)).to(w.dtype)


def run(device="cuda", dtype=torch.bfloat16, quick=False) -> Iterator[dict]:
    from blip2_fast.kernels.rms_norm import rms_norm

    torch.manual_seed(0)
    cases = [("flan-t5-xl", 16 * 512, 2048), ("flan-t5-xxl", 16 * 512, 4096)]
    if quick:
        cases = [("flan-t5-xl", 33, 2048), ("flan-t5-xxl", 17, 4096)]
    eps = 1e-6
    for name, M, N in cases:
        x = torch.randn(M, N, device=device, dtype=dtype)
        r = torch.randn(M, N, device=device, dtype=dtype)
        w = torch.randn(N, device=device, dtype=dtype)
        el = x.element_size()

        def eager_res():
            s = x + r
            return _t5_layer_norm(s, w, eps), s

        ms = time_ms(lambda: rms_norm(x, w, eps), device=device)
        base = time_ms(lambda: _t5_layer_norm(x, w, eps), device=device)
        out = row(f"rms_norm/{name}", (M, N), dtype, ms, "T5LayerNorm eager", base,
                  nbytes=2 * M * N * el + N * el, device=device)
        yield with_tactic(out, "rms_norm", ("triton", rms_norm), (x, w, eps), device=device)
        ms = time_ms(lambda: rms_norm(x, w, eps, residual=r), device=device)
        base = time_ms(eager_res, device=device)
        out = row(f"add_rms_norm/{name}", (M, N), dtype, ms, "x + r; T5LayerNorm eager", base,
                  nbytes=4 * M * N * el + N * el, device=device)
        out["max_abs_diff"] = (rms_norm(x, w, eps, residual=r)[0].float() - eager_res()[0].float()).abs().max().item()
        yield with_tactic(out, "rms_norm", ("triton", rms_norm), (x, w, eps), dict(residual=r), device=device)


def main(argv=None) -> list[dict]:
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
