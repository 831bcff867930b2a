"""BlockManager: allocation, free, fork, copy-on-write, prefix sharing, exhaustion, and a randomized
run against a simulated cache that checks every sequence reads back exactly its own tokens."""
import random

import pytest

from blip2_fast.engine.block_manager import (BlockManager, BlockManagerError, NoFreeBlocksError,
                                             SequenceExistsError, UnknownSequenceError)

BS = 4


def test_allocate_free_roundtrip():
    bm = BlockManager(8, BS)
    table, cached = bm.allocate("a", list(range(10)))
    assert len(table) == 3 and cached == 0 and bm.num_free_blocks == 5
    assert bm.slot_mapping("a", 0, 10) == [table[t // BS] * BS + t % BS for t in range(10)]
    assert bm.num_tokens("a") == 10 and bm.block_table("a") == table
    bm.check_invariants()
    bm.free("a")
    assert bm.num_free_blocks == 8 and "a" not in bm
    bm.check_invariants()


def test_errors_are_clean():
    bm = BlockManager(3, BS)
    with pytest.raises(ValueError):
        BlockManager(3, 3)
    with pytest.raises(UnknownSequenceError):
        bm.free("nope")
    with pytest.raises(UnknownSequenceError):
        bm.append_slot("nope", 1)
    bm.allocate("a", [1, 2, 3])
    with pytest.raises(SequenceExistsError):
        bm.allocate("a", [1])
    with pytest.raises(SequenceExistsError):
        bm.fork("a", "a")
    with pytest.raises(ValueError):
        bm.allocate("b", [])
    with pytest.raises(ValueError):
        bm.slot_mapping("a", 2, 4)
    bm.free("a")
    with pytest.raises(UnknownSequenceError, match="already-freed"):
        bm.free("a")  # double free
    assert issubclass(NoFreeBlocksError, BlockManagerError)
    bm.check_invariants()


def test_exhaustion_raises_without_changing_state():
    bm = BlockManager(3, BS)
    assert bm.can_allocate(12) and not bm.can_allocate(13)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("big", list(range(13)))
    assert bm.num_free_blocks == 3 and "big" not in bm
    bm.allocate("a", list(range(12)))  # fills all three blocks
    assert not bm.can_append("a")
    with pytest.raises(NoFreeBlocksError):
        bm.append_slot("a", 99)
    assert bm.num_tokens("a") == 12
    bm.check_invariants()
    bm.free("a")
    bm.check_invariants()


def test_append_fills_blocks_in_order():
    bm = BlockManager(4, BS)
    table, _ = bm.allocate("a", [0, 1, 2])
    slot, copy = bm.append_slot("a", 3)
    assert slot == table[0] * BS + 3 and copy is None
    slot, copy = bm.append_slot("a", 4)  # block full: starts a new one
    assert copy is None and len(bm.block_table("a")) == 2 and slot == bm.block_table("a")[1] * BS
    bm.check_invariants()


def test_fork_copy_on_write():
    bm = BlockManager(8, BS)
    table, _ = bm.allocate("p", list(range(6)))  # one full block + a partial one holding 2 tokens
    assert bm.fork("p", "c") == table
    assert bm.num_free_blocks == 6  # forking allocates nothing
    bm.check_invariants()
    slot, copy = bm.append_slot("c", 100)  # shared partial last block -> copy on write
    new = bm.block_table("c")
    assert copy == (table[1], new[1]) and new[0] == table[0] and new[1] != table[1]
    assert slot == new[1] * BS + 2
    bm.check_invariants()
    slot, copy = bm.append_slot("p", 200)  # the parent owns its block alone again: no copy
    assert copy is None and slot == table[1] * BS + 2 and bm.block_table("p") == table
    bm.free("p")
    assert bm.block_table("c")[0] == table[0]  # still held by the child
    bm.check_invariants()
    bm.free("c")
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_fork_of_full_last_block_needs_no_copy():
    bm = BlockManager(8, BS)
    bm.allocate("p", list(range(8)))
    bm.fork("p", "c")
    _, copy = bm.append_slot("c", 1)
    assert copy is None
    bm.check_invariants()


def test_can_append_counts_copy_on_write():
    bm = BlockManager(2, BS)
    bm.allocate("p", [1, 2, 3, 4, 5])  # both blocks used
    bm.fork("p", "c")
    assert not bm.can_append("c")  # shared partial block would need a copy, and none is free
    with pytest.raises(NoFreeBlocksError):
        bm.append_slot("c", 6)
    bm.check_invariants()


def test_prefix_sharing_and_cached_tokens():
    bm = BlockManager(16, BS)
    img = [("img", "digest0", i) for i in range(6)]  # image positions have no token ids
    a = img + [10, 11, 12, 13, 14]  # 11 tokens: blocks 0, 1 full; block 2 partial
    ta, ca = bm.allocate("a", a)
    assert ca == 0
    b = img + [10, 11, 99]  # shares block 0 (img 0..3) and block 1 (img 4, 5, 10, 11)
    tb, cb = bm.allocate("b", b + [7])
    assert cb == 8 and tb[:2] == ta[:2] and tb[2] not in ta
    assert bm.num_free_blocks == 16 - 3 - 1
    other_img = [("img", "digest1", i) for i in range(6)] + [10, 11, 12, 13, 14]
    _, cc = bm.allocate("c", other_img)
    assert cc == 0  # a different image shares nothing
    bm.check_invariants()


def test_prefix_never_covers_last_token():
    bm = BlockManager(16, BS)
    keys = list(range(8))  # exactly two full blocks
    ta, _ = bm.allocate("a", keys)
    tb, cb = bm.allocate("b", keys)
    assert cb == 4 and tb[0] == ta[0] and tb[1] != ta[1]  # the last block is recomputed privately
    bm.check_invariants()
    tc, cc = bm.allocate("c", keys + [8])  # still chains through the first copy
    assert cc == 8 and tc[:2] == ta[:2]
    bm.check_invariants()


def test_freed_blocks_stay_cached_until_evicted():
    bm = BlockManager(4, BS)
    keys = list(range(9))
    ta, _ = bm.allocate("a", keys)
    bm.free("a")
    assert bm.num_free_blocks == 4
    assert bm.can_allocate(keys)
    tb, cb = bm.allocate("b", keys)  # revives the freed prefix blocks
    assert cb == 8 and tb[:2] == ta[:2]
    bm.free("b")
    bm.allocate("x", [100 + i for i in range(16)])  # needs every block: evicts the cached ones
    bm.free("x")
    _, cb = bm.allocate("b2", keys)
    assert cb == 0
    bm.check_invariants()


def test_appended_blocks_become_shareable():
    bm = BlockManager(8, BS)
    bm.allocate("a", [1, 2])
    for k in (3, 4, 5):
        bm.append_slot("a", k)
    _, cached = bm.allocate("b", [1, 2, 3, 4, 5, 6])
    assert cached == 4
    bm.check_invariants()


def test_check_invariants_catches_corruption():
    def fresh():
        bm = BlockManager(8, BS)
        bm.allocate("p", list(range(6)))
        bm.fork("p", "c")
        return bm

    bm = fresh()
    bm._blocks[bm.block_table("p")[0]].ref += 1  # count without a table
    with pytest.raises(AssertionError):
        bm.check_invariants()
    bm = fresh()
    bm._blocks[bm.block_table("p")[1]].keys.append(7)  # a write into the shared partial block
    with pytest.raises(AssertionError):
        bm.check_invariants()
    bm = fresh()
    bm._free.popitem()  # a leaked block
    with pytest.raises(AssertionError):
        bm.check_invariants()


class _SimCache:
    """What the model runner would do with the manager's instructions, with each slot holding the
    full key prefix its token's KV depends on."""

    def __init__(self, bm):
        self.bm, self.slots, self.keys = bm, {}, {}

    def allocate(self, sid, keys):
        _, cached = self.bm.allocate(sid, keys)
        for t, slot in zip(range(cached, len(keys)), self.bm.slot_mapping(sid, cached, len(keys))):
            self.slots[slot] = tuple(keys[:t + 1])
        self.keys[sid] = list(keys)
        return cached

    def append(self, sid, key):
        slot, copy = self.bm.append_slot(sid, key)
        if copy is not None:
            src, dst = copy
            for i in range(self.bm.block_size):
                if src * self.bm.block_size + i in self.slots:
                    self.slots[dst * self.bm.block_size + i] = self.slots[src * self.bm.block_size + i]
        self.keys[sid].append(key)
        self.slots[slot] = tuple(self.keys[sid])
        return copy

    def fork(self, parent, child):
        self.bm.fork(parent, child)
        self.keys[child] = list(self.keys[parent])

    def free(self, sid):
        self.bm.free(sid)
        del self.keys[sid]

    def verify(self):
        for sid, keys in self.keys.items():
            for t, slot in enumerate(self.bm.slot_mapping(sid)):
                assert self.slots.get(slot) == tuple(keys[:t + 1]), f"seq {sid} token {t} reads the wrong KV"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_ops_keep_invariants(seed):
    rng = random.Random(seed)
    bm = BlockManager(24, BS)
    sim = _SimCache(bm)
    prompts = [[("img", 0, i) for i in range(5)] + [1, 2, 3], [("img", 1, i) for i in range(5)] + [1, 2]]
    next_id, counts = 0, {"alloc": 0, "append": 0, "fork": 0, "free": 0, "full": 0, "cow": 0, "hit": 0}
    for _ in range(600):
        live = list(sim.keys)
        op = rng.choice(["alloc", "append", "append", "append", "fork", "free"] if live else ["alloc"])
        try:
            if op == "alloc":
                keys = list(rng.choice(prompts)) + [rng.randrange(3) for _ in range(rng.randrange(0, 9))]
                counts["hit"] += sim.allocate(next_id, keys) > 0
                next_id += 1
            elif op == "append":
                sid = rng.choice(live)
                counts["cow"] += sim.append(sid, rng.randrange(3)) is not None
            elif op == "fork":
                sim.fork(rng.choice(live), next_id)
                next_id += 1
            else:
                sim.free(rng.choice(live))
            counts[op] += 1
        except NoFreeBlocksError:
            counts["full"] += 1
            if live:
                sim.free(rng.choice(live))
        bm.check_invariants()
        sim.verify()
    for sid in list(sim.keys):
        sim.free(sid)
    bm.check_invariants()
    assert bm.num_free_blocks == 24
    assert all(counts[k] > 10 for k in ("alloc", "append", "fork", "free")), counts
    # exhaustion, copy-on-write and prefix hits all ran
    assert counts["full"] > 0 and counts["cow"] > 0 and counts["hit"] > 0, counts
