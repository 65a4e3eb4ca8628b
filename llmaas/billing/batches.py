"""Batches (/v1/batches) in the database: their lines, who runs each, and each line's outcome.

A line is billed under the ledger request id `line_request_id(batch, line)`, the same whoever runs it
and however often the server restarts, so the ledger's unique request_id bills it at most once. Its
life, each step one transaction:

    pending -> running (claimed by a server instance: `claim_lines`)
            -> generated (its response recorded, not yet settled: `record_generated`)
            -> succeeded (settled: `record_succeeded`)
    or failed (its error recorded), or cancelled / expired (never ran).

The response is recorded before the line is settled, so a crash between the two leaves a line whose
tokens are known: it is settled at the next start (`unsettled_lines`; settling is idempotent). A line
that was running when its server died has no response: it is claimed again (`reclaim_lines`), its
unsettled hold dropped (`drop_unsettled_hold`, it held money for a run that is gone), and run again
under the same request id. Lines run without progress checkpoints, so a dead run is never billed in
part: the line is billed once, for the run whose response the client gets.

Claims: on PostgreSQL, `SELECT ... FOR UPDATE SKIP LOCKED` lets several replicas claim lines of the same
batches at once without waiting on each other; on SQLite the write transaction is exclusive anyway.
Every function blocks: callers run them in a worker thread.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select, update

from llmaas.billing.db import Database
from llmaas.billing.errors import NotFoundError
from llmaas.billing.schema import Batch, BatchLine, Hold, Instance, UsageRecord, utcnow
from llmaas.errors import InvalidRequestError

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
MAX_LINES = 50_000  # per batch, as OpenAI's
MAX_CUSTOM_ID = 256
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's metadata bounds
# Line statuses that will not change any more, and those still to be run or settled.
FINAL_LINE = ("succeeded", "failed", "cancelled", "expired")
OPEN_LINE = ("pending", "running", "generated")
FINALIZING_STALE = timedelta(minutes=2)  # a batch finalizing this long lost its instance: finalize again


def line_request_id(batch_id: str, line: int) -> str:
    """The ledger request id of a batch line: the same for every attempt at it."""
    return f"{batch_id}-{line}"


@dataclass(frozen=True)
class NewLine:
    """A line of the input file: to run (`body`), or refused at once (`error`: code and message)."""

    line: int
    custom_id: str | None
    body: dict[str, Any] | None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class LineWork:
    """A claimed line, with what is needed to run it."""

    id: int
    batch_id: str
    line: int
    custom_id: str | None
    body: dict[str, Any]
    endpoint: str
    account_id: int
    key_id: str | None

    @property
    def request_id(self) -> str:
        return line_request_id(self.batch_id, self.line)


@dataclass(frozen=True)
class LineOutcome:
    line: int
    custom_id: str | None
    status: str
    response: dict[str, Any] | None
    error: dict[str, Any] | None


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA_KEYS
        or not all(isinstance(k, str) and 0 < len(k) <= MAX_METADATA_KEY for k in metadata)
        or not all(isinstance(v, str) and len(v) <= MAX_METADATA_VALUE for v in metadata.values())
    ):
        raise InvalidRequestError(
            f"'metadata' takes at most {MAX_METADATA_KEYS} string keys (up to {MAX_METADATA_KEY} characters) "
            f"with string values (up to {MAX_METADATA_VALUE})",
            param="metadata",
        )
    return metadata


def create_batch(
    db: Database,
    account_id: int,
    key_id: str | None,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    lines: list[NewLine],
) -> Batch:
    """The batch and its lines in one transaction: `in_progress`, or `failed` (with its `errors`) when
    the file holds no line or more than MAX_LINES."""
    if completion_window not in COMPLETION_WINDOWS:
        raise InvalidRequestError(
            f"'completion_window' must be one of {', '.join(COMPLETION_WINDOWS)}", param="completion_window"
        )
    now = utcnow()
    batch = Batch(
        id="batch_" + secrets.token_hex(12),
        account_id=account_id,
        key_id=key_id,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        status="in_progress",
        batch_metadata=check_metadata(metadata),
        created_at=now,
        expires_at=now + COMPLETION_WINDOWS[completion_window],
        in_progress_at=now,
    )
    if not 0 < len(lines) <= MAX_LINES:
        why = f"The input file has {len(lines)} lines; a batch takes 1 to {MAX_LINES}."
        batch.status, batch.failed_at, batch.in_progress_at = "failed", now, None
        batch.errors = [{"code": "invalid_line_count", "message": why, "param": "input_file_id"}]
        lines = []
    with db.write() as session:
        session.add(batch)
        session.flush()
        session.add_all(
            BatchLine(
                batch_id=batch.id,
                line=n.line,
                custom_id=n.custom_id,
                body=n.body or {},
                status="failed" if n.error else "pending",
                error=n.error,
            )
            for n in lines
        )
    return batch


def get_batch(db: Database, account_id: int, batch_id: str) -> Batch:
    """The account's batch (another account's id answers as an unknown one: 404)."""
    with db.read() as session:
        batch = session.get(Batch, batch_id) if len(batch_id) <= 64 else None
        if batch is None or batch.account_id != account_id:
            raise NotFoundError(f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch


def list_batches(db: Database, account_id: int, limit: int = 20, after: str | None = None) -> list[Batch]:
    """The account's batches, newest first; `after`: the page after that batch id."""
    query = select(Batch).where(Batch.account_id == account_id)
    with db.read() as session:
        if after is not None:
            cursor = session.get(Batch, after) if len(after) <= 64 else None
            if cursor is None or cursor.account_id != account_id:
                raise NotFoundError(f"No batch found with id '{after}'.", param="after")
            query = query.where(
                or_(
                    Batch.created_at < cursor.created_at,
                    and_(Batch.created_at == cursor.created_at, Batch.id > cursor.id),
                )
            )
        query = query.order_by(Batch.created_at.desc(), Batch.id).limit(limit)
        return list(session.scalars(query))


def request_counts(db: Database, batch_id: str) -> dict[str, int]:
    """OpenAI's request_counts: total, completed (succeeded) and failed lines."""
    with db.read() as session:
        rows = session.execute(
            select(BatchLine.status, func.count())
            .where(BatchLine.batch_id == batch_id)
            .group_by(BatchLine.status)
        ).all()
    by_status = {status: int(count) for status, count in rows}
    return {
        "total": sum(by_status.values()),
        "completed": by_status.get("succeeded", 0),
        "failed": by_status.get("failed", 0),
    }


def cancel_batch(db: Database, account_id: int, batch_id: str) -> Batch:
    """`cancelling`: lines not yet claimed never run (cancelled); those running finish and are billed.
    The batch becomes `cancelled` once they have (`finishable_batches`). Cancelling twice is a no-op."""
    now = utcnow()
    with db.write() as session:
        batch = session.get(Batch, batch_id, with_for_update=True) if len(batch_id) <= 64 else None
        if batch is None or batch.account_id != account_id:
            raise NotFoundError(f"No batch found with id '{batch_id}'.", param="batch_id")
        if batch.status in ("validating", "in_progress"):
            batch.status, batch.cancelling_at = "cancelling", now
            session.execute(
                update(BatchLine)
                .where(BatchLine.batch_id == batch_id, BatchLine.status == "pending")
                .values(
                    status="cancelled",
                    error={"code": "batch_cancelled", "message": "The batch was cancelled."},
                )
            )
        elif batch.status not in ("cancelling", "cancelled"):
            raise InvalidRequestError(f"A batch that is {batch.status} cannot be cancelled", param="batch_id")
        return batch


def expire_batches(db: Database, now: datetime | None = None) -> int:
    """Batches past their window: lines not yet claimed expire (never run, never billed); the batch
    finishes as `expired` once its running lines are in. Returns how many batches expired now."""
    now = now or utcnow()
    with db.write() as session:
        due = list(
            session.scalars(
                select(Batch).where(Batch.status == "in_progress", Batch.expires_at <= now).with_for_update()
            )
        )
        for batch in due:
            batch.status, batch.expired_at = "expiring", now
            session.execute(
                update(BatchLine)
                .where(BatchLine.batch_id == batch.id, BatchLine.status == "pending")
                .values(
                    status="expired",
                    error={
                        "code": "batch_expired",
                        "message": "This line was not run within the batch's window.",
                    },
                )
            )
        return len(due)


def claim_lines(db: Database, owner: str, limit: int) -> list[LineWork]:
    """Up to `limit` pending lines of running batches (oldest batch first), now `running` for `owner`."""
    if limit <= 0:
        return []
    with db.write() as session:
        rows = session.execute(
            select(BatchLine, Batch.endpoint, Batch.account_id, Batch.key_id)
            .join(Batch, Batch.id == BatchLine.batch_id)
            .where(BatchLine.status == "pending", Batch.status == "in_progress")
            .order_by(Batch.created_at, BatchLine.batch_id, BatchLine.line)
            .limit(limit)
            .with_for_update(skip_locked=True, of=BatchLine)
        ).all()
        work = []
        for line, endpoint, account_id, key_id in rows:
            line.status, line.claimed_by = "running", owner
            work.append(
                LineWork(
                    line.id, line.batch_id, line.line, line.custom_id, line.body, endpoint, account_id, key_id
                )
            )
        return work


def _set_line(db: Database, line_id: int, expected: tuple[str, ...], **values: Any) -> bool:
    with db.write() as session:
        done = session.execute(
            update(BatchLine).where(BatchLine.id == line_id, BatchLine.status.in_(expected)).values(**values)
        )
        return done.rowcount == 1


def record_generated(db: Database, line_id: int, response: dict[str, Any]) -> bool:
    """The line's response, before it is settled (see the module docstring)."""
    return _set_line(db, line_id, ("running",), status="generated", response=response)


def record_succeeded(db: Database, line_id: int, response: dict[str, Any]) -> bool:
    """Settled: the response with its cost."""
    return _set_line(db, line_id, ("running", "generated"), status="succeeded", response=response)


def record_failed(db: Database, line_id: int, error: dict[str, Any]) -> bool:
    """`error`: {"status_code", "body"} for a request the endpoint refused, or {"code", "message"}."""
    return _set_line(db, line_id, ("running",), status="failed", error=error)


def _dead(owner: str, now: datetime, restarting: bool):
    """Lines claimed by another instance whose lease has lapsed (or that has none), and when
    `restarting`, by `owner` itself (its previous run)."""
    alive = exists().where(Instance.id == BatchLine.claimed_by, Instance.lease_until > now)
    others = and_(BatchLine.claimed_by != owner, ~alive)
    return or_(BatchLine.claimed_by == owner, others) if restarting else others


def reclaim_lines(db: Database, owner: str, *, restarting: bool, now: datetime | None = None) -> int:
    """Lines left `running` by a dead run are pending again: at start (`restarting`) this instance's
    own from before, and at any time those of replicas whose lease lapsed."""
    now = now or utcnow()
    with db.write() as session:
        done = session.execute(
            update(BatchLine)
            .where(BatchLine.status == "running", _dead(owner, now, restarting))
            .values(status="pending", claimed_by=None)
            .execution_options(synchronize_session=False)
        )
        return done.rowcount


def unsettled_lines(
    db: Database, owner: str, *, restarting: bool, now: datetime | None = None
) -> list[tuple[LineWork, dict]]:
    """Lines whose response was recorded by a dead run but not settled: (line, response)."""
    now = now or utcnow()
    with db.read() as session:
        rows = session.execute(
            select(BatchLine, Batch.endpoint, Batch.account_id, Batch.key_id)
            .join(Batch, Batch.id == BatchLine.batch_id)
            .where(BatchLine.status == "generated", _dead(owner, now, restarting))
        ).all()
        return [
            (
                LineWork(
                    line.id, line.batch_id, line.line, line.custom_id, line.body, endpoint, account_id, key_id
                ),
                line.response,
            )
            for line, endpoint, account_id, key_id in rows
        ]


def drop_unsettled_hold(db: Database, request_id: str) -> bool:
    """Before a line runs again: its earlier run's hold, if it was never settled, is deleted (the run
    it reserved money for is gone). Returns False when the line was settled already (it must not run
    again)."""
    with db.write() as session:
        if session.scalar(select(UsageRecord.id).where(UsageRecord.request_id == request_id)) is not None:
            return False
        session.execute(delete(Hold).where(Hold.request_id == request_id))
        return True


def finishable_batches(db: Database) -> list[str]:
    """Running, cancelling or expiring batches with no line left to run or settle."""
    still_open = exists().where(BatchLine.batch_id == Batch.id, BatchLine.status.in_(OPEN_LINE))
    with db.read() as session:
        return list(
            session.scalars(
                select(Batch.id).where(
                    Batch.status.in_(("in_progress", "cancelling", "expiring")), ~still_open
                )
            )
        )


def begin_finalizing(db: Database, batch_id: str, stale_after: timedelta = FINALIZING_STALE) -> Batch | None:
    """Take the batch into `finalizing` (one instance wins); None when another did, or it has open lines.
    A batch left `finalizing` for `stale_after` (its instance died writing the files) is taken again."""
    still_open = exists().where(BatchLine.batch_id == batch_id, BatchLine.status.in_(OPEN_LINE))
    now = utcnow()
    with db.write() as session:
        batch = session.get(Batch, batch_id, with_for_update=True)
        if batch is None:
            return None
        stale = batch.status == "finalizing" and batch.finalizing_at < now - stale_after
        if batch.status not in ("in_progress", "cancelling", "expiring") and not stale:
            return None
        if session.scalar(select(still_open)):
            return None
        batch.finalizing_at, batch.status = now, "finalizing"
        return batch


def line_outcomes(db: Database, batch_id: str) -> list[LineOutcome]:
    with db.read() as session:
        rows = session.scalars(
            select(BatchLine).where(BatchLine.batch_id == batch_id).order_by(BatchLine.line)
        )
        return [LineOutcome(r.line, r.custom_id, r.status, r.response, r.error) for r in rows]


def finish_batch(db: Database, batch_id: str, output_file_id: str | None, error_file_id: str | None) -> None:
    """Out of `finalizing`: completed, cancelled or expired, with its files."""
    with db.write() as session:
        batch = session.get(Batch, batch_id, with_for_update=True)
        batch.output_file_id, batch.error_file_id = output_file_id, error_file_id
        if batch.expired_at is not None:  # set when its window ran out
            batch.status = "expired"
        elif batch.cancelling_at is not None:
            batch.status, batch.cancelled_at = "cancelled", utcnow()
        else:
            batch.status, batch.completed_at = "completed", utcnow()


def stale_finalizing(db: Database, stale_after: timedelta = FINALIZING_STALE) -> list[str]:
    """Batches whose finalizing instance died before writing their files: to finalize again."""
    with db.read() as session:
        return list(
            session.scalars(
                select(Batch.id).where(
                    Batch.status == "finalizing", Batch.finalizing_at < utcnow() - stale_after
                )
            )
        )
