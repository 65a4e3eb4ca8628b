"""Scheduler: which sequences run this step, and how many tokens each.

One token budget per step is shared by decodes and prefill chunks (continuous batching with chunked
prefill). Sequences are visited in priority order (higher first; within a priority, running before
waiting, then first come first served), so a higher-priority request gets the budget, the batch slots
and the KV blocks before lower-priority work does:

- A waiting sequence that finds the batch full (max_num_seqs) or the KV cache short preempts the
  lowest-priority, latest running sequences of STRICTLY lower priority (never equal: two requests of
  one plan cannot thrash each other), at most `max_preemptions_per_step` of them per step. A preempted
  sequence frees its blocks and waits to be recomputed - prefix caching usually makes that cheap.
- A running sequence that cannot grow preempts the lowest-priority, latest running sequence still
  unvisited this step (possibly itself), as before.
- A step in which a sequence prefills (its prompt, or a recompute) runs no lower-priority work: the
  step that produces a higher-priority request's first token is as short as it would be on an idle
  engine. Lower-priority sequences keep their blocks and continue on the next step.
- While a higher priority has been active recently (within `priority_memory_s`), all lower-priority
  sequences together get at most `lower_priority_step_tokens` per step. A step cannot be interrupted,
  so a request that arrives mid-step waits for it: keeping steps short while better-paying tenants are
  about bounds that wait, at the cost of some lower-priority throughput meanwhile (benchmarks/
  fairness.py, 2 CPU cores, 64 free sequences: plus TTFT p50 137 ms with whole-budget steps, 72 ms
  with 16 tokens, 52 ms with 8 (idle: 30 ms); free tok/s meanwhile 259, 246, 201). With one priority
  active (only free traffic, or only plus) every sequence gets the whole budget, as before.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
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
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_preemptions_per_step: int = 8,
        lower_priority_step_tokens: int = 8,
        priority_memory_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_preemptions_per_step = max_preemptions_per_step
        self.lower_priority_step_tokens = lower_priority_step_tokens
        self.priority_memory_s = priority_memory_s
        self._clock = clock
        self._priority_seen_at: dict[int, float] = {}  # the highest priority present, when last seen
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_priority_preemptions = 0  # of those, made to admit a higher-priority waiting sequence

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

    def _recent_top_priority(self) -> int | None:
        """The highest priority present now or within the last `priority_memory_s`."""
        now = self._clock()
        present = [q[0].priority for q in (self.running, self.waiting) if q]
        if present:
            self._priority_seen_at[max(present)] = now
        for priority, seen in list(self._priority_seen_at.items()):
            if now - seen > self.priority_memory_s:
                del self._priority_seen_at[priority]
        return max(self._priority_seen_at, default=None)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledChunk] = []
        self.running.sort(key=Sequence.sort_key)
        top = self._recent_top_priority()
        lower_left = self.lower_priority_step_tokens  # shared by sequences of priority below `top`
        unvisited = deque(self.running)  # running sequences not yet given their share, best first
        waiting = deque(self.waiting)  # a snapshot: what is preempted in this step waits for the next
        admitting = True
        preemptions_left = self.max_preemptions_per_step
        floor: int | None = None  # once a sequence prefills, nothing of lower priority runs this step
        while budget > 0:
            admissible = admitting and bool(waiting)
            if unvisited and (not admissible or unvisited[0].priority >= waiting[0].priority):
                seq = unvisited.popleft()
            elif admissible:
                seq = waiting.popleft()
            else:
                break
            if floor is not None and seq.priority < floor:
                break  # everything left is of lower priority (the walk is in priority order)
            lower = top is not None and seq.priority < top
            if lower and lower_left <= 0:
                break  # the same: lower-priority work has had its share of this step
            allowed = min(budget, lower_left) if lower else budget
            if seq.status == SequenceStatus.RUNNING:
                n = min(seq.num_uncomputed_tokens, allowed)
                if not self._grow_running(seq, n, unvisited):
                    continue
            else:
                if self._leader_not_ready(seq):
                    continue
                n = self._admit(seq, allowed, unvisited, preemptions_left)
                if n is None:
                    admitting = False  # strict order: nothing behind it may overtake it
                    continue
                preemptions_left -= n[1]
                n = n[0]
            scheduled.append(ScheduledChunk(seq, n))
            budget -= n
            if lower:
                lower_left -= n
            if n > 1 or seq.num_computed_tokens + n < seq.num_tokens:  # a prefill, not a decode
                floor = seq.priority if floor is None else max(floor, seq.priority)
        return scheduled

    def _grow_running(self, seq: Sequence, n: int, unvisited: deque[Sequence]) -> bool:
        """Blocks for n more tokens of a running sequence, preempting the lowest-priority latest
        unvisited running sequence (or, when none is left, seq itself) until they fit."""
        while not self.block_manager.allocate(seq, n):
            victim = unvisited.pop() if unvisited else seq
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit(
        self, seq: Sequence, budget: int, unvisited: deque[Sequence], preemptions_left: int
    ) -> tuple[int, int] | None:
        """Admit a waiting sequence with up to `budget` tokens: (tokens scheduled, preemptions made),
        or None when it cannot run this step. Makes room by preempting strictly lower-priority running
        sequences, latest first, within `preemptions_left`."""
        preempted = 0

        def make_room() -> bool:
            nonlocal preempted
            if not unvisited or unvisited[-1].priority >= seq.priority or preempted >= preemptions_left:
                return False
            self._preempt(unvisited.pop())
            self.num_priority_preemptions += 1
            preempted += 1
            return True

        while len(self.running) >= self.max_num_seqs:
            if not make_room():
                return None
        computed_before = seq.num_computed_tokens
        n = min(self.block_manager.tokens_schedulable(seq), budget)
        while not self.block_manager.allocate(seq, n):
            if not make_room():
                return None
        if not seq.admitted_once:
            seq.num_cached_prompt_tokens = seq.num_computed_tokens - computed_before
            seq.admitted_once = True
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return n, preempted
