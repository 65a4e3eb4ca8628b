"""Usage and cost reports: buckets, grouping, sums equal to the ledger, one account sees only itself."""

from datetime import datetime, timedelta, timezone

import pytest

from llmaas.billing import (
    FreeGrant,
    balance,
    create_account,
    create_key,
    hold_for_request,
    set_price,
    settle,
    usage_report,
)
from llmaas.errors import InvalidRequestError

pytest_plugins = ["tests.billing_services"]

DAY = datetime(2025, 3, 1, tzinfo=timezone.utc)
START = int(DAY.timestamp())


def _request(db, request_id, account, key_id, model, at, prompt, cached, completion):
    hold_for_request(db, request_id, account.id, model, prompt, completion, key_id=key_id, now=at)
    return settle(db, request_id, prompt, cached, completion, now=at + timedelta(seconds=1))


@pytest.fixture
def traffic(db):
    set_price(db, "small", input_usd="1", cached_input_usd="0.5", output_usd="2", effective_from=DAY)
    set_price(db, "large", input_usd="3", cached_input_usd="1", output_usd="9", effective_from=DAY)
    acme = create_account(db, "acme", free_grant=FreeGrant(10**9, None))
    zeta = create_account(db, "zeta", free_grant=FreeGrant(10**9, None))
    k1, k2 = create_key(db, "acme").info.id, create_key(db, "acme").info.id
    kz = create_key(db, "zeta").info.id
    h = timedelta(hours=1)
    _request(db, "a1", acme, k1, "small", DAY + 0 * h, 1000, 200, 100)  # 800+100+200 = 1100
    _request(db, "a2", acme, k2, "small", DAY + 0 * h + timedelta(minutes=5), 10, 0, 10)  # 10+20 = 30
    _request(db, "a3", acme, k1, "large", DAY + 2 * h, 100, 100, 1)  # 100+9 = 109
    _request(db, "z1", zeta, kz, "small", DAY + 2 * h, 7, 0, 7)  # 7+14 = 21
    _request(db, "late", acme, k1, "small", DAY + timedelta(days=2), 1, 0, 0)  # outside the range
    return db, acme, zeta, (k1, k2, kz)


def test_hourly_buckets_grouped_by_model(traffic):
    db, *_ = traffic
    buckets = usage_report(db, START, START + 3 * 3600, bucket_width="1h", group_by=["model"])
    assert [b.start_time - START for b in buckets] == [0, 3600, 7200]
    assert all(b.end_time - b.start_time == 3600 for b in buckets)
    first, empty, third = buckets
    assert empty.results == []
    [small] = first.results
    assert (small.model, small.num_model_requests, small.cost_micros) == ("small", 2, 1130)
    assert (small.input_tokens, small.input_cached_tokens, small.output_tokens) == (1010, 200, 110)
    assert small.api_key_id is None and small.account is None
    assert {(r.model, r.cost_micros) for r in third.results} == {("large", 109), ("small", 21)}


def test_group_by_key_and_account(traffic):
    db, acme, zeta, (k1, k2, kz) = traffic
    [day] = usage_report(db, START, START + 86400, group_by=["api_key_id", "account"])
    got = {(r.account, r.api_key_id): (r.num_model_requests, r.cost_micros) for r in day.results}
    assert got == {("acme", k1): (2, 1209), ("acme", k2): (1, 30), ("zeta", kz): (1, 21)}
    [total] = usage_report(db, START, START + 86400)[0].results
    assert (total.num_model_requests, total.cost_micros) == (4, 1260)


def test_an_account_sees_only_its_own_usage(traffic):
    db, acme, zeta, _ = traffic
    [zday] = usage_report(db, START, START + 86400, group_by=["account", "model"], account="zeta")
    assert [(r.account, r.model, r.cost_micros) for r in zday.results] == [("zeta", "small", 21)]
    [aday] = usage_report(db, DAY, DAY + timedelta(days=1), group_by=["account"], account=acme.id)
    assert [r.account for r in aday.results] == ["acme"]


def test_report_equals_the_ledger(traffic):
    db, acme, *_ = traffic
    spent = 10**9 - balance(db, "acme").available_micros
    rows = usage_report(db, START, START + 3 * 86400, account="acme")
    assert sum(r.cost_micros for b in rows for r in b.results) == spent


def test_minute_buckets_and_bad_parameters(traffic):
    db, *_ = traffic
    minutes = usage_report(db, START, START + 600, bucket_width="1m")
    assert len(minutes) == 10
    assert [b.start_time - START for b in minutes if b.results] == [0, 300]
    for kwargs, param in (
        ({"bucket_width": "2h"}, "bucket_width"),
        ({"group_by": ["user"]}, "group_by"),
        ({"group_by": "model"}, "group_by"),
    ):
        with pytest.raises(InvalidRequestError) as info:
            usage_report(db, START, START + 60, **kwargs)
        assert info.value.param == param
    with pytest.raises(InvalidRequestError) as info:
        usage_report(db, START, START)
    assert info.value.param == "end_time"
    with pytest.raises(InvalidRequestError):
        usage_report(db, 0, START, bucket_width="1m")  # too many buckets
