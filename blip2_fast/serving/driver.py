"""The one thread that owns the engine. Nothing else calls add_request / step / abort.

The event loop hands it commands through a locked deque (`submit`, `abort`, `stop`) and wakes it
with a condition variable; idle, the thread sleeps on that condition (no polling). After each step
it posts what happened back to each request's asyncio.Queue with one `call_soon_threadsafe` per
event loop per step, so a step never waits on a socket and a socket never waits on a step.

A request's queue receives, in order: `Accepted` or `Rejected` (add_request's verdict), then
`Progress` items, the last one finished; or `Stopped` if the engine stops or dies first.

On a CPU whose cores torch's threads fill, a decode-only step (nothing waiting to be prefilled)
runs on one thread fewer: that is when the event loop is busiest, turning every step into one chunk
per stream, and a loop thread preempting one of the step's OpenMP threads stalls each of its
parallel regions (bench.serve, 16 streams on 2 cores: decode steps of 3.3 - 3.6 ms at one thread
against 4 - 7.5 ms at two beside the loop; 2.5 ms at two in-process, alone). Prefill steps keep
every thread (at one they were slower overall), and so does an idle engine: torch's thread count is
set for the process (MKL's with it), so other work in it is not left on fewer threads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections import deque

import torch


log = logging.getLogger("blip2_fast.serving")


@dataclasses.dataclass(frozen=True)
class Accepted:
    request_id: object


@dataclasses.dataclass(frozen=True)
class Rejected:
    request_id: object
    error: Exception  # what add_request raised (ValueError / TypeError: the client's input)


@dataclasses.dataclass(frozen=True)
class Stopped:
    request_id: object
    reason: str


@dataclasses.dataclass(frozen=True)
class Progress:
    """One engine output with its timing. inter_token: the gap before each of its new tokens."""

    output: object  # RequestOutput
    metrics: object  # RequestMetrics
    num_prompt_tokens: int
    error: str | None
    inter_token: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class _Add:
    request_id: object
    kwargs: dict
    num_prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineDriver:
    """Drive `engine` from a daemon thread. observer(progress: list[Progress], stats) runs on that
    thread after every step (keep it cheap: it is how /metrics learns what happened)."""

    def __init__(self, engine, *, observer=None, name: str = "blip2_fast-engine", decode_threads: int | None = None):
        """decode_threads: torch threads for decode-only steps (default: see the module docstring)."""
        self.engine = engine
        self._observer = observer
        self._threads = torch.get_num_threads()
        self._step_threads = None  # set before the first step, on the engine thread
        if decode_threads is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            fills = engine.model.device.type == "cpu" and self._threads >= cores
            decode_threads = self._threads - 1 if fills and self._threads > 1 else self._threads
        if not isinstance(decode_threads, int) or isinstance(decode_threads, bool) or decode_threads < 1:
            raise ValueError(f"decode_threads must be a positive int, got {decode_threads!r}")
        self._decode_threads = decode_threads
        self._cv = threading.Condition()
        self._cmds: deque = deque()
        self._pending_adds = 0
        self._accepting = True
        self._stopping = False
        self._live: dict[object, _Add] = {}  # engine thread only
        self._last_token: dict[object, float] = {}  # engine thread only
        self.error: BaseException | None = None
        self._snapshot = engine.stats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---- called from the event loop (or any thread) ------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._accepting

    @property
    def stats(self):
        """The engine's stats after its latest step (a snapshot; never touches the engine)."""
        return self._snapshot

    def num_waiting(self) -> int:
        """Requests not yet admitted: the engine's queue plus adds it has not taken yet."""
        with self._cv:
            return self._snapshot.num_waiting + self._pending_adds

    def submit(self, request_id, kwargs: dict, num_prompt_tokens: int, queue: asyncio.Queue) -> bool:
        """Queue `engine.add_request(request_id, **kwargs)`; its events go to `queue` on the calling
        event loop. False when the engine is not running (nothing was queued)."""
        add = _Add(request_id, kwargs, num_prompt_tokens, asyncio.get_running_loop(), queue)
        with self._cv:
            if not self._accepting:
                return False
            self._cmds.append(add)
            self._pending_adds += 1
            self._cv.notify()
        return True

    def abort(self, request_id) -> None:
        with self._cv:
            self._cmds.append(("abort", request_id))
            self._cv.notify()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort every request in flight, let their final outputs reach their queues, end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._iterate():
                    pass
        except BaseException as e:  # the engine itself failed: every request in flight ends with it
            self.error = e
            log.exception("the engine thread died; the server is no longer serving")
        finally:
            if self._step_threads is not None:
                self._use_threads(self._threads)
            with self._cv:
                self._accepting = False
                left = [c for c in self._cmds if isinstance(c, _Add)]
                self._cmds.clear()
            why = "the server is shutting down" if self.error is None else f"the engine failed ({self.error!r})"
            events = [(a, Stopped(a.request_id, why)) for a in left]
            events += [(a, Stopped(rid, why)) for rid, a in self._live.items()]
            self._live.clear()
            self._deliver(events)

    def _iterate(self) -> bool:
        eng = self.engine
        with self._cv:
            while not self._cmds and not self._stopping and not eng.has_unfinished():
                self._cv.wait()
            cmds = list(self._cmds)
            self._cmds.clear()
            stopping = self._stopping
        events = []
        n_adds = 0
        for c in cmds:
            if isinstance(c, _Add):
                n_adds += 1
                events.append((c, self._add(c)))
            elif c[1] in self._live:
                eng.abort(c[1])
        if stopping:
            for rid in list(self._live):
                eng.abort(rid)
        progress = []
        if eng.has_unfinished():
            # decode-only unless something waits to be prefilled: queued before the last step
            # (or preempted in it), or added just now
            prefill = n_adds > 0 or self._snapshot.num_waiting > 0
            self._use_threads(self._threads if prefill else self._decode_threads)
            outs = eng.step()
            for out in outs:
                add = self._live.get(out.request_id)
                if add is None:
                    continue  # not ours (an engine shared with direct callers)
                p = self._progress(out)
                progress.append(p)
                events.append((add, p))
                if out.finished:
                    del self._live[out.request_id]
        if not eng.has_unfinished():  # idle: every thread again (torch's count is the process's, MKL's too)
            self._use_threads(self._threads)
        stats = eng.stats()
        with self._cv:
            self._snapshot = stats
            self._pending_adds -= n_adds
        if self._observer is not None:  # before delivery: a client that saw its answer sees it counted
            self._observer(progress, stats)
        self._deliver(events)
        return not (stopping and not self._live)

    def _use_threads(self, n: int) -> None:
        if n != self._step_threads:
            torch.set_num_threads(n)
            self._step_threads = n

    def _add(self, c: _Add):
        try:
            self.engine.add_request(c.request_id, **c.kwargs)
        except (ValueError, TypeError) as e:  # bad input fails this request only
            return Rejected(c.request_id, e)
        self._live[c.request_id] = c
        return Accepted(c.request_id)

    def _progress(self, out) -> Progress:
        m, n_prompt, error = out.metrics, out.num_prompt_tokens, out.error
        gaps = ()
        prev = self._last_token.get(out.request_id)
        if out.new_token_ids and m.last_token_time is not None:
            if prev is not None:
                gaps = ((m.last_token_time - prev) / len(out.new_token_ids),) * len(out.new_token_ids)
            self._last_token[out.request_id] = m.last_token_time
        if out.finished:
            self._last_token.pop(out.request_id, None)
        return Progress(out, m, n_prompt, error, gaps)

    @staticmethod
    def _deliver(events) -> None:
        by_loop: dict = {}
        for add, item in events:
            by_loop.setdefault(add.loop, []).append((add.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)
