"""Holds expire (issue 13): progress checkpoints, instance leases, the sweep, and `llmaas holds`.

A hold whose owner's lease lapsed, or whose deadline passed, is closed by any sweep: billed
`interrupted` at its last progress checkpoint, or released when it made none; exactly once, whatever
races it (a live settle, other sweepers). On a SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, func, select, text

from llmaas.billing import (
    FreeGrant,
    HoldStateError,
    balance,
    close_hold,
    create_account,
    end_lease,
    get_usage,
    hold_for_request,
    list_holds,
    open_database,
    open_holds,
    record_progress,
    renew_lease,
    set_price,
    settle,
    sweep_expired_holds,
)
from llmaas.billing.cli_holds import add_holds_parser
from llmaas.billing.db import MIGRATIONS_DIR
from llmaas.billing.holds import close_owner_holds
from llmaas.billing.schema import LedgerEntry, UsageRecord
from llmaas.errors import InvalidRequestError
from tests.test_billing_credits import _ledger_consistent

pytest_plugins = ["tests.billing_services"]

CREDIT = 100_000
# Prices of "smol": $1 / $0.5 / $2 per 1M tokens = 1 / 0.5 / 2 micro-USD per token.
PROGRESS = (10, 0, 50)
PROGRESS_COST = 10 * 1 + 50 * 2


def _account(db, name: str = "acme"):
    account = create_account(db, name, free_grant=FreeGrant(CREDIT, valid_for=None))
    try:
        set_price(
            db,
            "smol",
            input_usd="1",
            cached_input_usd="0.5",
            output_usd="2",
            effective_from=datetime(2025, 1, 1, tzinfo=timezone.utc),
        )
    except InvalidRequestError:
        pass  # priced by an earlier call in this test
    return account


def _charges(db, request_id: str) -> int:
    with db.read() as session:
        return session.scalar(
            select(func.count()).select_from(LedgerEntry).where(LedgerEntry.request_id == request_id)
        )


def test_a_dead_owners_hold_is_billed_at_its_checkpoint_once(db):
    account = _account(db)
    now = datetime.now(timezone.utc)
    renew_lease(db, "replica-a", lease_s=5, now=now)
    hold = hold_for_request(db, "r1", account.id, "smol", 10, 1000, owner="replica-a", now=now)
    assert record_progress(db, "r1", *PROGRESS, now=now + timedelta(seconds=1))
    assert sweep_expired_holds(db, now=now + timedelta(seconds=4)).closed == 0  # the lease still runs
    swept = sweep_expired_holds(db, now=now + timedelta(seconds=6))
    assert (swept.settled, swept.released, swept.cost_micros) == (1, 0, PROGRESS_COST)
    record = get_usage(db, "r1")
    assert (record.status, record.completion_tokens, record.cost_micros) == ("interrupted", 50, PROGRESS_COST)
    assert open_holds(db, "acme") == []
    assert balance(db, "acme").available_micros == CREDIT - PROGRESS_COST
    # The owner was alive after all and settles later: the checkpoint's record stands, no second charge.
    late = settle(db, "r1", 10, 0, 900, hold=hold)
    assert (late.status, late.cost_micros) == ("interrupted", PROGRESS_COST)
    assert sweep_expired_holds(db, now=now + timedelta(seconds=60)).closed == 0
    assert _charges(db, "r1") == 1 and balance(db, "acme").available_micros == CREDIT - PROGRESS_COST
    _ledger_consistent(db, account.id)


def test_a_dead_owners_hold_without_progress_is_released_and_a_late_settle_still_bills(db):
    account = _account(db)
    now = datetime.now(timezone.utc)
    renew_lease(db, "replica-a", lease_s=5, now=now)
    hold_for_request(db, "r1", account.id, "smol", 10, 1000, owner="replica-a", now=now)
    assert balance(db, "acme").held_micros > 0
    swept = sweep_expired_holds(db, now=now + timedelta(seconds=6))
    assert (swept.settled, swept.released) == (0, 1)
    assert get_usage(db, "r1") is None
    assert balance(db, "acme").available_micros == CREDIT  # available again
    assert settle(db, "r1", 10, 0, 5).cost_micros == 20  # served after all: billed, once
    assert _charges(db, "r1") == 1
    _ledger_consistent(db, account.id)


def test_live_and_unleased_owners_keep_their_holds_until_the_deadline(db):
    account = _account(db)
    now = datetime.now(timezone.utc)
    renew_lease(db, "alive", lease_s=30, now=now)
    hold_for_request(db, "leased", account.id, "smol", 10, 10, owner="alive", now=now, ttl_s=100)
    hold_for_request(db, "library", account.id, "smol", 10, 10, now=now, ttl_s=100)  # no owner, no lease
    hold_for_request(db, "no-lease", account.id, "smol", 10, 10, owner="old-server", now=now, ttl_s=100)
    renew_lease(db, "alive", lease_s=30, now=now + timedelta(seconds=25))  # a heartbeat
    assert sweep_expired_holds(db, now=now + timedelta(seconds=50)).closed == 0
    # A checkpoint renews the deadline: `leased` made progress, the others did not.
    record_progress(db, "leased", 10, 0, 3, ttl_s=100, now=now + timedelta(seconds=90))
    renew_lease(db, "alive", lease_s=3600, now=now + timedelta(seconds=90))
    swept = sweep_expired_holds(db, now=now + timedelta(seconds=101))
    assert (swept.settled, swept.released) == (0, 2)
    assert [h.request_id for h in open_holds(db, "acme")] == ["leased"]
    swept = sweep_expired_holds(db, now=now + timedelta(seconds=191))  # its own deadline passed
    assert (swept.settled, swept.released, swept.cost_micros) == (1, 0, 10 + 6)


def test_a_clean_exit_ends_the_lease_at_once(db):
    account = _account(db)
    renew_lease(db, "replica-a", lease_s=3600)
    hold_for_request(db, "r1", account.id, "smol", 10, 10, owner="replica-a")
    assert sweep_expired_holds(db).closed == 0
    end_lease(db, "replica-a")
    assert sweep_expired_holds(db).released == 1


def test_a_restart_under_the_same_id_closes_its_previous_holds(db):
    account = _account(db)
    renew_lease(db, "replica-a", lease_s=3600)  # the previous run's lease has not lapsed yet
    hold_for_request(db, "r1", account.id, "smol", 10, 100, owner="replica-a")
    hold_for_request(db, "r2", account.id, "smol", 10, 100, owner="replica-a")
    hold_for_request(db, "other", account.id, "smol", 10, 100, owner="replica-b")
    record_progress(db, "r1", *PROGRESS)
    closed = close_owner_holds(db, "replica-a")
    assert (closed.settled, closed.released, closed.cost_micros) == (1, 1, PROGRESS_COST)
    assert [h.request_id for h in open_holds(db, "acme")] == ["other"]


def test_progress_is_only_recorded_on_open_holds_and_bounded(db):
    account = _account(db)
    hold_for_request(db, "r1", account.id, "smol", 10, 100)
    assert record_progress(db, "r1", 10, 0, 1)
    settle(db, "r1", 10, 0, 2)
    assert not record_progress(db, "r1", 10, 0, 3)  # settled: nothing written
    assert not record_progress(db, "unknown", 1, 0, 1)
    for bad in ((-1, 0, 0), (1, 2, 0), (2**64, 0, 0), (1, 0, 1.5), (1, 0, True)):
        with pytest.raises(InvalidRequestError):
            record_progress(db, "r1", *bad)
    for bad_ttl in (0, -1, float("nan"), float("inf"), 10**9, True):
        with pytest.raises(InvalidRequestError):
            hold_for_request(db, "r2", account.id, "smol", 1, 1, ttl_s=bad_ttl)
    for bad_lease in (0, float("nan"), 10**9):
        with pytest.raises(InvalidRequestError):
            renew_lease(db, "x", lease_s=bad_lease)
    with pytest.raises(InvalidRequestError):
        renew_lease(db, "x" * 129)


def test_sweepers_and_settles_racing_bill_each_request_exactly_once(db):
    """Four sweepers (replicas) and the live owner's settles, all at once, over 12 expired holds."""
    account = _account(db)
    now = datetime.now(timezone.utc)
    renew_lease(db, "dead", lease_s=1, now=now - timedelta(seconds=10))
    holds = {}
    for i in range(12):
        holds[f"r{i}"] = hold_for_request(db, f"r{i}", account.id, "smol", 10, 100, owner="dead", now=now)
        if i % 2:
            record_progress(db, f"r{i}", *PROGRESS, now=now)
    start = threading.Barrier(5)
    errors: list[BaseException] = []

    def sweeper() -> None:
        try:
            start.wait()
            sweep_expired_holds(db)
        except BaseException as exc:
            errors.append(exc)

    def settler() -> None:
        try:
            start.wait()
            for request_id, hold in holds.items():
                settle(db, request_id, 10, 0, 80, hold=hold)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sweeper) for _ in range(4)] + [threading.Thread(target=settler)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert open_holds(db, "acme") == []
    with db.read() as session:
        counts = select(UsageRecord.request_id, func.count()).group_by(UsageRecord.request_id)
        per_request = dict(session.execute(counts).all())
        spent = session.scalar(select(func.sum(UsageRecord.cost_micros)))
    assert per_request == {request_id: 1 for request_id in holds}
    assert all(_charges(db, request_id) == 1 for request_id in holds)
    for request_id in holds:  # settled in full, or at the checkpoint (odd ones only)
        record = get_usage(db, request_id)
        assert record.cost_micros == (PROGRESS_COST if record.status == "interrupted" else 170)
        assert record.status == "completed" or int(request_id[1:]) % 2
    assert balance(db, "acme").available_micros == CREDIT - spent
    _ledger_consistent(db, account.id)


def test_an_operator_closes_a_hold_by_hold_or_request_id(db):
    account = _account(db)
    first = hold_for_request(db, "r1", account.id, "smol", 10, 100)
    hold_for_request(db, "r2", account.id, "smol", 10, 100)
    record_progress(db, "r2", *PROGRESS)
    assert close_hold(db, "r2").outcome == "settled"
    assert close_hold(db, "r2").outcome == "none"  # already closed: nothing more
    views = list_holds(db, "acme", include_closed=True)
    assert [(v.request_id, v.status, v.progress_tokens) for v in views] == [
        ("r2", "settled", PROGRESS),
        ("r1", "open", None),
    ]
    assert views[1].id == first.id and views[1].expires_at is not None and not views[1].expired


def test_the_0002_migration_gives_open_holds_a_deadline(tmp_path):
    """A database at 0001 with an open hold: upgrading gives it admission + 1 hour."""
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            text(
                "INSERT INTO accounts (id, name, plan, overdraft_micros, created_at) "
                "VALUES (1, 'acme', 'free', 0, '2025-01-01 00:00:00.000000');"
            )
        )
        connection.execute(
            text(
                "INSERT INTO prices (id, model, input_micros_per_m, cached_input_micros_per_m, "
                "output_micros_per_m, effective_from, created_at) VALUES (1, 'smol', 1, 1, 1, "
                "'2025-01-01 00:00:00.000000', '2025-01-01 00:00:00.000000')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO holds (request_id, account_id, model, price_id, amount_micros, status, "
                "created_at) VALUES ('old', 1, 'smol', 1, 5, 'open', '2025-01-01 00:00:00.000000')"
            )
        )
    engine.dispose()
    db = open_database(url)
    try:
        (view,) = list_holds(db)
        assert view.expires_at == datetime(2025, 1, 1, 1, tzinfo=timezone.utc) and view.expired
        assert sweep_expired_holds(db).released == 1
    finally:
        db.close()


# ------------------------------------------------------------------ `llmaas holds`


@pytest.fixture
def cli(db_url, capsys):
    def run(*argv: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser(prog="llmaas")
        add_holds_parser(parser.add_subparsers(dest="verb", required=True))
        capsys.readouterr()
        try:
            args = parser.parse_args([*argv, "--database-url", db_url])
            status = args.func(args)
        except SystemExit as exc:  # argparse's own errors
            status = exc.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_holds_cli_lists_and_releases(db, cli):
    account = _account(db)
    other = _account(db, "other")
    renew_lease(db, "gone", lease_s=1, now=datetime.now(timezone.utc) - timedelta(seconds=5))
    h1 = hold_for_request(db, "req-1", account.id, "smol", 10, 100)
    hold_for_request(db, "req-2", account.id, "smol", 10, 100, owner="gone")
    hold_for_request(db, "req-3", other.id, "smol", 10, 100)
    record_progress(db, "req-2", *PROGRESS)

    status, out, err = cli("holds", "list", "--account", "acme")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 3 and "req-2" in lines[1] and "open (expired)" in lines[1] and "10/0/50" in lines[1]
    status, out, _ = cli("holds", "list", "--json")
    assert status == 0 and {h["request_id"] for h in json.loads(out)} == {"req-1", "req-2", "req-3"}

    status, out, _ = cli("holds", "release", str(h1.id))  # by hold id
    assert status == 0 and out.strip() == "hold of req-1 released"
    status, out, _ = cli("holds", "release", "--expired")
    assert status == 0 and "1 billed at their last checkpoint ($0.000110), 0 released" in out
    assert get_usage(db, "req-2").status == "interrupted"
    status, out, _ = cli("holds", "release", "req-3", "--json")  # by request id
    assert status == 0 and json.loads(out) == {"request_id": "req-3", "outcome": "released"}
    status, out, _ = cli("holds", "list", "--all", "--json")
    assert sorted(h["status"] for h in json.loads(out)) == ["released", "released", "settled"]
    assert balance(db, "acme").available_micros == CREDIT - PROGRESS_COST

    for argv, param in (
        (("holds", "release", "req-1"), "hold_or_request_id"),  # already released
        (("holds", "release", "nope"), "hold_or_request_id"),
        (("holds", "release"), "hold_or_request_id"),
        (("holds", "release", "req-1", "--expired"), "hold_or_request_id"),
        (("holds", "release", "x" * 129), "hold_or_request_id"),
        (("holds", "release", "9" * 40), "hold_or_request_id"),
        (("holds", "list", "--limit", "0"), "limit"),
        (("holds", "list", "--limit", str(2**64)), "limit"),
        (("holds", "list", "--account", "nobody"), "account"),
        (("holds", "list", "--account", "a" * 10_000), "account"),
    ):
        status, out, err = cli(*argv)
        assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, argv
        assert f"(parameter: {param})" in err, (argv, err)
    status, _, err = cli("holds", "list", "--limit", "abc")
    assert status == 2 and "Traceback" not in err
    with pytest.raises(HoldStateError):
        from llmaas.billing.holds import close_hold_by_operator

        close_hold_by_operator(db, "req-3")


# ------------------------------------------------------------------ the server's checkpointer


class _Run:
    def __init__(self):
        self.prompt_tokens, self.cached_tokens, self.completion_tokens = 10, 2, 0


def test_checkpoints_every_interval_with_at_most_one_write_in_flight():
    import asyncio

    from llmaas.server.progress import ProgressCheckpoint, ProgressPolicy

    async def scenario() -> list[tuple]:
        clock = [0.0]
        writes: list[tuple] = []
        release = threading.Event()

        def write(request_id: str, prompt: int, cached: int, completion: int) -> bool:
            release.wait(5)  # a slow database
            writes.append((request_id, prompt, cached, completion))
            return True

        checkpoint = ProgressCheckpoint(
            write, "r1", ProgressPolicy(every_s=5, every_tokens=100), lambda: clock[0]
        )
        run = _Run()
        for tokens in range(1, 100):  # under both intervals: nothing
            run.completion_tokens = tokens
            checkpoint(run)
        clock[0] = 5.0
        checkpoint(run)  # 5 s passed: one write of 99 tokens
        for tokens in range(100, 400):  # while it is in flight, nothing else starts
            run.completion_tokens = tokens
            checkpoint(run)
        release.set()
        while checkpoint.writes < 1:
            await asyncio.sleep(0.01)
        run.completion_tokens = 450
        checkpoint(run)  # 351 tokens since the last: due by count
        while checkpoint.writes < 2:
            await asyncio.sleep(0.01)
        checkpoint.close()
        run.completion_tokens = 900
        clock[0] = 100.0
        checkpoint(run)  # closed: nothing
        await asyncio.sleep(0.05)
        return writes

    assert asyncio.run(scenario()) == [("r1", 10, 2, 99), ("r1", 10, 2, 450)]


def test_a_failing_checkpoint_never_breaks_the_stream(caplog):
    import asyncio

    from llmaas.server.progress import ProgressCheckpoint, ProgressPolicy

    async def scenario() -> int:
        def write(*_args):
            raise OSError("database unreachable")

        checkpoint = ProgressCheckpoint(write, "r1", ProgressPolicy(every_s=0.05, every_tokens=1))
        run = _Run()
        for tokens in range(1, 4):
            run.completion_tokens = tokens
            checkpoint(run)
            await asyncio.sleep(0.05)
        return checkpoint.writes

    assert asyncio.run(scenario()) == 0
    assert "database unreachable" in caplog.text
    for bad in (dict(every_s=0), dict(every_s=float("nan")), dict(every_tokens=0), dict(every_tokens=1.5)):
        with pytest.raises(InvalidRequestError):
            ProgressPolicy(**bad)


def test_the_server_bills_a_failed_request_for_its_tokens(db):
    """Issue 13 item 1: an engine error mid-stream used to settle `failed` at $0."""
    from llmaas.server.billing import ServerBilling
    from llmaas.server.usage import RequestUsage

    _account(db, "default")
    billing = ServerBilling(db, auth=False, owner="replica-a", hold_ttl_s=60)
    admission = billing.admit(billing.begin(None, "smol", "req-failed"), "smol", 10, 100)
    assert admission.hold.expires_at == admission.hold.created_at + timedelta(seconds=60)
    assert billing.record_progress("req-failed", 10, 0, 3)
    usage = RequestUsage("req-failed", "smol", "chat.completions", 10, 0, 51, "failed", (None,))
    settled = billing.finish(admission, usage)
    assert (settled.status, settled.completion_tokens, settled.cost_micros) == ("failed", 51, 10 + 102)
    assert balance(db, "default").available_micros == CREDIT - 112
