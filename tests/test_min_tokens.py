"""min_tokens in the sampler: the ending tokens are kept out until the choice has that many tokens,
unless nothing else could be drawn (a constraint that allows only an ending wins)."""

from __future__ import annotations

import pytest
import torch

from llmaas.engine import sampler
from llmaas.engine.sampling_params import SamplingParams
from llmaas.engine.sequence import Sequence
from llmaas.errors import InvalidRequestError

ENDING = 2


def _seq(produced: int, **params) -> Sequence:
    seq = Sequence("r", 0, [1, 2, 3], SamplingParams(temperature=0, **params))
    seq.output_token_ids = [5] * produced
    seq.params.min_tokens_banned = (ENDING,)  # what the engine sets at add_request
    return seq


def test_the_ending_is_kept_out_before_min_tokens_and_allowed_after():
    logits = torch.zeros(1, 8)
    logits[0, ENDING] = 50.0  # the model wants to end
    assert sampler.sample(logits, [_seq(2, min_tokens=3)])[0][0] != ENDING
    assert sampler.sample(logits, [_seq(3, min_tokens=3)])[0][0] == ENDING
    assert sampler.sample(logits, [_seq(0)])[0][0] == ENDING  # min_tokens 0: nothing kept out


def test_an_ending_that_is_the_only_choice_wins():
    logits = torch.full((1, 8), float("-inf"))
    logits[0, ENDING] = 0.0  # e.g. a grammar that accepts only the end here
    assert sampler.sample(logits, [_seq(0, min_tokens=3)])[0][0] == ENDING


@pytest.mark.parametrize(
    "params", [{"min_tokens": -1}, {"min_tokens": 4, "max_tokens": 3}, {"min_tokens": 1.5}]
)
def test_min_tokens_is_checked(params):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**params).validate()
    assert err.value.param == "min_tokens"
