"""SamplingParams and token selection, numerically identical to transformers' `generate`.

The processors run in transformers' order (repetition penalty, min_new_tokens, then temperature,
top-k, top-p when sampling) on float32 logits, so greedy and beam search match token for token and
sampling draws from the same distribution (the same tokens too, given the same generator state).
"""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class SamplingParams:
    """How one request generates. Defaults follow transformers' GenerationConfig.

    max_new_tokens: new tokens at most (the prompt excluded). min_new_tokens: end-of-sequence is
    suppressed until this many. do_sample / temperature / top_k / top_p: sampling (top_k 0 = off,
    top_p 1.0 = off). repetition_penalty: > 1 penalises tokens already in the prompt or output.
    num_beams > 1: beam search with `length_penalty` and `early_stopping` as transformers.
    seed: per-request generator for reproducible sampling (None = the global torch RNG).
    stop_token_ids: end-of-sequence ids (None = the checkpoint's eos).
    num_return_sequences: with beam search, the best this-many beams are returned as candidates.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    num_return_sequences: int = 1  # beam search: how many of the best beams `RequestOutput.candidates` holds

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.length_penalty, (int, float)) and math.isfinite(self.length_penalty)):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive int, got {self.num_beams!r}")
        if self.num_beams > 1 and not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], got {self.num_return_sequences}")
        if self.num_beams == 1 and self.num_return_sequences != 1:
            raise ValueError("num_return_sequences > 1 needs beam search here; for several samples add several requests")


def process(logits: torch.Tensor, p: SamplingParams, history: list[list[int]], n_generated: list[int],
            eos: list[int], *, log_probs: bool = False) -> torch.Tensor:
    """Apply transformers' processors to `logits` [n, V] (float32). `history[i]` are the ids the
    repetition penalty looks at (prompt + generated), `n_generated[i]` the new tokens so far.
    log_probs=True: beam search, which processes log-softmaxed scores."""
    scores = torch.log_softmax(logits, dim=-1) if log_probs else logits
    V = scores.shape[-1]
    if p.repetition_penalty != 1.0:
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for i, h in enumerate(history):
            ids = torch.tensor([t for t in h if 0 <= t < V], dtype=torch.long, device=scores.device)
            mask[i, ids] = True
        pen = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        scores = torch.where(mask, pen, scores)
    if p.min_new_tokens > 0 and eos:
        early = [i for i, n in enumerate(n_generated) if n < p.min_new_tokens]
        ids = [e for e in eos if 0 <= e < V]
        if early and ids:
            scores = scores.clone()
            rows = torch.tensor(early, device=scores.device)[:, None]
            scores[rows, torch.tensor(ids, device=scores.device)[None, :]] = -math.inf
    if p.do_sample:
        keep = 2 if p.num_beams > 1 else 1  # beams keep a non-eos continuation
        if p.temperature != 1.0:
            scores = scores / p.temperature
        if p.top_k:
            k = min(max(p.top_k, keep), V)
            scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -math.inf)
        if p.top_p is not None and p.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(scores, descending=False)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cum <= (1 - p.top_p)
            remove[..., -keep:] = False
            scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)
    return scores


def select(scores: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax or one multinomial draw per row: [n, V] -> [n]."""
    if p.do_sample:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return torch.argmax(scores, dim=-1)
