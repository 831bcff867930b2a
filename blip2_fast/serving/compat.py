"""Fallback for an engine without the stats interface (/work notes: ENGINE_STATS.md): `Engine.stats()`,
`RequestOutput.metrics / num_prompt_tokens / error`. With that interface both functions below pass
its values straight through; without it they rebuild them from the driver's own timestamps and
counts. Delete this file once every engine has the interface: `observe` becomes
`(out.metrics, out.num_prompt_tokens, out.error)` and `stats` becomes `engine.stats()`.

What the fallback cannot know, it approximates: a request is "scheduled" at the start of the step
that returns its first output and its tokens arrive at that step's end; a preempted request still
counts as running; image cache hits, misses and encode times are not visible (0 and empty).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RequestMetrics:  # the engine's RequestMetrics, field for field
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass(frozen=True)
class EngineStats:  # the engine's EngineStats, field for field
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    image_cache_hits: int
    image_cache_misses: int
    image_encode_seconds: tuple[float, ...]


class Book:
    """What the fallback keeps: per request id its metrics and prompt size; cumulative token counts."""

    def __init__(self):
        self.requests: dict[object, tuple[RequestMetrics, int]] = {}
        self.prompt_tokens = self.generation_tokens = 0

    def added(self, request_id, arrival_time: float, num_prompt_tokens: int) -> None:
        self.requests[request_id] = (RequestMetrics(arrival_time), num_prompt_tokens)


def observe(book: Book, out, step_start: float, step_end: float):
    """One RequestOutput -> (metrics, num_prompt_tokens, error)."""
    if getattr(out, "metrics", None) is not None:
        book.requests.pop(out.request_id, None)
        return out.metrics, out.num_prompt_tokens, getattr(out, "error", None)
    m, n_prompt = book.requests[out.request_id]
    if m.first_scheduled_time is None and not (out.finished and out.finish_reason == "abort" and not out.token_ids):
        m = dataclasses.replace(m, first_scheduled_time=step_start)
        book.prompt_tokens += n_prompt
    if out.new_token_ids:
        book.generation_tokens += len(out.new_token_ids)
        m = dataclasses.replace(m, last_token_time=step_end, first_token_time=m.first_token_time or step_end)
    if out.finished:
        m = dataclasses.replace(m, finished_time=step_end)
        book.requests.pop(out.request_id)
    else:
        book.requests[out.request_id] = (m, n_prompt)
    return m, n_prompt, getattr(out, "error", None)


def stats(engine, book: Book) -> EngineStats:
    if callable(getattr(engine, "stats", None)):
        return engine.stats()
    waiting = sum(1 for m, _ in book.requests.values() if m.first_scheduled_time is None)
    return EngineStats(num_running=len(book.requests) - waiting, num_waiting=waiting, num_blocks=engine.num_blocks,
                       num_free_blocks=engine.num_free_blocks,
                       num_preemptions=int(getattr(engine, "num_preemptions", 0)),
                       prompt_tokens=book.prompt_tokens, generation_tokens=book.generation_tokens,
                       image_cache_hits=0, image_cache_misses=0, image_encode_seconds=())
