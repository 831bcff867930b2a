"""The engine's state objects: one `Request` per `add_request`, one `Sequence` per generated stream
(one per beam), and the `Layout` that says how a request's positions map onto the KV cache for
decoder-only (OPT) and encoder-decoder (T5) models. Plain bookkeeping: no tensor math."""
from __future__ import annotations

import dataclasses
import enum
import itertools

import torch

from .beam import BeamState
from .outputs import RequestMetrics
from .params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclasses.dataclass(eq=False, slots=True)
class Sequence:
    """One stream of tokens in the paged KV cache: the block manager's key (by identity) and one row
    of a decode batch. T5's per-request encoder K/V is a Sequence too (`Request.cross`)."""

    request: Request
    block_table: list[int] = dataclasses.field(default_factory=list)  # the block manager's own list: read only
    next_token: int = -1  # fed at the next decode step; its KV is not cached yet
    position: int = -1  # next_token's position; set with `slot` when the scheduler reserves the step
    slot: int = -1
    uid: int = dataclasses.field(default_factory=lambda: next(_ids))
    table_row: object = None  # the runner's int32 copy of block_table (ModelRunner._table_rows) ...
    table_row_len: int = 0  # ... and the table length it was made for

    def __repr__(self) -> str:
        return f"Sequence({self.request.request_id!r}, #{self.uid})"


@dataclasses.dataclass(eq=False, slots=True)
class Request:
    """Everything the engine owns about one request, from add_request until its last output."""

    request_id: object
    order: int  # arrival order: admission is first come first served, preemption newest first
    params: SamplingParams
    prompt_ids: tuple[int, ...]  # the prompt as given (image tokens included): penalties, T5 prefix keys
    lm_tokens: tuple[int, ...]  # token id of every prompt position of the LM (T5: encoder); -1 = image query
    keys: tuple  # block-manager key of every prompt position (image queries: ("img", digest, j))
    digest: str  # the image's content hash (+ its interpolation flag)
    pixels: torch.Tensor  # the engine's own copy of the image [3, H, W]
    interpolate: bool
    eos: tuple[int, ...]
    ban_ids: tuple[int, ...]  # the eos ids inside the vocabulary: what min_new_tokens bans
    pad: int | None
    max_tokens: int  # tokens it may generate: max_new_tokens, or fewer where max_model_len stops it
    generator: torch.Generator | None
    arrival_time: float
    greedy: bool = False  # params.plain_greedy, read every step
    status: Status = Status.WAITING
    generated: list[int] = dataclasses.field(default_factory=list)
    seqs: list[Sequence] = dataclasses.field(default_factory=list)  # live KV streams (beams)
    cross: Sequence | None = None  # T5: the encoder's K/V
    num_cached: int = 0  # prompt positions whose KV the prefix cache held at admission
    cross_cached: int = 0
    beam: BeamState | None = None
    candidates: list[list[int]] | None = None
    finish_reason: str | None = None
    error: str | None = None
    emitted: int = 0  # generated tokens already handed out
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    sink: object = None  # stream(): a deque every output of this request is appended to
    bans: object = None  # processors.BanRules: n-gram / bad-word / suppressed ids, or None
    watch: bool = False  # the caller's stopping criteria are checked after each token (host)
    step_scores: list | None = None  # output_scores: each step's processed scores [rows, V] (host)
    step_logits: list | None = None  # output_logits: each step's raw logits [rows, V] (host)
    candidate_scores: list[float] | None = None  # beam search: each candidate's final score
    beam_indices: list[list[int]] | None = None  # beam search: per candidate, the beam of each token

    @property
    def n_prompt(self) -> int:
        return len(self.lm_tokens)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def num_seqs(self) -> int:
        """Sequences this request decodes at once (a beam search: num_beams)."""
        return self.params.num_beams

    def metrics(self) -> RequestMetrics:
        return RequestMetrics(*self.timeline())

    def timeline(self) -> tuple:
        """RequestMetrics' fields now, as a tuple (an output snapshots it; the object is made when read)."""
        return (self.arrival_time, self.first_scheduled_time, self.first_token_time, self.last_token_time,
                self.finished_time)

    def reset_generator(self) -> None:
        if self.generator is not None:
            self.generator.manual_seed(self.params.seed)


class DecoderOnly:
    """OPT: the prompt (image queries included) and the generated tokens share one KV stream."""

    cross = False

    def seq_keys(self, r: Request) -> list:
        n = r.n_prompt  # generated tokens are keyed (token, position), as the scheduler appends them
        return list(r.keys) + [(t, n + i) for i, t in enumerate(r.generated)]

    def cross_keys(self, r: Request) -> list:
        return []

    def lm_len(self, r: Request) -> int:
        """Positions the request occupies in the model once its generated tokens are cached."""
        return r.n_prompt + len(r.generated)

    def prefix(self, r: Request) -> list[int]:
        """What transformers' beam search and repetition penalty see before the new tokens."""
        return list(r.prompt_ids)


class EncoderDecoder:
    """T5: the prompt goes through the encoder (its K/V in a cross stream); the decoder stream starts
    with the decoder start token."""

    cross = True

    def __init__(self, decoder_start: int):
        self.decoder_start = decoder_start

    def seq_keys(self, r: Request) -> list:
        # the decoder's K/V depend on the whole encoder input, so only identical prompts share them
        return [("dec", r.digest, r.prompt_ids)] + [(t, 1 + i) for i, t in enumerate(r.generated)]

    def cross_keys(self, r: Request) -> list:
        # the encoder is bidirectional: every position's K/V depend on the whole prompt
        whole = (r.digest, r.prompt_ids)
        return [("enc", whole, i) for i in range(r.n_prompt)]

    def lm_len(self, r: Request) -> int:
        return 1 + len(r.generated)

    def prefix(self, r: Request) -> list[int]:
        return [self.decoder_start]
