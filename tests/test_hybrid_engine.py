"""Hybrid models (qwen3_5_text, qwen3_next) through our engine against transformers, fp32: greedy ids
and chosen-token logprobs (max abs diff <= 1e-4) for mixed-length batches, chunked prefill, prefix
cache hits resuming from state snapshots, preemption and recompute, abort, n = 3 with a seed; and the
state pool's share of the memory budget.
"""

from __future__ import annotations

import pytest
import torch

from llmaas import SamplingParams
from llmaas.engine.llm_engine import EngineConfig
from llmaas.llm import LLM
from tests.test_hybrid_parity import MODELS
from tests.test_model_parity import TOL, checkpoint_pairs, prompt

FAMILIES = ["qwen3_5_text", "qwen3_next"]
PROMPTS = [prompt(n, 30 + n) for n in (5, 13, 2, 30, 9)]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """family -> (model dir, transformers' model)."""
    pairs = checkpoint_pairs(tmp_path_factory.mktemp("hybrid-engine"), MODELS)
    return lambda family: pairs(family)[:2]


def make_llm(model_dir, **kw) -> LLM:
    kw.setdefault("dtype", "float32")
    kw.setdefault("block_size", 4)
    kw.setdefault("kv_cache_memory", 2**21)
    kw.setdefault("max_num_seqs", 8)
    return LLM(config=EngineConfig(model=str(model_dir), **kw))


@torch.no_grad()
def check_against_reference(ref, prompt_ids: list[int], completion) -> None:
    """Greedy: each token is transformers' argmax after the tokens before it; our logprob of it
    equals transformers' (one forward over prompt + completion)."""
    tokens = prompt_ids + completion.token_ids
    logprobs = ref(torch.tensor([tokens])).logits[0].log_softmax(-1)
    n = len(prompt_ids)
    for i, token in enumerate(completion.token_ids):
        row = logprobs[n + i - 1]
        assert token == int(row.argmax()), f"token {i}"
        assert abs(completion.logprobs[i].logprob - row[token].item()) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_greedy_and_logprobs(hybrid, family):
    model_dir, ref = hybrid(family)
    llm = make_llm(model_dir)
    for p, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        check_against_reference(ref, p, out.outputs[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_preemption(hybrid, family):
    model_dir, ref = hybrid(family)
    # 7-token steps split prompts mid-block; 14 blocks of 4 tokens cannot hold five sequences of up to
    # 38 tokens at once, so some are preempted and recomputed (their state slot given back, then zeros
    # or a snapshot again).
    kv = 2 * 2 * 16 * 4  # one full-attention layer: K and V, 2 heads x 16 dims, fp32
    llm = make_llm(model_dir, max_num_batched_tokens=7, max_num_seqs=4)
    runner = llm.engine.runner
    state_pool = runner.state_pool_bytes
    llm = make_llm(
        model_dir, max_num_batched_tokens=7, max_num_seqs=4, kv_cache_memory=state_pool + 14 * 4 * kv
    )
    assert llm.engine.block_manager.num_blocks == 14
    for p, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        check_against_reference(ref, p, out.outputs[0])
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_used_blocks == 0
    assert sorted(llm.engine.runner.states.free) == list(range(4))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_resumes_from_state_snapshot(hybrid, family):
    model_dir, ref = hybrid(family)
    llm = make_llm(model_dir)
    shared = prompt(18, 77)  # 4 full blocks of 4 and 2 tokens
    first = llm.generate([shared + [5, 6, 7]], GREEDY)[0]
    second = llm.generate([shared + [9, 10]], GREEDY)[0]
    assert first.cached_tokens == 0 and second.cached_tokens == 16
    check_against_reference(ref, shared + [5, 6, 7], first.outputs[0])
    check_against_reference(ref, shared + [9, 10], second.outputs[0])
    without = make_llm(model_dir, enable_prefix_caching=False).generate([shared + [9, 10]], GREEDY)[0]
    assert without.cached_tokens == 0
    assert without.outputs[0].token_ids == second.outputs[0].token_ids


def test_prefix_cache_hit_after_chunked_prefill(hybrid):
    """Snapshots are taken at block ends inside every prefill chunk, chunk ends off the block grid."""
    model_dir, ref = hybrid("qwen3_5_text")
    llm = make_llm(model_dir, max_num_batched_tokens=5)
    shared = prompt(21, 78)
    llm.generate([shared + [4]], GREEDY)
    out = llm.generate([shared + [8, 9]], GREEDY)[0]
    assert out.cached_tokens == 20
    check_against_reference(ref, shared + [8, 9], out.outputs[0])


def test_next_turn_reuses_the_answer_through_decode_snapshots(hybrid):
    """Block ends reached while decoding are snapshotted too: a follow-up prompt that repeats the
    previous prompt and answer resumes after the answer's last full block."""
    model_dir, ref = hybrid("qwen3_next")
    llm = make_llm(model_dir)
    first_prompt = prompt(10, 79)
    answer = llm.generate([first_prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    follow_up = first_prompt + answer.outputs[0].token_ids + [7, 8, 9]
    out = llm.generate([follow_up], GREEDY)[0]
    # position 19 (the last answer token) was sampled, never fed: blocks up to 16 are complete
    assert out.cached_tokens == 16
    check_against_reference(ref, follow_up, out.outputs[0])


def test_n_samples_with_seed_match_single_requests(hybrid):
    model_dir, _ = hybrid("qwen3_5_text")
    llm = make_llm(model_dir)
    p = prompt(14, 90)
    params = dict(max_tokens=8, temperature=1.0, ignore_eos=True)
    together = llm.generate([p], SamplingParams(n=3, seed=7, **params))[0]
    alone = [
        make_llm(model_dir).generate([p], SamplingParams(seed=7 + i, **params))[0].outputs[0].token_ids
        for i in range(3)
    ]
    assert [o.token_ids for o in together.outputs] == alone
    assert len({tuple(t) for t in alone}) > 1


def test_higher_priority_preempts_and_everyone_finishes_exactly(hybrid):
    """Two sequence slots: a higher-priority request preempts a running one (its state slot goes to
    the newcomer); the preempted one is recomputed later, all outputs as transformers'."""
    model_dir, ref = hybrid("qwen3_5_text")
    engine = make_llm(model_dir, max_num_seqs=2).engine
    prompts = {"low-a": prompt(9, 93), "low-b": prompt(6, 94), "high": prompt(7, 95)}
    engine.add_request("low-a", prompts["low-a"], GREEDY, priority=0)
    engine.add_request("low-b", prompts["low-b"], GREEDY, priority=0)
    finals = {}
    for _ in range(3):
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    engine.add_request("high", prompts["high"], GREEDY, priority=5)
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.scheduler.num_priority_preemptions == 1
    for rid, p in prompts.items():
        check_against_reference(ref, p, finals[rid].outputs[0])
    assert sorted(engine.runner.states.free) == [0, 1]


def test_abort_gives_back_state_slot(hybrid):
    model_dir, _ = hybrid("qwen3_5_text")
    llm = make_llm(model_dir)
    engine = llm.engine
    engine.add_request("a", prompt(9, 91), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", prompt(6, 92), SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()
    assert len(engine.runner.states.free) == 8 - 2
    engine.abort_request("a")
    assert len(engine.runner.states.free) == 8 - 1
    while engine.has_unfinished_requests():
        engine.step()
    assert sorted(engine.runner.states.free) == list(range(8))


def test_state_pool_comes_out_of_the_kv_budget(hybrid):
    model_dir, _ = hybrid("qwen3_5_text")
    llm = make_llm(model_dir, kv_cache_memory=2**20, max_num_seqs=4)
    runner = llm.engine.runner
    per_seq = 3 * ((2 * 16 + 32) * 3 * 4 + 4 * 8 * 8 * 4)  # 3 linear layers: conv inputs + fp32 state
    assert runner.state_bytes_per_sequence == per_seq
    assert runner.state_pool_bytes == 8 * per_seq  # 4 sequences + 4 snapshot slots
    assert runner.num_blocks == (2**20 - 8 * per_seq) // (runner.kv_bytes_per_token * 4)
    assert llm.model_report.state_bytes_per_sequence == per_seq
    assert llm.engine.model_report.as_dict()["state_bytes_per_sequence"] == per_seq  # /v1/models metadata
    no_cache = make_llm(model_dir, kv_cache_memory=2**20, max_num_seqs=4, enable_prefix_caching=False)
    assert no_cache.engine.runner.state_pool_bytes == 4 * per_seq  # no snapshot slots
    with pytest.raises(Exception, match="kv_cache_memory|linear-attention state"):
        make_llm(model_dir, kv_cache_memory=8 * per_seq, max_num_seqs=4)
