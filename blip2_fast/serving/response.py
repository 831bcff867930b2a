"""One HTTP request's engine requests -> an OpenAI response, or a stream of server-sent events.

A `Run` owns the engine requests behind one HTTP request (one per choice, or one beam search for
all its choices), consumes the driver's events from its queue, keeps each choice's text
(`ChoiceText`), aborts what is no longer wanted, and renders OpenAI's objects.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from .driver import Accepted, Progress, Rejected, Stopped
from .errors import APIError, bad_request
from .protocol import Job
from .text import ChoiceText

log = logging.getLogger("blip2_fast.serving")
# one encoder for every chunk: json.dumps with options builds a new JSONEncoder per call
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class EventStream(StreamingResponse):
    def __init__(self, run, **kw):
        super().__init__(run.sse(), **kw)
        self.run = run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            # a server whose send() raises on a closed socket (ASGI spec 2.4) leaves the generator
            # suspended, and one that never started it never runs its `finally`: abort here either way
            await self.body_iterator.aclose()
            self.run.abort()


class _Choice:
    def __init__(self, index: int, engine_id, candidate: int | None, stop):
        self.index, self.engine_id, self.candidate = index, engine_id, candidate
        self.text = ChoiceText(stop)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.pending = ""  # text not yet streamed
        self.reported = False  # its finish_reason was streamed
        self.sent_role = False


class Run:
    """One HTTP request's engine requests (one per choice, or one beam search for all choices)."""

    def __init__(self, server, rid: str, job: Job, n_engine: int, n_prompt: int, t0: float):
        self.server, self.rid, self.job, self.t0 = server, rid, job, t0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine_ids = [f"{rid}-{i}" for i in range(n_engine)]
        if n_engine == 1 and job.n > 1:  # beam search: the choices are its candidates
            self.choices = [_Choice(i, self.engine_ids[0], i, job.stop) for i in range(job.n)]
        else:
            self.choices = [_Choice(i, eid, None, job.stop) for i, eid in enumerate(self.engine_ids)]
        self.num_prompt_tokens = n_prompt
        self.verdicts: dict = {}
        self.open = set(self.engine_ids)  # engine requests not finished
        self.stopped: str | None = None  # why the engine stopped under us
        self.created = int(time.time())
        # a stream chunk is this head, the choices, this tail: the same bytes as the whole object
        # serialized (the head's fields are fixed for the request), without rebuilding them per token
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        head = _dumps({"id": rid, "object": obj, "created": self.created, "model": server.model_name})
        self._head = f"data: {head[:-1]},\"choices\":"
        self._tail = ',"usage":null}\n\n' if job.include_usage else "}\n\n"

    # ---- events ----------------------------------------------------------------------------------
    async def wait_accepted(self) -> None:
        try:
            while len(self.verdicts) < len(self.engine_ids):
                self._handle([await self.queue.get()])
        except BaseException:
            self.abort()
            raise
        rejected = [v for v in self.verdicts.values() if isinstance(v, Rejected)]
        if rejected:
            self.abort()
            raise bad_request(str(rejected[0].error))
        if self.stopped:
            raise APIError(503, f"the engine is not running: {self.stopped}", code="engine_not_running")

    async def _next(self) -> None:
        """Wait for events, then take every event already queued (a client slower than the engine
        gets one chunk with several tokens, not a backlog)."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        self._handle(items)

    def _handle(self, items) -> None:
        latest = {}
        for it in items:
            if isinstance(it, (Accepted, Rejected)):
                self.verdicts[it.request_id] = it
            elif isinstance(it, Stopped):
                self.verdicts.setdefault(it.request_id, it)
                self.open.discard(it.request_id)
                self.stopped = it.reason
            elif isinstance(it, Progress):
                latest[it.output.request_id] = it  # outputs are cumulative: the newest says it all
        for eid, p in latest.items():
            self._progress(eid, p)
        if self.stopped:
            for c in self.choices:
                if c.finish_reason is None:
                    c.finish_reason, c.error = "error", f"the engine stopped: {self.stopped}"

    def _progress(self, eid, p: Progress) -> None:
        out = p.output
        if out.finished:
            self.open.discard(eid)
        for c in self.choices:
            if c.engine_id != eid or c.finish_reason is not None:
                continue
            if c.candidate is not None:
                if not out.finished:
                    continue  # running beams have no text yet
                c.tokens = list(out.candidates[c.candidate]) if out.candidates else list(out.token_ids)
            else:
                c.tokens = list(out.token_ids)
            c.pending += c.text.update(self.server.decode(c.tokens), out.finished)
            if c.text.stopped:
                c.finish_reason = "stop"
            elif out.finished and out.finish_reason == "abort":
                # we abort only requests whose client is gone or whose choices all stopped: this
                # one was aborted by the engine's owner stopping
                self.stopped = "the server is shutting down"
                c.finish_reason, c.error = "error", "the request was aborted: the server is shutting down"
            elif out.finished:
                c.finish_reason = out.finish_reason
                c.error = p.error if out.finish_reason == "error" else None
        if eid in self.open and all(c.finish_reason for c in self.choices if c.engine_id == eid):
            self.server.driver.abort(eid)  # every choice of it hit a stop string
            self.open.discard(eid)

    def abort(self) -> None:
        for eid in self.open:
            self.server.driver.abort(eid)
        self.open.clear()

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict:
        done = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": done,
                "total_tokens": self.num_prompt_tokens + done}

    def _log(self, status: str) -> None:
        u = self.usage()
        log.info("%s %s prompt_tokens=%d completion_tokens=%d finish=%s latency=%.3fs", self.rid, status,
                 u["prompt_tokens"], u["completion_tokens"], ",".join(str(c.finish_reason) for c in self.choices),
                 time.monotonic() - self.t0)

    # ---- a whole response ------------------------------------------------------------------------
    async def complete(self, request: Request) -> dict:
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while not self.done:
                nxt = asyncio.ensure_future(self._next())
                await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    self._log("client-disconnected")
                    raise APIError(499, "the client disconnected")
                nxt.result()
        finally:
            gone.cancel()
            self.abort()
        failed = [c for c in self.choices if c.finish_reason == "error"]
        if failed:
            self._log("500" if not self.stopped else "503")
            raise APIError(503 if self.stopped else 500, failed[0].error or "generation failed")
        self._log("200")
        if self.job.kind == "chat":
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text}, "logprobs": None,
                        "finish_reason": c.finish_reason} for c in self.choices]
        else:
            choices = [{"index": c.index, "text": c.text.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for c in self.choices]
        return {"id": self.rid, "object": "chat.completion" if self.job.kind == "chat" else "text_completion",
                "created": self.created, "model": self.server.model_name, "choices": choices, "usage": self.usage()}

    # ---- a stream --------------------------------------------------------------------------------
    def _chunk(self, choices: list, usage=None) -> str:
        if usage is None:
            return self._head + _dumps(choices) + self._tail
        obj = {"id": self.rid, "object": "chat.completion.chunk" if self.job.kind == "chat" else "text_completion",
               "created": self.created, "model": self.server.model_name, "choices": choices}
        if self.job.include_usage:
            obj["usage"] = usage
        return f"data: {_dumps(obj)}\n\n"

    def _piece(self, c: _Choice, delta: str, finish) -> dict:
        if self.job.kind != "chat":
            return {"index": c.index, "text": delta, "logprobs": None, "finish_reason": finish}
        d = {"content": delta} if delta or finish is None else {}
        if not c.sent_role:
            d, c.sent_role = {"role": "assistant", **d}, True
        return {"index": c.index, "delta": d, "logprobs": None, "finish_reason": finish}

    def _pieces(self) -> list:
        """What the stream has not sent yet: each choice's new text, and its finish once."""
        pieces = []
        for c in self.choices:
            delta, c.pending = c.pending, ""
            if c.finish_reason is None:
                if delta:
                    pieces.append(self._piece(c, delta, None))
            elif not c.reported:
                c.reported = True
                if c.finish_reason != "error":  # errors end the stream with an error event instead
                    pieces.append(self._piece(c, delta, c.finish_reason))
        return pieces

    async def sse(self):
        status = "200"
        try:
            if self.job.kind == "chat":  # the role first, as OpenAI streams it
                yield self._chunk([self._piece(c, "", None) for c in self.choices])
            tail = ""  # the last text, the finish, an error, the usage and [DONE] leave in one write
            while True:
                pieces = self._pieces()
                if self.done:
                    tail = self._chunk(pieces) if pieces else ""
                    break
                if pieces:
                    yield self._chunk(pieces)
                await self._next()
            errors = [c.error for c in self.choices if c.finish_reason == "error"]
            if errors:
                status = "error"
                err = APIError(503 if self.stopped else 500, errors[0] or "generation failed")
                tail += f"data: {json.dumps(err.body())}\n\n"
            if self.job.include_usage:
                tail += self._chunk([], self.usage())
            yield tail + "data: [DONE]\n\n"
        except BaseException:
            status = "client-disconnected"
            raise
        finally:
            self.abort()
            self._log(status)


async def _disconnected(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return
