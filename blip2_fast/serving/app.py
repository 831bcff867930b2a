"""`build_app(model_or_engine, ...)`: the OpenAI-compatible ASGI app over one engine.

A thin translation layer: an OpenAI body -> `Job` (protocol.py) -> image (media.py) -> engine inputs
(inputs.py, then `Engine.prepare_pixels`, off the event loop on one preprocessing thread, so the
engine thread neither copies nor digests the pixels) -> `EngineDriver.submit` (driver.py,
the engine's own thread); engine outputs -> OpenAI responses or server-sent-event chunks (response.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import itertools
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.engine import Engine
from . import inputs, media
from .driver import EngineDriver
from .errors import APIError, bad_request
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import Job, parse_chat, parse_completion
from .response import EventStream, Run

log = logging.getLogger("blip2_fast.serving")


def build_app(model_or_engine, *, served_model_name: str | None = None, api_key: str | None = None,
              max_queue: int = 512, allowed_local_media_path=None, allow_remote_images: bool = False,
              max_image_pixels: int = 4096 * 4096, max_image_bytes: int = 20 * 2**20,
              max_body_bytes: int | None = None, **engine_kwargs) -> FastAPI:
    """An ASGI app serving `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`,
    `/metrics` and `/version` from one engine, whose thread starts now.

    model_or_engine: a model from `blip2_fast.load()` (an Engine is built with `engine_kwargs`,
    e.g. max_num_seqs, num_blocks) or an `Engine` (then no engine_kwargs). The model needs its
    checkpoint's processor (prompts are tokenized and images preprocessed as model.answer does).
    served_model_name: the id clients send as `model` (default: the checkpoint directory's name).
    api_key: when set, /v1/* needs `Authorization: Bearer <api_key>`. max_queue: requests waiting
    for admission before new ones get 503. Images: data: URLs always; file:// only under
    allowed_local_media_path; http(s) only with allow_remote_images; at most max_image_pixels
    (width x height) and max_image_bytes encoded. max_body_bytes: request bodies (default: room for
    one base64 image of max_image_bytes plus 1 MiB). Stop the engine thread with
    `app.state.server.close()` (the ASGI lifespan shutdown does it).
    """
    if isinstance(model_or_engine, Engine):
        if engine_kwargs:
            raise TypeError(f"engine options {sorted(engine_kwargs)} apply only when build_app builds the Engine")
        engine = model_or_engine
    else:
        engine = Engine(model_or_engine, **engine_kwargs)
    if not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max_queue must be a positive int, got {max_queue!r}")
    policy = media.MediaPolicy(max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                               allowed_local_media_path=allowed_local_media_path,
                               allow_remote_images=allow_remote_images)
    server = _Server(engine, served_model_name, api_key, max_queue, policy,
                     max_body_bytes or max_image_bytes * 4 // 3 + 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.close()

    app = FastAPI(title="blip2_fast", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        log.info("%s %s -> %d %s", getattr(request.state, "rid", "-"), request.url.path, e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("%s %s -> 500", getattr(request.state, "rid", "-"), request.url.path)
        return JSONResponse(APIError(500, f"internal server error ({type(e).__name__})").body(), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await server.generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.generate(request, "completion")

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "blip2_fast", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health():
        if not server.driver.alive:
            raise APIError(503, "the engine is not running" + (f": {server.driver.error!r}" if server.driver.error
                                                              else ""), code="engine_not_running")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app


class _Server:
    def __init__(self, engine, model_name, api_key, max_queue, policy, max_body_bytes):
        from ..generation import processor_for

        model = engine.model
        self.engine, self.model = engine, model
        self.processor = processor_for(model)  # raises ValueError naming what is missing
        self.prepare = inputs.Preparer(model, self.processor)  # the processor's inputs, faster where it can
        # decoding runs on the event loop while the preprocessing thread tokenizes: a fast tokenizer is
        # not safe to share across threads, so the loop decodes with its own copy
        self.tokenizer = copy.deepcopy(self.processor.tokenizer)
        self.decode = inputs.decoder(self.tokenizer)  # ids -> text, as inputs.decode gives it
        # request ids: unique per server without a system call per request (uuid4 reads urandom)
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:16]
        src = getattr(model, "source_dir", None)
        self.model_name = model_name or (src.name if src is not None else "blip2")
        self.api_key, self.max_queue, self.policy, self.max_body_bytes = api_key, max_queue, policy, max_body_bytes
        self.created = int(time.time())
        self.metrics = ServerMetrics(self.model_name)
        self.driver = EngineDriver(engine, observer=self.metrics.observe)
        self.metrics.attach(self.driver)
        self.pre = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip2_fast-preprocess")
        self.driver.start()

    def close(self) -> None:
        self.driver.stop()
        self.pre.shutdown(wait=False, cancel_futures=True)

    # ---- the door --------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, key = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        limit = self.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None:
            if not cl.isdigit():
                raise bad_request("malformed Content-Length header")
            if int(cl) > limit:
                raise media.too_large("the request body", limit, "bytes")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise media.too_large("the request body", limit, "bytes")
        try:
            body = json.loads(buf, parse_constant=_no_constants)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON ({e})") from None
        except RecursionError:  # arrays or objects nested thousands deep: the decoder's stack, not ours
            raise bad_request("the request body is nested too deeply to be a request") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return body

    def _prepare(self, source, job: Job):
        """-> (EngineInputs, the engine's PreparedPixels of them), on the preprocessing thread."""
        data = media.read_bytes(*source, self.policy, job.image_param)
        image = media.decode(data, self.policy, job.image_param)
        try:
            ins = self.prepare(image, job.prompt)
        except (ValueError, TypeError) as e:
            raise bad_request(f"the prompt could not be processed: {e}", "messages" if job.kind == "chat" else "prompt")
        try:  # the copy and image-cache digest add_request would make, here instead of on the engine thread
            return ins, self.engine.prepare_pixels(ins.pixel_values)
        except (ValueError, TypeError) as e:  # what add_request would have refused them with
            raise bad_request(str(e)) from None

    def _check_queue(self, n: int) -> None:
        if self.driver.num_waiting() + n > self.max_queue:
            raise APIError(503, f"the server is overloaded: {self.max_queue} requests are already waiting; retry later",
                           code="queue_full")

    # ---- a generation request --------------------------------------------------------------------
    async def generate(self, request: Request, kind: str):
        t0 = time.monotonic()
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{self._id_prefix}{next(self._ids):016x}"
        request.state.rid = rid
        self.authorize(request)
        body = await self.read_json(request)
        max_n = self.engine.max_num_seqs
        job = parse_chat(body, max_n=max_n) if kind == "chat" else parse_completion(body, max_n=max_n)
        if job.model is not None and job.model != self.model_name:
            raise APIError(404, f"the model {job.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        self._check_queue(job.n)  # before any work is spent on a request that would be refused
        source = media.read_source(job.image_url, self.policy, job.image_param)
        if source[0] == "remote":
            source = ("bytes", await media.fetch_remote(source[1], self.policy, job.image_param))
        loop = asyncio.get_running_loop()
        ins, pixels = await loop.run_in_executor(self.pre, self._prepare, source, job)
        params = inputs.choice_params(inputs.sampling(self.model, job.options, job.n, ins.prompt_ids.numel()), job.n)
        self._check_queue(len(params))
        run = Run(self, rid, job, len(params), ins.num_prompt_tokens, t0)
        for i, p in enumerate(params):
            kw = {"pixel_values": pixels, "prompt": ins.prompt_ids, "sampling": p}
            if not self.driver.submit(run.engine_ids[i], kw, ins.num_prompt_tokens, run.queue):
                run.abort()
                raise APIError(503, "the engine is not running", code="engine_not_running")
        await run.wait_accepted()
        if job.stream:
            return EventStream(run, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        return JSONResponse(await run.complete(request), headers={"X-Request-Id": rid})


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")
