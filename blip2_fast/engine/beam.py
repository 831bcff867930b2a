"""Beam search state for one request, step for step the arithmetic of transformers' `_beam_search`
(batch of one): top-2k continuations over all beams, finished hypotheses scored with
`length_penalty`, the same early-stopping heuristic, and the same final selection.

The selection of the 2k candidates runs on the device with the rest of the batch (`Sampler`);
this host-side bookkeeping only sees those candidates."""
from __future__ import annotations

import torch

from .params import SamplingParams


class BeamState:
    def __init__(self, p: SamplingParams, prompt_ids: list[int], eos: list[int], pad: int, max_len_total: int):
        k = p.num_beams
        self.p, self.k = p, k
        self.eos = torch.tensor(eos or [], dtype=torch.long)
        self.prompt_len = len(prompt_ids)
        self.max_length = max_len_total  # prompt + max_new_tokens, as transformers' max_length
        self.keep = max(2, 1 + len(eos or [])) * k
        L = self.max_length
        fill = pad if pad is not None else (eos[0] if eos else -1)
        self.running = torch.full((k, L), fill, dtype=torch.long)
        self.running[:, : self.prompt_len] = torch.tensor(prompt_ids, dtype=torch.long)
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros(k)
        self.running_scores[1:] = -1e9
        self.scores = torch.full((k,), -1e9)
        self.finished = torch.zeros(k, dtype=torch.bool)
        self.heuristic_unsatisfied = True
        self.running_idx = torch.full((k, L - self.prompt_len), -1, dtype=torch.long)
        self.idx = self.running_idx.clone()
        self.cur_len = self.prompt_len
        self.top_mask = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(self.keep - k, dtype=torch.bool)])
        self.done = False

    def history(self) -> list[list[int]]:
        return [r[: self.cur_len].tolist() for r in self.running]

    def step(self, top_lp: torch.Tensor, top_i: torch.Tensor, V: int, stop=None) -> tuple[list[int], list[int]]:
        """The `keep` best continuations of this step, best first (from `Sampler`): their summed
        log-probabilities top_lp [keep] (float32) and flat indices top_i [keep] into the running
        beams' [k, V] scores. Returns, for the next running beams, (parent beam index, new token)
        each; sets `done` when the search is over. `stop`: the caller's stopping criteria, called
        with the candidates' ids [keep, cur + 1] (bool [keep]: True ends that candidate)."""
        k = self.k
        cur, P = self.cur_len, self.prompt_len
        beam, tok = top_i // V, top_i % V
        top_seqs = self.running[beam].clone()
        top_seqs[:, cur] = tok
        top_idx = self.running_idx[beam].clone()
        top_idx[:, cur - P] = beam
        hits = torch.isin(tok, self.eos) | (cur + 1 >= self.max_length)
        if stop is not None:
            hits = hits | stop(top_seqs[:, : cur + 1])
        # running beams for the next step: the best k that did not stop
        run_lp = top_lp + hits.float() * -1e9
        nxt = torch.topk(run_lp, k)[1]
        self.running, self.running_scores, self.running_idx = top_seqs[nxt], run_lp[nxt], top_idx[nxt]
        # finished hypotheses: merge the newly finished among the top k with the kept ones
        just = hits & self.top_mask
        fin_lp = top_lp / ((cur + 1 - P) ** self.p.length_penalty)
        if bool(self.finished.all()) and self.p.early_stopping is True:
            fin_lp = fin_lp - 1e9
        if not self.heuristic_unsatisfied:
            fin_lp = fin_lp - 1e9
        fin_lp = fin_lp + (~just).float() * -1e9
        m_seq = torch.cat([self.sequences, top_seqs])
        m_sc = torch.cat([self.scores, fin_lp])
        m_idx = torch.cat([self.idx, top_idx])
        m_fin = torch.cat([self.finished, just])
        best = torch.topk(m_sc, k)[1]
        self.sequences, self.scores, self.idx, self.finished = m_seq[best], m_sc[best], m_idx[best], m_fin[best]
        self.cur_len = cur + 1
        # transformers' early-stopping heuristic and loop condition
        if self.p.early_stopping == "never" and self.p.length_penalty > 0.0:
            best_len = self.max_length - P
        else:
            best_len = self.cur_len - P
        best_running = self.running_scores[0] / (best_len ** self.p.length_penalty)
        worst_fin = torch.where(self.finished, self.scores.min(), torch.tensor(-1e9))
        self.heuristic_unsatisfied = self.heuristic_unsatisfied and bool((best_running > worst_fin).any())
        open_beam = not (bool(self.finished.all()) and self.p.early_stopping is True)
        valid = not bool(hits.all())
        self.done = not (self.heuristic_unsatisfied and open_beam and valid)
        parents = self.running_idx[:, cur - P].tolist()
        return parents, self.running[:, cur].tolist()

    def result_beams(self, i: int = 0) -> list[int]:
        """The beam (0..k-1) each of the i-th best sequence's new tokens came from, as transformers'
        beam_indices (without the batch offset)."""
        n = int((self.idx[i] + 1).bool().sum())
        return self.idx[i, :n].tolist()

    def result(self, i: int = 0) -> list[int]:
        """The i-th best finished sequence's new tokens (what transformers returns after the prompt)."""
        n = int((self.idx[i] + 1).bool().sum())
        return self.sequences[i, self.prompt_len: self.prompt_len + n].tolist()
