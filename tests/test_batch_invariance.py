"""Batch invariance (docs/batch_invariance.md): a request's logits, hence its logprobs, greedy tokens and
seeded samples, are bit-identical whatever shares its steps, wherever it sits in the batch, whatever the
decode batch size, prefilled whole or in chunks, cold or from the prefix cache. bf16 by default, int4
with `batch_invariant`.

Kernel tests check each native op: a row computed among others equals the same row computed alone,
bit for bit. Engine tests use a tiny llama with 64-wide heads (the sizes our attention kernel is built
for). Everything here needs our kernels on a CPU with AVX-512 BF16; elsewhere it is skipped (and the
engine refuses `batch_invariant`, tested below).
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from llmaas import LLM, SamplingParams
from llmaas.engine.llm_engine import EngineConfig
from llmaas.errors import InvalidRequestError
from llmaas.kernels import cpu_ops
from llmaas.models.quantize import quantize_int4_groups
from llmaas.server import create_app
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import make_engine, serve

needs_kernels = pytest.mark.skipif(
    not cpu_ops.decode_matmul_available(), reason="our kernels need a CPU with AVX-512 BF16"
)
ROW_COUNTS = [1, 2, 3, 5, 7, 16, 17, 33, 130]  # across every register-block and threading switch


def _row_alone_equals_row_among(op, width: int, seed: int) -> None:
    """op(x) for x of each row count: row 0 (x's first row) and the last row equal op of that row alone."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(max(ROW_COUNTS), width, generator=gen).to(torch.bfloat16)
    alone_first, alone_last = op(rows[:1]), {}
    for m in ROW_COUNTS:
        out = op(rows[:m])
        assert torch.equal(out[:1], alone_first), m
        alone_last.setdefault(m, op(rows[m - 1 : m]))
        assert torch.equal(out[m - 1 :], alone_last[m]), m


@needs_kernels
def test_bf16_matmul_rows_do_not_depend_on_the_row_count():
    weight = torch.randn(96, 320, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed = cpu_ops.pack_bf16_for_matmul(weight)
    for threads in (1, 2):
        _row_alone_equals_row_among(lambda x, t=threads: cpu_ops.bf16_matmul(x, packed, t), 320, seed=2)


@needs_kernels
def test_int4_and_int8_matmul_rows_do_not_depend_on_the_row_count():
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(80, 256, generator=gen) * 0.1).to(torch.bfloat16)
    int4 = cpu_ops.pack_int4_for_matmul(*quantize_int4_groups(weight))
    q8 = torch.randint(-127, 128, (80, 256), generator=gen, dtype=torch.int8)
    int8 = cpu_ops.pack_int8_for_matmul(q8, torch.rand(80, 8, generator=gen) * 0.01)
    for threads in (1, 2):
        _row_alone_equals_row_among(lambda x, t=threads: cpu_ops.int4_matmul(x, int4, t), 256, seed=4)
        _row_alone_equals_row_among(lambda x, t=threads: cpu_ops.int8_matmul(x, int8, t), 256, seed=5)


@needs_kernels
def test_norm_and_activation_rows_do_not_depend_on_the_row_count():
    weight = torch.randn(192, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    _row_alone_equals_row_among(lambda x: cpu_ops.rms_norm(x, weight, 1e-5), 192, seed=7)
    _row_alone_equals_row_among(cpu_ops.silu_mul, 192, seed=8)


# ---------------------------------------------------------------------------------------------- engine
VOCAB = 320


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(
        "llama", tmp_path_factory.mktemp("invariance"), head_dim=64, max_position_embeddings=512
    )


def make_llm(model_dir, quantization: str | None, **config) -> LLM:
    # bf16 is invariant by default; int4 with batch_invariant
    defaults = {"kv_cache_memory": 16 * 2**20, "block_size": 16, "batch_invariant": quantization is not None}
    config = {**defaults, **config}
    config = EngineConfig(model=str(model_dir), dtype="bfloat16", quantization=quantization, **config)
    return LLM(config=config)


def _prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 200))] for _ in range(count)]


def _tokens_and_logprobs(output) -> tuple[list[int], list[float]]:
    choice = output.outputs[0]
    return choice.token_ids, [lp.logprob for lp in choice.logprobs]


GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, logprobs=0)
SEEDED = SamplingParams(max_tokens=64, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True, logprobs=0)


@needs_kernels
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_a_request_gets_the_same_numbers_alone_among_31_others_and_at_any_position(model_dir, quantization):
    target = _prompts(0, 1)[0][:40]
    others = _prompts(1, 31)
    llm = make_llm(model_dir, quantization)
    for params, positions in ((GREEDY, (0, 31)), (SEEDED, (13,))):
        alone = _tokens_and_logprobs(llm.generate([target], params)[0])
        assert len(alone[0]) == 64
        for position in positions:
            batch = [*others[:position], target, *others[position:]]
            greedy_others = [GREEDY] * len(batch)
            greedy_others[position] = params
            got = llm.generate(batch, greedy_others)[position]
            assert _tokens_and_logprobs(got) == alone, (params.temperature, position)
    # other decode batch sizes (at most 3 or 8 sequences a step) and prefill chunks of 24 or 100 tokens
    for max_num_seqs, budget in ((3, 24), (8, 100)):
        other = make_llm(model_dir, quantization, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
        got = other.generate([*others[:5], target, *others[5:9]], GREEDY)[5]
        assert _tokens_and_logprobs(got) == _tokens_and_logprobs(llm.generate([target], GREEDY)[0])


@needs_kernels
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_whole_and_chunked_prefill_and_cold_and_cached_prefix_give_the_same_numbers(model_dir, quantization):
    prompt = _prompts(2, 1)[0] + _prompts(3, 1)[0]  # ~200 tokens: many chunks at 16 a step
    scoring = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)

    def scored(llm: LLM) -> tuple:
        out = llm.generate([prompt], scoring)[0]
        return [lp.logprob for lp in out.prompt_logprobs[1:]], _tokens_and_logprobs(out)

    whole = scored(make_llm(model_dir, quantization, max_num_batched_tokens=1024))
    assert len(whole[0]) == len(prompt) - 1
    for budget in (16, 37, 100):
        assert scored(make_llm(model_dir, quantization, max_num_batched_tokens=budget)) == whole, budget
    # prefix cache: the second request's prompt is served from the cache up to its last block
    llm = make_llm(model_dir, quantization)
    generate = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
    cold = llm.generate([prompt], generate)[0]
    cached = llm.generate([prompt], generate)[0]
    assert cold.cached_tokens == 0 and cached.cached_tokens >= len(prompt) - 16
    assert _tokens_and_logprobs(cached) == _tokens_and_logprobs(cold) == whole[1]


def test_batch_invariance_is_refused_where_it_cannot_be_kept(model_dir, tmp_path):
    with pytest.raises(InvalidRequestError) as info:
        make_llm(model_dir, "int8", batch_invariant=True)
    assert info.value.param == "batch_invariant"
    with pytest.raises(InvalidRequestError) as info:
        LLM(config=EngineConfig(model=str(model_dir), dtype="float32", batch_invariant=True))
    assert info.value.param == "batch_invariant"
    if cpu_ops.decode_matmul_available():  # weights left in torch's plain layout: torch's matmuls
        with pytest.raises(InvalidRequestError, match="self_attn.qkv_proj") as info:
            make_llm(model_dir, None, batch_invariant=True, pack_weights=False)
        assert info.value.param == "batch_invariant"
        narrow_heads = make_tiny_checkpoint("llama", tmp_path, head_dim=16)  # no attention kernel of ours
        with pytest.raises(InvalidRequestError, match="heads of 16") as info:
            make_llm(narrow_heads, "int4")
        assert info.value.param == "batch_invariant"


# ------------------------------------------------------------------------------------------------ HTTP
@needs_kernels
def test_prompt_scoring_over_http_is_identical_at_concurrency_1_and_8(model_dir):
    engine = make_engine(model_dir, dtype="bfloat16", kv_cache_memory=16 * 2**20, block_size=16)
    texts = [
        "The quick brown fox jumps over the lazy dog. " * (i + 1) + f"Question {i}: what is the weather?"
        for i in range(8)
    ]
    try:
        with serve(create_app({"tiny": engine})) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=120)

            def score(text: str) -> list[float | None]:
                r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=0)
                return r.choices[0].logprobs.token_logprobs

            alone = [score(text) for text in texts]
            with ThreadPoolExecutor(8) as pool:
                for _ in range(2):
                    together = list(pool.map(score, texts))
                    assert together == alone
    finally:
        engine.shutdown()
    assert all(len(lps) > 10 and lps[0] is None for lps in alone)


# --------------------------------------------------------------------------------- the default model
@needs_kernels
@pytest.mark.slow
def test_the_default_model_in_bf16_gives_the_same_numbers_alone_and_among_15_others():
    """SmolLM2-135M-Instruct in bf16 (its default here): the step sizes of a real server's load."""
    llm = LLM("smollm2-135m", dtype="bfloat16", kv_cache_memory=64 * 2**20)
    rng = random.Random(4)
    vocab = llm.engine.model_config.vocab_size
    target = [rng.randrange(100, vocab) for _ in range(40)]
    others = [[rng.randrange(100, vocab) for _ in range(rng.randrange(5, 300))] for _ in range(15)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    alone = _tokens_and_logprobs(llm.generate([target], params)[0])
    together = llm.generate([*others[:7], target, *others[7:]], params)[7]
    assert _tokens_and_logprobs(together) == alone
