"""Failure isolation in the engine: a fault in one request's sampling, prompt logprobs, stop matching,
detokenizing or output fails that request alone; a fault in the forward pass ends every request of
the step with its tokens so far (never with nothing to bill). Real engine, tiny random llama; the
faults are injected by wrapping the real functions so that only the marked request's rows raise."""

from __future__ import annotations

import asyncio

import pytest

from llmaas import SamplingParams
from llmaas.engine import model_runner, sampler
from llmaas.engine.async_engine import AsyncEngine
from llmaas.engine.llm_engine import EngineConfig, LLMEngine
from tests.model_factory import make_tiny_checkpoint

PROMPTS = {"a": [5, 17, 33, 101, 7], "b": [9, 250, 14, 3, 88, 61], "c": [77, 78], "bad": [40, 41, 42, 43]}
MAX_TOKENS = 12
FAULT_AFTER = 3  # the marked request fails when it has this many tokens


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("isolation"))


def make_engine(model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=2**20, block_size=4))


def params(seed: int, **kw) -> SamplingParams:
    # temperature > 0 and penalties: the batched sampler's per-row work runs for every row
    kw = {"max_tokens": MAX_TOKENS, "temperature": 0.8, "ignore_eos": True, "repetition_penalty": 1.1, **kw}
    return SamplingParams(seed=seed, **kw)


def run_all(engine: LLMEngine, ids: list[str], **kw) -> dict:
    for i, rid in enumerate(ids):
        engine.add_request(rid, PROMPTS[rid], params(i, **kw))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in finished
            if out.finished:
                finished[out.request_id] = out
    return finished


def is_marked(seq) -> bool:
    return seq.request_id == "bad" and len(seq.output_token_ids) >= FAULT_AFTER


@pytest.fixture(scope="module")
def expected(model_dir):
    """What the good requests produce with no faulty request beside them (seeded: batch-independent)."""
    return run_all(make_engine(model_dir), ["a", "b", "c"])


def _sampling_fault(monkeypatch, engine):
    real = sampler.sample
    calls = {"batched_failures": 0}

    def faulty(logits, seqs, generator=None, masks=None):
        if any(is_marked(s) for s in seqs):
            calls["batched_failures"] += len(seqs) > 1
            raise InjectedFault("sampling this row failed")
        return real(logits, seqs, generator, masks)

    monkeypatch.setattr(sampler, "sample", faulty)
    return calls


def _prompt_logprobs_fault(monkeypatch, engine):
    real = engine.runner._prompt_logprobs

    def faulty(chunk, hidden):
        if chunk.seq.request_id == "bad":
            raise InjectedFault("prompt logprobs failed")
        return real(chunk, hidden)

    monkeypatch.setattr(engine.runner, "_prompt_logprobs", faulty)


def _stop_matching_fault(monkeypatch, engine):
    real = engine._cut_at_stop_string

    def faulty(seq):
        if is_marked(seq):
            raise InjectedFault("stop matching failed")
        return real(seq)

    monkeypatch.setattr(engine, "_cut_at_stop_string", faulty)


def _detokenizer_fault(monkeypatch, engine):
    (seq,) = engine.requests["bad"].seqs
    real = seq.detokenizer.add

    def faulty(token):
        if is_marked(seq):
            raise InjectedFault("detokenizing failed")
        return real(token)

    monkeypatch.setattr(seq.detokenizer, "add", faulty)


def _output_fault(monkeypatch, engine):
    real = engine._completion_output

    def faulty(seq):
        if is_marked(seq):
            raise InjectedFault("building the output failed")
        return real(seq)

    monkeypatch.setattr(engine, "_completion_output", faulty)


@pytest.mark.parametrize(
    "inject, tokens_before_fault",
    [
        (_sampling_fault, FAULT_AFTER),  # the row raised: no token appended in that step
        (_prompt_logprobs_fault, 0),  # fails in its prefill, before its first token
        (_stop_matching_fault, FAULT_AFTER),  # the token was appended, then matching raised
        (_detokenizer_fault, FAULT_AFTER),
        (_output_fault, FAULT_AFTER),
    ],
)
def test_a_fault_in_one_sequence_fails_that_request_alone(
    model_dir, expected, monkeypatch, inject, tokens_before_fault
):
    engine = make_engine(model_dir)
    seeds = {"a": 0, "bad": 99, "b": 1, "c": 2}  # the good ones keep the seeds of `expected`
    for rid, seed in seeds.items():
        extra = {"prompt_logprobs": 1} if rid == "bad" else {}
        engine.add_request(rid, PROMPTS[rid], params(seed, stop=["\x00never"], **extra))
    inject(monkeypatch, engine)
    finished, steps_with_bad = {}, 0
    while engine.has_unfinished_requests():
        steps_with_bad += "bad" in engine.requests
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    bad = finished["bad"]
    assert bad.error and "InjectedFault" in bad.error
    assert bad.finished and bad.outputs[0].finish_reason == "error"
    assert bad.completion_tokens == tokens_before_fault == len(bad.outputs[0].token_ids)
    assert bad.prompt_tokens == len(PROMPTS["bad"])
    for rid in ("a", "b", "c"):
        out = finished[rid]
        assert out.error is None and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == expected[rid].outputs[0].token_ids
        assert out.outputs[0].text == expected[rid].outputs[0].text
    assert steps_with_bad < MAX_TOKENS  # it ended at its fault, not when the others did
    assert engine.block_manager.num_used_blocks == 0 and not engine.scheduler.running


def test_the_batched_sampler_stays_the_common_path(model_dir, monkeypatch):
    """Per-row sampling happens only in a step where the batch raised."""
    engine = make_engine(model_dir)
    per_row = []
    real_each = sampler.sample_each
    monkeypatch.setattr(sampler, "sample_each", lambda *a: per_row.append(1) or real_each(*a))
    run_all(engine, ["a", "b", "c"])
    assert per_row == []
    calls = _sampling_fault(monkeypatch, engine)
    run_all(engine, ["a", "bad", "b"])
    assert per_row == [1] and calls["batched_failures"] == 1


def test_n_samples_fail_together_and_keep_their_counts(model_dir, monkeypatch):
    engine = make_engine(model_dir)
    _sampling_fault(monkeypatch, engine)
    engine.add_request("bad", PROMPTS["bad"], params(5, n=3))
    engine.add_request("a", PROMPTS["a"], params(0))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    bad = finished["bad"]
    assert [o.finish_reason for o in bad.outputs] == ["error"] * 3
    lengths = [len(o.token_ids) for o in bad.outputs]  # siblings start a step after the leader
    assert bad.completion_tokens == sum(lengths) and max(lengths) == FAULT_AFTER and min(lengths) > 0
    assert finished["a"].error is None and finished["a"].completion_tokens == MAX_TOKENS
    assert engine.block_manager.num_used_blocks == 0


def test_a_forward_pass_fault_ends_each_request_of_the_step_with_its_tokens(model_dir, monkeypatch):
    engine = make_engine(model_dir)
    for i, rid in enumerate(["a", "b", "c"]):
        engine.add_request(rid, PROMPTS[rid], params(i))
    for _ in range(4):
        engine.step()
    counts = {rid: sum(len(s.output_token_ids) for s in r.seqs) for rid, r in engine.requests.items()}
    assert all(n >= 3 for n in counts.values())
    engine.add_request("queued", PROMPTS["c"], params(9))  # arrives now: admitted in the failing step

    def broken_forward(*args, **kwargs):
        raise InjectedFault("the forward pass failed")

    monkeypatch.setattr(model_runner, "build_forward_batch", broken_forward)
    outs = {o.request_id: o for o in engine.step()}
    assert set(outs) == {"a", "b", "c", "queued"}
    for rid, out in outs.items():
        assert out.finished and out.error and "forward pass" in out.error
        assert out.completion_tokens == counts.get(rid, 0)
        assert out.prompt_tokens == len(PROMPTS[rid if rid != "queued" else "c"])
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
    monkeypatch.undo()  # the engine keeps serving
    assert run_all(engine, ["a"])["a"].completion_tokens == MAX_TOKENS


def test_async_engine_a_failed_step_ends_every_stream_with_its_tokens(model_dir, monkeypatch):
    """A step that raises outside the runner (here: publishing blocks) used to end every stream with a
    bare EngineDeadError and no counts; now each ends with its final output, error and tokens so far."""
    engine = make_engine(model_dir)
    aeng = AsyncEngine(engine)
    real = engine.block_manager.register_full_blocks

    def broken(seq):
        if all(len(s.output_token_ids) >= FAULT_AFTER for r in engine.requests.values() for s in r.seqs):
            raise InjectedFault("publishing blocks failed")
        return real(seq)

    monkeypatch.setattr(engine.block_manager, "register_full_blocks", broken)

    async def one(rid: str, seed: int):
        last = None
        async for out in aeng.generate(PROMPTS[rid], params(seed, max_tokens=None), request_id=rid):
            last = out
        return last

    async def main():
        return await asyncio.gather(*(one(rid, i) for i, rid in enumerate(["a", "b", "c"])))

    try:
        outs = asyncio.run(main())
    finally:
        aeng.shutdown()
    for out in outs:
        assert out.finished and out.error and "InjectedFault" in out.error
        assert out.completion_tokens >= FAULT_AFTER


def test_a_fault_while_aborting_still_ends_the_request_with_its_tokens(model_dir, monkeypatch):
    engine = make_engine(model_dir)
    engine.add_request("bad", PROMPTS["bad"], params(1))
    engine.add_request("a", PROMPTS["a"], params(0))
    for _ in range(3):
        engine.step()
    (seq,) = engine.requests["bad"].seqs

    def broken_flush():
        raise InjectedFault("flushing the detokenizer failed")

    monkeypatch.setattr(seq.detokenizer, "flush", broken_flush)
    out = engine.abort_request("bad")
    assert out.finished and out.error and "InjectedFault" in out.error
    assert out.completion_tokens == 3 and "bad" not in engine.requests
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert finished["a"].error is None and finished["a"].completion_tokens == MAX_TOKENS
    assert engine.block_manager.num_used_blocks == 0
