"""Paged KV-cache bookkeeping: which physical block holds which tokens of which sequence.

No tensor math and no tensors: the model runner owns the cache tensors and does what this module
tells it (write these slots, copy block src to dst). Design (nano-vllm's, plus copy-on-write):

* A pool of `num_blocks` blocks of `block_size` token slots. Slot `b * block_size + i` is offset i of
  block b, the flat index `write_kv` takes.
* Each sequence has a block table (logical block j -> physical block) and a token count. Blocks
  carry reference counts; a block is free exactly when its count is 0.
* Every token has an opaque hashable *key* that determines its KV together with all earlier keys:
  a token id, or e.g. ("img", image_digest, position) for the image-embedding positions, which have
  no token id. Two requests with the same image and prompt prefix therefore have equal key prefixes.
* Prefix sharing: a full block is registered under (content id of the previous block, its own
  block_size keys); a later request whose prefix matches walks that chain and shares the blocks.
  Content ids are small integers handed out once per distinct content, so matching is exact: no
  hash collisions are possible, and an evicted parent can never be confused with new content.
  Freed blocks keep their content and registration and sit in an LRU free list; they are evicted
  (unregistered) only when the free list hands them out again, and unregistered blocks go first.
* The last prompt token is never served from the cache, so the runner always computes at least one
  token (it needs its logits) and never writes into a shared block.
* Forks (beam search) share every block, the partial last one included. Appending into a shared
  partial block copies it first: `append_slot` hands out a fresh block and returns (src, dst), which
  the runner copies (every layer's K and V) before writing the new token. Full blocks are never
  written again, so they are shared without copies.

API (seq_id: any hashable; keys: a sequence of hashables):
    can_allocate(num_tokens or keys) -> bool      enough free blocks (keys: counting prefix hits)
    allocate(seq_id, keys) -> (table, num_cached)  num_cached leading tokens already hold their KV;
                                                   the runner writes slot_mapping(seq_id, num_cached, len(keys))
    can_append(seq_id) -> bool                    a free block exists if the next append needs one
    append_slot(seq_id, key) -> (slot, copy)       slot for the new token; copy is (src, dst) or None
    append_token(seq_id, token) -> (slot, pos, copy)  append_slot keyed (token, position)
    append_tokens(seq_ids, tokens, slots, positions, copies)  the same for many (the decode step)
    slot_mapping(seq_id, start, end) -> list[int]  flat slots of tokens [start, end)
    fork(parent_seq_id, child_seq_id) -> table     child shares all of parent's blocks
    free(seq_id)                                   release; unknown or already-freed id raises
    block_table(seq_id), table_view(seq_id), num_tokens(seq_id), num_free_blocks, num_used_blocks, seq_ids
    check_invariants()                            asserts the accounting (tests, debug runs)
Failures raise `NoFreeBlocksError`, `UnknownSequenceError` or `SequenceExistsError` (all
`BlockManagerError`) before any state changes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

_ROOT = 0  # content id of the empty prefix, the parent of every sequence's first block


class BlockManagerError(Exception):
    pass


class NoFreeBlocksError(BlockManagerError):
    pass


class UnknownSequenceError(BlockManagerError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SequenceExistsError(BlockManagerError, ValueError):
    pass


class _Block:
    __slots__ = ("id", "ref", "keys", "uid", "cache_key")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref = 0
        self.keys: list = []  # keys of the tokens in slots 0..len-1 (the slots that hold KV)
        self.uid: int | None = None  # content id once full
        self.cache_key: tuple | None = None  # (parent uid, keys) it is registered under, if any

    def reset(self) -> None:
        self.keys, self.uid, self.cache_key = [], None, None


class _Seq:
    __slots__ = ("table", "num_tokens")

    def __init__(self, table: list[int], num_tokens: int):
        self.table = table
        self.num_tokens = num_tokens


class BlockManager:
    """Free list, block tables, reference counts, prefix cache and copy-on-write for a paged KV cache."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # front = evicted first
        self._cache: dict[tuple, int] = {}  # (parent uid, keys tuple) -> block id
        self._seqs: dict[Hashable, _Seq] = {}
        self._next_uid = _ROOT + 1

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def seq_ids(self) -> list:
        return list(self._seqs)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id) -> list[int]:
        return list(self._seq(seq_id).table)

    def table_view(self, seq_id) -> list[int]:
        """The sequence's block table itself, not a copy: it follows appends and copy-on-write (the
        runner reads it every step). Read only."""
        return self._seq(seq_id).table

    def num_tokens(self, seq_id) -> int:
        return self._seq(seq_id).num_tokens

    def slot_mapping(self, seq_id, start: int = 0, end: int | None = None) -> list[int]:
        """Flat cache slots (block * block_size + offset) of tokens [start, end) of `seq_id`."""
        s = self._seq(seq_id)
        end = s.num_tokens if end is None else end
        if not 0 <= start <= end <= s.num_tokens:
            raise ValueError(f"token range [{start}, {end}) outside sequence {seq_id!r} of {s.num_tokens} tokens")
        bs = self.block_size
        return [s.table[t // bs] * bs + t % bs for t in range(start, end)]

    # ---- allocation ----------------------------------------------------------------------------
    def _prefix_hits(self, keys: Sequence) -> list[int]:
        """Blocks holding a cached prefix of `keys`, not reaching the last token."""
        bs, hits, parent = self.block_size, [], _ROOT
        for j in range((len(keys) - 1) // bs):  # full blocks inside keys[:-1]
            bid = self._cache.get((parent, tuple(keys[j * bs:(j + 1) * bs])))
            if bid is None:
                break
            hits.append(bid)
            parent = self._blocks[bid].uid
        return hits

    def _blocks_needed(self, keys: Sequence) -> tuple[list[int], int]:
        hits = self._prefix_hits(keys)
        fresh = -(-len(keys) // self.block_size) - len(hits)
        revived = sum(1 for b in hits if self._blocks[b].ref == 0)  # cached but free: leave the free list too
        return hits, fresh + revived

    def can_allocate(self, num_tokens_or_keys) -> bool:
        """Whether `allocate` would succeed: an int counts blocks without prefix sharing (an upper
        bound); a key sequence counts exactly, prefix-cache hits included."""
        if isinstance(num_tokens_or_keys, int):
            return -(-num_tokens_or_keys // self.block_size) <= len(self._free)
        return self._blocks_needed(num_tokens_or_keys)[1] <= len(self._free)

    def allocate(self, seq_id, keys: Sequence) -> tuple[list[int], int]:
        """Give a new sequence blocks for its prompt `keys`; returns (block_table, num_cached_tokens).

        The first num_cached_tokens tokens (a multiple of block_size, < len(keys)) already have their
        KV in shared blocks; the runner computes the rest and writes them to
        slot_mapping(seq_id, num_cached_tokens, len(keys)), all in blocks this sequence owns alone.
        """
        if seq_id in self._seqs:
            raise SequenceExistsError(f"sequence {seq_id!r} is already allocated")
        if len(keys) == 0:
            raise ValueError("allocate needs at least one token")
        hits, needed = self._blocks_needed(keys)
        if needed > len(self._free):
            raise NoFreeBlocksError(f"sequence {seq_id!r} needs {needed} free blocks, {len(self._free)} left")
        bs = self.block_size
        table, parent = [], _ROOT
        for bid in hits:  # take the hits before popping fresh blocks, so none of them gets evicted
            b = self._blocks[bid]
            if b.ref == 0:
                del self._free[bid]
            b.ref += 1
            table.append(bid)
            parent = b.uid
        for j in range(len(hits), -(-len(keys) // bs)):
            b = self._pop_free()
            b.ref = 1
            b.keys = list(keys[j * bs:(j + 1) * bs])
            if len(b.keys) == bs:
                parent = self._register(b, parent)
            table.append(b.id)
        self._seqs[seq_id] = _Seq(table, len(keys))
        return list(table), len(hits) * bs

    def can_append(self, seq_id) -> bool:
        return self._append_needs_block(self._seq(seq_id)) <= len(self._free)

    def _append_needs_block(self, s: _Seq) -> int:
        if s.num_tokens % self.block_size == 0:
            return 1  # last block full (or no block): the token starts a new one
        return 1 if self._blocks[s.table[-1]].ref > 1 else 0  # shared partial block: copy on write

    def append_slot(self, seq_id, key) -> tuple[int, tuple[int, int] | None]:
        """Reserve the slot of one new token with `key`; returns (slot, copy).

        copy is None, or (src_block, dst_block) when the last block was shared and partial: the
        runner must copy block src to dst (K and V, every layer) before writing the token to slot.
        """
        s = self._seq(seq_id)
        return self._append(s, seq_id, key)

    def append_token(self, seq_id, token) -> tuple[int, int, tuple[int, int] | None]:
        """`append_slot` for a generated token, keyed (token, position): returns (slot, position, copy)."""
        s = self._seqs.get(seq_id)
        if s is None:
            raise UnknownSequenceError(f"unknown sequence {seq_id!r}")
        pos = s.num_tokens
        slot, copy = self._append(s, seq_id, (token, pos))
        return slot, pos, copy

    def append_tokens(self, seq_ids: list, tokens: list[int], slots: list[int], positions: list[int],
                      copies: list[tuple[int, int]]) -> None:
        """`append_token` for many sequences, the common case inline (the decode step's hot loop):
        appends each one's slot and position to `slots` / `positions`, and copy-on-write pairs to
        `copies`. On NoFreeBlocksError the sequences before the failing one have their slots (as
        many as `slots` holds); the failing one and those after are unchanged."""
        bs, blocks, seqs = self.block_size, self._blocks, self._seqs
        for sid, tok in zip(seq_ids[len(slots):], tokens[len(slots):]):
            s = seqs.get(sid)
            if s is None:
                raise UnknownSequenceError(f"unknown sequence {sid!r}")
            pos = s.num_tokens
            off = pos % bs
            b = blocks[s.table[-1]] if off else None
            if b is not None and b.ref == 1 and off < bs - 1:  # room in an own block, and it stays partial
                b.keys.append((tok, pos))
                s.num_tokens = pos + 1
                slots.append(b.id * bs + off)
            else:
                slot, copy = self._append(s, sid, (tok, pos))
                slots.append(slot)
                if copy is not None:
                    copies.append(copy)
            positions.append(pos)

    def _append(self, s: _Seq, seq_id, key) -> tuple[int, tuple[int, int] | None]:
        bs = self.block_size
        offset, copy = s.num_tokens % bs, None
        if offset == 0:
            if not self._free:
                raise NoFreeBlocksError(f"sequence {seq_id!r} needs a free block to append, none left")
            b = self._pop_free()
            b.ref = 1
            s.table.append(b.id)
        else:
            b = self._blocks[s.table[-1]]
            if b.ref > 1:  # shared partial block: copy on write
                if not self._free:
                    raise NoFreeBlocksError(f"sequence {seq_id!r} needs a free block to append, none left")
                src, b = b, self._pop_free()
                src.ref -= 1
                b.ref = 1
                b.keys = list(src.keys)
                s.table[-1] = b.id
                copy = (src.id, b.id)
        assert b.ref == 1 and len(b.keys) == offset, "about to write a shared block or a misfilled one"
        b.keys.append(key)
        s.num_tokens += 1
        if offset == bs - 1:
            self._register(b, self._blocks[s.table[-2]].uid if len(s.table) > 1 else _ROOT)
        return b.id * bs + offset, copy

    def fork(self, parent_seq_id, child_seq_id) -> list[int]:
        """Make `child_seq_id` a copy of `parent_seq_id` sharing all its blocks; returns the child's table."""
        p = self._seq(parent_seq_id)
        if child_seq_id in self._seqs:
            raise SequenceExistsError(f"sequence {child_seq_id!r} is already allocated")
        for bid in p.table:
            self._blocks[bid].ref += 1
        self._seqs[child_seq_id] = _Seq(list(p.table), p.num_tokens)
        return list(p.table)

    def free(self, seq_id) -> None:
        """Release a finished or preempted sequence. Blocks whose count drops to 0 become free; full
        registered ones keep their content for prefix hits until evicted."""
        s = self._seqs.pop(seq_id, None)
        if s is None:
            raise UnknownSequenceError(f"free of unknown or already-freed sequence {seq_id!r}")
        for bid in reversed(s.table):  # tail first, so a prefix outlives its continuations in the LRU
            b = self._blocks[bid]
            assert b.ref > 0, f"block {bid} freed twice"
            b.ref -= 1
            if b.ref == 0:
                self._free[bid] = None
                if b.cache_key is None:
                    b.reset()
                    self._free.move_to_end(bid, last=False)  # no reusable content: evict first

    # ---- internals -----------------------------------------------------------------------------
    def _seq(self, seq_id) -> _Seq:
        s = self._seqs.get(seq_id)
        if s is None:
            raise UnknownSequenceError(f"unknown sequence {seq_id!r}")
        return s

    def _pop_free(self) -> _Block:
        bid, _ = self._free.popitem(last=False)
        b = self._blocks[bid]
        assert b.ref == 0
        if b.cache_key is not None:
            del self._cache[b.cache_key]  # evict: its content is about to be overwritten
        b.reset()
        return b

    def _register(self, b: _Block, parent_uid: int) -> int:
        """Give full block `b` its content id and register it for prefix hits; returns the id."""
        key = (parent_uid, tuple(b.keys))
        other = self._cache.get(key)
        if other is None:
            b.uid, self._next_uid = self._next_uid, self._next_uid + 1
            self._cache[key] = b.id
            b.cache_key = key
        else:
            # Same content computed twice (a fully cached prompt's last block, or two sequences that
            # filled equal blocks): share the content id so later blocks still chain to the cached one.
            b.uid = self._blocks[other].uid
        return b.uid

    def check_invariants(self) -> None:
        """Assert the accounting: no leaks, no double frees, counts match tables, no shared block is
        written past what every sharer sees, the prefix cache points at matching full blocks."""
        bs = self.block_size
        refs = [0] * self.num_blocks
        for seq_id, s in self._seqs.items():
            assert len(s.table) == -(-s.num_tokens // bs), f"seq {seq_id!r}: {len(s.table)} blocks for {s.num_tokens} tokens"
            assert len(set(s.table)) == len(s.table), f"seq {seq_id!r}: a block appears twice in its table"
            for j, bid in enumerate(s.table):
                refs[bid] += 1
                b = self._blocks[bid]
                used = min(bs, s.num_tokens - j * bs)
                # A sharer that had written into a shared block would make another sharer's view shorter.
                assert len(b.keys) == used, f"seq {seq_id!r}: block {bid} holds {len(b.keys)} tokens, seq uses {used}"
                if used == bs:
                    assert b.uid is not None, f"full block {bid} has no content id"
        for b in self._blocks:
            assert b.ref == refs[b.id], f"block {b.id}: ref {b.ref}, but {refs[b.id]} tables hold it"
            assert (b.ref == 0) == (b.id in self._free), f"block {b.id}: ref {b.ref} but free={b.id in self._free}"
            if b.cache_key is not None:
                assert self._cache.get(b.cache_key) == b.id, f"block {b.id} registered under a stale key"
                assert b.cache_key[1] == tuple(b.keys) and len(b.keys) == bs and b.uid is not None
        assert len(self._free) + sum(1 for r in refs if r) == self.num_blocks, "leaked blocks"
        for key, bid in self._cache.items():
            assert self._blocks[bid].cache_key == key, f"cache entry for block {bid} does not match it"
