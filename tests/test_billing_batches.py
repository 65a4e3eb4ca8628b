"""The batch records on their own (SQLite and PostgreSQL): claims, a dead run's lines taken back, the
window running out, and a line never billed twice whatever happens to its runs."""

from __future__ import annotations

from datetime import timedelta

from llmaas.billing import FreeGrant, create_account, hold_for_request, set_price, settle
from llmaas.billing.batches import (
    NewLine,
    begin_finalizing,
    cancel_batch,
    claim_lines,
    create_batch,
    drop_unsettled_hold,
    expire_batches,
    finish_batch,
    finishable_batches,
    get_batch,
    reclaim_lines,
    record_generated,
    request_counts,
    unsettled_lines,
)
from llmaas.billing.schema import utcnow

pytest_plugins = ["tests.billing_services"]  # db: SQLite and PostgreSQL


def new_batch(db, lines: int = 4):
    account = create_account(db, "batcher", plan="plus", free_grant=FreeGrant(10_000_000, None)).id
    news = [NewLine(i, f"c{i}", {"model": "m"}) for i in range(lines)]
    return account, create_batch(db, account, None, "/v1/completions", "file-x", "24h", None, news)


def test_lines_are_claimed_once_and_a_dead_runs_lines_come_back(db):
    _, batch = new_batch(db)
    first = claim_lines(db, "replica-a", 3)
    assert [w.line for w in first] == [0, 1, 2]
    assert [w.line for w in claim_lines(db, "replica-b", 10)] == [3]
    assert claim_lines(db, "replica-b", 10) == []
    # replica-a is gone (no lease): replica-b takes its lines back; it never takes back its own.
    assert reclaim_lines(db, "replica-b", restarting=False) == 3
    assert reclaim_lines(db, "replica-b", restarting=False) == 0
    assert [w.line for w in claim_lines(db, "replica-b", 10)] == [0, 1, 2]
    assert reclaim_lines(db, "replica-b", restarting=True) == 4  # its own previous run's, at restart


def test_a_line_is_billed_at_most_once_across_runs(db):
    set_price(db, "m", input_usd="1", cached_input_usd="0.1", output_usd="2")
    account, batch = new_batch(db, 1)
    (line,) = claim_lines(db, "a", 1)
    hold_for_request(db, line.request_id, account, "m", 10, 10, service_tier="batch")
    assert drop_unsettled_hold(db, line.request_id)  # the dead run's hold goes; the line runs again
    hold_for_request(db, line.request_id, account, "m", 10, 10, service_tier="batch")
    response = {
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}
    }
    assert record_generated(db, line.id, response)
    ((found, recorded),) = unsettled_lines(db, "a", restarting=True)
    assert found.request_id == line.request_id and recorded == response
    first = settle(db, line.request_id, 10, 0, 5)
    assert settle(db, line.request_id, 10, 0, 5) == first and first.service_tier == "batch"
    assert not drop_unsettled_hold(db, line.request_id)  # billed: it must never run again


def test_cancel_and_the_window(db):
    account, batch = new_batch(db, 3)
    claim_lines(db, "a", 1)
    assert cancel_batch(db, account, batch.id).status == "cancelling"
    assert request_counts(db, batch.id) == {"total": 3, "completed": 0, "failed": 0}
    assert finishable_batches(db) == []  # its running line is not in yet

    _, late = new_batch_for(db, account)
    assert expire_batches(db, utcnow() + timedelta(hours=25)) == 1
    assert get_batch(db, account, late.id).status == "expiring"
    assert late.id in finishable_batches(db)
    assert begin_finalizing(db, late.id).status == "finalizing"
    assert begin_finalizing(db, late.id) is None  # one instance finalizes
    finish_batch(db, late.id, None, "file-errors")
    done = get_batch(db, account, late.id)
    assert done.status == "expired" and done.error_file_id == "file-errors"


def new_batch_for(db, account: int):
    news = [NewLine(0, "x", {"model": "m"})]
    return account, create_batch(db, account, None, "/v1/completions", "file-y", "24h", None, news)
