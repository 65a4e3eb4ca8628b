"""Scheduler: which sequences run this step, and how many tokens each.

One token budget per step is shared by decodes and prefill chunks (continuous batching with chunked
prefill). Running sequences go first, in priority order; when the KV cache is full the lowest-priority,
latest running sequence is preempted (its blocks freed, recomputed later - prefix caching usually
makes that cheap). Waiting sequences are admitted by priority while there is budget, room in the
batch and blocks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from llmaas.engine.block_manager import BlockManager
from llmaas.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence's known tokens: a token is sampled.
        A prompt-only request (max_tokens=0) samples nothing: the engine ends it after its prefill."""
        return (
            self.seq.max_tokens > 0
            and self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens
        )


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        keys = [s.sort_key() for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.sort_key()), seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _leader_not_ready(self, seq: Sequence) -> bool:
        leader = seq.leader
        if leader is None or leader.is_finished:
            return False
        return leader.num_computed_tokens < len(leader.prompt_token_ids)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledChunk] = []
        self.running.sort(key=Sequence.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledChunk(seq, n))
                budget -= n
                i += 1
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if self._leader_not_ready(seq):
                continue
            computed_before = seq.num_computed_tokens
            n = min(self.block_manager.tokens_schedulable(seq), budget)
            if not self.block_manager.allocate(seq, n):
                break
            if not seq.admitted_once:
                seq.num_cached_prompt_tokens = seq.num_computed_tokens - computed_before
                seq.admitted_once = True
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledChunk(seq, n))
            budget -= n
        return scheduled
