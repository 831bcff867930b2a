"""Running one scheduled step: the decode batch, then the prefill batch (image features first), the
sampler's choice for every row, and each request's bookkeeping after (its tokens, beams, finish,
outputs). A batch that fails is rerun one request at a time, and only the requests that fail alone
finish with finish_reason "error"."""
from __future__ import annotations

import time

import torch

from .beam import BeamState
from .outputs import RequestOutput
from .runner import PrefillItem
from .processors import hits_stop
from .sampler import BeamGroup, Capture, Row
from .scheduler import DecodeBatch
from .sequence import Request, Status


class Executor:
    def __init__(self, model, scheduler, runner, sampler, layout, *, max_model_len: int, tokenizer=None):
        self.model, self.scheduler, self.runner, self.sampler, self.layout = model, scheduler, runner, sampler, layout
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.vocab = model.cfg.lm.vocab
        self.live: dict[object, Request] = {}  # request id -> its unfinished request: one place per id
        self.pending: list[Request] = []  # finished between steps (aborts): their last output comes with the next step
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def step(self) -> list[RequestOutput]:
        """One step (the engine holds its lock, inference mode is on): outputs of the requests that
        progressed, finished or failed in it, and of those finished since the last (aborts)."""
        touched, self.pending = self.pending, []
        plan = self.scheduler.schedule()
        now = time.monotonic()
        for r in plan.prefill:
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
                self.prompt_tokens += r.n_prompt
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
            self.finish(r, "error", f"{type(e).__name__}: {e}")

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
        if greedy:  # no beams here: the ban depends on the generated count (and the ids, with ban rules) alone
            plan = self.sampler.prepare_greedy([self._banned(r) for r in reqs], st)
        else:
            rows, beams = self._rows(reqs, prefill)
            plan = self.sampler.prepare(rows, beams, self.vocab, st)
        st.send()
        runner.copy_blocks(copies)
        logits = lm.logits(run(inp)).float() if prefill else run(inp)
        out = self.sampler(logits, plan)
        if out.captured is not None:
            self._keep_captures(reqs, out.captured)
        self._apply(reqs, out.tokens, out.beams)

    def _banned(self, r: Request):
        """The ids a request may not take now: eos while short of min_new_tokens, and its ban rules'
        (per beam, a list, when the rules depend on each beam's ids)."""
        n = (r.beam.cur_len - r.beam.prompt_len) if r.beam is not None else len(r.generated)
        eos = r.ban_ids if n < r.params.min_new_tokens else ()
        rules = r.bans
        if rules is None:
            return eos
        if not rules.dynamic:
            return eos + rules.static
        if r.beam is not None:
            return [eos + rules.now(h) for h in r.beam.history()]
        return eos + rules.now(self.layout.prefix(r) + r.generated)

    def _capture(self, r: Request, beam_ids: list[list[int]] | None) -> Capture | None:
        p = r.params
        if not p.on_host:
            return None
        ids = beam_ids if beam_ids is not None else [self.layout.prefix(r) + r.generated]
        return Capture(ids, p.logits_processors, p.output_scores, p.output_logits)

    @staticmethod
    def _keep_captures(reqs: list[Request], captured: list) -> None:
        """The step's scores / logits into each request that asked (rows first, then beam groups, as
        the sampler orders them)."""
        rows = [r for r in reqs if r.params.num_beams == 1]
        groups = [r for r in reqs if r.params.num_beams > 1]
        for r, c in zip(rows + groups, captured):
            if c is None:
                continue
            if r.step_scores is not None:
                r.step_scores.append(c[0])
            if r.step_logits is not None:
                r.step_logits.append(c[1])

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
                hist = b.history() if p.repetition_penalty != 1.0 or p.on_host else None
                rr = [i] * k if prefill else list(range(i, i + k))
                beams.append(BeamGroup(rr, p, r.generator, hist if p.repetition_penalty != 1.0 else None,
                                       self._banned(r), b.running_scores.tolist(), b.keep, self._capture(r, hist)))
                i += 1 if prefill else k
            else:
                hist = self.layout.prefix(r) + r.generated if p.repetition_penalty != 1.0 else None
                rows.append(Row(i, p, r.generator, hist, self._banned(r), self._capture(r, None)))
                i += 1
        return rows, beams

    def _apply(self, reqs: list[Request], tokens: list[int], cands: list) -> None:
        """Hand every request its token (or its beams' candidates); one request's failure here fails it alone."""
        now = time.monotonic()
        if not cands:  # no beam search in the batch: the decode step's hot loop, `_take` inline
            for r, tok in zip(reqs, tokens):
                gen = r.generated
                if tok < 0 or tok in r.eos or len(gen) + 1 >= r.max_tokens or r.first_token_time is None or r.watch:
                    try:  # the rare cases: a failed row, a request's first or last token, stopping criteria
                        self._take(r, tok, now)
                    except Exception as e:
                        self._fail(r, e)
                    continue
                gen.append(tok)
                r.last_token_time = now
                r.seqs[0].next_token = tok
                self.generation_tokens += 1
            return
        it_tok, it_beam = iter(tokens), iter(cands)
        for r in reqs:
            beam = r.params.num_beams > 1
            c = next(it_beam) if beam else None
            t = None if beam else next(it_tok)
            try:
                if beam:
                    self._beam_step(r, c, self.vocab)
                else:
                    self._take(r, t, now)
            except Exception as e:
                self._fail(r, e)

    def _take(self, r: Request, tok: int, now: float) -> None:
        if tok < 0:
            raise ValueError("the sampler found no finite score (the model's logits are NaN or -inf)")
        gen = r.generated
        gen.append(tok)
        self.generation_tokens += 1
        if r.first_token_time is None:
            r.first_token_time = now
        r.last_token_time = now
        if tok in r.eos:
            self.finish(r, "stop")
        elif len(gen) >= r.max_tokens:  # max_new_tokens, or max_model_len
            self.finish(r, "length")
        elif r.watch and bool(self._stops(r, [self.layout.prefix(r) + gen])[0]):
            self.finish(r, "stop")
        else:
            r.seqs[0].next_token = tok

    @staticmethod
    def _stops(r: Request, ids: list[list[int]]):
        """The caller's stopping criteria on these rows of ids (bool [rows]), given the scores so far
        as transformers does (None unless they are kept)."""
        scores = tuple(r.step_scores) if r.step_scores is not None else None
        return hits_stop(r.params.stopping_criteria, torch.tensor(ids, dtype=torch.long), scores)

    def _beam_step(self, r: Request, cand, V: int) -> None:
        b = r.beam
        stop = (lambda seqs: self._stops(r, seqs.tolist())) if r.watch else None
        parents, toks = b.step(cand[0], cand[1], V, stop)
        now = time.monotonic()
        if r.first_token_time is None:
            r.first_token_time = now
        r.last_token_time = now
        if b.done:
            r.generated = b.result()
            r.candidates = [b.result(i) for i in range(r.params.num_return_sequences)]
            r.candidate_scores = b.scores[: r.params.num_return_sequences].tolist()
            r.beam_indices = [b.result_beams(i) for i in range(r.params.num_return_sequences)]
            self.generation_tokens += len(r.generated)
            self.finish(r, "stop" if (r.generated and r.generated[-1] in r.eos) else "length")
        else:
            self.scheduler.fork_beams(r, parents, toks)

    # ---- outputs --------------------------------------------------------------------------------
    def finish(self, r: Request, reason: str, error: str | None = None) -> None:
        r.finish_reason, r.error = reason, error
        r.finished_time = time.monotonic()
        self.scheduler.finish(r)
        if self.live.get(r.request_id) is r:  # a later request may already hold this id
            del self.live[r.request_id]

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
        if done and (r.params.on_host or beams):
            out.__dict__.update(scores=None if r.step_scores is None else tuple(r.step_scores),
                                logits=None if r.step_logits is None else tuple(r.step_logits),
                                candidate_scores=r.candidate_scores, beam_indices=r.beam_indices)
        if r.sink is not None:
            r.sink.append(out)
        return out
