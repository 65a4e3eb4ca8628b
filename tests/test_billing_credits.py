"""Credits, holds and settlement: exact, idempotent, and never below zero under concurrency."""

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from llmaas.billing import (
    FreeGrant,
    HoldStateError,
    InsufficientQuotaError,
    NotFoundError,
    PriceNotSetError,
    balance,
    create_account,
    get_usage,
    grant,
    hold_for_request,
    open_database,
    open_holds,
    place_hold,
    release,
    release_stale_holds,
    set_price,
    settle,
    top_up,
)
from llmaas.billing.prices import current_price
from llmaas.billing.schema import LedgerEntry, UsageRecord
from llmaas.errors import InvalidRequestError

pytest_plugins = ["tests.billing_services"]

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _setup(db, credit_micros: int, name: str = "acme"):
    account = create_account(db, name, free_grant=FreeGrant(credit_micros, valid_for=None))
    if not _has_price(db):
        set_price(db, "smol", input_usd="1", cached_input_usd="0.5", output_usd="2", effective_from=T0)
    return account, current_price(db, "smol")


def _has_price(db) -> bool:
    try:
        current_price(db, "smol")
        return True
    except PriceNotSetError:
        return False


def _ledger_consistent(db, account_id: int) -> None:
    """credits granted - charges = credit remaining (expired included) - overdraft, to the micro."""
    with db.read() as session:
        credits = session.scalar(
            select(func.sum(LedgerEntry.amount_micros)).where(
                LedgerEntry.account_id == account_id, LedgerEntry.kind != "charge"
            )
        )
        charges = session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0)).where(
                LedgerEntry.account_id == account_id, LedgerEntry.kind == "charge"
            )
        )
        remaining = session.scalar(
            select(func.sum(LedgerEntry.remaining_micros)).where(
                LedgerEntry.account_id == account_id, LedgerEntry.kind != "charge"
            )
        )
        usage_cost = session.scalar(
            select(func.coalesce(func.sum(UsageRecord.cost_micros), 0)).where(
                UsageRecord.account_id == account_id
            )
        )
    overdraft = balance(db, account_id).overdraft_micros
    assert int(credits) + int(charges) == int(remaining) - overdraft
    assert -int(charges) == int(usage_cost)


def test_hold_settle_charges_the_exact_cost_and_releases_the_rest(db):
    account, price = _setup(db, 10_000)
    # worst case: 1000 prompt at $1/1M + 2000 output at $2/1M = 1000 + 4000 = 5000 micro-USD
    hold = hold_for_request(db, "req-1", account.id, "smol", 1000, 2000)
    assert (hold.amount_micros, hold.price_id, hold.status) == (5000, price.id, "open")
    assert balance(db, "acme").available_micros == 5000
    assert balance(db, "acme").held_micros == 5000
    # 1000 prompt (600 cached) + 10 completion: 400 * 1 + 600 * 0.5 + 10 * 2 = 720
    usage = settle(db, "req-1", 1000, 600, 10, endpoint="chat.completions")
    assert (usage.cost_micros, usage.status, usage.price_id) == (720, "completed", price.id)
    after = balance(db, "acme")
    assert (after.available_micros, after.held_micros, after.credit_micros) == (9280, 0, 9280)
    _ledger_consistent(db, account.id)


def test_settle_is_idempotent(db):
    account, _ = _setup(db, 10_000)
    hold_for_request(db, "req-1", account.id, "smol", 100, 100)
    first = settle(db, "req-1", 100, 0, 50)
    again = settle(db, "req-1", 100, 0, 99)  # a retry with other numbers changes nothing
    assert again == first
    assert balance(db, "acme").available_micros == 10_000 - 200
    assert get_usage(db, "req-1") == first
    with db.read() as session:
        assert session.scalar(select(func.count(UsageRecord.id))) == 1
    with pytest.raises(HoldStateError):
        place_hold(db, "req-1", account.id, current_price(db, "smol"), 1)
    with pytest.raises(HoldStateError):
        release(db, "req-1")
    with pytest.raises(NotFoundError):
        settle(db, "never-held", 1, 0, 1)
    with pytest.raises(InvalidRequestError):
        settle(db, "req-1", 1, 0, 1, status="done")


def test_insufficient_quota(db):
    account, price = _setup(db, 1000)
    with pytest.raises(InsufficientQuotaError) as info:
        place_hold(db, "big", account.id, price, 1001)
    err = info.value
    assert (err.status_code, err.error_type, err.code) == (429, "insufficient_quota", "insufficient_quota")
    assert err.headers == {"x-should-retry": "false"}
    place_hold(db, "exact", account.id, price, 1000)  # exactly the balance is fine
    with pytest.raises(InsufficientQuotaError):
        place_hold(db, "one-more", account.id, price, 1)
    release(db, "exact")
    assert release(db, "exact").status == "released"  # twice is a no-op
    assert balance(db, "acme").available_micros == 1000


def test_request_is_billed_at_the_price_in_force_at_admission(db):
    account, old = _setup(db, 100_000)
    hold_for_request(db, "req-1", account.id, "smol", 1000, 0)
    set_price(db, "smol", input_usd="10", cached_input_usd="5", output_usd="20")
    usage = settle(db, "req-1", 1000, 0, 0)
    assert usage.price_id == old.id and usage.cost_micros == 1000


def test_cancelled_and_failed_are_billed_for_their_tokens(db):
    """A request that failed mid-stream was delivered its tokens: never $0 (issue 13, item 1)."""
    account, _ = _setup(db, 10_000)
    hold_for_request(db, "gone", account.id, "smol", 100, 100)
    hold_for_request(db, "broke", account.id, "smol", 100, 100)
    assert settle(db, "gone", 100, 0, 7, status="cancelled").cost_micros == 114
    failed = settle(db, "broke", 100, 0, 7, status="failed")
    assert (failed.cost_micros, failed.completion_tokens, failed.status) == (114, 7, "failed")
    assert get_usage(db, "broke").cost_micros == 114
    assert balance(db, "acme").available_micros == 10_000 - 2 * 114
    _ledger_consistent(db, account.id)


def test_charges_draw_expiring_grants_first(db):
    account, _ = _setup(db, 0)
    now = datetime.now(timezone.utc)
    top_up(db, "acme", 1000)
    grant(db, "acme", 300, expires_at=now + timedelta(days=1))
    hold_for_request(db, "req-1", account.id, "smol", 200, 0)
    settle(db, "req-1", 200, 0, 0)  # 200 drawn from the expiring grant, not the top-up
    assert balance(db, "acme").available_micros == 1100
    assert balance(db, "acme", now=now + timedelta(days=2)).available_micros == 1000
    _ledger_consistent(db, account.id)


def test_overdraft_is_paid_by_the_next_credit(db):
    account, price = _setup(db, 100)
    place_hold(db, "under", account.id, price, 50)  # a hold that under-estimated the request
    usage = settle(db, "under", 130, 0, 0)
    assert usage.cost_micros == 130
    b = balance(db, "acme")
    assert (b.credit_micros, b.overdraft_micros, b.available_micros) == (0, 30, -30)
    with pytest.raises(InsufficientQuotaError):
        place_hold(db, "next", account.id, price, 0)
    top_up(db, "acme", 100)
    assert balance(db, "acme").available_micros == 70
    _ledger_consistent(db, account.id)
    with pytest.raises(InvalidRequestError):
        top_up(db, "acme", 0)


def test_stale_holds_are_released(db):
    account, price = _setup(db, 1000)
    place_hold(db, "a", account.id, price, 100, owner="server-1")
    place_hold(db, "b", account.id, price, 100, owner="server-2")
    place_hold(db, "c", account.id, price, 100, owner="server-2", now=T0)
    assert release_stale_holds(db, owner="server-1") == 1
    assert release_stale_holds(db, created_before=T0 + timedelta(seconds=1)) == 1
    assert [h.request_id for h in open_holds(db, "acme")] == ["b"]
    # A request whose hold was released as stale but which did finish is still billed, once.
    assert settle(db, "a", 10, 0, 0).cost_micros == 10
    assert balance(db, "acme").available_micros == 1000 - 100 - 10


HOLD = 1000


def test_fifty_concurrent_holds_against_a_balance_for_ten(db):
    account, price = _setup(db, 10 * HOLD)
    start = threading.Barrier(50)

    def attempt(i: int) -> bool:
        start.wait()
        try:
            place_hold(db, f"req-{i}", account.id, price, HOLD)
            return True
        except InsufficientQuotaError:
            return False

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(attempt, range(50)))
    assert sum(results) == 10
    assert balance(db, "acme").available_micros == 0
    held = [f"req-{i}" for i, ok in enumerate(results) if ok]

    # Settle all ten concurrently, each twice: one charge per request, none lost.
    def finish(request_id: str):
        return settle(db, request_id, 100, 50, 100)  # 50 + 25 + 200 = 275

    with ThreadPoolExecutor(20) as pool:
        usages = list(pool.map(finish, held * 2))
    assert all(u.cost_micros == 275 for u in usages)
    assert balance(db, "acme").available_micros == 10 * HOLD - 10 * 275
    with db.read() as session:
        assert session.scalar(select(func.count(UsageRecord.id))) == 10
    _ledger_consistent(db, account.id)


def _hold_in_another_process(url: str, account_id: int, worker: int) -> int:
    db = open_database(url, migrate=False)
    with db.read() as session:
        from llmaas.billing.prices import price_in_force

        price = price_in_force(session, "smol")
    won = 0
    for i in range(10):
        try:
            place_hold(db, f"p{worker}-{i}", account_id, price, HOLD)
            won += 1
        except InsufficientQuotaError:
            pass
    db.close()
    return won


def test_holds_from_five_processes_never_overdraw(db, db_url):
    account, _ = _setup(db, 10 * HOLD)
    with multiprocessing.get_context("fork").Pool(5) as pool:
        won = pool.starmap(_hold_in_another_process, [(db_url, account.id, w) for w in range(5)])
    assert sum(won) == 10
    b = balance(db, "acme")
    assert (b.available_micros, b.held_micros) == (0, 10 * HOLD)
