"""Money and operator-input bounds in the billing library: one USD parser, bounded amounts, prices,
account totals, dates and account names, on SQLite and PostgreSQL (issue 13, items 5, 6, 10)."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from llmaas.billing import (
    FreeGrant,
    balance,
    create_account,
    grant,
    list_accounts,
    list_prices,
    set_price,
    top_up,
    usage_report,
)
from llmaas.billing.money import (
    MAX_ACCOUNT_CREDIT_MICROS,
    MAX_AMOUNT_MICROS,
    MAX_PRICE_MICROS_PER_M,
    credit_to_micros,
    usd_to_micros,
)
from llmaas.billing.operator_input import parse_time
from llmaas.errors import InvalidRequestError

pytest_plugins = ["tests.billing_services"]

HUGE = "9" * 1_000_000


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("0", 0),
        ("10", 10_000_000),
        ("10.50", 10_500_000),
        (" 2.5 ", 2_500_000),
        ("0.000001", 1),
        ("1.5000000", 1_500_000),  # trailing zeros beyond six places are still exact
        ("1000000000", MAX_AMOUNT_MICROS),
        (3, 3_000_000),
        (Decimal("1.25"), 1_250_000),
        (Decimal("1E+2"), 100_000_000),
    ],
)
def test_usd_to_micros_takes_plain_decimals(text, micros):
    assert usd_to_micros(text, "amount_usd") == micros


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "inf",
        "1_000",  # Decimal() and int() accept underscores: $1,000 by accident
        "1e30",
        "1E3",
        "1e-7",
        "+5",
        "-1",
        "--1",
        "0x10",
        "1,000",
        "",
        " ",
        ".5",
        "5.",
        "1.0000001",
        "١٢",  # Arabic-Indic digits: Decimal() takes them
        "5000000000000",
        "1000000000.000001",
        str(2**64),
        str(-(2**64)),
        HUGE,
        "\ud800",
        2**64,
        -(2**64),
        1e308,
        float("nan"),
        True,
        None,
        [1],
        Decimal("NaN"),
        Decimal("Infinity"),
        Decimal("1e30"),
        Decimal("1E+999999"),
        Decimal("1e-7"),
    ],
)
def test_usd_to_micros_refuses_everything_else_naming_the_field_in_a_short_message(text):
    with pytest.raises(InvalidRequestError) as err:
        usd_to_micros(text, "amount_usd")
    assert err.value.param == "amount_usd"
    assert len(err.value.message) < 300  # a 1 MB value is never echoed back whole


def test_negative_amounts_only_where_allowed_and_credits_are_positive():
    assert usd_to_micros("-1.5", "delta", allow_negative=True) == -1_500_000
    with pytest.raises(InvalidRequestError):
        usd_to_micros("-" + "9" * 20, "delta", allow_negative=True)
    for zero in ("0", "0.000000", "-0"):
        with pytest.raises(InvalidRequestError, match="positive"):
            credit_to_micros(zero)


def test_the_bounds_leave_room_in_a_64_bit_sum():
    # Thousands of the largest amounts, and hundreds of full accounts, still sum inside BIGINT.
    assert 9_000 * MAX_AMOUNT_MICROS < 2**63
    assert MAX_ACCOUNT_CREDIT_MICROS * 900 < 2**63
    # The dearest price times a million-token request is at most one maximal amount.
    assert MAX_PRICE_MICROS_PER_M <= MAX_AMOUNT_MICROS


def test_an_account_total_is_bounded_and_the_account_keeps_working(db):
    """Two top-ups of $5e12 once overflowed SQLite's INTEGER after committing; PostgreSQL: bigint."""
    create_account(db, "rich", free_grant=None)
    create_account(db, "other")
    for amount in (5_000_000_000_000 * 1_000_000, 2**63, 2**64):
        with pytest.raises(InvalidRequestError):
            top_up(db, "rich", amount)
    for _ in range(MAX_ACCOUNT_CREDIT_MICROS // MAX_AMOUNT_MICROS):
        top_up(db, "rich", MAX_AMOUNT_MICROS)
    with pytest.raises(InvalidRequestError, match="most one account may hold") as err:
        top_up(db, "rich", 1)
    assert err.value.param == "amount_usd"
    with pytest.raises(InvalidRequestError):
        grant(db, "rich", 1)
    assert balance(db, "rich").credit_micros == MAX_ACCOUNT_CREDIT_MICROS
    assert {a.name for a in list_accounts(db)} == {"rich", "other"}
    assert balance(db, "other").available_micros == 1_000_000


@pytest.mark.parametrize(
    "price", ["1000000000000000", "100000.000001", "1e30", "NaN", "1_000", "-1", HUGE, 2**64]
)
def test_prices_are_bounded(db, price):
    with pytest.raises(InvalidRequestError) as err:
        set_price(db, "m", input_usd="1", cached_input_usd="0.5", output_usd=price)
    assert err.value.param == "output" and len(err.value.message) < 300
    assert list_prices(db) == []
    assert set_price(
        db, "m", input_usd="100000", cached_input_usd="0", output_usd="1"
    ).input_micros_per_m == (MAX_PRICE_MICROS_PER_M)


def test_price_dates_naive_is_utc_and_the_range_is_bounded(db):
    naive = set_price(
        db, "m", input_usd="1", cached_input_usd="1", output_usd="1", effective_from=datetime(2030, 1, 1)
    )
    assert naive.effective_from == datetime(2030, 1, 1, tzinfo=timezone.utc)
    for when in (
        datetime(1, 1, 1),
        datetime(9999, 12, 31, 23, 59),
        datetime(2200, 1, 1, tzinfo=timezone.utc),
    ):
        with pytest.raises(InvalidRequestError) as err:
            set_price(db, "m", input_usd="1", cached_input_usd="1", output_usd="1", effective_from=when)
        assert err.value.param == "effective_from"
    for bad_model in ("", "x" * 129, "a\x00b", "\ud800"):
        with pytest.raises(InvalidRequestError) as err:
            set_price(db, bad_model, input_usd="1", cached_input_usd="1", output_usd="1")
        assert err.value.param == "model"
    assert len(list_prices(db)) == 1


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01T00:00:00",
        "9999-12-31T23:59:59",
        "9999-12-31T23:59:59-05:00",  # converting to UTC leaves datetime's range
        "0001-01-01T00:00:00+05:00",
        "2200-01-01",
        "1969-12-31T23:59:59Z",
        "yesterday",
        HUGE,
        "\ud800",
        2**64,
    ],
)
def test_parse_time_refuses_out_of_range_and_malformed_dates(text):
    with pytest.raises(InvalidRequestError) as err:
        parse_time(text, "effective_from")
    assert err.value.param == "effective_from" and len(err.value.message) < 300


def test_parse_time_takes_naive_as_utc():
    assert parse_time("2030-01-02T03:04:05", "t") == datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert parse_time("2030-01-02T03:04:05+01:00", "t") == datetime(2030, 1, 2, 2, 4, 5, tzinfo=timezone.utc)


def test_account_names_are_unique_ignoring_case_and_admin_is_reserved(db):
    create_account(db, "acme")
    for name in ("ACME", "Acme", "admin", "Admin", "ADMIN"):
        with pytest.raises(InvalidRequestError) as err:
            create_account(db, name)
        assert err.value.param == "name"
    for name in ("x" * 129, "", "a b", "\ud800", "-lead", HUGE, 2**64, None):
        with pytest.raises(InvalidRequestError) as err:
            create_account(db, name)
        assert err.value.param == "name" and len(err.value.message) < 300
    create_account(db, "admin", free_grant=None, reserved=True)  # what the server's bootstrap does
    assert [a.name for a in list_accounts(db)] == ["acme", "admin"]


def test_usage_report_counts_an_account_named_twice_once(db):
    when = datetime(2030, 1, 1, tzinfo=timezone.utc)
    from llmaas.billing import create_key, hold_for_request, settle

    set_price(db, "m", input_usd="1", cached_input_usd="1", output_usd="1", effective_from=when)
    acme = create_account(db, "acme", free_grant=FreeGrant(10**6, None))
    key = create_key(db, "acme").info.id
    hold_for_request(db, "r1", acme.id, "m", 10, 10, key_id=key, now=when)
    settle(db, "r1", 10, 0, 10, now=when)
    start = int(when.timestamp())
    once = usage_report(db, start, start + 3600, bucket_width="1h", group_by=["account", "api_key_id"])
    thrice = usage_report(
        db,
        start,
        start + 3600,
        bucket_width="1h",
        group_by=["account", "api_key_id"],
        accounts=["acme", "acme", acme.id],
    )
    assert thrice == once and [r.num_model_requests for r in once[0].results] == [1]
    for bad in (10**15, -1, 2**64, "1e30"):
        with pytest.raises(InvalidRequestError):
            usage_report(db, bad, None)


def test_every_plan_limit_is_within_what_an_operator_may_set():
    """Plans are code, not input, but a key's override and a plan's default share one range."""
    from llmaas.billing.operator_input import requests_per_minute, tokens_per_minute
    from llmaas.billing.plans import PLANS

    for plan in PLANS.values():
        assert requests_per_minute(plan.requests_per_minute) == plan.requests_per_minute
        assert tokens_per_minute(plan.tokens_per_minute) == plan.tokens_per_minute
