"""SamplingParams: how one request generates, checked at the door with exact types and ranges.

Argument checks shared by `Engine`, `add_request` and `generate()` live here too (`check_int`,
`check_real`, `check_bool`), so every entry point refuses the same inputs with the same message: a
TypeError for a wrong type (an int must be an int: 2.5, '3' and True are refused), a ValueError for
a value out of range, each naming the argument.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

SEED_LIMIT = 2**64  # torch generators take 64-bit seeds


def check_int(name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    """`v` as an int, which it must be (numpy integers too, never bools or floats), in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise ValueError(f"{name} must be {'in ' if lo is not None and hi is not None else ''}{rng}, got {v}")
    return v


def check_real(name: str, v) -> float:
    """`v` as a finite float (ints allowed, never bools or strings)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")
    return v


def check_ids(name: str, ids, vocab: int | None = None) -> list[int]:
    """A list of token ids: ints in [0, vocab) (an int alone is one id; strings are refused)."""
    if isinstance(ids, (str, bytes)) or not (isinstance(ids, numbers.Integral) or hasattr(ids, "__iter__")):
        raise TypeError(f"{name} must be a token id or a list of token ids (ints), got {type(ids).__name__} {ids!r}")
    ids = [ids] if isinstance(ids, numbers.Integral) else list(ids)
    hi = None if vocab is None else vocab - 1
    return [check_int(f"{name}[{i}]", t, 0, hi if hi is not None else 2**63 - 1) for i, t in enumerate(ids)]


# sampling divides the logits by the temperature: below this they overflow float32 (1e-45 made inf - inf)
MIN_TEMPERATURE = 1e-3


@dataclasses.dataclass
class SamplingParams:
    """How one request generates. Defaults follow transformers' GenerationConfig.

    max_new_tokens: new tokens at most (the prompt excluded); a request also stops at the engine's
    max_model_len. min_new_tokens: end-of-sequence is suppressed until this many.
    do_sample / temperature / top_k / top_p: sampling (top_k 0 or None = off, top_p 1.0 = off;
    temperature >= 1e-3 when sampling). repetition_penalty: > 1 penalises tokens already in the
    prompt or output. num_beams > 1: beam search with `length_penalty` and `early_stopping` as
    transformers. seed: the request's own generator, in [0, 2**64) (None: a seed drawn from the
    global torch RNG when the request is added, so `torch.manual_seed` reproduces it); a request's
    samples depend only on its seed, never on which requests share its batch.
    stop_token_ids: end-of-sequence ids, in the vocabulary (None = the checkpoint's eos).
    num_return_sequences: with beam search, the best this-many beams are returned as candidates.
    no_repeat_ngram_size / bad_words_ids / suppress_tokens: bans as transformers' NoRepeatNGram,
    NoBadWords and SuppressTokens processors make them (on the fast path: ids banned with eos).
    logits_processors / stopping_criteria: transformers-style callables `f(input_ids [rows, L],
    scores [rows, V]) -> scores` (after the bans, before the sampling warpers) and `f(input_ids,
    scores) -> bool [rows]` (stop there), run on the host per request and step: slower.
    output_scores / output_logits: keep each step's processed scores / raw logits on the host
    (`RequestOutput.scores` / `.logits`), only when asked.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    num_return_sequences: int = 1  # beam search: how many of the best beams `RequestOutput.candidates` holds
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    suppress_tokens: list[int] | None = None
    logits_processors: tuple = ()
    stopping_criteria: tuple = ()
    output_scores: bool = False
    output_logits: bool = False

    def validate(self, vocab: int | None = None) -> None:
        """Check every field (exact types, ranges) and normalise it in place (numpy ints -> int,
        ints -> float where a float is meant); stop ids are checked against `vocab` when given."""
        self.max_new_tokens = check_int("max_new_tokens", self.max_new_tokens, 1)
        self.min_new_tokens = check_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
        self.do_sample = check_bool("do_sample", self.do_sample)
        self.temperature = check_real("temperature", self.temperature)
        if self.do_sample and self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be >= {MIN_TEMPERATURE} when sampling, got {self.temperature} "
                             "(for greedy decoding use do_sample=False)")
        if self.top_k is not None:
            self.top_k = check_int("top_k", self.top_k, 0)
        if self.top_p is not None:
            self.top_p = check_real("top_p", self.top_p)
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.repetition_penalty = check_real("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.num_beams = check_int("num_beams", self.num_beams, 1)
        self.length_penalty = check_real("length_penalty", self.length_penalty)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.seed is not None:
            self.seed = check_int("seed", self.seed, 0, SEED_LIMIT - 1)
        if self.stop_token_ids is not None:
            self.stop_token_ids = check_ids("stop_token_ids", self.stop_token_ids, vocab)
        self.num_return_sequences = check_int("num_return_sequences", self.num_return_sequences, 1)
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], got {self.num_return_sequences}")
        if self.num_beams == 1 and self.num_return_sequences != 1:
            raise ValueError("num_return_sequences > 1 needs beam search here; for several samples add several requests")
        self.no_repeat_ngram_size = check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if self.suppress_tokens is not None:
            self.suppress_tokens = check_ids("suppress_tokens", self.suppress_tokens, vocab)
        if self.bad_words_ids is not None:
            words = self.bad_words_ids
            if isinstance(words, (str, bytes)) or not isinstance(words, (list, tuple)) or not words:
                raise ValueError(f"bad_words_ids must be a non-empty list of lists of token ids, got {words!r}")
            self.bad_words_ids = []
            for i, w in enumerate(words):
                if isinstance(w, (str, bytes)) or not isinstance(w, (list, tuple)) or not w:
                    raise ValueError(f"bad_words_ids[{i}] must be a non-empty list of token ids, got {w!r}")
                self.bad_words_ids.append(check_ids(f"bad_words_ids[{i}]", w, vocab))
        for name in ("logits_processors", "stopping_criteria"):
            fs = getattr(self, name)
            fs = () if fs is None else (fs,) if callable(fs) else fs
            if isinstance(fs, (str, bytes)) or not hasattr(fs, "__iter__"):
                raise TypeError(f"{name} must be a list of callables, got {type(fs).__name__}")
            fs = tuple(fs)
            bad = [i for i, f in enumerate(fs) if not callable(f)]
            if bad:
                raise TypeError(f"{name}[{bad[0]}] must be callable (input_ids, scores), got {type(fs[bad[0]]).__name__}")
            setattr(self, name, fs)
        self.output_scores = check_bool("output_scores", self.output_scores)
        self.output_logits = check_bool("output_logits", self.output_logits)

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: the next token is the argmax of the logits (banned ids aside:
        eos before min_new_tokens, n-gram / bad-word / suppressed ids)."""
        return (self.num_beams == 1 and not self.do_sample and self.repetition_penalty == 1.0 and not self.on_host)

    @property
    def on_host(self) -> bool:
        """Whether a step of this request needs its scores on the host (user processors, stopping
        criteria, or scores / logits to return)."""
        return bool(self.logits_processors or self.stopping_criteria or self.output_scores or self.output_logits)
