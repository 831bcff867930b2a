"""The scheduler: which requests run this step, and where their new tokens go in the KV cache.

Each step first gives every running sequence a cache slot for the token it feeds next (running
requests first: they hold blocks already), preempting the newest request when blocks run out; then
admits waiting requests, first come first served, while `max_num_seqs`, the free blocks and the
prefill budget allow. A preempted request frees its blocks and goes back to the front of the queue:
greedy and sampled ones keep their tokens and recompute their KV, beam searches restart
(deterministically), so outputs are the same as without preemption. No tensors here.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from collections import deque

from .block_manager import BlockManager, NoFreeBlocksError
from .sequence import Request, Sequence, Status


def _order(r: Request) -> int:
    return r.order


@dataclasses.dataclass
class DecodeBatch:
    """The decode step's sequences, in row order, with what each feeds: token at position -> slot."""

    seqs: list[Sequence]
    tokens: list[int]
    positions: list[int]
    slots: list[int]

    @classmethod
    def of(cls, seqs: list[Sequence]) -> DecodeBatch:
        """From sequences already reserved (their `slot` and `position` set)."""
        return cls(seqs, [s.next_token for s in seqs], [s.position for s in seqs], [s.slot for s in seqs])


@dataclasses.dataclass
class ScheduledStep:
    prefill: list[Request]  # admitted this step: their prompts (and recomputed tokens) run now
    decode: list[Request]  # running: every sequence feeds `next_token` into its reserved `slot`
    copies: list[tuple[int, int]]  # copy-on-write block copies (src, dst) due before the decode
    batch: DecodeBatch | None = None  # decode's sequences, flat


class Scheduler:
    def __init__(self, blocks: BlockManager, layout, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks, self.layout = blocks, layout
        self.block_size = blocks.block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0  # prompt positions whose KV came from the prefix cache instead of a prefill

    def add(self, r: Request) -> None:
        self.waiting.append(r)

    def schedule(self) -> ScheduledStep:
        decode, copies, batch = self._reserve(self.running)
        return ScheduledStep(self._admit(), decode, copies, batch)

    # ---- admission ------------------------------------------------------------------------------
    def blocks_to_admit(self, n_cross: int, n_tokens: int, num_beams: int) -> int:
        """Free blocks admission wants: the prompt (+ one block per beam for its first copy-on-write),
        the encoder K/V (T5), and one spare for the first decode step."""
        need = n_tokens + (0 if num_beams == 1 else self.block_size * num_beams)
        return math.ceil(need / self.block_size) + math.ceil(n_cross / self.block_size) + 1

    def prefill_positions(self, r: Request) -> int:
        """Positions a request's prefill computes (its share of a padded prefill batch, at most)."""
        return max(r.n_prompt, self.layout.lm_len(r)) if self.layout.cross else self.layout.lm_len(r)

    def _admit(self) -> list[Request]:
        admitted, widest = [], 0
        n_seqs = sum(r.num_seqs for r in self.running) if self.waiting else 0
        while self.waiting:
            r = self.waiting[0]
            if n_seqs + r.num_seqs > self.max_num_seqs:
                break
            width = max(widest, self.prefill_positions(r))
            if admitted and width * (len(admitted) + 1) > self.max_num_batched_tokens:
                break  # the padded prefill batch would exceed its budget: next step
            keys = self.layout.seq_keys(r)
            xkeys = self.layout.cross_keys(r)
            if self.blocks.num_free_blocks < self.blocks_to_admit(len(xkeys), len(keys), r.num_seqs):
                break
            self.waiting.popleft()
            seq = Sequence(r)
            _, r.num_cached = self.blocks.allocate(seq, keys)
            seq.block_table = self.blocks.table_view(seq)
            self.prefix_hit_tokens += r.num_cached
            r.seqs = [seq]
            if xkeys:
                r.cross = Sequence(r)
                _, r.cross_cached = self.blocks.allocate(r.cross, xkeys)
                r.cross.block_table = self.blocks.table_view(r.cross)
            r.status = Status.RUNNING
            bisect.insort(self.running, r, key=_order)  # arrival order (a preempted request comes back in place)
            admitted.append(r)
            n_seqs += r.num_seqs
            widest = width
        return admitted

    # ---- decode slots ---------------------------------------------------------------------------
    def _reserve(self, reqs: list[Request]) -> tuple[list[Request], list[tuple[int, int]], DecodeBatch | None]:
        """Give every running sequence a slot for its next token, preempting the newest requests when
        blocks run out. Returns the requests that keep running, the copy-on-write copies, and their
        sequences as a DecodeBatch."""
        reqs = list(reqs)  # `running` is kept in arrival order: the newest last, preemption pops from the end
        seqs = [s for r in reqs for s in r.seqs]
        tokens = [s.next_token for s in seqs]
        slots, positions, copies = [], [], []
        while True:
            try:
                self.blocks.append_tokens(seqs, tokens, slots, positions, copies)
                break
            except NoFreeBlocksError:
                victim = reqs.pop()  # every running request is in reqs: the newest is the last
                self.preempt(victim)  # frees its blocks, the new slots of its sequences too
                if not reqs:
                    return [], copies, None
                # the others keep the slots they got; reservation goes on where it stopped
                kept = [i for i, s in enumerate(seqs) if s.request is not victim]
                n = len(slots)
                slots = [slots[i] for i in kept if i < n]
                positions = [positions[i] for i in kept if i < n]
                seqs = [seqs[i] for i in kept]
                tokens = [tokens[i] for i in kept]
        for s, slot, pos in zip(seqs, slots, positions):
            s.slot, s.position = slot, pos
        return reqs, copies, DecodeBatch(seqs, tokens, positions, slots) if seqs else None

    # ---- leaving --------------------------------------------------------------------------------
    def preempt(self, r: Request) -> None:
        self.num_preemptions += 1
        self.free(r)
        self.running.remove(r)
        if r.beam is not None:  # beam searches restart; they are deterministic given their seed
            r.beam, r.generated, r.candidates = None, [], None
            if r.step_scores is not None:  # kept scores restart with it
                r.step_scores = []
            if r.step_logits is not None:
                r.step_logits = []
            r.reset_generator()
        r.status = Status.WAITING
        self.waiting.appendleft(r)

    def free(self, r: Request) -> None:
        """Release every block the request holds."""
        for s in r.seqs:
            self.blocks.free(s)
        if r.cross is not None:
            self.blocks.free(r.cross)
        r.seqs, r.cross = [], None

    def finish(self, r: Request) -> None:
        """A request is done (finished, aborted or failed): its blocks are freed and it leaves the queues."""
        self.free(r)
        if r.status is Status.RUNNING:
            self.running.remove(r)
        elif r.status is Status.WAITING and r in self.waiting:
            self.waiting.remove(r)
        r.status = Status.FINISHED

    def fork_beams(self, r: Request, parents: list[int], tokens: list[int]) -> None:
        """The next running beams: beam i continues parent beam parents[i] with tokens[i]."""
        old = r.seqs
        src = old if len(old) == len(parents) else old * len(parents)  # right after prefill: one stream
        new = []
        for par, tok in zip(parents, tokens):
            s = Sequence(r, next_token=tok)
            self.blocks.fork(src[par], s)
            s.block_table = self.blocks.table_view(s)
            new.append(s)
        for s in old:
            self.blocks.free(s)
        r.seqs = new
