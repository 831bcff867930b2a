"""What the engine hands out: per-request outputs with their timings, and engine-wide counters."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """One request's timeline; all times are time.monotonic() seconds."""

    arrival_time: float  # add_request accepted it
    first_scheduled_time: float | None  # first admitted into a step (queue time = this - arrival_time)
    first_token_time: float | None  # its first generated token was produced
    last_token_time: float | None  # its latest token
    finished_time: float | None



@dataclasses.dataclass(frozen=True)
class EngineStats:
    """`Engine.stats()`: a snapshot, taken without any device sync."""

    num_running: int  # admitted, unfinished requests
    num_waiting: int  # queued requests not yet admitted (including preempted ones)
    num_blocks: int
    num_free_blocks: int
    num_preemptions: int  # cumulative since the engine was built
    prompt_tokens: int  # cumulative prompt positions of admitted requests (image queries included), once per request
    generation_tokens: int  # cumulative generated tokens (beam search: those of the returned best beam)
    image_cache_hits: int  # cumulative
    image_cache_misses: int  # cumulative (images that had to be encoded)
    image_encode_seconds: tuple[float, ...]  # wall time of each image-encode batch since the previous stats() call


class _LazyMetrics:
    """`RequestOutput.metrics`: the engine stores a snapshot tuple of the request's timeline; the
    RequestMetrics is made from it when first read (a step makes an output per request)."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return None
        m = obj.__dict__.get("_metrics")
        if isinstance(m, tuple):
            m = obj.__dict__["_metrics"] = RequestMetrics(*m)
        return m

    def __set__(self, obj, value):
        obj.__dict__["_metrics"] = value


class _LazyText:
    """`RequestOutput.text`: decoded from token_ids by the engine's tokenizer when first read.

    A descriptor-typed dataclass field: `RequestOutput(..., text=...)`, `dataclasses.asdict` and ==
    see it as an ordinary field; the class-level read gives the default, None."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return None
        d = obj.__dict__
        if d.get(self.slot) is None and d.get("_tokenizer") is not None:
            d[self.slot] = d.pop("_tokenizer").decode(obj.token_ids, skip_special_tokens=True)
        return d.get(self.slot)

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value
        obj.__dict__.pop("_tokenizer", None)


@dataclasses.dataclass
class RequestOutput:
    """One request's state after a step.

    `text` is `token_ids` decoded by the engine's tokenizer (None without one), decoded when first
    read, so a step costs no detokenisation nobody asked for. Pickling or deep-copying an output
    carries the decoded text, never the tokenizer.
    """

    request_id: object
    token_ids: list[int]  # generated so far, prompt excluded (beam search: the best beam, at the end)
    new_token_ids: list[int]  # generated since the previous output of this request
    finished: bool
    finish_reason: str | None = None  # "stop" (eos/stop token), "length", "abort", "error"
    text: str | None = _LazyText()
    candidates: list[list[int]] | None = None  # beam search: the best num_return_sequences beams, best first
    metrics: RequestMetrics | None = _LazyMetrics()
    num_prompt_tokens: int | None = None  # prompt positions including the image query tokens
    error: str | None = None  # with finish_reason "error": what went wrong
    # in the final output, when SamplingParams asked (output_scores / output_logits): per step, the
    # processed scores / raw logits [rows, V] on the host (rows: 1, or the running beams)
    scores: tuple | None = None
    logits: tuple | None = None
    candidate_scores: list[float] | None = None  # beam search: each candidate's final (length-penalised) score
    beam_indices: list[list[int]] | None = None  # beam search: per candidate, the beam (0..k-1) of each new token

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}
        state["_text"] = self.text
        state["_metrics"] = self.metrics
        return state

    @classmethod
    def _of(cls, request_id, token_ids, new_token_ids, finished, finish_reason, candidates, metrics,
            num_prompt_tokens, error, tokenizer) -> RequestOutput:
        """The engine's constructor (one output per request per step): fields set directly, `text`
        left to decode from token_ids with `tokenizer` when first read (None: text stays None),
        `metrics` given as RequestMetrics' fields in a tuple (the object is made when read)."""
        out = object.__new__(cls)
        out.__dict__ = {"request_id": request_id, "token_ids": token_ids, "new_token_ids": new_token_ids,
                        "finished": finished, "finish_reason": finish_reason, "_text": None, "candidates": candidates,
                        "_metrics": metrics, "num_prompt_tokens": num_prompt_tokens, "error": error}
        if tokenizer is not None:
            out.__dict__["_tokenizer"] = tokenizer
        return out

    @classmethod
    def _decoded_later(cls, tokenizer, *args, **kwargs) -> RequestOutput:
        out = cls(*args, **kwargs)
        if tokenizer is not None and out.text is None:
            out.__dict__["_tokenizer"] = tokenizer
        return out
