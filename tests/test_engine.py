"""Engine behaviour on a tiny random llama: batching, paging, prefix cache, preemption, sampling."""

from __future__ import annotations

import pytest
import torch

from llmaas import SamplingParams
from llmaas.engine.llm_engine import EngineConfig
from llmaas.errors import ContextLengthExceededError, InvalidRequestError
from llmaas.llm import LLM
from tests.model_factory import make_tiny_checkpoint

PROMPTS = [
    [5, 17, 33, 101, 7],
    [9, 250, 14, 3, 88, 61, 12, 40, 41, 42, 43],
    [77, 78],
    list(range(10, 40)),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_llm(model_dir, **kw) -> LLM:
    kw.setdefault("dtype", "float32")
    kw.setdefault("block_size", 4)
    kw.setdefault("kv_cache_memory", 2**20)
    return LLM(config=EngineConfig(model=str(model_dir), **kw))


def reference_greedy(reference, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt) :].tolist()


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def test_batched_greedy_matches_transformers(model_dir, reference):
    llm = make_llm(model_dir)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == reference_greedy(reference, prompt, 12)
        assert out.prompt_tokens == len(prompt)
        assert out.completion_tokens == 12
        assert out.outputs[0].finish_reason == "length"


def test_chunked_prefill_and_small_batches_give_same_tokens(model_dir, reference):
    llm = make_llm(model_dir, max_num_batched_tokens=6, max_num_seqs=2)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == reference_greedy(reference, prompt, 12)


def test_preemption_under_kv_pressure_completes_every_request(model_dir, reference):
    # 12 blocks of 4 tokens (512 bytes a token: 2 layers x K,V x 2 heads x 16 dims x fp32),
    # far fewer than 8 requests of up to 40 tokens need at once.
    llm = make_llm(model_dir, kv_cache_memory=12 * 4 * 512)
    assert llm.engine.block_manager.num_blocks == 12
    prompts = [PROMPTS[i % 4] for i in range(8)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(reference, prompt, 10)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_prefix_cache_reports_cached_tokens_and_keeps_output(model_dir, reference):
    llm = make_llm(model_dir)
    shared = list(range(50, 70))  # 20 tokens = 5 full blocks of 4
    first = llm.generate([shared + [1, 2, 3]], GREEDY)[0]
    assert first.cached_tokens == 0
    second = llm.generate([shared + [4, 5]], GREEDY)[0]
    assert second.cached_tokens == 20
    assert second.outputs[0].token_ids == reference_greedy(reference, shared + [4, 5], 12)
    # an identical prompt: all full blocks but the one holding the last token are reused
    again = llm.generate([shared + [1, 2, 3]], GREEDY)[0]
    assert again.cached_tokens == 20
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.engine.block_manager.prefix_hit_rate > 0


def test_prompt_is_cached_even_when_request_ends_in_its_prefill_step(model_dir):
    llm = make_llm(model_dir)
    shared = list(range(150, 170))
    llm.generate([shared + [1]], SamplingParams(max_tokens=1, temperature=0.0))
    assert llm.generate([shared + [2]], GREEDY)[0].cached_tokens == 20


def test_no_prefix_caching_reports_zero(model_dir):
    llm = make_llm(model_dir, enable_prefix_caching=False)
    llm.generate([list(range(50, 70))], GREEDY)
    assert llm.generate([list(range(50, 70))], GREEDY)[0].cached_tokens == 0


def test_seed_gives_same_tokens_alone_and_batched(model_dir):
    llm = make_llm(model_dir)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
    other = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, ignore_eos=True)
    batched = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [other, params, other])
    assert batched[1].outputs[0].token_ids == alone
    different = llm.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True)
    )[0]
    assert different.outputs[0].token_ids != alone


def test_n_samples_share_prompt_blocks(model_dir):
    llm = make_llm(model_dir)
    prompt = list(range(100, 130))  # 30 tokens = 7 full blocks
    out = llm.generate([prompt], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))[
        0
    ]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert out.completion_tokens == 24
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    # siblings were admitted after the leader's prompt: its 7 full blocks were hits for each
    assert llm.engine.block_manager.prefix_hits == 2 * 28


def test_stop_strings_never_leak(model_dir):
    llm = make_llm(model_dir)
    base = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    text = base.outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate(
        [PROMPTS[1]], SamplingParams(max_tokens=30, temperature=0.0, stop=[stop], ignore_eos=True)
    )[0]
    o = out.outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == text[: text.index(stop)]


def test_stop_token_ids_and_eos(model_dir):
    llm = make_llm(model_dir)
    base = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    target = base.outputs[0].token_ids[4]
    out = llm.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[target], ignore_eos=True)
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert out.token_ids[-1] == target and target not in out.token_ids[:-1]
    # logit_bias forces eos (id 2): generation stops at once unless ignore_eos
    forced = SamplingParams(max_tokens=5, temperature=0.0, logit_bias={2: 100.0})
    eos = llm.generate([PROMPTS[0]], forced)[0].outputs[0]
    assert eos.finish_reason == "stop" and eos.token_ids == [2]
    forced.ignore_eos = True
    kept = llm.generate([PROMPTS[0]], forced)[0].outputs[0]
    assert kept.finish_reason == "length" and kept.token_ids == [2] * 5


def test_logprobs_match_reference(model_dir, reference):
    llm = make_llm(model_dir)
    prompt = PROMPTS[1]
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, logprobs=5, ignore_eos=True))
    o = out[0].outputs[0]
    with torch.no_grad():
        ref = reference(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    first = o.logprobs[0]
    assert first.token_id == o.token_ids[0] == int(ref.argmax())
    assert abs(first.logprob - float(ref.max())) < 1e-4
    assert [t for t, _ in first.top] == ref.topk(5).indices.tolist()
    assert o.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in o.logprobs))


def test_penalties_change_output(model_dir):
    llm = make_llm(model_dir)
    plain = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    penal = llm.generate(
        [PROMPTS[2]],
        SamplingParams(
            max_tokens=20, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0
        ),
    )[0]
    ids = penal.outputs[0].token_ids
    assert ids != plain.outputs[0].token_ids
    assert len(set(ids)) >= len(set(plain.outputs[0].token_ids))
    rep = llm.generate(
        [PROMPTS[2]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, repetition_penalty=5.0)
    )[0]
    assert rep.outputs[0].token_ids != plain.outputs[0].token_ids


def test_top_k_one_is_greedy(model_dir):
    llm = make_llm(model_dir)
    greedy = llm.generate([PROMPTS[3]], GREEDY)[0].outputs[0].token_ids
    topk = (
        llm.generate(
            [PROMPTS[3]], SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
        )[0]
        .outputs[0]
        .token_ids
    )
    tiny_p = (
        llm.generate(
            [PROMPTS[3]], SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True)
        )[0]
        .outputs[0]
        .token_ids
    )
    assert topk == greedy == tiny_p


def test_priority_admits_higher_first(model_dir):
    llm = make_llm(model_dir, max_num_seqs=1)
    engine = llm.engine
    engine.add_request("low", PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True), priority=0)
    engine.add_request("high", PROMPTS[1], SamplingParams(max_tokens=3, ignore_eos=True), priority=5)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["high", "low"]


def test_abort_frees_blocks_at_once(model_dir):
    llm = make_llm(model_dir)
    engine = llm.engine
    engine.add_request("a", PROMPTS[3], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.step()
    out = engine.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert out.completion_tokens == 2
    assert engine.block_manager.num_used_blocks == engine.block_manager.blocks_needed(len(PROMPTS[1]) + 1)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0
    assert engine.abort_request("a") is None


@pytest.mark.parametrize(
    "params, prompt, param",
    [
        (SamplingParams(temperature=-1), PROMPTS[0], "temperature"),
        (SamplingParams(top_p=0), PROMPTS[0], "top_p"),
        (SamplingParams(top_p=1.5), PROMPTS[0], "top_p"),
        (SamplingParams(n=0), PROMPTS[0], "n"),
        (SamplingParams(temperature=float("nan")), PROMPTS[0], "temperature"),
        (SamplingParams(max_tokens=0), PROMPTS[0], "max_tokens"),  # prompt-only needs prompt_logprobs
        (SamplingParams(max_tokens=-1, prompt_logprobs=1), PROMPTS[0], "max_tokens"),
        (SamplingParams(logit_bias={10_000: 1.0}), PROMPTS[0], "logit_bias"),
        (SamplingParams(), [], "prompt"),
        (SamplingParams(), "", "prompt"),
        (SamplingParams(), [1, 2, 99999], "prompt"),
    ],
)
def test_bad_input_is_rejected_before_work(model_dir, params, prompt, param):
    llm = make_llm(model_dir)
    engine = llm.engine
    engine.add_request("ok", PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", prompt, params)
    assert err.value.param == param
    assert set(engine.requests) == {"ok"}
    while engine.has_unfinished_requests():
        engine.step()


def test_context_window_errors(model_dir):
    llm = make_llm(model_dir)  # max_position_embeddings 256
    with pytest.raises(ContextLengthExceededError) as err:
        llm.generate([list(range(300))], GREEDY)
    assert err.value.param == "prompt" and "256" in err.value.message
    with pytest.raises(ContextLengthExceededError) as err:
        llm.generate([list(range(200))], SamplingParams(max_tokens=10_000_000))
    assert err.value.param == "max_tokens"
    out = llm.generate([list(range(250))], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))[
        0
    ]
    assert out.completion_tokens == 6 and out.outputs[0].finish_reason == "length"


def test_unknown_model_name(tmp_path):
    from llmaas.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        LLM("no-such-model")


def test_kv_cache_is_fixed_at_start(model_dir):
    llm = make_llm(model_dir)
    caches = [
        t.data_ptr() for layer in llm.engine.model.attention_layers() for t in (layer.k_cache, layer.v_cache)
    ]
    llm.generate(PROMPTS * 4, SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True))
    after = [
        t.data_ptr() for layer in llm.engine.model.attention_layers() for t in (layer.k_cache, layer.v_cache)
    ]
    assert caches == after


def test_text_and_chat(model_dir):
    llm = make_llm(model_dir)
    out = llm.generate("Hello, world!", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert out.prompt_tokens == len(llm.tokenizer.encode("Hello, world!"))
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)
    chat = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    expected = llm.tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert chat.prompt_token_ids == expected


@pytest.mark.parametrize("budget", [1024, 5])  # whole prompt in one step, or in chunks of 5
def test_prompt_logprobs_match_reference(model_dir, reference, budget):
    llm = make_llm(model_dir, max_num_batched_tokens=budget)
    prompt = PROMPTS[3]
    llm.generate([prompt], GREEDY)  # a cached prefix must not hide positions from scoring
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=3))[0]
    with torch.no_grad():
        ref = reference(torch.tensor([prompt])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    assert out.cached_tokens == 0
    for p, entry in enumerate(out.prompt_logprobs[1:]):
        assert entry.token_id == prompt[p + 1]
        assert abs(entry.logprob - float(ref[p, prompt[p + 1]])) < 1e-4
        assert [t for t, _ in entry.top] == ref[p].topk(3).indices.tolist()


def _same_prompt_logprobs(got, want):
    assert len(got) == len(want) and got[0] is None and want[0] is None
    for g, w in zip(got[1:], want[1:]):
        assert g.token_id == w.token_id and abs(g.logprob - w.logprob) < 1e-5
        assert [t for t, _ in g.top] == [t for t, _ in w.top]


@pytest.mark.parametrize("budget", [1024, 5])  # whole prompt in one step, or in chunks of 5
def test_prompt_only_request_scores_the_prompt_and_generates_nothing(model_dir, budget):
    llm = make_llm(model_dir, max_num_batched_tokens=budget)
    engine = llm.engine
    prompt = PROMPTS[3]
    normal = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    (want,) = llm.generate([prompt], normal)
    (alone,) = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert alone.finished and alone.prompt_tokens == len(prompt) and alone.completion_tokens == 0
    (c,) = alone.outputs
    assert c.token_ids == [] and c.text == "" and c.finish_reason == "length"
    _same_prompt_logprobs(alone.prompt_logprobs, want.prompt_logprobs)
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()

    # Batched with normal requests (one sharing its prompt), each gets what it would alone.
    other = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    (plain,) = llm.generate([PROMPTS[1]], other)
    outs = llm.generate(
        [PROMPTS[1], prompt, prompt],
        [other, SamplingParams(max_tokens=0, prompt_logprobs=2), normal],
    )
    assert outs[0].outputs[0].token_ids == plain.outputs[0].token_ids and outs[0].completion_tokens == 4
    assert outs[1].completion_tokens == 0 and outs[1].outputs[0].finish_reason == "length"
    _same_prompt_logprobs(outs[1].prompt_logprobs, want.prompt_logprobs)
    assert outs[2].outputs[0].token_ids == want.outputs[0].token_ids
    _same_prompt_logprobs(outs[2].prompt_logprobs, want.prompt_logprobs)
    assert engine.block_manager.num_used_blocks == 0
