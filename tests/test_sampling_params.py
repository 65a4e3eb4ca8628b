"""SamplingParams.validate: every field has a bound, and nothing out of range reaches the sampler."""

from __future__ import annotations

import pytest
import torch

from llmaas.engine import sampling_params as sp
from llmaas.engine.sampler import sample
from llmaas.engine.sampling_params import SamplingParams
from llmaas.engine.sequence import Sequence
from llmaas.errors import InvalidRequestError

VOCAB = 320
HUGE = [2**63, 2**64, -(2**64), 10**30]


@pytest.mark.parametrize(
    "kw, param",
    [
        *[({"top_k": v}, "top_k") for v in HUGE],  # the 2**64 overflowed int64 in the sampler
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        *[({"seed": v}, "seed") for v in HUGE],
        ({"seed": 1.0}, "seed"),
        *[({"max_tokens": v}, "max_tokens") for v in HUGE],
        ({"max_tokens": True}, "max_tokens"),
        *[({"n": v}, "n") for v in (0, 129, 2**64, True)],
        *[({"logprobs": v}, "logprobs") for v in (-1, 21, 2**64, True)],
        *[({"prompt_logprobs": v}, "prompt_logprobs") for v in (-1, 21, 2**64)],
        *[({"temperature": v}, "temperature") for v in (-1e-9, 101.0, 1e308, float("inf"), float("nan"))],
        *[({"top_p": v}, "top_p") for v in (0.0, 1.0001, float("nan"))],
        *[({"min_p": v}, "min_p") for v in (-0.1, 1.5, float("nan"))],
        *[({"presence_penalty": v}, "presence_penalty") for v in (-2.1, 2.1, 1e308)],
        *[({"frequency_penalty": v}, "frequency_penalty") for v in (-2.1, 2.1, float("-inf"))],
        *[({"repetition_penalty": v}, "repetition_penalty") for v in (0.0, 1e-300, 101.0, float("nan"))],
        ({"stop": ["a"] * (sp.MAX_STOP + 1)}, "stop"),
        ({"stop": ["x" * (sp.MAX_STOP_LENGTH + 1)]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [1] * (sp.MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ({"stop_token_ids": [2**64]}, "stop_token_ids"),
        ({"logit_bias": {i: 1.0 for i in range(sp.MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
        ({"logit_bias": {2**64: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"skip_special_tokens": 1}, "skip_special_tokens"),
    ],
)
def test_out_of_range_is_invalid_request_naming_the_field(kw, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kw).validate(VOCAB)
    assert err.value.param == param and err.value.status_code == 400


@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": -1},
        {"top_k": sp.MAX_TOP_K},
        {"seed": 2**63 - 1, "n": sp.MAX_N},
        {"seed": -(2**63)},
        {"stop": ["x" * sp.MAX_STOP_LENGTH] * sp.MAX_STOP},
        {"stop_token_ids": list(range(sp.MAX_STOP_TOKEN_IDS))},
        {"logit_bias": {i: -100.0 for i in range(sp.MAX_LOGIT_BIAS)}},
        {"temperature": sp.MAX_TEMPERATURE, "repetition_penalty": sp.MIN_REPETITION_PENALTY},
        {"max_tokens": sp.MAX_TOKENS_LIMIT},
        {"max_tokens": 0, "prompt_logprobs": 0},
    ],
)
def test_the_bounds_themselves_are_accepted(kw):
    SamplingParams(**kw).validate(VOCAB)


def test_a_top_k_beyond_the_vocabulary_is_off():
    params = SamplingParams(top_k=VOCAB)
    params.validate(VOCAB)
    assert params.top_k == 0
    kept = SamplingParams(top_k=VOCAB - 1)
    kept.validate(VOCAB)
    assert kept.top_k == VOCAB - 1


def test_one_stop_limit_and_message():
    with pytest.raises(InvalidRequestError) as err:
        sp.check_stop(["a", "b", "c", "d", "e"])
    assert f"up to {sp.MAX_STOP} " in err.value.message and sp.MAX_STOP == 4
    from llmaas.server import sampling

    assert sampling.check_stop is sp.check_stop  # the server asks the engine's rule


def test_sampler_is_safe_even_with_an_unvalidated_huge_top_k():
    """Defence in depth: the sampler clamps k in Python, so no int64 overflow whatever reaches it."""
    seqs = [
        Sequence("a", 0, [1, 2], SamplingParams(temperature=1.0, top_k=2**64)),
        Sequence("b", 0, [1, 2], SamplingParams(temperature=1.0, top_k=3)),
    ]
    logits = torch.randn(2, VOCAB)
    (tok_a, _), (tok_b, _) = sample(logits, seqs, torch.Generator().manual_seed(0))
    assert 0 <= tok_a < VOCAB and tok_b in logits[1].topk(3).indices.tolist()


def test_a_tiny_temperature_is_greedy():
    seq = Sequence("a", 0, [1, 2], SamplingParams(temperature=1e-30))
    logits = torch.randn(1, VOCAB)
    ((token, _),) = sample(logits, [seq], torch.Generator().manual_seed(0))
    assert token == int(logits[0].argmax())
