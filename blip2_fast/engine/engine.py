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
import dataclasses
import itertools
import math
import threading
import time

import torch

from .beam import BeamState
from .block_manager import BlockManager
from .limits import available_memory, format_bytes, to_pixels
from .outputs import EngineStats, RequestOutput
from .params import SamplingParams, check_bool, check_ids, check_int, check_real
from .runner import ModelRunner, PrefillItem, image_digest
from .sampler import BeamGroup, Row, Sampler
from .scheduler import DecodeBatch, Scheduler
from .sequence import DecoderOnly, EncoderDecoder, Request, Status

MAX_BLOCK_SIZE = 1024
DEFAULT_BLOCK_SIZE = 16


class Engine:
    """Continuous batching over a paged KV cache for a model from `blip2_fast.load()`.

    max_num_seqs: sequences decoded together at most (a beam search counts num_beams); at most
        num_blocks (every running sequence holds a block). Default: 256, or num_blocks if fewer.
    block_size: tokens per KV block, a power of two <= 1024. num_blocks: pool size; default on a
        GPU: what `gpu_memory_utilization` of the GPU leaves after the weights and the peak of a
        profile run (an image batch, the largest prefill, the decode logits); on a CPU, enough for
        min(max_num_seqs, 16) sequences of max_model_len. A pool larger than the memory available
        is refused.
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
        if num_blocks is None:
            if model.device.type == "cuda":
                num_blocks = self._profile_num_blocks(util, per_block)
            else:
                num_blocks = per_seq * min(self.max_num_seqs, 16) + 1
        else:
            num_blocks = check_int("num_blocks", num_blocks, 2)
        if not explicit_seqs:  # the default: no more sequences than the pool can hold
            self.max_num_seqs = min(self.max_num_seqs, num_blocks)
        self._check_pool(num_blocks, per_block)
        if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer must have a decode(ids, skip_special_tokens=...) method (a transformers "
                            f"tokenizer); got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, self.layout, max_num_seqs=self.max_num_seqs,
                                   max_num_batched_tokens=self.max_num_batched_tokens)
        # no sequence outgrows the pool: the runner sizes its per-length tables to what can happen
        self.runner = ModelRunner(model, num_blocks, block_size, max_model_len=min(self.max_model_len, num_blocks * block_size),
                                  max_num_seqs=self.max_num_seqs, enforce_eager=self.enforce_eager)
        self.sampler = Sampler(model.device)
        self._live: dict[object, Request] = {}  # request id -> its unfinished request: one place per id
        self._pending: list[Request] = []  # finished between steps (aborts): their last output comes with the next step
        self._lock = threading.RLock()
        self._order = itertools.count()
        self._vocab = model.cfg.lm.vocab
        self._prompt_tokens = 0
        self._generation_tokens = 0

    def _check_pool(self, num_blocks: int, per_block: int) -> None:
        nbytes = num_blocks * per_block
        avail = available_memory(self.model.device)
        if nbytes > avail:
            raise ValueError(f"num_blocks={num_blocks}: a KV pool of {format_bytes(nbytes)} exceeds the "
                             f"{format_bytes(avail)} of memory available on {self.model.device}")
        if num_blocks * self.block_size >= 2**31:
            raise ValueError(f"num_blocks={num_blocks} x block_size={self.block_size} cache slots exceed the 2**31 "
                             "that int32 slot indices address")
        if self.max_num_seqs > num_blocks:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} exceeds num_blocks={num_blocks}: every running "
                             "sequence holds at least one KV block")

    def _profile_num_blocks(self, util: float, per_block: int) -> int:
        """KV blocks that fit in `util` of the GPU after the weights and the measured peak of a profile
        run: an image batch through the vision encoder and Q-Former, the largest prefill this engine
        admits, and the decode step's logits at max_num_seqs."""
        m, dev = self.model, self.model.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        with torch.inference_mode():
            S = m.cfg.vision.image_size
            m.language_model_inputs(torch.zeros(32, 3, S, S, device=dev, dtype=m.dtype))
            L = self.max_model_len
            n = max(1, self.max_num_batched_tokens // L)
            E = m.lm.embed_tokens(torch.zeros(1, 1, dtype=torch.long, device=dev)).shape[-1]  # embedding width
            x = torch.zeros(n, L, E, device=dev, dtype=m.dtype)
            mask = torch.ones(n, L, dtype=torch.bool, device=dev)
            from ..layers import AttnMeta

            if m.is_encoder_decoder:
                enc = m.lm.encode(x, mask)
                m.lm.decode(x, enc, AttnMeta(prefill=True, key_padding_mask=mask, encoder_mask=mask))
            else:
                pos = torch.arange(L, device=dev).expand(n, L)
                m.lm(x, pos, AttnMeta(prefill=True, key_padding_mask=mask))
            del x, mask
            hidden = m.cfg.lm.d_model if m.is_encoder_decoder else m.cfg.lm.hidden
            m.lm.logits(torch.zeros(self.max_num_seqs, hidden, device=dev, dtype=m.dtype)).float()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        torch.cuda.empty_cache()  # what the profile run cached is free again: count it once, as `peak`
        free, total = torch.cuda.mem_get_info(dev)
        budget = int(total * util) - (total - free) - peak
        if budget < 2 * per_block:
            raise ValueError(f"gpu_memory_utilization={util}: {format_bytes(total * util)} of the GPU leave no room for "
                             f"a KV cache after {format_bytes(total - free)} in use and a measured activation peak of "
                             f"{format_bytes(peak)}")
        return budget // per_block

    # ---- public state ---------------------------------------------------------------------------
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
        return bool(s.waiting or s.running or self._pending)

    def stats(self) -> EngineStats:
        """Counters for monitoring (cheap: no device sync)."""
        with self._lock:
            s, r = self.scheduler, self.runner
            return EngineStats(len(s.running), len(s.waiting), self.num_blocks, self.num_free_blocks, s.num_preemptions,
                               self._prompt_tokens, self._generation_tokens, r.images.hits, r.images.misses,
                               r.encode_seconds())

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id, *, pixel_values=None, image=None, prompt=None, sampling: SamplingParams | None = None,
                    interpolate_pos_encoding: bool = False) -> None:
        """Queue a request. pixel_values: a [3, H, W] tensor or array (or image: a PIL image,
        preprocessed with the checkpoint's processor); the engine keeps its own copy. prompt: text,
        or token ids as `Blip2Processor` lays them out (with `num_query_tokens` image tokens, or
        none: then the queries are prepended). Every argument is checked here: a request that is
        accepted cannot fail a step on its arguments, and one the engine could never serve (too
        long, too many beams, too many blocks) is refused with the limit named."""
        with self._lock:
            self._add(request_id, pixel_values, image, prompt, sampling, interpolate_pos_encoding)

    def _add(self, request_id, pixel_values, image, prompt, sampling, interp) -> Request:
        try:
            hash(request_id)
        except TypeError:
            raise TypeError(f"request_id must be hashable, got {type(request_id).__name__}") from None
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in use")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        p = dataclasses.replace(sampling) if sampling is not None else SamplingParams()
        p.validate(self._vocab)
        interp = check_bool("interpolate_pos_encoding", interp)
        model = self.model
        if (pixel_values is None) == (image is None):
            raise ValueError("give exactly one of pixel_values (a [3, H, W] tensor) or image (a PIL image)")
        if image is not None:
            pixel_values = model.processor().image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        px = to_pixels(model, pixel_values, batched=False, device=None, interpolate=interp)  # our own copy
        prompt_ids = self._prompt_ids(prompt)
        Q, img = model.cfg.num_query_tokens, model.cfg.image_token_id
        n_img = sum(1 for t in prompt_ids if t == img) if img is not None else 0
        if n_img not in (0, Q):
            raise ValueError(f"prompt has {n_img} image tokens (id {img}); expected 0 or num_query_tokens={Q}")
        digest = image_digest(px) + ("/i" if interp else "")
        if n_img:
            lm_tokens = tuple(-1 if t == img else t for t in prompt_ids)
        else:
            lm_tokens = (-1,) * Q + prompt_ids  # no image tokens: the queries go first
        q = itertools.count()
        keys = tuple(("img", digest, next(q)) if t < 0 else t for t in lm_tokens)
        n_lm = len(keys)
        if not self.layout.cross and n_lm >= self.max_model_len:
            raise ValueError(f"prompt of {n_lm} positions (image queries included) leaves no room for new tokens "
                             f"within the model's maximum of {self.max_model_len} positions")
        if p.num_beams > self.max_num_seqs:
            raise ValueError(f"num_beams={p.num_beams} exceeds max_num_seqs={self.max_num_seqs}")
        bs = self.block_size
        lm_prompt = 1 if self.layout.cross else n_lm
        room = min(p.max_new_tokens, self.max_model_len - lm_prompt)  # a request stops at max_model_len
        cross = math.ceil(n_lm / bs) if self.layout.cross else 0
        worst = max(math.ceil((lm_prompt + room) / bs) * p.num_beams + cross,
                    self.scheduler.blocks_to_admit(n_lm if self.layout.cross else 0, lm_prompt, p.num_beams))
        if worst > self.num_blocks:
            raise ValueError(f"request {request_id!r} needs up to {worst} KV blocks but the pool has {self.num_blocks}")
        defaults = getattr(model, "generation_defaults", {})
        eos = p.stop_token_ids if p.stop_token_ids is not None else defaults.get("eos_token_id")
        eos = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
        generator = None
        if p.do_sample:
            if p.seed is None:  # drawn from the global RNG: torch.manual_seed reproduces the request
                p.seed = int(torch.randint(0, 2**63 - 1, (1,)))
            generator = torch.Generator(device=model.device).manual_seed(p.seed)
        ban = tuple(t for t in eos if 0 <= t < self._vocab)
        r = Request(request_id, next(self._order), p, prompt_ids, lm_tokens, keys, digest, px, interp, eos, ban,
                    defaults.get("pad_token_id"), room, generator, time.monotonic(), p.plain_greedy)
        self._live[request_id] = r
        self.scheduler.add(r)
        return r

    def _prompt_ids(self, prompt) -> tuple[int, ...]:
        model = self.model
        if prompt is None:
            if model.is_encoder_decoder:
                return ()
            bos = getattr(model, "generation_defaults", {}).get("bos_token_id")
            return (bos,) if bos is not None else ()
        if isinstance(prompt, str):
            tok = self.tokenizer
            if tok is None:
                ids = model.processor()(text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
            elif not callable(tok):
                raise TypeError(f"a text prompt needs a callable tokenizer (tokenizer(text)['input_ids']); "
                                f"{type(tok).__name__} is not: pass token ids instead")
            else:
                ids = tok(prompt)["input_ids"]
            return tuple(check_ids("prompt", ids, self._vocab))
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point() or prompt.dtype == torch.bool or prompt.is_complex():
                raise ValueError(f"prompt token ids must be a 1-D integer sequence, got {prompt.dtype} of shape "
                                 f"{list(prompt.shape)}")
            prompt = prompt.tolist()
        elif hasattr(prompt, "dtype") and hasattr(prompt, "tolist"):  # numpy
            if getattr(prompt, "ndim", 1) != 1 or prompt.dtype.kind not in "iu":
                raise ValueError(f"prompt token ids must be a 1-D integer sequence, got {prompt.dtype} of shape "
                                 f"{list(prompt.shape)}")
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"prompt must be text or a 1-D sequence of token ids, got {type(prompt).__name__}")
        return tuple(check_ids("prompt", prompt, self._vocab))

    def abort(self, request_id) -> None:
        """Stop a request now; its blocks are freed and the next `step()` returns its final output
        (finish_reason "abort"). The id is free for a new request at once."""
        with self._lock:
            r = self._live.get(request_id)
            if r is not None:
                self._abort(r)

    def _abort(self, r: Request) -> None:
        self._finish(r, "abort")
        self._pending.append(r)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Decode running requests, admit and prefill waiting ones; return the outputs of the
        requests that progressed, finished or failed in this step (and of aborts since the last)."""
        with self._lock, torch.inference_mode():
            touched, self._pending = self._pending, []
            plan = self.scheduler.schedule()
            now = time.monotonic()
            for r in plan.prefill:
                if r.first_scheduled_time is None:
                    r.first_scheduled_time = now
                    self._prompt_tokens += r.n_prompt
            if plan.decode:
                full = plan.batch
                self._isolated(lambda reqs: self._decode(reqs, plan.copies, full if reqs is plan.decode else None),
                               plan.decode)
                touched += plan.decode
            if plan.prefill:
                self._isolated(self._prefill, plan.prefill)
                touched += plan.prefill
            # pending (finished), decoding and admitted requests are three disjoint sets: one output each
            return [self._output(r) for r in touched]

    def _isolated(self, fn, reqs: list[Request]) -> None:
        """Run `fn(reqs)`; if it fails, rerun it one request at a time, and fail only those that fail alone."""
        if not reqs:
            return
        try:
            fn(reqs)
        except Exception as e:
            if len(reqs) == 1:
                self._fail(reqs[0], e)
                return
            for r in reqs:
                if r.status is Status.RUNNING:
                    try:
                        fn([r])
                    except Exception as e1:
                        self._fail(r, e1)

    def _fail(self, r: Request, e: Exception) -> None:
        if not r.finished:
            self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _prefill(self, reqs: list[Request]) -> None:
        runner, layout = self.runner, self.layout
        feats = runner.image_features([(r.digest, r.pixels, r.interpolate) for r in reqs])
        items = []
        for r in reqs:
            seq = r.seqs[0]
            if layout.cross:
                items.append(PrefillItem(list(r.lm_tokens), feats[r.digest], seq.block_table, r.num_cached,
                                         [layout.decoder_start] + r.generated, r.cross.block_table, r.cross_cached))
            else:
                items.append(PrefillItem(list(r.lm_tokens) + r.generated, feats[r.digest], seq.block_table, r.num_cached))
        runner.staging.reset()
        inp = runner.prepare_prefill(items)
        self._choose(reqs, inp, runner.prefill, None, prefill=True)

    def _decode(self, reqs: list[Request], copies: list[tuple[int, int]], batch: DecodeBatch | None = None) -> None:
        """One decode step for `reqs` (copy-on-write `copies` first: copying twice is harmless);
        `batch`: their sequences (the scheduler's, or rebuilt for a retry)."""
        runner = self.runner
        runner.staging.reset()
        batch = batch or DecodeBatch.of([s for r in reqs for s in r.seqs])
        inp = runner.prepare_decode(batch)  # first: graphs read these offsets
        self._choose(reqs, inp, runner.decode, runner.prepare_copies(copies), prefill=False)

    def _choose(self, reqs: list[Request], inp, run, copies, prefill: bool) -> None:
        """Finish the step's inputs with the sampler's, send them (the one host-to-device copy), run
        the model and hand each request its token."""
        runner, lm = self.runner, self.model.lm
        st = runner.staging
        greedy = all(r.greedy for r in reqs)
        if greedy and runner.greedy_head is not None:  # the screened head skips the full fp32 logits
            st.send()
            runner.copy_blocks(copies)
            h = run(inp) if prefill else run(inp, hidden=True)
            self._apply(reqs, runner.greedy_head(lm.head_input(h), [self._banned(r) for r in reqs]), [])
            return
        if greedy:  # no beams here: the ban depends on the generated count alone
            plan = self.sampler.prepare_greedy([r.ban_ids if len(r.generated) < r.params.min_new_tokens else ()
                                                for r in reqs], st)
        else:
            rows, beams = self._rows(reqs, prefill)
            plan = self.sampler.prepare(rows, beams, self._vocab, st)
        st.send()
        runner.copy_blocks(copies)
        logits = lm.logits(run(inp)).float() if prefill else run(inp)
        out = self.sampler(logits, plan)
        self._apply(reqs, out.tokens, out.beams)

    def _screened(self, reqs) -> bool:
        return self.runner.greedy_head is not None and all(r.greedy for r in reqs)

    @staticmethod
    def _banned(r: Request) -> tuple[int, ...]:
        """The ids a request may not take now: eos while short of min_new_tokens."""
        n = (r.beam.cur_len - r.beam.prompt_len) if r.beam is not None else len(r.generated)
        return r.ban_ids if n < r.params.min_new_tokens else ()

    def _rows(self, reqs: list[Request], prefill: bool) -> tuple[list[Row], list[BeamGroup]]:
        """What the sampler does for each request: one Row, or a BeamGroup of its k beams."""
        rows, beams, i = [], [], 0
        for r in reqs:
            p = r.params
            if r.greedy:  # the common case, first
                rows.append(Row(i, p, None, None, r.ban_ids if len(r.generated) < p.min_new_tokens else ()))
                i += 1
            elif p.num_beams > 1:
                k = p.num_beams
                if r.beam is None:  # its first step: k beams over the prompt's one row of logits
                    prefix = self.layout.prefix(r)
                    room = self.max_model_len - self.layout.lm_len(r)  # beams stop at max_model_len too
                    r.beam = BeamState(p, prefix, list(r.eos), r.pad, len(prefix) + min(p.max_new_tokens, room))
                b = r.beam
                hist = b.history() if p.repetition_penalty != 1.0 else None
                rr = [i] * k if prefill else list(range(i, i + k))
                beams.append(BeamGroup(rr, p, r.generator, hist, self._banned(r), b.running_scores.tolist(), b.keep))
                i += 1 if prefill else k
            else:
                hist = self.layout.prefix(r) + r.generated if p.repetition_penalty != 1.0 else None
                rows.append(Row(i, p, r.generator, hist, self._banned(r)))
                i += 1
        return rows, beams

    def _apply(self, reqs: list[Request], tokens: list[int], cands: list) -> None:
        """Hand every request its token (or its beams' candidates); one request's failure here fails it alone."""
        now = time.monotonic()
        if not cands:  # no beam search in the batch: the decode step's hot loop, `_take` inline
            for r, tok in zip(reqs, tokens):
                gen = r.generated
                if tok < 0 or tok in r.eos or len(gen) + 1 >= r.max_tokens or r.first_token_time is None:
                    try:  # the rare cases: a failed row, a request's first or last token
                        self._take(r, tok, now)
                    except Exception as e:
                        self._fail(r, e)
                    continue
                gen.append(tok)
                r.last_token_time = now
                r.seqs[0].next_token = tok
                self._generation_tokens += 1
            return
        it_tok, it_beam = iter(tokens), iter(cands)
        for r in reqs:
            beam = r.params.num_beams > 1
            c = next(it_beam) if beam else None
            t = None if beam else next(it_tok)
            try:
                if beam:
                    self._beam_step(r, c, self._vocab)
                else:
                    self._take(r, t, now)
            except Exception as e:
                self._fail(r, e)

    def _take(self, r: Request, tok: int, now: float) -> None:
        if tok < 0:
            raise ValueError("the sampler found no finite score (the model's logits are NaN or -inf)")
        gen = r.generated
        gen.append(tok)
        self._generation_tokens += 1
        if r.first_token_time is None:
            r.first_token_time = now
        r.last_token_time = now
        if tok in r.eos:
            self._finish(r, "stop")
        elif len(gen) >= r.max_tokens:  # max_new_tokens, or max_model_len
            self._finish(r, "length")
        else:
            r.seqs[0].next_token = tok

    def _beam_step(self, r: Request, cand, V: int) -> None:
        b = r.beam
        parents, toks = b.step(cand[0], cand[1], V)
        now = time.monotonic()
        if r.first_token_time is None:
            r.first_token_time = now
        r.last_token_time = now
        if b.done:
            r.generated = b.result()
            r.candidates = [b.result(i) for i in range(r.params.num_return_sequences)]
            self._generation_tokens += len(r.generated)
            self._finish(r, "stop" if (r.generated and r.generated[-1] in r.eos) else "length")
        else:
            self.scheduler.fork_beams(r, parents, toks)

    # ---- outputs --------------------------------------------------------------------------------
    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        r.finish_reason, r.error = reason, error
        r.finished_time = time.monotonic()
        self.scheduler.finish(r)
        if self._live.get(r.request_id) is r:  # a later request may already hold this id
            del self._live[r.request_id]

    def _output(self, r: Request) -> RequestOutput:
        done = r.status is Status.FINISHED
        beams = r.params.num_beams > 1
        if beams and not done:
            toks, new = [], []  # running beams have no best sequence yet
        else:
            toks = r.generated[:]
            new = toks[r.emitted:]
            r.emitted = len(toks)
        tok = self.tokenizer if (done or not beams) else None  # running beams have no text yet
        out = RequestOutput._of(r.request_id, toks, new, done, r.finish_reason, r.candidates if done else None,
                                r.timeline(), len(r.lm_tokens), r.error, tok)
        if r.sink is not None:
            r.sink.append(out)
        return out

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

