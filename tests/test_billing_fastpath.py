"""The per-request statements (billing/sql.py): durability options, the key re-check in the hold, and
settling a request whose hold row was lost."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete

from llmaas.billing import (
    AuthenticationError,
    FreeGrant,
    balance,
    create_account,
    create_key,
    get_usage,
    hold_for_request,
    open_database,
    revoke_key,
    set_price,
    settle,
    verify_key,
)
from llmaas.billing.keys import check_key
from llmaas.billing.schema import Hold, utcnow

pytest_plugins = ["tests.billing_services"]

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _account(db, name="acme", micros=1_000_000):
    account = create_account(db, name, plan="plus", free_grant=FreeGrant(micros, valid_for=None))
    set_price(db, "smol", input_usd="1", cached_input_usd="0.5", output_usd="2", effective_from=T0)
    return account


def test_sqlite_synchronous_is_chosen_in_the_url(tmp_path):
    for option, expected in (("", 1), ("?synchronous=full", 2), ("?synchronous=NORMAL", 1)):
        db = open_database(f"sqlite:///{tmp_path / 'b.sqlite3'}{option}")
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == expected
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        db.close()
    with pytest.raises(ValueError, match="synchronous"):
        open_database(f"sqlite:///{tmp_path / 'b.sqlite3'}?synchronous=off")
    with pytest.raises(ValueError, match="postgresql only"):
        open_database(f"sqlite:///{tmp_path / 'b.sqlite3'}?hold_commit=sync")


def test_postgres_hold_commit_option(postgres_url):
    assert open_database(postgres_url, migrate=False).durable_holds is False
    assert open_database(postgres_url + "?hold_commit=sync", migrate=False).durable_holds is True
    with pytest.raises(ValueError, match="hold_commit"):
        open_database(postgres_url + "?hold_commit=maybe", migrate=False)


def test_a_hold_rechecks_the_key(db):
    account = _account(db)
    key = create_key(db, "acme", expires_at=utcnow() + timedelta(hours=1))
    principal = verify_key(db, key.secret)
    hold_for_request(db, "ok", account.id, "smol", 10, 10, key_id=principal.key_id)
    revoke_key(db, principal.key_id)  # e.g. by `llmaas keys revoke`, while a replica still caches the key
    with pytest.raises(AuthenticationError, match="revoked") as info:
        hold_for_request(db, "after", account.id, "smol", 10, 10, key_id=principal.key_id)
    assert key.secret not in str(info.value)
    later = create_key(db, "acme", expires_at=utcnow() + timedelta(hours=1))
    with pytest.raises(AuthenticationError, match="expired"):
        hold_for_request(
            db, "late", account.id, "smol", 10, 10, key_id=later.info.id, now=utcnow() + timedelta(hours=2)
        )
    assert check_key(db, later.secret).expires_at == later.info.expires_at


def test_settle_bills_a_request_whose_hold_row_was_lost(db):
    account = _account(db)
    hold = hold_for_request(db, "lost", account.id, "smol", 100, 100)
    with db.write() as session:  # what a PostgreSQL crash can do to an unflushed hold (hold_commit=async)
        session.execute(delete(Hold).where(Hold.request_id == "lost"))
    usage = settle(db, "lost", 100, 0, 50, hold=hold)
    assert (usage.cost_micros, usage.price_id, usage.account_id) == (200, hold.price_id, account.id)
    assert get_usage(db, "lost").cost_micros == 200
    assert settle(db, "lost", 100, 0, 99, hold=hold) == get_usage(db, "lost")  # still once
    b = balance(db, "acme")
    assert (b.available_micros, b.held_micros) == (1_000_000 - 200, 0)


def test_the_servers_key_cache_ages_out_and_forgets(db):
    from llmaas.server.billing import KeyCache

    _account(db)
    key = create_key(db, "acme", expires_at=utcnow() + timedelta(hours=1))
    verified = check_key(db, key.secret)
    now = [0.0]
    cache = KeyCache(ttl_s=5.0, clock=lambda: now[0])
    cache.put("h", verified)
    assert cache.get("h") == verified.principal
    now[0] = 5.0
    assert cache.get("h") is None  # aged out: the next request reads the database
    cache.put("h", verified)
    cache.forget(key_id=verified.principal.key_id)
    assert cache.get("h") is None
    cache.put("h", verified)
    cache.forget(account_id=verified.principal.account_id)
    assert cache.get("h") is None
    gone = dataclasses.replace(verified, expires_at=utcnow() - timedelta(seconds=1))
    cache.put("h", gone)
    assert cache.get("h") is None  # the key itself expired: never served from the cache
