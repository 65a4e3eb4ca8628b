"""State slots of a hybrid model's linear-attention layers: who owns which slot of the state pool.

The pool (conv inputs and recurrent state of every linear layer, one slot = one sequence's state) is
allocated once at start-up beside the paged KV cache. Its first `num_sequence_slots` slots belong to
running sequences, one each, taken at admission and given back when the sequence finishes, is aborted
or is preempted (a recompute starts from zeros, or from a snapshot). The others hold prefix-cache
snapshots: the state before the first token after a full KV block, keyed by that block's id. A
snapshot lives as long as its block keeps its contents: when the block manager hands the block out
again, the snapshot goes too; when all snapshot slots are taken, the least recently used goes first.
Sequence slots are handed out lowest first, so the running sequences' slots stay packed and a decode
batch (sorted by slot) is usually one run of consecutive slots, which the layers update in place.
A sequence that resumes from a cached prefix gets the snapshot copied into its own slot before its
first step (`pending_copies`, done by the runner), so snapshots are never written by a sequence.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from llmaas.engine.sequence import Sequence


class StateSlots:
    def __init__(self, num_sequence_slots: int, num_snapshot_slots: int):
        self.num_sequence_slots = num_sequence_slots
        self.num_snapshot_slots = num_snapshot_slots
        self.free: list[int] = list(range(num_sequence_slots))  # a heap: the lowest slot is taken first
        self.free_snapshots: list[int] = list(
            range(num_sequence_slots, num_sequence_slots + num_snapshot_slots)
        )
        self.snapshots: OrderedDict[int, int] = OrderedDict()  # block id -> slot, least recently used first
        self.pending_copies: list[
            tuple[int, int]
        ] = []  # (snapshot slot, sequence slot), before the next step

    @property
    def num_slots(self) -> int:
        return self.num_sequence_slots + self.num_snapshot_slots

    def acquire(self, seq: Sequence) -> bool:
        if seq.state_slot is None:
            if not self.free:
                return False
            seq.state_slot = heapq.heappop(self.free)
        return True

    def release(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            self.pending_copies = [(s, d) for s, d in self.pending_copies if d != seq.state_slot]
            heapq.heappush(self.free, seq.state_slot)
            seq.state_slot = None

    def has_snapshot(self, block_id: int) -> bool:
        return block_id in self.snapshots

    def restore(self, seq: Sequence, block_id: int) -> None:
        """seq resumes after `block_id`: its slot gets the snapshot before its next step."""
        self.snapshots.move_to_end(block_id)
        self.pending_copies.append((self.snapshots[block_id], seq.state_slot))

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def snapshot_slot(self, block_id: int) -> int | None:
        """A slot to save the state after `block_id` in (evicting the least recently used snapshot if
        none is free); None when it already has one. Call after the pending copies are done."""
        if block_id in self.snapshots:
            self.snapshots.move_to_end(block_id)
            return None
        if not self.free_snapshots:
            if not self.snapshots:
                return None
            _, slot = self.snapshots.popitem(last=False)
            self.free_snapshots.append(slot)
        slot = self.free_snapshots.pop()
        self.snapshots[block_id] = slot
        return slot

    def forget_block(self, block_id: int) -> None:
        """The block's contents are about to change: its snapshot no longer describes any prefix."""
        slot = self.snapshots.pop(block_id, None)
        if slot is not None:
            self.free_snapshots.append(slot)
