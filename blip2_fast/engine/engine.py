"""The continuous-batching engine's public face: requests in, tokens out, one `step()` at a time.

Each step gives every running sequence a KV slot (preempting the newest request when blocks run
out), admits waiting requests, decodes the running sequences as one batch, then encodes the new
images and prefills the admitted requests as one batch (`Scheduler`, `ModelRunner`, `Sampler`).

Whatever a request needs later is the engine's own from `add_request` on (the pixels are copied),
and everything is checked there, so a step cannot fail on a request's arguments. If a step still
fails for one request, that request finishes with finish_reason "error" and the message; the others
go on. Every mutating call holds one lock: calls from several threads serialize.
"""
from __future__ import annotations

import collections
import itertools
import math
import threading

import torch

from .block_manager import BlockManager
from .executor import Executor
from .intake import PreparedPixels, new_request, prepare_pixels
from .limits import available_memory, format_bytes, profile_kv_blocks
from .outputs import EngineStats, RequestOutput
from .params import SamplingParams, check_bool, check_int, check_real
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import DecoderOnly, EncoderDecoder, Request

MAX_BLOCK_SIZE = 1024
DEFAULT_BLOCK_SIZE = 16


class Engine:
    """Continuous batching over a paged KV cache for a model from `blip2_fast.load()`.

    max_num_seqs: sequences decoded together at most (a beam search counts num_beams); at most
        num_blocks (every running sequence holds a block). Default: 256, or num_blocks if fewer.
    block_size: tokens per KV block, a power of two <= 1024. num_blocks: pool size; default on a
        GPU: what `gpu_memory_utilization` of the GPU leaves after the weights and the peak of a
        profile run (an image batch, the largest prefill, the decode logits); on a CPU, enough for
        min(max_num_seqs, 16) sequences of max_model_len, and at least max_num_seqs blocks. A pool
        larger than the memory available is refused.
    max_model_len: longest prompt + output of one sequence (default: OPT's max positions, 2048 for
        T5's decoder); a request stops there with finish_reason "length".
    max_num_batched_tokens: positions one prefill batch computes at most, padding included
        (default max(max_model_len, 8192)); bounds the activation memory of a step.
    tokenizer: decodes `RequestOutput.text` (None: text stays None) and encodes string prompts
        (without one, string prompts go through the checkpoint's processor).
    enforce_eager: on a GPU the decode step replays CUDA graphs captured here, at start-up, per
        batch-size bucket (1, 2, 4, 8, 16, ..., up to min(max_num_seqs, 512)); True turns that off.
        A capture that fails raises RuntimeError with its reason. The CPU path always runs eagerly.
    """

    def __init__(self, model, *, max_num_seqs: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 num_blocks: int | None = None, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 tokenizer=None, enforce_eager: bool = False):
        if getattr(model, "lm", None) is None:
            raise ValueError(f"a {getattr(model, 'architecture', type(model).__name__)} checkpoint has no language "
                             "model to generate with")
        self.model = model
        t5 = model.is_encoder_decoder
        defaults = getattr(model, "generation_defaults", {})
        self.layout = EncoderDecoder(defaults.get("decoder_start_token_id", 0)) if t5 else DecoderOnly()
        explicit_seqs = max_num_seqs is not None
        self.max_num_seqs = check_int("max_num_seqs", max_num_seqs if explicit_seqs else 256, 1)
        self.block_size = block_size = check_int("block_size", block_size, 1, MAX_BLOCK_SIZE)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.enforce_eager = check_bool("enforce_eager", enforce_eager)
        util = check_real("gpu_memory_utilization", gpu_memory_utilization)
        if not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util}")
        positions = getattr(model.cfg.lm, "max_positions", None) if not t5 else None
        explicit_len = max_model_len is not None
        self.max_model_len = check_int("max_model_len", max_model_len if explicit_len else positions or 2048, 1, positions)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(self.max_model_len, 8192)
        self.max_num_batched_tokens = check_int("max_num_batched_tokens", max_num_batched_tokens, 1)
        per_block = ModelRunner.bytes_per_block(model, block_size)
        per_seq = math.ceil(self.max_model_len / block_size)
        sized_by = None  # what chose num_blocks, when not the caller
        if num_blocks is None:
            if model.device.type == "cuda":
                num_blocks = profile_kv_blocks(model, util, per_block, self.max_model_len,
                                               self.max_num_batched_tokens, self.max_num_seqs)
            else:
                num_blocks = per_seq * min(self.max_num_seqs, 16) + 1
                if self.max_num_seqs > num_blocks:  # an explicit max_num_seqs still gets a block per sequence
                    num_blocks = self.max_num_seqs
                    sized_by = f"max_num_seqs={self.max_num_seqs} needs a KV pool of at least {num_blocks} blocks"
        else:
            num_blocks = check_int("num_blocks", num_blocks, 2)
        if not explicit_seqs:  # the default: no more sequences than the pool can hold
            self.max_num_seqs = min(self.max_num_seqs, num_blocks)
        self._check_pool(num_blocks, per_block, sized_by)
        if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer must have a decode(ids, skip_special_tokens=...) method (a transformers "
                            f"tokenizer); got {type(tokenizer).__name__}")
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, self.layout, max_num_seqs=self.max_num_seqs,
                                   max_num_batched_tokens=self.max_num_batched_tokens)
        # no sequence outgrows the pool: the runner sizes its per-length tables to what can happen
        self.runner = ModelRunner(model, num_blocks, block_size, max_model_len=min(self.max_model_len, num_blocks * block_size),
                                  max_num_seqs=self.max_num_seqs, enforce_eager=self.enforce_eager)
        self.sampler = Sampler(model.device)
        self.executor = Executor(model, self.scheduler, self.runner, self.sampler, self.layout,
                                 max_model_len=self.max_model_len, tokenizer=tokenizer)
        self._live = self.executor.live  # request id -> its unfinished request
        self._lock = threading.RLock()
        self._order = itertools.count()
        self._vocab = model.cfg.lm.vocab

    def _check_pool(self, num_blocks: int, per_block: int, sized_by: str | None = None) -> None:
        """sized_by: what chose num_blocks, named in the error instead of num_blocks itself."""
        nbytes = num_blocks * per_block
        avail = available_memory(self.model.device)
        if nbytes > avail:
            what = sized_by or f"num_blocks={num_blocks}"
            raise ValueError(f"{what}: a KV pool of {format_bytes(nbytes)} exceeds the "
                             f"{format_bytes(avail)} of memory available on {self.model.device}")
        if num_blocks * self.block_size >= 2**31:
            raise ValueError(f"num_blocks={num_blocks} x block_size={self.block_size} cache slots exceed the 2**31 "
                             "that int32 slot indices address")
        if self.max_num_seqs > num_blocks:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} exceeds num_blocks={num_blocks}: every running "
                             "sequence holds at least one KV block")

    # ---- public state ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """Decodes `RequestOutput.text` and encodes text prompts (None: text stays None)."""
        return self.executor.tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self.executor.tokenizer = tok

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def prefix_hit_tokens(self) -> int:
        """Prompt positions whose KV came from the prefix cache instead of a prefill."""
        return self.scheduler.prefix_hit_tokens

    def has_unfinished(self) -> bool:
        """True while a request waits, runs, or has an abort output not yet returned by `step()`."""
        s = self.scheduler
        return bool(s.waiting or s.running or self.executor.pending)

    def stats(self) -> EngineStats:
        """Counters for monitoring (cheap: no device sync)."""
        with self._lock:
            s, r = self.scheduler, self.runner
            return EngineStats(len(s.running), len(s.waiting), self.num_blocks, self.num_free_blocks, s.num_preemptions,
                               self.executor.prompt_tokens, self.executor.generation_tokens, r.images.hits, r.images.misses,
                               r.encode_seconds())

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id, *, pixel_values=None, image=None, prompt=None, sampling: SamplingParams | None = None,
                    interpolate_pos_encoding: bool = False) -> None:
        """Queue a request. pixel_values: a [3, H, W] tensor or array (or image: a PIL image,
        preprocessed with the checkpoint's processor); the engine keeps its own copy. Or
        `prepare_pixels`' result: then that copy and its digest are taken as they are. prompt: text,
        or token ids as `Blip2Processor` lays them out (with `num_query_tokens` image tokens, or
        none: then the queries are prepended). Every argument is checked here: a request that is
        accepted cannot fail a step on its arguments, and one the engine could never serve (too
        long, too many beams, too many blocks) is refused with the limit named."""
        with self._lock:
            self._add(request_id, pixel_values, image, prompt, sampling, interpolate_pos_encoding)

    def prepare_pixels(self, pixel_values, *, interpolate_pos_encoding: bool = False) -> PreparedPixels:
        """The pixel work of `add_request`, on the calling thread: check `pixel_values` ([3, H, W]
        tensor or array), copy them to the model's dtype and digest the copy for the image cache.
        Pass the result as add_request's pixel_values (with the same interpolate_pos_encoding, to
        an engine over the same model), once or for several requests: the engine thread then skips
        that work. The caller's tensor may change afterwards; the engine keeps its copy. Takes no
        engine lock (it touches no engine state): a server's preprocessing thread calls it."""
        return prepare_pixels(self.model, pixel_values, interpolate_pos_encoding)

    def _add(self, request_id, pixel_values, image, prompt, sampling, interp) -> Request:
        r = new_request(self, request_id, pixel_values, image, prompt, sampling, interp, next(self._order))
        self._live[request_id] = r
        self.scheduler.add(r)
        return r

    def abort(self, request_id) -> None:
        """Stop a request now; its blocks are freed and the next `step()` returns its final output
        (finish_reason "abort"). The id is free for a new request at once."""
        with self._lock:
            r = self._live.get(request_id)
            if r is not None:
                self._abort(r)

    def _abort(self, r: Request) -> None:
        self.executor.finish(r, "abort")
        self.executor.pending.append(r)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Decode running requests, admit and prefill waiting ones; return the outputs of the
        requests that progressed, finished or failed in this step (and of aborts since the last)."""
        with self._lock, torch.inference_mode():
            return self.executor.step()

    # ---- convenience ----------------------------------------------------------------------------
    def run(self) -> dict:
        """Step until every request is finished; returns {request_id: final RequestOutput}."""
        final = {}
        while self.has_unfinished():
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        return final

    async def stream(self, request_id, **kwargs):
        """`add_request(request_id, **kwargs)`, then yield its RequestOutputs as they come (asyncio).

        Several streams may run concurrently; whichever stream finds its outputs missing drives
        `step()`, yielding to the event loop between steps. Leaving the loop early aborts the
        request this stream added (and no other)."""
        import asyncio

        args = [kwargs.pop(k, None) for k in ("pixel_values", "image", "prompt", "sampling")]
        args.append(kwargs.pop("interpolate_pos_encoding", False))
        if kwargs:
            raise TypeError(f"stream() got unexpected arguments: {', '.join(sorted(kwargs))}")
        outs: collections.deque = collections.deque()  # appended by whichever thread runs the step
        with self._lock:
            r = self._add(request_id, *args)
            r.sink = outs
        try:
            while True:
                while not outs:
                    if r.finished and not outs:
                        return
                    self.step()
                    await asyncio.sleep(0)
                out = outs.popleft()
                yield out
                if out.finished:
                    return
        finally:
            with self._lock:
                if not r.finished:
                    self._abort(r)
                r.sink = None

