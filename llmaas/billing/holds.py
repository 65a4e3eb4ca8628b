"""Holds that expire: progress checkpoints, server leases, and closing the holds of requests that died.

A hold is open while its request runs. Two things end a hold that its own settle never will:

- **Its owner is gone.** Each server instance holds a lease: one row in `instances` (its
  --instance-id, the holds' `owner`) whose `lease_until` its heartbeat pushes forward every few
  seconds (server/leases.py). Once `lease_until` has passed, the instance is taken for dead and any
  replica closes its open holds. A clean exit ends the lease at once.
- **Its deadline passed.** Each hold has `expires_at` = admission (or its last progress checkpoint) +
  the hold TTL (default one hour): a hold whose owner lives but whose request never ended (a bug, a
  settle that kept failing) does not reserve money forever. Holds whose owner has no lease row at all
  (a library caller, a server from before leases) expire by their deadline only.

Closing an expired hold bills what was delivered: a hold with a progress checkpoint (the tokens the
request had produced, recorded while it ran: `record_progress`) is settled at those tokens, status
`interrupted`, through the same charge as every settle (credits._charge, exactly once by request id);
a hold without one is released. A live owner settling later finds the usage record and charges
nothing more (settled at the checkpoint), or bills the request in full (released). Each close is one
transaction that locks the account (as a hold and a settle do) and re-reads the hold, so replicas
sweeping together, and a settle racing a sweep, close each hold once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from llmaas.billing import operator_input
from llmaas.billing.credits import _HOLD_TERMS, _charge, hold_ttl
from llmaas.billing.db import Database
from llmaas.billing.errors import HoldStateError, NotFoundError
from llmaas.billing.schema import utcnow
from llmaas.billing.sql import Transaction, read_time, transaction
from llmaas.errors import InvalidRequestError

DEFAULT_LEASE_S = 30.0  # an instance is taken for dead this long after its last heartbeat
MAX_LEASE_S = 3600.0
MAX_LISTED = 10_000
MAX_ID_CHARS = 128  # request ids and instance ids (their columns' width)
_HOLD_ID = re.compile(r"^[0-9]{1,18}$")


@dataclass(frozen=True)
class HoldView:
    """A hold as an operator sees it (`llmaas holds list`)."""

    id: int
    request_id: str
    account: str
    model: str
    amount_micros: int
    status: str
    owner: str | None
    created_at: datetime
    expires_at: datetime | None
    lease_until: datetime | None  # the owner's lease (None: no lease row)
    progress_tokens: tuple[int, int, int] | None  # (prompt, cached, completion) at the last checkpoint
    progress_at: datetime | None
    expired: bool  # open, and its deadline or its owner's lease has passed


@dataclass(frozen=True)
class Closed:
    """How one hold was closed: `settled` at its checkpoint (with the cost), `released`, or `none` (it
    was already closed: settled or released by its owner or another replica)."""

    request_id: str
    outcome: str
    cost_micros: int = 0


@dataclass(frozen=True)
class SweepResult:
    settled: int = 0
    released: int = 0
    cost_micros: int = 0  # what the settled ones were billed

    @property
    def closed(self) -> int:
        return self.settled + self.released


def lease_length(lease_s: float | None) -> timedelta:
    return operator_input.seconds(lease_s, "hold_lease_s", default=DEFAULT_LEASE_S, low=1, high=MAX_LEASE_S)


def _instance_id(instance_id: str) -> str:
    if not isinstance(instance_id, str) or not 0 < len(instance_id) <= MAX_ID_CHARS:
        raise InvalidRequestError(f"'instance_id' must be 1-{MAX_ID_CHARS} characters", param="instance_id")
    return instance_id


# ------------------------------------------------------------------ progress


_RECORD_PROGRESS = """
UPDATE holds SET progress_prompt_tokens = :prompt, progress_cached_tokens = :cached,
                 progress_completion_tokens = :completion, progress_at = :now, expires_at = :expires_at
 WHERE request_id = :request_id AND status = 'open'
"""


def record_progress(
    db: Database,
    request_id: str,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    *,
    ttl_s: float | None = None,
    now: datetime | None = None,
) -> bool:
    """Checkpoint a running request's tokens so far on its open hold and renew its deadline (now +
    `ttl_s`). False when the hold is no longer open (settled, released) or unknown: nothing written.

    One small UPDATE, committed like a hold (asynchronously on PostgreSQL unless hold_commit=sync)."""
    for value, param in (
        (prompt_tokens, "prompt_tokens"),
        (cached_tokens, "cached_tokens"),
        (completion_tokens, "completion_tokens"),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
            raise InvalidRequestError(f"'{param}' must be a non-negative integer below 2**31", param=param)
    if cached_tokens > prompt_tokens:
        raise InvalidRequestError("'cached_tokens' cannot exceed 'prompt_tokens'", param="cached_tokens")
    now = now or utcnow()
    expires_at = now + hold_ttl(ttl_s)
    with transaction(db, write=True, synchronous=db.durable_holds) as tx:
        written = tx.run(
            _RECORD_PROGRESS,
            request_id=request_id,
            prompt=prompt_tokens,
            cached=cached_tokens,
            completion=completion_tokens,
            now=tx.time(now),
            expires_at=tx.time(expires_at),
        )
    return written == 1


# ------------------------------------------------------------------ leases

_RENEW_LEASE = """
INSERT INTO instances (id, started_at, heartbeat_at, lease_until) VALUES (:id, :now, :now, :lease_until)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, lease_until = excluded.lease_until
"""


def renew_lease(
    db: Database, instance_id: str, lease_s: float | None = None, now: datetime | None = None
) -> datetime:
    """The instance's heartbeat: its lease now runs until now + `lease_s`. Returns that time."""
    instance_id = _instance_id(instance_id)
    now = now or utcnow()
    lease_until = now + lease_length(lease_s)
    with transaction(db, write=True) as tx:
        tx.run(_RENEW_LEASE, id=instance_id, now=tx.time(now), lease_until=tx.time(lease_until))
    return lease_until


def end_lease(db: Database, instance_id: str, now: datetime | None = None) -> None:
    """A clean exit: the lease ends now, so what the instance left open expires at the next sweep."""
    instance_id = _instance_id(instance_id)
    with transaction(db, write=True) as tx:
        tx.run(
            "UPDATE instances SET lease_until = :now WHERE id = :id",
            id=instance_id,
            now=tx.time(now or utcnow()),
        )


# ------------------------------------------------------------------ closing holds

_EXPIRED = """(h.expires_at <= :now OR i.lease_until <= :now)"""
_EXPIRED_HOLDS = f"""
SELECT h.request_id FROM holds h LEFT JOIN instances i ON i.id = h.owner
 WHERE h.status = 'open' AND {_EXPIRED}
 ORDER BY h.id LIMIT :limit
"""
_OWNER_HOLDS = """
SELECT h.request_id FROM holds h WHERE h.status = 'open' AND h.owner = :owner ORDER BY h.id LIMIT :limit
"""
_HOLD_FOR_CLOSE = """
SELECT status, progress_prompt_tokens, progress_cached_tokens, progress_completion_tokens
  FROM holds WHERE request_id = :request_id
"""


def _close(tx: Transaction, request_id: str, now: datetime) -> Closed:
    """Close one open hold in `tx`: settled at its checkpoint, or released. Locks the account first
    (PostgreSQL FOR UPDATE; SQLite's BEGIN IMMEDIATE already serializes writers), then re-reads the
    hold, so whoever closes or settles it first wins and the others change nothing."""
    terms = tx.named(_HOLD_TERMS, request_id=request_id)
    if terms is None:
        raise NotFoundError(f"No hold for request {request_id!r}", param="request_id")
    if tx.postgres:
        tx.one("SELECT id FROM accounts WHERE id = :id FOR UPDATE", id=terms["account_id"])
    hold = tx.named(_HOLD_FOR_CLOSE, request_id=request_id)
    if hold is None or hold["status"] != "open":
        return Closed(request_id, "none")
    if hold["progress_completion_tokens"] is not None:
        tokens = (
            hold["progress_prompt_tokens"],
            hold["progress_cached_tokens"],
            hold["progress_completion_tokens"],
        )
        charged = _charge(tx, request_id, terms, tokens, "interrupted", None, now)
        if charged is not None:
            return Closed(request_id, "settled", charged.cost_micros)
        # A usage record but an open hold: settled, then its hold row reopened? Never written so;
        # close the hold without a second charge.
    tx.run(
        "UPDATE holds SET status = 'released', closed_at = :now WHERE request_id = :request_id "
        "AND status = 'open'",
        now=tx.time(now),
        request_id=request_id,
    )
    return Closed(request_id, "released")


def close_hold(db: Database, request_id: str, now: datetime | None = None) -> Closed:
    """Close one open hold now, as its expiry would: settled `interrupted` at its last progress
    checkpoint, or released when it has none. A closed hold is left as it is (outcome `none`)."""
    now = now or utcnow()
    with transaction(db, write=True) as tx:
        return _close(tx, request_id, now)


def _sweep(db: Database, query: str, now: datetime, limit: int, **params: Any) -> SweepResult:
    with transaction(db, write=False) as tx:
        request_ids = [row[0] for row in tx.all(query, now=tx.time(now), limit=limit, **params)]
    settled = released = cost = 0
    for request_id in request_ids:  # one short transaction each: admissions are not held up
        closed = close_hold(db, request_id, now)
        if closed.outcome == "settled":
            settled += 1
            cost += closed.cost_micros
        elif closed.outcome == "released":
            released += 1
    return SweepResult(settled, released, cost)


def sweep_expired_holds(db: Database, now: datetime | None = None, limit: int = 1000) -> SweepResult:
    """Close every open hold whose deadline passed or whose owner's lease lapsed (up to `limit` per
    call). Safe to run on every replica at once."""
    return _sweep(db, _EXPIRED_HOLDS, now or utcnow(), _limit(limit))


def close_owner_holds(
    db: Database, owner: str, now: datetime | None = None, limit: int = 100_000
) -> SweepResult:
    """Close every open hold of `owner`: an instance restarting under its own id closes what its
    previous run left (that run is dead, whatever its lease says)."""
    return _sweep(db, _OWNER_HOLDS, now or utcnow(), limit, owner=_instance_id(owner))


def release_stale_holds(
    db: Database, *, owner: str | None = None, created_before: datetime | None = None
) -> int:
    """Close the open holds of requests that died: those of `owner` and/or those admitted before
    `created_before`, each as an expiry would (settled at its checkpoint, else released). Returns how
    many were closed."""
    if owner is None and created_before is None:
        raise InvalidRequestError("give an owner or a created_before time", param="owner")
    conditions, params = ["status = 'open'"], {}
    if owner is not None:
        conditions.append("owner = :owner")
        params["owner"] = _instance_id(owner)
    now = utcnow()
    with transaction(db, write=False) as tx:
        if created_before is not None:
            conditions.append("created_at < :created_before")
            params["created_before"] = tx.time(created_before)
        query = f"SELECT request_id FROM holds WHERE {' AND '.join(conditions)} ORDER BY id"
        request_ids = [row[0] for row in tx.all(query, **params)]
    return sum(close_hold(db, request_id, now).outcome != "none" for request_id in request_ids)


# ------------------------------------------------------------------ operators

_LIST_HOLDS = """
SELECT h.id, h.request_id, a.name AS account, h.model, h.amount_micros, h.status, h.owner, h.created_at,
       h.expires_at, i.lease_until, h.progress_prompt_tokens, h.progress_cached_tokens,
       h.progress_completion_tokens, h.progress_at
  FROM holds h JOIN accounts a ON a.id = h.account_id LEFT JOIN instances i ON i.id = h.owner
"""


def _view(row: dict[str, Any], now: datetime) -> HoldView:
    expires_at, lease_until = read_time(row["expires_at"]), read_time(row["lease_until"])
    progress = None
    if row["progress_completion_tokens"] is not None:
        progress = (
            row["progress_prompt_tokens"],
            row["progress_cached_tokens"],
            row["progress_completion_tokens"],
        )
    expired = row["status"] == "open" and any(t is not None and t <= now for t in (expires_at, lease_until))
    return HoldView(
        row["id"],
        row["request_id"],
        row["account"],
        row["model"],
        row["amount_micros"],
        row["status"],
        row["owner"],
        read_time(row["created_at"]),
        expires_at,
        lease_until,
        progress,
        read_time(row["progress_at"]),
        expired,
    )


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LISTED:
        raise InvalidRequestError(f"'limit' must be between 1 and {MAX_LISTED}", param="limit")
    return limit


def list_holds(
    db: Database,
    account: str | None = None,
    *,
    include_closed: bool = False,
    limit: int = 100,
    now: datetime | None = None,
) -> list[HoldView]:
    """Open holds (every hold with `include_closed`), newest first, at most `limit`."""
    now = now or utcnow()
    conditions, params = [], {"limit": _limit(limit)}
    if account is not None:
        if not isinstance(account, str) or not 0 < len(account) <= MAX_ID_CHARS:
            raise InvalidRequestError(f"'account' must be 1-{MAX_ID_CHARS} characters", param="account")
        conditions.append("a.name = :account")
        params["account"] = account
    if not include_closed:
        conditions.append("h.status = 'open'")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    with transaction(db, write=False) as tx:
        if account is not None and tx.one("SELECT id FROM accounts WHERE name = :n", n=account) is None:
            raise NotFoundError(f"No account {account!r}", param="account")
        rows = tx.named_all(f"{_LIST_HOLDS}{where} ORDER BY h.id DESC LIMIT :limit", **params)
    return [_view(row, now) for row in rows]


def find_hold(db: Database, hold_or_request_id: str) -> HoldView:
    """A hold by its numeric id or its request id."""
    if not isinstance(hold_or_request_id, str) or not 0 < len(hold_or_request_id) <= MAX_ID_CHARS:
        raise InvalidRequestError(
            f"a hold id or request id is 1-{MAX_ID_CHARS} characters", param="hold_or_request_id"
        )
    with transaction(db, write=False) as tx:
        row = tx.named(f"{_LIST_HOLDS} WHERE h.request_id = :rid", rid=hold_or_request_id)
        if row is None and _HOLD_ID.match(hold_or_request_id):
            row = tx.named(f"{_LIST_HOLDS} WHERE h.id = :id", id=int(hold_or_request_id))
    if row is None:
        raise NotFoundError(f"No hold {hold_or_request_id!r}", param="hold_or_request_id")
    return _view(row, utcnow())


def close_hold_by_operator(db: Database, hold_or_request_id: str) -> Closed:
    """`llmaas holds release`: close one open hold now (settled at its checkpoint, else released)."""
    hold = find_hold(db, hold_or_request_id)
    if hold.status != "open":
        raise HoldStateError(
            f"Hold {hold.id} (request {hold.request_id!r}) is already {hold.status}",
            param="hold_or_request_id",
        )
    return close_hold(db, hold.request_id)
