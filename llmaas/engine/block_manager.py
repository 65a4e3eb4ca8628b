"""Paged KV blocks with prefix caching.

Every block holds `block_size` token slots. A full block is identified by a chained hash of its
tokens and its parent's hash, so equal prefixes map to equal blocks; such blocks are shared by
refcount. Blocks nobody uses go to an LRU free list but keep their contents and hash until they are
handed out again, so a later request with the same prefix still finds them.

Hybrid models (linear-attention layers beside attention) also need the linear layers' state at the
end of a reused prefix: with `states` (state_slots.py) a running sequence holds a state slot, and a
prefix hit is cut back to the longest run of blocks whose last block has a state snapshot.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llmaas.engine.sequence import Sequence
from llmaas.engine.state_slots import StateSlots


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()  # kept to rule out hash collisions (tenants share this cache)


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        states: StateSlots | None = None,
    ):
        self.block_size = block_size
        self.states = states
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_tokens(self, tokens: list[int], i: int) -> tuple[int, ...]:
        return tuple(tokens[i * self.block_size : (i + 1) * self.block_size])

    def _match_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks for the longest cached run of seq's full blocks (never all its tokens)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return [], []  # prompt logprobs need the logits of every prompt position
        tokens = seq.all_token_ids
        hits: list[int] = []
        hashes: list[int] = []
        parent = None
        for i in range(len(tokens) // self.block_size):
            block_tokens = self._full_block_tokens(tokens, i)
            h = chain_hash(parent, block_tokens)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != block_tokens:
                break
            hits.append(bid)
            hashes.append(h)
            parent = h
        if hits and len(hits) * self.block_size == len(tokens):
            hits.pop()  # the last token must be computed to get logits
            hashes.pop()
        while hits and self.states is not None and not self.states.has_snapshot(hits[-1]):
            hits.pop()  # hybrids resume only where the linear layers' state was saved
            hashes.pop()
        return hits, hashes

    def _take_free_block(self) -> int:
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.block_hash is not None and self.cached.get(block.block_hash) == bid:
            del self.cached[block.block_hash]
        if self.states is not None:
            self.states.forget_block(bid)
        block.block_hash, block.token_ids, block.ref_count = None, (), 1
        return bid

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for seq's next num_new_tokens; on first admission reuse cached prefix blocks.

        Returns False, changing nothing, when there are not enough free blocks.
        """
        hits: list[int] = []
        hashes: list[int] = []
        fresh = not seq.block_table and seq.num_computed_tokens == 0
        if fresh:
            hits, hashes = self._match_prefix(seq)
            num_new_tokens = min(num_new_tokens, seq.num_tokens - len(hits) * self.block_size)
        computed = len(hits) * self.block_size if fresh else seq.num_computed_tokens
        have = len(hits) if fresh else len(seq.block_table)
        need = self.blocks_needed(computed + num_new_tokens) - have
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if need > self.num_free_blocks - reclaimed:
            return False
        if fresh and self.states is not None and not self.states.acquire(seq):
            return False
        if fresh:
            for bid in hits:
                if self.blocks[bid].ref_count == 0:
                    del self.free[bid]
                self.blocks[bid].ref_count += 1
            seq.block_table = list(hits)
            seq.block_hashes = list(hashes)
            seq.num_computed_tokens = computed
            if hits and self.states is not None:
                self.states.restore(seq, hits[-1])
            if self.enable_prefix_caching and not seq.admitted_once:
                self.prefix_queries += len(seq.prompt_token_ids)
                self.prefix_hits += computed
        for _ in range(max(need, 0)):
            seq.block_table.append(self._take_free_block())
        return True

    def tokens_schedulable(self, seq: Sequence) -> int:
        """Tokens seq would still have to compute after a prefix-cache hit (for budgeting)."""
        if seq.block_table or seq.num_computed_tokens:
            return seq.num_uncomputed_tokens
        hits, _ = self._match_prefix(seq)
        return seq.num_tokens - len(hits) * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish seq's newly filled blocks so other requests can share them."""
        if not self.enable_prefix_caching:
            return
        tokens = seq.all_token_ids
        full = min(seq.num_computed_tokens, len(tokens)) // self.block_size
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_tokens = self._full_block_tokens(tokens, i)
            h = chain_hash(parent, block_tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached and block.block_hash is None:
                self.cached[h] = block.block_id
                block.block_hash, block.token_ids = h, block_tokens

    def free_sequence(self, seq: Sequence) -> None:
        for bid in reversed(seq.block_table):  # tail blocks first: they are evicted first
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        if self.states is not None:
            self.states.release(seq)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
