"""Logits processing beyond the sampler's built-in steps, as transformers' processors do it.

`BanRules`: the ids transformers' NoRepeatNGram, NoBadWords and SuppressTokens processors set to
-inf, worked out on the host from a sequence's ids (a few list operations per step) and banned on
the device with the eos ban, in the sampler's one indexed write: the fast path, greedy head
included. `run_host_processors` / `hits_stop`: a caller's own `logits_processor` and
`stopping_criteria` lists, called on the host with each request's rows (slower: the rows travel
to the host and back every step).
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class BanRules:
    """One request's bans: `static` every step, n-grams and multi-token bad words from its ids."""

    static: tuple[int, ...]  # suppress_tokens and one-token bad words
    ngram: int  # no_repeat_ngram_size; 0: off
    words: tuple[tuple[int, ...], ...]  # bad words of two or more tokens: the last is banned after the rest

    @classmethod
    def of(cls, p, eos: tuple[int, ...]) -> BanRules | None:
        """The rules of SamplingParams `p` (None when it bans nothing). As NoBadWordsLogitsProcessor,
        a one-token bad word that is an eos id is dropped (min_new_tokens owns that ban)."""
        static = list(p.suppress_tokens or ())
        words = []
        for w in p.bad_words_ids or ():
            if len(w) == 1:
                if w[0] not in eos:
                    static.append(w[0])
            else:
                words.append(tuple(w))
        if not static and not p.no_repeat_ngram_size and not words:
            return None
        return cls(tuple(dict.fromkeys(static)), p.no_repeat_ngram_size, tuple(words))

    @property
    def dynamic(self) -> bool:
        return bool(self.ngram or self.words)

    def now(self, ids: list[int]) -> tuple[int, ...]:
        """The ids banned as the next token after `ids` (what transformers' processors see as the
        row's input_ids: the prompt and the generated tokens; T5: the decoder's)."""
        if not self.dynamic:
            return self.static
        out = list(self.static)
        n, L = self.ngram, len(ids)
        if n and L + 1 >= n:  # NoRepeatNGram: every token that completed the current (n-1)-gram before
            tail = ids[L - n + 1:] if n > 1 else []
            for i in range(L - n + 1):
                if ids[i: i + n - 1] == tail:
                    out.append(ids[i + n - 1])
        for w in self.words:  # NoBadWords: the last token of a word whose other tokens end `ids`
            m = len(w) - 1
            if L >= m and tuple(ids[L - m:]) == w[:-1]:
                out.append(w[-1])
        return tuple(out)


def run_host_processors(x: torch.Tensor, rows: torch.Tensor, input_ids: list[list[int]], processors) -> None:
    """Apply transformers-style `processors` (f(input_ids [r, L], scores [r, V]) -> scores) to the
    rows `rows` of x (float32 [n, V], on the device) in place, on the host."""
    ids = torch.tensor(input_ids, dtype=torch.long)
    s = x.index_select(0, rows).cpu()
    for f in processors:
        s = f(ids, s)
        if not isinstance(s, torch.Tensor) or s.shape != (len(input_ids), x.shape[1]):
            raise ValueError(f"logits processor {type(f).__name__} returned {type(s).__name__} "
                             f"{list(getattr(s, 'shape', []))}; expected scores [{len(input_ids)}, {x.shape[1]}]")
    x.index_copy_(0, rows, s.to(x.device, torch.float32))


def hits_stop(criteria, input_ids, scores) -> torch.Tensor:
    """Which rows of `input_ids` (a [r, L] tensor) a caller's stopping criteria stop: bool [r]."""
    hit = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for c in criteria:
        h = c(input_ids, scores)
        hit |= torch.as_tensor(h, dtype=torch.bool).cpu().reshape(-1).expand(input_ids.shape[0])
    return hit
