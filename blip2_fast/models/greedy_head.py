"""Exact greedy choice over a large vocabulary, screened with a bf16 copy of the LM head (CPU, fp32).

Greedy decoding needs only argmax_v (h · w_v), yet the fp32 head [V, E] is the largest GEMM of a CPU
decode step (50304 x 512 x 8: 11 ms of a 29 ms step on 2 cores). With bf16 matrix units
(AVX512-BF16 / AMX) the same product in bf16 takes 1.5 ms. Its logits are off by a bounded amount,
so they are used only to *screen*:

  1. a_v = bf16(h) · bf16(w_v) for every v (bf16 GEMM, fp32 accumulation; on an x86 CPU with
     AVX2 or better the small-M kernel's packed bf16 head, `linear_cpu.PackedLinear`, with an fp32
     result, else torch.mm with a bf16 one);
  2. per row, a bound B >= |h · w_v - a_v| that holds for every v (see `_bound`);
  3. the true argmax t* satisfies a_t* >= max_v a_v - 2B, so only those candidates (usually 1 to 3)
     can win; their logits are recomputed in fp32 and the best taken (ties: the lowest id, as
     torch.argmax).

Wherever the packed kernel runs, everything after the GEMM is one call into the extension,
`greedy_pick_cpu`: the bound's base from h, the bans, the row max, the selection (three read passes
per row, nothing [n, V] allocated; the selection alone, `greedy_screen_cpu`, takes 50 us at
[8, 50304] on one EPYC core where torch's amax / amin / ge / nonzero / bincount took about 0.9 ms),
and the candidates' recheck in float64. `_bound_base`, `screen_candidates_ref` and the fp32 recheck
below are its spec and run elsewhere.

The result is the argmax of fp32 logits, like `argmax_ref`; the two can differ only where two fp32
logits are within fp32 rounding of each other, as any two fp32 GEMMs can. A row with no candidate
(non-finite hidden state) or too many falls back to its full fp32 logits.

The bound, for h (fp32, K elements), hb = bf16(h), wb_v = bf16(w_v), u = 2^-24:
    |h·w - hb·wb| <= ||h - hb|| ||w|| + ||hb|| ||w - wb||          (Cauchy-Schwarz, twice)
    |hb·wb - fl32(hb·wb)| <= 2K u ||hb|| ||wb||                     (any summation order)
    |fl32(x) - bf16(fl32(x))| <= 2^-8 |bf16(...)|                   (round to nearest, 8 bits)
and per row the maxima over v of the norms are used, so B is one scalar per row.
"""
from __future__ import annotations

import functools

import torch

_SAFETY = 1.5  # margin on the bound for the GEMM's unknown internals (e.g. how it splits K)
_MAX_CANDIDATES = 64  # per row; more than this and the row's full fp32 logits are cheaper
_REL = _SAFETY * 2.0 ** -8  # the bound's term per unit of the largest |screened logit| (output rounding)


def argmax_ref(hidden: torch.Tensor, weight: torch.Tensor, banned: list[list[int]] | None = None) -> torch.Tensor:
    """argmax_v of hidden [n, E] @ weight [V, E]ᵀ, with banned[i] ids excluded from row i: [n] int64."""
    logits = torch.mm(hidden, weight.t()).float()  # (n, V)
    _ban(logits, banned)
    return logits.argmax(-1)


def _ban(scores: torch.Tensor, banned: list[list[int]] | None) -> None:
    V = scores.shape[1]
    for i, ids in enumerate(banned or []):
        ids = [t for t in ids if 0 <= t < V]  # an eos id outside the vocabulary can never be chosen anyway
        if ids:
            scores[i, ids] = float("-inf")


def screen_supported(weight: torch.Tensor) -> str | None:
    """Why the bf16 screen cannot help for this head, or None when it can."""
    if weight.device.type != "cpu":
        return f"the head is on {weight.device.type}; the screen is a CPU path"
    if weight.dtype != torch.float32:
        return f"the head is {weight.dtype}, not float32 (its GEMM is already narrow)"
    if weight.shape[0] < 4096:
        return f"a {weight.shape[0]}-way vocabulary is too small for the screen to pay off"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "oneDNN (torch.backends.mkldnn) is unavailable or disabled, so bf16 GEMMs would not be fast"
    if not _native_bf16():
        return "this CPU has no bf16 matrix instructions (avx512_bf16 / amx_bf16); emulated bf16 is no faster"
    return None


@functools.lru_cache(maxsize=1)
def _native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively. oneDNN also reports bf16 support on AVX-512 CPUs
    that only emulate it (no faster than fp32 there), so the CPU flags decide (Linux; elsewhere no)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class ScreenedArgmax:
    """Greedy ids from hidden states [n, E] and an fp32 head weight [V, E] (see the module docstring).

    Keeps a bf16 copy of the weight (half the fp32 head's memory: packed for the small-M kernel, or
    a plain bf16 matrix where that kernel cannot run) and three scalars.
    """

    def __init__(self, weight: torch.Tensor, chunk: int = 8192):
        assert weight.dim() == 2 and weight.dtype == torch.float32, (weight.shape, weight.dtype)
        from ..linear_cpu import PackedLinear, resolve_isa

        self.weight = weight
        # the packed kernel streams the bf16 head at close to the memory bandwidth (oneDNN's bf16 GEMM
        # reads it at 7-10 GB/s with 1-32 rows); its sums obey the same fp32 bound (linear_cpu's docstring)
        self.packed = PackedLinear(weight, dtype=torch.bfloat16) if resolve_isa() not in ("torch", "scalar") else None
        self.wb = None if self.packed is not None else weight.bfloat16()
        K = weight.shape[1]
        w_max = r_max = wb_max = 0.0
        for s in range(0, weight.shape[0], chunk):  # chunks: no second fp32 copy of the head at once
            # norms in float64: squares of tiny fp32 values would underflow to 0 and void the bound
            w = weight[s: s + chunk].double()
            wb = weight[s: s + chunk].bfloat16().double()
            w_max = max(w_max, float(w.norm(dim=1).max()))
            r_max = max(r_max, float((w - wb).norm(dim=1).max()))
            wb_max = max(wb_max, float(wb.norm(dim=1).max()))
        self.K, self.w_max = K, w_max
        self.r_max = r_max + 2 * K * 2.0 ** -24 * wb_max  # the bf16 residual and the fp32 accumulation

    def _bound_base(self, h: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
        """[n] float64: the part of `_bound` that does not depend on the screened logits."""
        h64, hb64 = h.double(), hb.double()  # (n, E): float64 norms never underflow
        b = (h64 - hb64).norm(dim=1) * self.w_max + hb64.norm(dim=1) * self.r_max  # (n,)
        # bf16 matrix units flush subnormal inputs, products and results to zero (DAZ/FTZ): each
        # flush errs by < 2^-126; K products per logit plus the inputs and output, generously
        b = b + 2.0 ** -120 * self.K * (1.0 + self.w_max + hb64.norm(dim=1))
        return b * _SAFETY

    def _bound(self, h: torch.Tensor, hb: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """[n]: max over v of |h · w_v - a_v| (a = the screened logits, [n, V]): the base plus the
        output rounding's 2^-8 |a_v| (a's largest magnitude stands for every v)."""
        m = torch.maximum(a.amax(dim=1), -a.amin(dim=1)).double()
        return (self._bound_base(h, hb) + _REL * m).float()

    def screen_logits(self, h: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
        """The screened logits a [n, V] (fp32, row-contiguous) of h [n, E] fp32 and hb = bf16(h)."""
        if self.packed is not None:
            return self.packed(h)  # bf16(h) · bf16(w), fp32 sums and result
        # (wb @ hbᵀ)ᵀ: BLAS runs the tall-skinny product faster (see layers.lm_head)
        # row-contiguous fp32 before any reduction: reducing the transposed view is 10x slower
        return torch.mm(self.wb, hb.t()).t().float().contiguous()  # bf16 values, fp32-accumulated

    def __call__(self, hidden: torch.Tensor, banned: list[list[int]] | None = None) -> list[int]:
        """Greedy ids for hidden [n, E] (fp32); banned[i] ids are excluded from row i (min_new_tokens)."""
        h = hidden.float().contiguous()
        hb = h.bfloat16()
        a = self.screen_logits(h, hb)
        if self.packed is not None:  # the extension is loaded: the bound, screen and recheck in one call
            from .. import _ext

            ptr, ids = _ban_csr(banned, h.shape[0])
            best = _ext.greedy_pick(a, h, self.weight, self.w_max, self.r_max, _SAFETY, _REL, ptr, ids,
                                    _MAX_CANDIDATES).tolist()
            return [b if b >= 0 else self._full(h, i, banned) for i, b in enumerate(best)]
        cols, counts = screen_candidates_ref(a, self._bound_base(h, hb), _REL, banned, _MAX_CANDIDATES)
        counts, cols = counts.tolist(), cols.tolist()
        rows, cands = [], []
        for i, c in enumerate(counts):
            if 0 < c <= _MAX_CANDIDATES:
                rows += [i] * c
                cands += cols[i][:c]
        # a row with no candidate (non-finite) or too many (flat logits) is scored in full below;
        # never recheck its candidates one by one (a flat row would gather the whole head)
        exact = (h[rows] * self.weight[torch.tensor(cands)]).sum(dim=1).tolist() if rows else []  # their fp32 logits
        best: dict[int, tuple[float, int]] = {}
        for r, c, e in zip(rows, cands, exact):  # ids ascend within a row
            if r not in best or e > best[r][0]:  # strictly greater: ties keep the lower id, as argmax
                best[r] = (e, c)
        return [best[i][1] if 0 < c <= _MAX_CANDIDATES else self._full(h, i, banned) for i, c in enumerate(counts)]

    def _full(self, h: torch.Tensor, i: int, banned: list[list[int]] | None) -> int:
        """Row i scored over its full fp32 logits (no candidate, or too many to recheck)."""
        return int(argmax_ref(h[i: i + 1], self.weight, [banned[i]] if banned else None))


def screen_candidates_ref(a: torch.Tensor, base: torch.Tensor, rel: float, banned: list[list[int]] | None,
                          max_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The screen after the bf16 GEMM (spec of the extension's `greedy_screen_cpu`).

    a: screened logits [n, V] fp32, modified in place: row i's banned ids become -inf. Per row, the
    margin is 2 (base_i + rel max_v |a_v|) (the bound over every id, banned ones included), and the
    candidates are the ids v with a_v >= max_v a_v - margin after the bans, the threshold rounded
    down to fp32. Returns (cols [n, max_candidates] int64: the candidates ascending, -1 past them;
    counts [n] int64: how many, 0 where there is none (a NaN in the row), max_candidates + 1 where
    there are more than max_candidates (then cols holds the first max_candidates)).
    """
    n, V = a.shape
    m = torch.maximum(a.amax(dim=1), -a.amin(dim=1)).double()  # (n,): NaN where the row has one
    margin = 2 * (base + rel * m)
    _ban(a, banned)
    thr = a.amax(dim=1).double() - margin  # (n,)
    t = thr.float()
    t = torch.where(t.double() > thr, torch.nextafter(t, torch.tensor(float("-inf"))), t)  # round down
    hit = a >= t[:, None]  # (n, V)
    counts = hit.sum(dim=1).clamp(max=max_candidates + 1)
    counts[m.isnan()] = 0
    cols = torch.full((n, max_candidates), -1, dtype=torch.long)
    for i in range(n):
        ids = hit[i].nonzero().flatten()[:max_candidates]
        if counts[i] > 0:
            cols[i, : ids.numel()] = ids
    return cols, counts


def _ban_csr(banned: list[list[int]] | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """banned as (ptr [n + 1], ids) int64: row i's ids are ids[ptr[i]:ptr[i + 1]]."""
    ptr, ids = [0], []
    for i in range(n):
        if banned:
            ids += banned[i]
        ptr.append(len(ids))
    return torch.tensor(ptr, dtype=torch.long), torch.tensor(ids, dtype=torch.long)
