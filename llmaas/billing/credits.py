"""Credits, holds and settlement: no account ever spends more than it has, no request is billed twice.

    available = unexpired credit remaining - open holds - overdraft

Credits are grants (optionally expiring) and top-ups. A charge draws from the credits that expire
soonest first (non-expiring top-ups last), so only a grant's unused rest is lost when it expires.

A request's life: `place_hold` at admission reserves its worst-case cost, refusing with
InsufficientQuotaError when `available` cannot cover it; `settle` at the end charges the exact cost
at the price version the hold captured, closes the hold (its unused rest is free again), and writes
the request's one usage record and one ledger charge. Both are unique by request id: settling twice
returns the first record and charges nothing more. `release` closes a hold without a charge (the
request never reached the engine); `release_stale_holds` releases holds of requests that died with
their server.

Concurrency: every check-then-write runs in one transaction that first locks the account row:
BEGIN IMMEDIATE on SQLite (db.py), SELECT ... FOR UPDATE on PostgreSQL. Holds for one account are
therefore serialized, whichever process or replica places them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from llmaas.billing.accounts import find_account
from llmaas.billing.db import Database
from llmaas.billing.errors import HoldStateError, InsufficientQuotaError, NotFoundError
from llmaas.billing.money import format_usd
from llmaas.billing.prices import (
    PriceVersion,
    cost_micros,
    get_price_version,
    price_in_force,
    worst_case_cost_micros,
)
from llmaas.billing.schema import Account, Hold, LedgerEntry, UsageRecord, utcnow
from llmaas.errors import InvalidRequestError

CREDIT_KINDS = ("grant", "top_up")
USAGE_STATUSES = ("completed", "cancelled", "failed")


@dataclass(frozen=True)
class Balance:
    credit_micros: int  # unexpired credit not yet spent
    held_micros: int  # reserved by open holds
    overdraft_micros: int  # charged beyond the credits; paid by the next credit
    available_micros: int  # what a new hold may reserve


@dataclass(frozen=True)
class HoldInfo:
    id: int
    request_id: str
    account_id: int
    key_id: str | None
    model: str
    price_id: int
    amount_micros: int
    status: str


@dataclass(frozen=True)
class UsageInfo:
    request_id: str
    account_id: int
    key_id: str | None
    model: str
    price_id: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int
    status: str
    finished_at: datetime


def _hold_info(h: Hold) -> HoldInfo:
    return HoldInfo(
        h.id, h.request_id, h.account_id, h.key_id, h.model, h.price_id, h.amount_micros, h.status
    )


def _usage_info(u: UsageRecord) -> UsageInfo:
    return UsageInfo(
        u.request_id,
        u.account_id,
        u.key_id,
        u.model,
        u.price_id,
        u.prompt_tokens,
        u.cached_tokens,
        u.completion_tokens,
        u.cost_micros,
        u.status,
        u.finished_at,
    )


def _unexpired_credit(account_id: int, now: datetime):
    return (
        LedgerEntry.account_id == account_id,
        LedgerEntry.kind.in_(CREDIT_KINDS),
        LedgerEntry.remaining_micros > 0,
        or_(LedgerEntry.expires_at.is_(None), LedgerEntry.expires_at > now),
    )


def _balance(session: Session, account: Account, now: datetime) -> Balance:
    credit = session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.remaining_micros), 0)).where(
            *_unexpired_credit(account.id, now)
        )
    )
    held = session.scalar(
        select(func.coalesce(func.sum(Hold.amount_micros), 0)).where(
            Hold.account_id == account.id, Hold.status == "open"
        )
    )
    credit, held = int(credit), int(held)
    overdraft = account.overdraft_micros
    return Balance(credit, held, overdraft, credit - held - overdraft)


def balance(db: Database, account: int | str, now: datetime | None = None) -> Balance:
    with db.read() as session:
        return _balance(session, find_account(session, account), now or utcnow())


def _add_credit(
    db: Database,
    account: int | str,
    kind: str,
    amount_micros: int,
    expires_at: datetime | None,
    note: str | None,
) -> int:
    if not isinstance(amount_micros, int) or isinstance(amount_micros, bool) or amount_micros <= 0:
        raise InvalidRequestError("'amount' must be a positive number of micro-USD", param="amount")
    with db.write() as session:
        row = find_account(session, account, lock=True)
        paid = min(amount_micros, row.overdraft_micros)  # an overdraft is paid first
        row.overdraft_micros -= paid
        entry = LedgerEntry(
            account_id=row.id,
            kind=kind,
            amount_micros=amount_micros,
            remaining_micros=amount_micros - paid,
            expires_at=expires_at,
            note=note,
            created_at=utcnow(),
        )
        session.add(entry)
        session.flush()
        return entry.id


def grant(
    db: Database,
    account: int | str,
    amount_micros: int,
    expires_at: datetime | None = None,
    note: str | None = None,
) -> int:
    """Free credit (a trial grant, a goodwill credit), optionally expiring. Returns the ledger entry id."""
    return _add_credit(db, account, "grant", amount_micros, expires_at, note)


def top_up(db: Database, account: int | str, amount_micros: int, note: str | None = None) -> int:
    """Paid credit, never expiring. Returns the ledger entry id."""
    return _add_credit(db, account, "top_up", amount_micros, None, note)


def place_hold(
    db: Database,
    request_id: str,
    account_id: int,
    price: PriceVersion,
    amount_micros: int,
    *,
    key_id: str | None = None,
    owner: str | None = None,
    now: datetime | None = None,
) -> HoldInfo:
    """Reserve `amount_micros` for request `request_id`, or raise InsufficientQuotaError (429)."""
    if not isinstance(amount_micros, int) or isinstance(amount_micros, bool) or amount_micros < 0:
        raise InvalidRequestError("hold amount must be a non-negative integer of micro-USD", param="amount")
    now = now or utcnow()
    with db.write() as session:
        account = find_account(session, account_id, lock=True)
        available = _balance(session, account, now).available_micros
        if amount_micros > available:
            raise InsufficientQuotaError(
                "You exceeded your current quota: this request may cost up to "
                f"${format_usd(amount_micros)} and the account has "
                f"${format_usd(max(available, 0))} available."
            )
        if session.scalar(select(Hold.id).where(Hold.request_id == request_id)) is not None:
            raise HoldStateError(f"Request {request_id!r} already has a hold", param="request_id")
        hold = Hold(
            request_id=request_id,
            account_id=account.id,
            key_id=key_id,
            model=price.model,
            price_id=price.id,
            amount_micros=amount_micros,
            status="open",
            owner=owner,
            created_at=now,
        )
        session.add(hold)
        session.flush()
        return _hold_info(hold)


def hold_for_request(
    db: Database,
    request_id: str,
    account_id: int,
    model: str,
    prompt_tokens: int,
    max_completion_tokens: int,
    *,
    key_id: str | None = None,
    owner: str | None = None,
    now: datetime | None = None,
) -> HoldInfo:
    """Admission in one call: the price in force now, the worst-case cost, the hold."""
    now = now or utcnow()
    with db.read() as session:
        price = price_in_force(session, model, now)
    amount = worst_case_cost_micros(price, prompt_tokens, max_completion_tokens)
    return place_hold(db, request_id, account_id, price, amount, key_id=key_id, owner=owner, now=now)


def _draw(session: Session, account: Account, amount: int, now: datetime) -> None:
    """Take `amount` from the credits expiring soonest; what none can cover becomes overdraft."""
    lots = session.scalars(
        select(LedgerEntry)
        .where(*_unexpired_credit(account.id, now))
        .order_by(LedgerEntry.expires_at.is_(None), LedgerEntry.expires_at, LedgerEntry.id)
    )
    for lot in lots:
        if amount == 0:
            return
        take = min(amount, lot.remaining_micros)
        lot.remaining_micros -= take
        amount -= take
    account.overdraft_micros += amount


def settle(
    db: Database,
    request_id: str,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    *,
    status: str = "completed",
    endpoint: str | None = None,
    now: datetime | None = None,
) -> UsageInfo:
    """Charge the exact cost of a held request and write its usage record, exactly once.

    `status`: completed, cancelled (the client went away: billed for what it was sent) or failed
    (our fault: recorded at cost 0). Settling a request that already has a usage record returns that
    record unchanged. A hold that was released as stale is still settled: the tokens were served.
    """
    if status not in USAGE_STATUSES:
        raise InvalidRequestError(f"'status' must be one of {', '.join(USAGE_STATUSES)}", param="status")
    now = now or utcnow()
    with db.write() as session:
        hold = session.scalars(select(Hold).where(Hold.request_id == request_id)).one_or_none()
        if hold is None:
            raise NotFoundError(f"No hold for request {request_id!r}", param="request_id")
        account = find_account(session, hold.account_id, lock=True)
        session.refresh(hold)  # re-read after the lock: a concurrent settle may have closed it
        done = session.scalars(select(UsageRecord).where(UsageRecord.request_id == request_id)).one_or_none()
        if done is not None:
            return _usage_info(done)
        price = get_price_version(session, hold.price_id)
        cost = cost_micros(price, prompt_tokens, cached_tokens, completion_tokens)
        if status == "failed":
            cost = 0
        hold.status = "settled"
        hold.closed_at = now
        if cost:
            _draw(session, account, cost, now)
        session.add(
            LedgerEntry(
                account_id=account.id,
                kind="charge",
                amount_micros=-cost,
                request_id=request_id,
                note=f"{hold.model} {status}",
                created_at=now,
            )
        )
        record = UsageRecord(
            request_id=request_id,
            account_id=account.id,
            key_id=hold.key_id,
            model=hold.model,
            endpoint=endpoint,
            price_id=hold.price_id,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            cost_micros=cost,
            status=status,
            admitted_at=hold.created_at,
            finished_at=now,
            epoch_minute=int(now.timestamp()) // 60,
        )
        session.add(record)
        session.flush()
        return _usage_info(record)


def release(db: Database, request_id: str, now: datetime | None = None) -> HoldInfo:
    """Close an open hold without a charge (the request never ran). Releasing twice is a no-op."""
    with db.write() as session:
        hold = session.scalars(select(Hold).where(Hold.request_id == request_id)).one_or_none()
        if hold is None:
            raise NotFoundError(f"No hold for request {request_id!r}", param="request_id")
        find_account(session, hold.account_id, lock=True)
        session.refresh(hold)
        if hold.status == "settled":
            raise HoldStateError(f"Request {request_id!r} is already settled", param="request_id")
        if hold.status == "open":
            hold.status = "released"
            hold.closed_at = now or utcnow()
        return _hold_info(hold)


def release_stale_holds(
    db: Database, *, owner: str | None = None, created_before: datetime | None = None
) -> int:
    """Release the open holds of requests that died: those of `owner` (a restarted server instance)
    and/or those older than `created_before`. Returns how many were released."""
    if owner is None and created_before is None:
        raise InvalidRequestError("give an owner or a created_before time", param="owner")
    conditions = [Hold.status == "open"]
    if owner is not None:
        conditions.append(Hold.owner == owner)
    if created_before is not None:
        conditions.append(Hold.created_at < created_before)
    with db.write() as session:
        result = session.execute(
            update(Hold).where(*conditions).values(status="released", closed_at=utcnow())
        )
        return result.rowcount or 0


def open_holds(db: Database, account: int | str) -> list[HoldInfo]:
    with db.read() as session:
        row = find_account(session, account)
        holds = session.scalars(select(Hold).where(Hold.account_id == row.id, Hold.status == "open"))
        return [_hold_info(h) for h in holds]


def get_usage(db: Database, request_id: str) -> UsageInfo | None:
    with db.read() as session:
        row = session.scalars(select(UsageRecord).where(UsageRecord.request_id == request_id)).one_or_none()
        return _usage_info(row) if row is not None else None
