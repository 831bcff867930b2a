"""Paged decode attention (kernels/paged_attention.py) vs SDPA on a contiguous cache: `python -m bench.bench_paged_attention`.

Cases (H200 targets, bf16, block_size 16, shuffled block tables): OPT-2.7B decode (H=32, D=80) and
OPT-6.7B decode (H=32, D=128) at batch 64 x 1024 context, and batch 1 x 4096 context, where split-K
decides the speed (also timed with the split forced off). Decode attention is bandwidth-bound: the
ceiling is copy bandwidth and the bytes are the K and V reads (q and the output are <0.1% of them).
Baseline: F.scaled_dot_product_attention over a contiguous [N, H, L, D] cache of the same size, the
layout it likes best. A case whose K+V fit in L2 (50 MB on an H200) rotates among several copies so
the timing is of HBM, not of the cache.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bench.common import cli, row, time_ms, with_tactic

_L2_BYTES = 50 << 20


def _rotating(fn, arg_sets):
    it = itertools.cycle(arg_sets)
    return lambda: fn(*next(it))


def _paged_case(N, L, H, D, block_size, device, dtype, g):
    nblk = L // block_size
    kc = torch.randn(N * nblk, block_size, H, D, device=device, dtype=dtype, generator=g)
    vc = torch.randn_like(kc)
    bt = torch.randperm(N * nblk, device=device, generator=g).view(N, nblk).to(torch.int32)
    return kc, vc, bt


def run(device="cuda", dtype=torch.bfloat16, quick=False) -> Iterator[dict]:
    from blip2_fast.kernels.paged_attention import paged_attention

    g = torch.Generator(device=device).manual_seed(0)
    bs = 16
    if quick:
        cases = [("opt2.7b-decode", 4, 64, 2, 80, None), ("opt6.7b-decode", 4, 64, 2, 128, None),
                 ("long-split-k", 1, 512, 2, 80, None), ("long-no-split", 1, 512, 2, 80, 1)]
    else:
        cases = [("opt2.7b-decode", 64, 1024, 32, 80, None), ("opt6.7b-decode", 64, 1024, 32, 128, None),
                 ("long-split-k", 1, 4096, 32, 80, None), ("long-split-k", 1, 4096, 32, 128, None),
                 ("long-no-split", 1, 4096, 32, 80, 1)]
    for name, N, L, H, D, splits in cases:
        nbytes = 2 * N * L * H * D * torch.tensor([], dtype=dtype).element_size()
        copies = 1 if device == "cpu" else min(8, max(1, -(-4 * _L2_BYTES // nbytes)))
        scale = D ** -0.5
        lens = torch.full((N,), L, dtype=torch.int32, device=device)
        paged, dense = [], []
        for _ in range(copies):
            kc, vc, bt = _paged_case(N, L, H, D, bs, device, dtype, g)
            q = torch.randn(N, 3, H, D, device=device, dtype=dtype, generator=g)[:, 0]  # view of a fused qkv
            paged.append((q, kc, vc, bt, lens, scale))
            # the same cache, contiguous per sequence and head-major: (N, H, L, D)
            k = kc[bt.long()].reshape(N, L, H, D).transpose(1, 2).contiguous()
            v = vc[bt.long()].reshape(N, L, H, D).transpose(1, 2).contiguous()
            dense.append((q.unsqueeze(2), k, v))  # q (N, H, 1, D)
        ms = time_ms(_rotating(lambda *a: paged_attention(*a, max_seq_len=L, num_splits=splits), paged), device=device)
        base_ms = time_ms(_rotating(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale), dense),
                          device=device)
        r = row(f"paged_attention/{name}", (N, L, H, D), dtype, ms, "F.scaled_dot_product_attention (contiguous cache)",
                base_ms, nbytes=nbytes, device=device)
        r["num_splits"] = "auto" if splits is None else splits
        r["block_size"] = bs
        if splits is None:  # what a load binds for this class (a forced split is not a tactic candidate)
            with_tactic(r, "paged_attention", ("triton", paged_attention), paged[0], device=device)
        del paged, dense
        yield r


def main(argv=None) -> list[dict]:
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
