"""The continuous-batching engine: requests in, tokens out, one `step()` at a time.

Every step admits waiting requests while blocks and `max_num_seqs` allow (first come, first served),
runs the vision encoder + Q-Former for their new images as one batch (repeated images hit a cache),
prefills them as one batch, and decodes every other running sequence as one batch. When the KV pool
runs out, the most recently admitted request is preempted: its blocks are freed and it is requeued
at the front; greedy/sampled requests keep their tokens and recompute their KV, beam searches restart
(deterministically), so the final output is the same as without preemption.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
from collections import deque

import torch

from . import sampling as smp
from .beam import BeamState
from .block_manager import BlockManager, NoFreeBlocksError
from .runner import ModelRunner, image_digest
from .sampling import SamplingParams


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
    finish_reason: str | None = None  # "stop" (eos/stop token), "length", "abort"
    text: str | None = None
    candidates: list[list[int]] | None = None  # beam search: the best num_return_sequences beams, best first

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}
        state["_text"] = self.text
        return state

    @classmethod
    def _decoded_later(cls, tokenizer, *args) -> RequestOutput:
        out = cls(*args)
        out.__dict__["_tokenizer"] = tokenizer
        return out


def _text(self: RequestOutput) -> str | None:
    d = self.__dict__
    if d.get("_text") is None and d.get("_tokenizer") is not None:
        d["_text"] = d.pop("_tokenizer").decode(self.token_ids, skip_special_tokens=True)
    return d.get("_text")


def _set_text(self: RequestOutput, value: str | None) -> None:
    self.__dict__["_text"] = value
    self.__dict__.pop("_tokenizer", None)


# A property over the dataclass field: `RequestOutput(..., text=...)`, asdict and == still see `text`.
RequestOutput.text = property(_text, _set_text)


class _Request:
    def __init__(self, rid, order, prompt_ids, px, digest, interp, p: SamplingParams, eos, pad, keys, n_lm_prompt):
        self.id, self.order = rid, order
        self.prompt_ids, self.px, self.digest, self.interp = prompt_ids, px, digest, interp
        self.p, self.eos, self.pad = p, eos, pad
        self.keys, self.n_lm_prompt = keys, n_lm_prompt  # LM cache keys of the prompt positions
        self.generated: list[int] = []
        self.emitted = 0
        self.seqs: list[int] = []  # live sequence ids (beams)
        self.pending: dict[int, int] = {}  # seq id -> token whose KV is not yet in the cache
        self.beam: BeamState | None = None
        self.generator = None
        self.finished, self.reason = False, None
        self.cross_seq = None
        self.lm_inputs = None
        self.candidates = None
        self.reset_generator()

    def reset_generator(self, device="cpu"):
        if self.p.seed is not None:
            # sampling and beam selection run on the CPU (see Engine._beam_step / _sample)
            self.generator = torch.Generator(device="cpu").manual_seed(self.p.seed)


def _plain_greedy(r: _Request) -> bool:
    """Greedy without penalties: the next token is the argmax of the logits (eos may be banned)."""
    return r.p.num_beams == 1 and not r.p.do_sample and r.p.repetition_penalty == 1.0


class Engine:
    """Continuous batching over a paged KV cache for a model from `blip2_fast.load()`.

    max_num_seqs: sequences decoded together at most (a beam search counts num_beams).
    block_size: tokens per KV block. num_blocks: pool size; default: `gpu_memory_utilization` of
    the free GPU memory, or on CPU enough for min(max_num_seqs, 16) sequences of max_model_len.
    max_model_len: longest prompt + output (default: OPT's max positions, 2048 for T5).
    tokenizer: decodes `RequestOutput.text` (None: text stays None) and encodes string prompts
        (without one, string prompts go through the checkpoint's processor).
    enforce_eager: on a GPU the decode step replays CUDA graphs captured per batch-size bucket
        (1, 2, 4, 8, 16, ... max_num_seqs); True turns that off. The CPU path always runs eagerly.
    """

    def __init__(self, model, *, max_num_seqs: int = 256, block_size: int = 16, num_blocks: int | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, tokenizer=None,
                 enforce_eager: bool = False):
        if model.lm is None:
            raise ValueError(f"a {model.architecture} checkpoint has no language model to generate with")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.model = model
        self._t5 = model.is_encoder_decoder  # read on every step: a plain attribute, not a property
        self._dec_start = getattr(model, "generation_defaults", {}).get("decoder_start_token_id", 0)
        lm_cfg = model.cfg.lm
        default_len = getattr(lm_cfg, "max_positions", 2048)
        self.max_model_len = min(max_model_len or default_len, default_len)
        if model.is_encoder_decoder:  # T5's decoder length is bounded by its relative-bias table
            self.max_model_len = min(max_model_len or default_len, model.lm.dec_rel_table.shape[1])
        self.max_num_seqs, self.block_size = max_num_seqs, block_size
        per_block = ModelRunner.bytes_per_block(model, block_size)
        if num_blocks is None:
            if model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(model.device)
                num_blocks = int(free * gpu_memory_utilization * 0.9) // per_block  # keep room for activations
            else:
                num_blocks = math.ceil(self.max_model_len / block_size) * min(max_num_seqs, 16) + 1
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: the KV pool needs at least 2 blocks")
        self.blocks = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(model, num_blocks, block_size, max_model_len=self.max_model_len,
                                  max_num_seqs=max_num_seqs, enforce_eager=enforce_eager)
        if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer must have a decode(ids, skip_special_tokens=...) method (a transformers "
                            f"tokenizer); got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.enforce_eager = enforce_eager
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.requests: dict[object, _Request] = {}
        self._order = itertools.count()
        self._seq_ids = itertools.count()
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0  # prompt tokens whose KV came from the prefix cache instead of a prefill
        self._queues: dict[object, asyncio.Queue] = {}
        self._aborted: list[_Request] = []
        self._slots: dict[int, tuple[int, int]] = {}
        self._copies: list[tuple[int, int]] = []

    # ---- public state ---------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.runner.caches[0][0].shape[0]

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    def has_unfinished(self) -> bool:
        """True while a request waits, runs, or has an abort output not yet returned by `step()`."""
        return bool(self.waiting or self.running or self._aborted)

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id, *, pixel_values=None, image=None, prompt=None, sampling: SamplingParams | None = None,
                    interpolate_pos_encoding: bool = False) -> None:
        """Queue a request. pixel_values: a [3, H, W] tensor (or image: a PIL image, preprocessed with
        the checkpoint's processor). prompt: text, or token ids as `Blip2Processor` lays them out
        (with `num_query_tokens` image tokens, or none: then the queries are prepended)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        p = dataclasses.replace(sampling) if sampling is not None else SamplingParams()
        p.validate()
        model = self.model
        if (pixel_values is None) == (image is None):
            raise ValueError("give exactly one of pixel_values (a [3, H, W] tensor) or image (a PIL image)")
        if image is not None:
            from ..generation import processor_for

            pixel_values = processor_for(model).image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 3:
            raise ValueError(f"pixel_values must be a [3, H, W] tensor, got {getattr(pixel_values, 'shape', type(pixel_values))}")
        model.vision.check_pixels(pixel_values[None], interpolate_pos_encoding)
        if not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values contain NaN or infinite values")
        prompt_ids = self._prompt_ids(prompt)
        lm_cfg = model.cfg.lm
        if prompt_ids.numel() and (int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= lm_cfg.vocab):
            raise ValueError(f"prompt ids must be in [0, {lm_cfg.vocab})")
        Q, img = model.cfg.num_query_tokens, model.cfg.image_token_id
        n_img = int((prompt_ids == img).sum()) if img is not None else 0
        if n_img not in (0, Q):
            raise ValueError(f"prompt has {n_img} image tokens (id {img}); expected 0 or num_query_tokens={Q}")
        digest = image_digest(pixel_values) + ("/i" if interpolate_pos_encoding else "")
        if n_img:
            it = iter(range(Q))
            keys = [("img", digest, next(it)) if t == img else int(t) for t in prompt_ids.tolist()]
        else:
            keys = [("img", digest, j) for j in range(Q)] + [int(t) for t in prompt_ids.tolist()]
        n_lm = len(keys)
        if not model.is_encoder_decoder and n_lm >= self.max_model_len:
            raise ValueError(f"prompt of {n_lm} positions (image queries included) leaves no room for new tokens "
                             f"within the model's maximum of {self.max_model_len} positions")
        need = max(p.num_beams, 1)
        if need > self.max_num_seqs:
            raise ValueError(f"num_beams={p.num_beams} exceeds max_num_seqs={self.max_num_seqs}")
        worst = math.ceil((n_lm + p.max_new_tokens) / self.block_size) * need + (
            math.ceil(n_lm / self.block_size) if model.is_encoder_decoder else 0)
        worst = max(worst, self._blocks_to_admit(n_lm, 1 if model.is_encoder_decoder else n_lm, p.num_beams))
        if worst > self.num_blocks:
            raise ValueError(f"request {request_id!r} needs up to {worst} KV blocks but the pool has {self.num_blocks}")
        defaults = getattr(model, "generation_defaults", {})
        eos = p.stop_token_ids if p.stop_token_ids is not None else defaults.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = defaults.get("pad_token_id")
        req = _Request(request_id, next(self._order), prompt_ids, pixel_values, digest, interpolate_pos_encoding, p,
                       eos, pad, keys, n_lm)
        self.requests[request_id] = req
        self.waiting.append(req)

    def _prompt_ids(self, prompt) -> torch.Tensor:
        model = self.model
        if prompt is None:
            if model.is_encoder_decoder:
                return torch.zeros(0, dtype=torch.long)
            bos = getattr(model, "generation_defaults", {}).get("bos_token_id")
            return torch.tensor([bos] if bos is not None else [], dtype=torch.long)
        if isinstance(prompt, str):
            tok = self.tokenizer
            if tok is None:
                from ..generation import processor_for

                proc = processor_for(model)
                ids = proc(text=[prompt], return_tensors="pt")["input_ids"][0]
                return ids.long()
            if not callable(tok):
                raise TypeError(f"a text prompt needs a callable tokenizer (tokenizer(text)['input_ids']); "
                                f"{type(tok).__name__} is not: pass token ids instead")
            return torch.tensor(tok(prompt)["input_ids"], dtype=torch.long)
        ids = torch.as_tensor(prompt)
        if ids.dim() != 1 or ids.is_floating_point():
            raise ValueError(f"prompt token ids must be a 1-D integer sequence, got shape {list(ids.shape)}")
        return ids.long().cpu()

    def abort(self, request_id) -> None:
        """Stop a request now; its blocks are freed and its next output says finish_reason="abort"."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self._free(req)
        req.finished, req.reason = True, "abort"
        self.requests.pop(request_id, None)  # the id can be reused at once
        self._aborted.append(req)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit, prefill new requests, decode running ones; return outputs of requests that progressed."""
        touched, self._aborted = self._aborted, []
        admitted = self._admit()
        decoding = [r for r in self.running if r not in admitted]
        if admitted:
            self._prefill(admitted)
            touched += admitted
        decoding = self._reserve(decoding)
        if decoding:
            self._decode(decoding)
            touched += decoding
        outs, seen = [], set()
        for r in touched:
            if id(r) in seen:
                continue
            seen.add(id(r))
            outs.append(self._output(r))
        return outs

    def _admit(self) -> list[_Request]:
        admitted = []
        n_seqs = sum(len(r.seqs) for r in self.running)
        while self.waiting:
            r = self.waiting[0]
            need_seqs = r.p.num_beams if r.beam is not None or r.p.num_beams > 1 else 1
            if n_seqs + need_seqs > self.max_num_seqs:
                break
            keys = self._seq_keys(r)
            xkeys = self._cross_keys(r) if self._t5 else []
            if self.blocks.num_free_blocks < self._blocks_to_admit(len(xkeys), len(keys), r.p.num_beams):
                break
            self.waiting.popleft()
            sid = next(self._seq_ids)
            r.num_cached = self.blocks.allocate(sid, keys)[1]
            self.prefix_hit_tokens += r.num_cached
            r.seqs = [sid]
            if xkeys:
                r.cross_seq = ("x", sid)
                r.cross_cached = self.blocks.allocate(r.cross_seq, xkeys)[1]
            self.running.append(r)
            admitted.append(r)
            n_seqs += need_seqs
        return admitted

    def _blocks_to_admit(self, n_cross: int, n_tokens: int, num_beams: int) -> int:
        """Free blocks `_admit` wants before admitting: the prompt (+ one block per beam for its first
        copy-on-write), the encoder K/V for T5, and one spare for the first decode step."""
        need = n_tokens + (0 if num_beams == 1 else self.block_size * num_beams)
        cross = math.ceil(n_cross / self.block_size) if self._t5 else 0
        return math.ceil(need / self.block_size) + cross + 1

    def _seq_keys(self, r: _Request) -> list:
        if self._t5:
            base = [("dec", r.digest, tuple(r.prompt_ids.tolist()))]
            return base + [(t, i) for i, t in enumerate(r.generated)]
        return r.keys + [(t, i) for i, t in enumerate(r.generated)]

    def _cross_keys(self, r: _Request) -> list:
        # T5's encoder is bidirectional: every position's K/V depend on the whole prompt, so encoder
        # blocks may be shared only between requests with the same image and the same whole prompt
        whole = (r.digest, tuple(r.prompt_ids.tolist()))
        return [("enc", whole, i) for i in range(len(r.keys))]

    def _prefill(self, reqs: list[_Request]) -> None:
        feats = self.runner.image_inputs([(r.digest, r.px, r.interp) for r in reqs])
        items = []
        for r in reqs:
            sid = r.seqs[0]
            n = self.blocks.num_tokens(sid)
            # tokens served from the prefix cache keep their KV: never write into shared blocks
            slots = [-1] * r.num_cached + self.blocks.slot_mapping(sid, r.num_cached, n)
            it = {"prompt_ids": r.prompt_ids, "lm_inputs": feats[r.digest], "generated": list(r.generated), "slots": slots,
                  "table": self.blocks.block_table(sid)}
            if not self._t5:  # the decoder-only prefill reads cached prefixes instead of recomputing them
                it["num_cached"] = r.num_cached
            else:
                it["dec_start"] = self._dec_start
                nx = self.blocks.num_tokens(r.cross_seq)
                it["cross_slots"] = [-1] * r.cross_cached + self.blocks.slot_mapping(r.cross_seq, r.cross_cached, nx)
            items.append(it)
        if self.runner.greedy_head is not None and all(_plain_greedy(r) for r in reqs):
            # every request only takes its argmax: the screened head skips the full fp32 logits
            for r, tok in zip(reqs, self.runner.prefill_greedy(items, banned=self._banned(reqs))):
                self._take(r, tok)
            return
        logits = self.runner.prefill(items)
        plain = []
        for i, r in enumerate(reqs):
            if r.p.num_beams > 1:
                self._start_beams(r, logits[i: i + 1])
            elif _plain_greedy(r):
                plain.append((r, i))
            else:
                self._sample(r, logits[i: i + 1])
        if plain:
            self._take_argmax(logits, plain)

    def _history(self, r: _Request) -> list[int]:
        if self._t5:
            return [self._dec_start] + r.generated
        return r.prompt_ids.tolist() + r.generated

    def _sample(self, r: _Request, logits: torch.Tensor) -> None:
        # one row of logits: processing it on the CPU keeps per-request generators device-independent
        scores = smp.process(logits.cpu(), r.p, [self._history(r)], [len(r.generated)], r.eos)
        self._take(r, int(smp.select(scores, r.p, r.generator)[0]))

    def _take(self, r: _Request, tok: int) -> None:
        r.generated.append(tok)
        sid = r.seqs[0]
        if tok in r.eos:
            self._finish(r, "stop")
        elif len(r.generated) >= r.p.max_new_tokens:
            self._finish(r, "length")
        elif self._lm_len(r) >= self.max_model_len:
            self._finish(r, "length")
        else:
            r.pending = {sid: tok}

    def _lm_len(self, r):
        return (1 if self._t5 else r.n_lm_prompt) + len(r.generated)

    # ---- beams --------------------------------------------------------------------------------
    def _beam_prompt(self, r):
        if self._t5:
            return [self._dec_start]
        return r.prompt_ids.tolist()

    def _start_beams(self, r: _Request, logits: torch.Tensor) -> None:
        k = r.p.num_beams
        prompt = self._beam_prompt(r)
        # like greedy requests, beams stop at max_model_len (the model has no positions past it)
        room = self.max_model_len - (1 if self._t5 else r.n_lm_prompt)
        r.beam = BeamState(r.p, prompt, r.eos, r.pad, len(prompt) + min(r.p.max_new_tokens, room))
        self._beam_step(r, logits.expand(k, -1))

    def _beam_step(self, r: _Request, logits: torch.Tensor) -> None:
        b = r.beam
        hist = b.history()
        n_gen = [b.cur_len - b.prompt_len] * len(hist)
        # beam bookkeeping lives on the CPU (a batch of one request, as transformers' arithmetic)
        scores = smp.process(logits.cpu(), r.p, hist, n_gen, r.eos, log_probs=True)
        parents, toks = b.step(scores, r.generator)
        old = list(r.seqs)
        if b.done:
            r.generated = b.result()
            r.candidates = [b.result(i) for i in range(r.p.num_return_sequences)]
            self._finish(r, "stop" if (r.generated and r.generated[-1] in r.eos) else "length")
            return
        src = old if len(old) == r.p.num_beams else old * r.p.num_beams
        new = []
        for par in parents:
            sid = next(self._seq_ids)
            self.blocks.fork(src[par], sid)
            new.append(sid)
        for sid in set(old):
            self.blocks.free(sid)
        r.seqs = new
        r.pending = dict(zip(new, toks))

    # ---- decode -------------------------------------------------------------------------------
    def _reserve(self, reqs: list[_Request]) -> list[_Request]:
        """Give every pending token a cache slot, preempting the newest requests when blocks run out."""
        reqs = sorted(reqs, key=lambda r: r.order)
        self._slots, self._copies = {}, []
        while True:
            try:
                for r in reqs:
                    for sid, tok in r.pending.items():
                        if sid in self._slots:
                            continue  # got its slot before a preemption restarted this loop
                        pos = self.blocks.num_tokens(sid)
                        slot, copy = self.blocks.append_slot(sid, (tok, pos))
                        self._slots[sid] = (slot, pos)
                        if copy is not None:
                            self._copies.append(copy)
                return reqs
            except NoFreeBlocksError:
                victim = max(self.running, key=lambda r: r.order)
                for sid in victim.seqs:
                    self._slots.pop(sid, None)
                self._preempt(victim)
                reqs = [r for r in reqs if r is not victim]
                if not reqs:
                    return []

    def _preempt(self, r: _Request) -> None:
        self.num_preemptions += 1
        self._free(r)
        self.running.remove(r)
        if r.beam is not None:  # beam searches restart; they are deterministic given their seed
            r.beam, r.generated, r.candidates = None, [], None
            r.reset_generator()
        r.pending = {}
        self.waiting.appendleft(r)

    def _free(self, r: _Request) -> None:
        for sid in set(r.seqs):
            if sid in self.blocks:
                self.blocks.free(sid)
        if r.cross_seq is not None and r.cross_seq in self.blocks:
            self.blocks.free(r.cross_seq)
        r.seqs, r.cross_seq = [], None

    def _decode(self, reqs: list[_Request]) -> None:
        self.runner.copy_blocks(self._copies)
        toks, pos, slots, tables, lens, xt, xl, owners = [], [], [], [], [], [], [], []
        for r in reqs:
            for sid in r.seqs:
                slot, p = self._slots[sid]
                toks.append(r.pending[sid])
                pos.append(p)
                slots.append(slot)
                tables.append(self.blocks.block_table(sid))
                lens.append(self.blocks.num_tokens(sid))
                if self._t5:
                    xt.append(self.blocks.block_table(r.cross_seq))
                    xl.append(self.blocks.num_tokens(r.cross_seq))
                owners.append(r)
        args = (toks, pos, slots, tables, lens, xt or None, xl or None)
        if self.runner.greedy_head is not None and all(_plain_greedy(r) for r in reqs):
            # every sequence only takes its argmax: the screened head skips the full fp32 logits
            for r, tok in zip(reqs, self.runner.decode_greedy(*args, banned=self._banned(reqs))):
                self._take(r, tok)
            return
        logits = self.runner.decode(*args)
        i, plain = 0, []
        for r in reqs:
            n = len(r.seqs)
            if r.p.num_beams > 1:
                self._beam_step(r, logits[i: i + n])
            elif _plain_greedy(r):
                plain.append((r, i))  # greedy without penalties: one argmax for all of them, below
            else:
                self._sample(r, logits[i: i + n])
            i += n
        if plain:
            self._take_argmax(logits, plain)

    @staticmethod
    def _banned(reqs: list[_Request]) -> list[list[int]]:
        """Per request, the ids it may not take now: eos while short of min_new_tokens."""
        return [r.eos if len(r.generated) < r.p.min_new_tokens else [] for r in reqs]

    def _take_argmax(self, logits: torch.Tensor, plain: list[tuple[_Request, int]]) -> None:
        """Greedy requests without penalties (`_plain_greedy`), (request, row of logits) each: one
        argmax for all of them, with eos banned for those still short of min_new_tokens (as
        `sampling.process` would), one host transfer instead of one per request."""
        # every row plain: argmax the logits in place (nothing else reads them); else a gathered copy
        scores = logits if len(plain) == logits.shape[0] else logits[torch.tensor([j for _, j in plain], device=logits.device)]
        V = scores.shape[1]
        ban = [(k, e) for k, (r, _) in enumerate(plain) if len(r.generated) < r.p.min_new_tokens
               for e in r.eos if 0 <= e < V]  # min_new_tokens: eos is not allowed yet
        if ban:  # one indexed write for the whole batch (inference mode: the logits were made in it)
            rows, cols = zip(*ban)
            with torch.inference_mode():
                scores[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = float("-inf")
        for (r, _), tok in zip(plain, scores.argmax(-1).tolist()):
            self._take(r, tok)

    # ---- outputs --------------------------------------------------------------------------------
    def _finish(self, r: _Request, reason: str) -> None:
        r.finished, r.reason = True, reason
        r.pending = {}
        self._free(r)
        if r in self.running:
            self.running.remove(r)

    def _output(self, r: _Request) -> RequestOutput:
        if r.p.num_beams > 1 and not r.finished:
            new, toks = [], []
        else:
            toks = list(r.generated)
            new = toks[r.emitted:]
            r.emitted = len(toks)
        tok = self.tokenizer if (r.finished or r.p.num_beams == 1) else None  # running beams have no text yet
        if r.finished:
            self.requests.pop(r.id, None)
        out = RequestOutput._decoded_later(tok, r.id, toks, new, r.finished, r.reason, None,
                                           r.candidates if r.finished else None)
        q = self._queues.get(r.id)
        if q is not None:
            q.put_nowait(out)
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

        Several streams may run concurrently; whichever stream finds the engine idle drives `step()`,
        yielding to the event loop between steps.
        """
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        try:
            self.add_request(request_id, **kwargs)
            while True:
                while q.empty():
                    if not self.has_unfinished():
                        return
                    self.step()
                    await asyncio.sleep(0)
                out = q.get_nowait()
                yield out
                if out.finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if request_id in self.requests and not self.requests[request_id].finished:
                self.abort(request_id)
