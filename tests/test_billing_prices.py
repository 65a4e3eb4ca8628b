"""Money and prices: exact micro-USD, one rounding per request, cached tokens billed once, versions."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from llmaas.billing import (
    PriceNotSetError,
    cost_micros,
    current_price,
    list_prices,
    set_price,
    usd_to_micros,
    worst_case_cost_micros,
)
from llmaas.billing.money import format_usd, micros_to_usd, round_half_up_div
from llmaas.billing.prices import PriceVersion
from llmaas.errors import InvalidRequestError

pytest_plugins = ["tests.billing_services"]

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
SMOL = PriceVersion(1, "smol", 50_000, 25_000, 200_000, T0)  # $0.05 / $0.025 / $0.20 per 1M


def test_usd_parsing_is_exact_and_refuses_floats_and_sub_micro_precision():
    assert usd_to_micros("10.00") == 10_000_000
    assert usd_to_micros(Decimal("0.000001")) == 1
    assert usd_to_micros(3) == 3_000_000
    for bad in (0.1, "abc", "1e-7", "-1", "NaN", "Infinity", True):
        with pytest.raises(InvalidRequestError) as info:
            usd_to_micros(bad, "amount")
        assert info.value.param == "amount"
    assert micros_to_usd(1_615) == Decimal("0.001615")
    assert format_usd(10_000_000) == "10.000000"


def test_round_half_up():
    assert round_half_up_div(5, 10) == 1
    assert round_half_up_div(4, 10) == 0
    assert round_half_up_div(15, 10) == 2
    assert round_half_up_div(-5, 10) == -1
    assert round_half_up_div(0, 7) == 0


def test_cost_bills_cached_tokens_once_at_the_cached_price():
    # 1000 prompt (400 cached) + 100 completion:
    # 600 * 0.05 + 400 * 0.025 + 100 * 0.20 = 30 + 10 + 20 = 60 micro-USD
    assert cost_micros(SMOL, 1000, 400, 100) == 60
    assert cost_micros(SMOL, 1000, 0, 100) == 70
    assert cost_micros(SMOL, 1000, 1000, 0) == 25
    assert cost_micros(SMOL, 0, 0, 0) == 0
    # 500 * 0.05 + 500 * 0.025 + 50 * 0.2 = 47.5 -> rounded once, half up, to 48
    assert cost_micros(SMOL, 1000, 500, 50) == 48
    # 1 token at $0.05/1M is 0.05 micro-USD: rounds to 0 alone; a million of them are exactly $0.05
    assert cost_micros(SMOL, 1, 0, 0) == 0
    assert cost_micros(SMOL, 1_000_000, 0, 0) == 50_000


def test_cost_refuses_bad_counts():
    with pytest.raises(InvalidRequestError) as info:
        cost_micros(SMOL, 10, 11, 0)
    assert info.value.param == "cached_tokens"
    for args, param in (((-1, 0, 0), "prompt_tokens"), ((1, 0, 1.5), "completion_tokens")):
        with pytest.raises(InvalidRequestError) as info:
            cost_micros(SMOL, *args)
        assert info.value.param == param


def test_worst_case_covers_every_actual_outcome():
    odd = PriceVersion(2, "odd", 10_000, 30_000, 70_000, T0)  # cached dearer than input: still covered
    for price in (SMOL, odd):
        worst = worst_case_cost_micros(price, 300, 50)
        for cached in (0, 150, 300):
            for completion in (0, 25, 50):
                assert cost_micros(price, 300, cached, completion) <= worst


def test_price_versions(db):
    with pytest.raises(PriceNotSetError):
        current_price(db, "smol")
    v1 = set_price(
        db, "smol", input_usd="0.05", cached_input_usd="0.025", output_usd="0.20", effective_from=T0
    )
    later = T0 + timedelta(days=10)
    v2 = set_price(
        db, "smol", input_usd="0.10", cached_input_usd="0.05", output_usd="0.40", effective_from=later
    )
    assert (v1.input_micros_per_m, v1.cached_input_micros_per_m, v1.output_micros_per_m) == (
        50_000,
        25_000,
        200_000,
    )
    assert current_price(db, "smol", at=T0 + timedelta(days=1)).id == v1.id
    assert current_price(db, "smol", at=later).id == v2.id
    assert current_price(db, "smol").id == v2.id
    with pytest.raises(PriceNotSetError):
        current_price(db, "smol", at=T0 - timedelta(seconds=1))
    assert [p.id for p in list_prices(db, "smol")] == [v1.id, v2.id]
    with pytest.raises(InvalidRequestError) as info:
        set_price(db, "smol", input_usd="1", cached_input_usd="1", output_usd="1", effective_from=T0)
    assert info.value.param == "effective_from"
    with pytest.raises(InvalidRequestError) as info:
        set_price(db, "smol", input_usd=0.05, cached_input_usd="1", output_usd="1")
    assert info.value.param == "input"
