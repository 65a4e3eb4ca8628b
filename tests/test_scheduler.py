"""Scheduler with the real BlockManager: priority admission, preemption of lower-priority running work
(batch full, KV cache full), never of equal priority, bounded per step, and the higher-priority step.

Steps are simulated: a scheduled chunk's tokens become computed and a sampling chunk appends a token,
which is what LLMEngine.step does around the model.
"""

from __future__ import annotations

from llmaas import SamplingParams
from llmaas.engine.block_manager import BlockManager
from llmaas.engine.scheduler import ScheduledChunk, Scheduler
from llmaas.engine.sequence import Sequence, SequenceStatus

LOW, HIGH = 0, 10


def seq(name: str, prompt_len: int, priority: int, first_token: int = 0) -> Sequence:
    prompt = [first_token + i for i in range(prompt_len)]
    return Sequence(name, 0, prompt, SamplingParams(), priority=priority, max_tokens=1000)


def step(sched: Scheduler) -> list[ScheduledChunk]:
    chunks = sched.schedule()
    sampling = [c.samples for c in chunks]  # before the tokens count as computed
    for c, samples in zip(chunks, sampling):
        c.seq.num_computed_tokens += c.num_new_tokens
        if samples:
            c.seq.output_token_ids.append(7)
        sched.block_manager.register_full_blocks(c.seq)
    return chunks


def names(chunks: list[ScheduledChunk]) -> list[str]:
    return [c.seq.request_id for c in chunks]


def decoding(sched: Scheduler, *seqs: Sequence) -> None:
    """Add seqs and step until every one has finished its prompt and decodes."""
    for s in seqs:
        sched.add(s)
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in seqs):
        step(sched)


def test_higher_priority_preempts_the_latest_lower_priority_when_the_batch_is_full():
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=2, max_num_batched_tokens=64)
    early, late = seq("free-early", 5, LOW, 100), seq("free-late", 5, LOW, 200)
    decoding(sched, early, late)
    plus = seq("plus", 5, HIGH, 300)
    sched.add(plus)
    chunks = step(sched)
    assert names(chunks) == ["plus"]  # its first token: the step runs nothing of lower priority
    assert chunks[0].seq.output_token_ids == [7]
    assert late.status == SequenceStatus.WAITING and late.num_preemptions == 1
    assert early.status == SequenceStatus.RUNNING and early.num_preemptions == 0
    assert sched.num_priority_preemptions == 1
    assert set(names(step(sched))) == {"plus", "free-early"}  # both decode; free-late waits for a slot


def test_higher_priority_preempts_lower_priority_when_the_kv_cache_is_full():
    sched = Scheduler(BlockManager(num_blocks=8, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("free-a", 14, LOW, 100), seq("free-b", 14, LOW, 200)  # 4 blocks each: the cache is full
    decoding(sched, a, b)
    assert sched.block_manager.num_free_blocks == 0
    plus = seq("plus", 6, HIGH, 300)  # 2 blocks
    sched.add(plus)
    assert names(step(sched)) == ["plus"]
    assert b.status == SequenceStatus.WAITING and a.status == SequenceStatus.RUNNING


def test_equal_priority_is_never_preempted_to_admit_a_newcomer():
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=2, max_num_batched_tokens=64)
    first, second = seq("free-1", 5, LOW, 100), seq("free-2", 5, LOW, 200)
    decoding(sched, first, second)
    third = seq("free-3", 5, LOW, 300)
    sched.add(third)
    for _ in range(3):
        assert names(step(sched)) == ["free-1", "free-2"]
    assert third.status == SequenceStatus.WAITING
    assert sched.num_preemptions == 0


def test_preemptions_to_admit_are_bounded_per_step():
    sched = Scheduler(
        BlockManager(num_blocks=8, block_size=4),
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_preemptions_per_step=1,
    )
    frees = [seq(f"free-{i}", 6, LOW, 100 * (i + 1)) for i in range(4)]  # 2 blocks each: full
    decoding(sched, *frees)
    plus = seq("plus", 14, HIGH, 900)  # needs 4 blocks: two victims
    sched.add(plus)
    first = step(sched)
    assert "plus" not in names(first) and sched.num_priority_preemptions == 1
    second = step(sched)
    assert names(second) == ["plus"] and sched.num_priority_preemptions == 2
    assert [f.status for f in frees[:2]] == [SequenceStatus.RUNNING] * 2  # the earliest kept their blocks


def test_lower_priority_prefill_gives_way_to_a_higher_priority_request():
    """A long low-priority prompt being chunk-prefilled does not take the budget from a newcomer of
    higher priority, and the step with the newcomer's prefill runs it alone."""
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=16)
    big = seq("free-big", 100, LOW, 100)
    sched.add(big)
    assert [c.num_new_tokens for c in step(sched)] == [16]
    plus = seq("plus", 10, HIGH, 500)
    sched.add(plus)
    chunks = step(sched)
    assert [(c.seq.request_id, c.num_new_tokens) for c in chunks] == [("plus", 10)]
    assert chunks[0].seq.output_token_ids == [7]
    assert big.status == SequenceStatus.RUNNING and big.num_preemptions == 0  # paused, blocks kept
    # The newcomer now decodes (one token); the big prefill continues with the lower priorities' share.
    share = sched.lower_priority_step_tokens
    assert share < 15
    assert [(c.seq.request_id, c.num_new_tokens) for c in step(sched)] == [("plus", 1), ("free-big", share)]


def test_a_preempted_sequence_is_recomputed_from_the_prefix_cache_and_continues():
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=1, max_num_batched_tokens=64)
    free = seq("free", 13, LOW, 100)
    decoding(sched, free)
    step(sched)
    produced = list(free.output_token_ids)
    plus = seq("plus", 5, HIGH, 500)
    sched.add(plus)
    assert names(step(sched)) == ["plus"] and free.status == SequenceStatus.WAITING
    plus.status = SequenceStatus.FINISHED
    sched.remove(plus)
    chunks = step(sched)
    assert names(chunks) == ["free"]
    assert free.output_token_ids[: len(produced)] == produced
    # 12 of its 15 tokens sat in 3 full, cached blocks: only the rest is recomputed
    assert chunks[0].num_new_tokens == free.num_tokens - 1 - 12


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lower_priority_work_gets_a_small_share_of_each_step_while_a_higher_priority_is_about():
    """Steps cannot be interrupted: while plus traffic is about, free work is held to short steps so a
    plus request arriving mid-step waits little; with free traffic alone it gets the whole budget."""
    clock = FakeClock()
    sched = Scheduler(
        BlockManager(num_blocks=64, block_size=4),
        max_num_seqs=16,
        max_num_batched_tokens=64,
        lower_priority_step_tokens=4,
        priority_memory_s=2.0,
        clock=clock,
    )
    frees = [seq(f"free-{i}", 5, LOW, 100 * (i + 1)) for i in range(6)]
    decoding(sched, *frees)
    assert len(step(sched)) == 6  # one priority about: every sequence runs
    plus = seq("plus", 5, HIGH, 900)
    sched.add(plus)
    assert names(step(sched)) == ["plus"]
    assert names(step(sched)) == ["plus", "free-0", "free-1", "free-2", "free-3"]
    plus.status = SequenceStatus.FINISHED
    sched.remove(plus)
    clock.now += 1.0
    assert len(step(sched)) == 4  # plus traffic was here a moment ago: still short steps
    clock.now += 1.5
    assert len(step(sched)) == 6
