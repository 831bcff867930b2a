"""Token choice for a whole step, on the device: one batch of logits in, one host copy of the
chosen tokens (and beam candidates) out.

The processors run in transformers' order on float32 logits: (beam search: log-softmax), the
repetition penalty, the eos ban before min_new_tokens, then temperature, top-k and top-p when
sampling. Greedy and beam search therefore match transformers token for token, and sampling draws
from the same distribution (two deliberate differences: a tie at the k-th score keeps exactly k
tokens, where transformers keeps every tied one; the draw itself is an exponential race,
argmax(p / E) with E ~ Exp(1), instead of torch.multinomial).

Every sampled request draws its noise from its own `torch.Generator` (seeded per request), a
fixed number of draws per step (its top_k, or the vocabulary), so its samples depend only on its
seed and its logits, never on which other requests share the batch.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .params import SamplingParams
from .processors import run_host_processors
from .staging import inference


@dataclasses.dataclass
class Capture:
    """What a request needs from its rows' scores on the host this step (only when asked)."""

    input_ids: list[list[int]]  # per row: what transformers' processors see as input_ids
    processors: tuple = ()  # the caller's logits processors (run on the host)
    scores: bool = False  # return the processed scores [rows, V]
    logits: bool = False  # return the raw logits [rows, V]


@dataclasses.dataclass
class Row:
    """One sequence taking one token this step (not beam search)."""

    logits_row: int  # its row of the step's logits
    params: SamplingParams
    generator: torch.Generator | None  # sampling: the request's own
    history: list[int] | None  # token ids the repetition penalty looks at (only with a penalty)
    banned: tuple[int, ...]  # ids (in the vocabulary) it may not take now: eos before min_new_tokens, bans
    capture: Capture | None = None


@dataclasses.dataclass
class BeamGroup:
    """One beam-search request's k running beams."""

    logits_rows: list[int]  # each beam's row of the logits (at prefill: k times the one prompt row)
    params: SamplingParams
    generator: torch.Generator | None
    histories: list[list[int]] | None  # per beam, for the repetition penalty
    banned: tuple[int, ...] | list[tuple[int, ...]]  # for every beam, or per beam
    running_scores: list[float]  # [k] summed log-probabilities of the running beams
    keep: int  # candidates to return (2k, more with several eos ids)
    capture: Capture | None = None


@dataclasses.dataclass
class SamplerOutput:
    tokens: list[int]  # per Row, in order; -1 where a row had no finite score (its request fails)
    beams: list[tuple[torch.Tensor, torch.Tensor]]  # per BeamGroup: (top_lp float32 [keep], top_i int64 [keep]) on the host
    # per Row, then per BeamGroup, with a Capture: (processed scores [rows, V] or None, raw logits or None), host float32
    captured: list[tuple[torch.Tensor | None, torch.Tensor | None] | None] | None = None


@dataclasses.dataclass
class _Plan:
    """What `Sampler.prepare` put into the step's staging buffer (device views), and the host-side facts."""

    rows: list[Row]
    beams: list[BeamGroup]
    V: int
    order: torch.Tensor | None  # logits row of every choosing row, when that is not simply 0..n-1
    greedy: list[int]
    sampled: list[int]
    greedy_idx: torch.Tensor | None
    sampled_idx: torch.Tensor | None
    ban: tuple | None  # (rows, cols)
    penalty: tuple | None  # (rows, ids [r, L], penalties)
    temps: torch.Tensor | None
    ks: list[int]
    ks_dev: torch.Tensor | None
    tops: torch.Tensor | None
    scores: list[torch.Tensor]  # per beam group: its running scores
    caps: list | None = None  # (first row of x, rows, Capture, params, kind "greedy" / "sampled" / "beam", out slot)


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._neg_inf = torch.tensor(-math.inf, device=device)
        self._greedy_memo = None  # the last greedy plan: reused while the batch stays the same

    def prepare(self, rows: list[Row], beams: list[BeamGroup], V: int, staging) -> _Plan:
        """Put everything the sampler needs on the device into `staging` (sent with the model's
        inputs: one host-to-device copy per step)."""
        add = staging.add
        i32 = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
        f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731
        n = len(rows)
        greedy, sampled, order = [], [], []
        ban_rows, ban_cols = [], []
        for i, r in enumerate(rows):
            (sampled if r.params.do_sample else greedy).append(i)
            order.append(r.logits_row)
            if r.banned:
                for t in r.banned:
                    ban_rows.append(i)
                    ban_cols.append(t)
        at = n
        caps = [(i, 1, r.capture, r.params, "sampled" if r.params.do_sample else "greedy", i)
                for i, r in enumerate(rows) if r.capture is not None]
        for g, b in enumerate(beams):
            order += b.logits_rows
            k = len(b.logits_rows)
            per_beam = isinstance(b.banned, list)
            for j in range(k):
                for t in (b.banned[j] if per_beam else b.banned):
                    ban_rows.append(at + j)
                    ban_cols.append(t)
            if b.capture is not None:
                caps.append((at, k, b.capture, b.params, "beam", n + g))
            at += k
        identity = order == list(range(len(order)))
        plan = _Plan(rows, beams, V, None if identity else add(i32(order)), greedy, sampled,
                     None if len(greedy) in (0, n) else add(i32(greedy)), add(i32(sampled)) if sampled else None,
                     None, None, None, [], None, None, [add(f32(b.running_scores)) for b in beams], caps or None)
        if ban_rows:
            plan.ban = (add(i32(ban_rows)), add(i32(ban_cols)))
        params = [r.params for r in rows] + [b.params for b in beams for _ in b.logits_rows]
        pen = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if pen:
            hists = [r.history for r in rows] + [h for b in beams for h in (b.histories or [None] * len(b.logits_rows))]
            hist = [[t for t in hists[i] if 0 <= t < V] for i in pen]
            ids = np.full((len(pen), max(1, max(len(h) for h in hist))), V, dtype=np.int32)  # V: a dummy column
            for j, h in enumerate(hist):
                ids[j, : len(h)] = h
            plan.penalty = (add(i32(pen)), add(ids), add(f32([params[i].repetition_penalty for i in pen])))
        if sampled:
            srows = [rows[i] for i in sampled]
            plan.temps = add(f32([r.params.temperature for r in srows]))
            plan.ks = [min(r.params.top_k, V) if r.params.top_k else V for r in srows]
            plan.ks_dev = add(i32(plan.ks))
            plan.tops = add(f32([r.params.top_p if r.params.top_p is not None else 1.0 for r in srows]))
        return plan

    def prepare_greedy(self, banned: list[tuple[int, ...]], staging) -> _Plan:
        """`prepare` for a batch of plain greedy rows (row i: logits row i, no penalty), the common case."""
        n = len(banned)
        first = banned[0] if n else ()
        if all(b == first for b in banned):  # every row bans the same ids (or none): no per-row lists
            memo = self._greedy_memo
            at = staging.offset
            if memo is not None and memo[0] is staging.owner and memo[1] == at and memo[2] == (n, first):
                staging.skip(memo[4])  # the same plan at the same place as the last step: its arrays are there
                return memo[3]
            plan = _Plan([None] * n, [], 0, None, list(range(n)), [], None, None, None, None, None, [], None, None, [])
            if first:
                cols = np.asarray(first, np.int32)
                plan.ban = (staging.add(np.repeat(np.arange(n, dtype=np.int32), len(cols))), staging.add(np.tile(cols, n)))
            if staging.owner is not None and at[0] == 0 and staging.offset[0] == 0:
                self._greedy_memo = (staging.owner, at, (n, first), plan, staging.offset[1] - at[1])
            return plan
        plan = _Plan([None] * n, [], 0, None, list(range(n)), [], None, None, None, None, None, [], None, None, [])
        rows = [i for i, ids in enumerate(banned) for _ in ids]
        if rows:
            plan.ban = (staging.add(np.asarray(rows, np.int32)),
                        staging.add(np.asarray([t for ids in banned for t in ids], np.int32)))
        return plan

    @inference
    def __call__(self, logits: torch.Tensor, plan: _Plan) -> SamplerOutput:
        """logits: float32 [n, V] (modified in place: nothing else reads them after the sampler)."""
        rows, beams = plan.rows, plan.beams
        # x: one row per choosing sequence; no gather when that is the logits as they are
        x = logits if plan.order is None else logits.index_select(0, plan.order)
        n = len(rows)
        caps = plan.caps
        raw = None
        if caps is not None:  # only when asked: the raw logits, before anything changes x in place
            raw = {c[5]: x[c[0]: c[0] + c[1]].to("cpu", copy=True) for c in caps if c[2].logits}
        if beams:  # beam search scores log-probabilities
            x[n:] = torch.log_softmax(x[n:], dim=-1)
        if plan.penalty is not None:
            self._penalize(x, *plan.penalty)
        if caps is not None:
            return self._with_captures(x, plan, raw)
        if len(plan.greedy) == n and not beams and x.device.type == "cpu" and n:
            # all greedy on a CPU (the common case): numpy's ban and argmax cost a third of torch's
            # on small batches; the same result (argmax: the first of equal maxima, NaN counts as max)
            xn = x.numpy()
            if plan.ban is not None:
                xn[plan.ban[0].numpy(), plan.ban[1].numpy()] = -np.inf
            return SamplerOutput(xn.argmax(-1).tolist(), [])
        if plan.ban is not None:  # eos before min_new_tokens, one indexed write for the whole batch
            x.index_put_(plan.ban, self._neg_inf)
        if len(plan.greedy) == n and not beams:  # all greedy (the common case): argmax, one copy back
            return SamplerOutput(x[:n].argmax(-1).tolist() if n else [], [])
        return self._choose(x, plan)

    def _with_captures(self, x, plan: _Plan, raw: dict) -> SamplerOutput:
        """The rest of the step for a batch where some request wants its scores on the host: the
        bans, the caller's processors (host), the processed scores as transformers returns them
        (after the warpers when sampling), then the usual choice."""
        if plan.ban is not None:
            x.index_put_(plan.ban, self._neg_inf)
        for at, k, cap, p, kind, slot in plan.caps:
            if cap.processors:
                run_host_processors(x, torch.arange(at, at + k, device=x.device), cap.input_ids, cap.processors)
        captured = [None] * (len(plan.rows) + len(plan.beams))
        for at, k, cap, p, kind, slot in plan.caps:
            sc = None
            if cap.scores:
                xs = x[at: at + k]
                if kind == "sampled" or (kind == "beam" and p.do_sample):
                    xs = _warp(xs, p, keep=1 if kind == "sampled" else 2)
                sc = xs.to("cpu", copy=True)
            captured[slot] = (sc, raw.get(slot))
        out = self._choose(x, plan)
        out.captured = captured
        return out

    def _choose(self, x, plan: _Plan) -> SamplerOutput:
        rows, beams = plan.rows, plan.beams
        n = len(rows)
        if len(plan.greedy) == n and not beams:
            return SamplerOutput(x[:n].argmax(-1).tolist() if n else [], [])
        parts = []
        if plan.greedy:
            xs = x[:n] if plan.greedy_idx is None else x.index_select(0, plan.greedy_idx)
            parts.append(xs.argmax(-1).double())
        if plan.sampled:
            xs = x.index_select(0, plan.sampled_idx)
            parts.append(self._sample(xs, [rows[i] for i in plan.sampled], plan))
        start = n
        for b, sc in zip(beams, plan.scores):
            k = len(b.logits_rows)
            top_lp, top_i = self._beam_candidates(x[start: start + k], b, sc)
            parts += [top_lp.double(), top_i.double()]
            start += k
        host = torch.cat(parts).cpu().tolist() if parts else []  # the step's one device-to-host copy
        tokens = [0] * n
        for i, t in zip(plan.greedy + plan.sampled, host[: n]):
            tokens[i] = int(t)
        out, at = [], n
        for b in beams:
            out.append((torch.tensor(host[at: at + b.keep], dtype=torch.float32),
                        torch.tensor(host[at + b.keep: at + 2 * b.keep], dtype=torch.long)))
            at += 2 * b.keep
        return SamplerOutput(tokens, out)

    @staticmethod
    def _penalize(x, rows, ids, pens) -> None:
        """transformers' RepetitionPenaltyLogitsProcessor: scores of tokens already seen are divided
        (positive) or multiplied (negative) by the penalty."""
        V = x.shape[1]
        rows = rows.long()
        seen = torch.zeros(rows.shape[0], V + 1, dtype=torch.bool, device=x.device)
        seen.scatter_(1, ids.long(), True)
        s = x[rows]
        pen = pens[:, None]
        x[rows] = torch.where(seen[:, :V], torch.where(s < 0, s * pen, s / pen), s)

    @staticmethod
    def _sample(x, rows: list[Row], plan: _Plan) -> torch.Tensor:
        """Temperature, top-k, top-p and one draw per row; works on each row's top_k scores only."""
        if any(r.params.temperature != 1.0 for r in rows):
            x = x / plan.temps[:, None]
        ks = plan.ks
        vals, ids = x.topk(max(ks), dim=-1)  # (s, K), sorted descending
        if min(ks) < vals.shape[1]:
            cut = torch.arange(vals.shape[1], device=x.device)[None, :] >= plan.ks_dev[:, None]
            vals = vals.masked_fill(cut, -math.inf)
        if any(r.params.top_p is not None and r.params.top_p < 1.0 for r in rows):
            # transformers' TopPLogitsWarper: ascending order, drop the tail whose mass is <= 1 - top_p,
            # always keep the best token
            cum = vals.flip(-1).softmax(-1).cumsum(-1)
            drop = cum <= (1 - plan.tops)[:, None]
            drop[:, -1] = False
            vals = vals.masked_fill(drop.flip(-1), -math.inf)
        probs = vals.softmax(-1)  # (s, K); cut tokens have probability 0
        noise = torch.ones_like(probs)
        for j, (r, k) in enumerate(zip(rows, ks)):
            noise[j, :k].exponential_(generator=r.generator)  # k draws per step: independent of the batch
        choice = (probs / noise.clamp_(min=torch.finfo(torch.float32).tiny)).argmax(-1, keepdim=True)
        tok = ids.gather(1, choice)[:, 0]
        return torch.where(torch.isfinite(vals[:, 0]), tok, -1).double()  # no finite score: the row fails

    @staticmethod
    def _beam_candidates(x, b: BeamGroup, running_scores: torch.Tensor):
        """The keep best (or, sampling, keep drawn) continuations over all k beams: (lp, flat index)."""
        p = b.params
        if p.do_sample:  # transformers warps beam scores too, keeping at least 2 tokens per beam
            x = _warp(x, p, keep=2)
        acc = (x + running_scores[:, None]).reshape(1, -1)  # (1, k*V)
        if p.do_sample:
            top_i = torch.multinomial(torch.softmax(acc, -1), b.keep, generator=b.generator)
            top_lp = acc.gather(1, top_i)
            top_lp, order = top_lp.sort(-1, descending=True)
            top_i = top_i.gather(-1, order)
        else:
            top_lp, top_i = torch.topk(acc, b.keep)
        return top_lp[0], top_i[0]


def _warp(x, p: SamplingParams, keep: int):
    """Temperature, top-k, top-p over the full vocabulary, as transformers' warpers (beam sampling)."""
    if p.temperature != 1.0:
        x = x / p.temperature
    V = x.shape[-1]
    if p.top_k:
        k = min(max(p.top_k, keep), V)
        x = x.masked_fill(x < torch.topk(x, k)[0][..., -1, None], -math.inf)
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(x, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - p.top_p)
        remove[..., -keep:] = False
        x = x.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)
    return x
