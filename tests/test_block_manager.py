"""BlockManager: allocation, sharing by refcount, LRU eviction of cached blocks, collision guard."""

from __future__ import annotations

from llmaas import SamplingParams
from llmaas.engine.block_manager import BlockManager
from llmaas.engine.sequence import Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, list(tokens), SamplingParams())


def admit(bm: BlockManager, s: Sequence) -> None:
    assert bm.allocate(s, bm.tokens_schedulable(s))
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)


def test_shared_prefix_is_reused_and_refcounted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(list(range(10)))  # blocks: [0-3] [4-7] [8,9]
    admit(bm, a)
    assert bm.num_used_blocks == 3
    b = seq(list(range(8)) + [99, 98, 97])
    assert bm.tokens_schedulable(b) == 3
    assert bm.allocate(b, 3)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.num_used_blocks == 4
    bm.free_sequence(a)
    assert bm.num_used_blocks == 3  # shared blocks still held by b
    bm.free_sequence(b)
    assert bm.num_used_blocks == 0


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free_sequence(a)
    again = seq([1, 2, 3, 4, 6])
    assert bm.tokens_schedulable(again) == 1  # both full blocks found after release
    # a different prompt needing every block evicts the cached ones
    other = seq([7, 8, 9, 10, 11, 12, 13, 14])
    admit(bm, other)
    bm.free_sequence(other)
    assert bm.tokens_schedulable(seq([1, 2, 3, 4, 6])) == 5


def test_allocation_fails_cleanly_when_full():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = seq([1, 2, 3])
    admit(bm, a)
    b = seq([9, 9, 9])
    before = (bm.num_free_blocks, list(b.block_table))
    assert not bm.allocate(b, 3)
    assert (bm.num_free_blocks, b.block_table) == before


def test_hash_collision_cannot_serve_foreign_tokens(monkeypatch):
    import llmaas.engine.block_manager as module

    monkeypatch.setattr(module, "chain_hash", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(num_blocks=8, block_size=2)
    admit(bm, seq([1, 2, 3]))
    stranger = seq([5, 6, 7])
    assert bm.tokens_schedulable(stranger) == 3  # same hash, different tokens: no hit
