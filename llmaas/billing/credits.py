"""Credits, holds and settlement: no account ever spends more than it has, no request is billed twice.

    available = unexpired credit remaining - open holds - overdraft

Credits are grants (optionally expiring) and top-ups. A charge draws from the credits that expire
soonest first (non-expiring top-ups last), so only a grant's unused rest is lost when it expires.

A request's life: `place_hold` at admission reserves its worst-case cost, refusing with
InsufficientQuotaError when `available` cannot cover it; `settle` at the end charges the exact cost
at the price version the hold captured, closes the hold (its unused rest is free again), and writes
the request's one usage record and one ledger charge. Both are unique by request id: settling twice
returns the first record and charges nothing more. Every status is billed for its tokens: a request
that failed or was cut short pays for what it was delivered, never $0. `release` closes a hold without
a charge (the request never reached the engine). Holds of requests that died with their server expire
(holds.py): settled at their last progress checkpoint, or released when they made none.

Each rule is stated once here: "unexpired credit" (`_unexpired_credit_sql`, used by the balance, the
hold and the draw), a key's status (keys.check_key_status), the charge (`_charge`, used by settle and
by the expiry of holds).

Concurrency: every check-then-write runs in one transaction that first locks the account row:
BEGIN IMMEDIATE on SQLite (db.py), SELECT ... FOR UPDATE on PostgreSQL. Holds for one account are
therefore serialized, whichever process or replica places them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, or_, select, text
from sqlalchemy.orm import Session

from llmaas.billing import operator_input
from llmaas.billing.accounts import find_account
from llmaas.billing.db import Database
from llmaas.billing.errors import (
    HoldStateError,
    InsufficientQuotaError,
    NotFoundError,
    PriceNotSetError,
)
from llmaas.billing.keys import check_key_status
from llmaas.billing.money import check_credit_fits, format_usd
from llmaas.billing.prices import (
    PriceVersion,
    cost_micros,
    worst_case_cost_micros,
)
from llmaas.billing.schema import MAX_CLIENT_REQUEST_ID, Hold, LedgerEntry, UsageRecord, UtcDateTime, utcnow
from llmaas.billing.sql import Transaction, read_time, transaction
from llmaas.errors import InvalidRequestError

CREDIT_KINDS = ("grant", "top_up")
# completed; cancelled (the client went away); failed (an error ended it); interrupted (its server died:
# billed at its last progress checkpoint by whichever replica closed the expired hold, holds.py).
USAGE_STATUSES = ("completed", "cancelled", "failed", "interrupted")
DEFAULT_HOLD_TTL_S = 3600.0  # a hold's deadline after admission or its last progress checkpoint
MAX_HOLD_TTL_S = 7 * 86400.0


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
    created_at: datetime | None = None
    price: PriceVersion | None = None  # the version the hold was priced at (from hold_for_request)
    expires_at: datetime | None = None  # the deadline (admission or last progress + the hold TTL)
    client_request_id: str | None = None  # the client's own id for the request (X-Client-Request-Id)
    service_tier: str | None = None  # the tier it is billed at (prices.TIERS); None: default


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
    client_request_id: str | None = None  # the client's own id (X-Client-Request-Id); request_id is ours
    service_tier: str | None = None  # None: default


def _hold_info(h: Hold) -> HoldInfo:
    return HoldInfo(
        h.id,
        h.request_id,
        h.account_id,
        h.key_id,
        h.model,
        h.price_id,
        h.amount_micros,
        h.status,
        h.created_at,
        expires_at=h.expires_at,
        client_request_id=h.client_request_id,
        service_tier=h.service_tier,
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
        u.client_request_id,
        u.service_tier,
    )


def _unexpired_credit_sql(alias: str, account: str) -> str:
    """The one definition of "unexpired credit": a grant or top-up of `account` (an SQL expression)
    with something left that has not expired at `:now`. The balance, the hold and the draw all use it."""
    kinds = ", ".join(f"'{kind}'" for kind in CREDIT_KINDS)
    return (
        f"{alias}.account_id = {account} AND {alias}.kind IN ({kinds}) AND {alias}.remaining_micros > 0"
        f" AND ({alias}.expires_at IS NULL OR {alias}.expires_at > :now)"
    )


# What `available` is made of, for one account row `a`: used by `balance` and by every hold.
_ACCOUNT_MONEY = f"""
SELECT a.id AS account_id, a.overdraft_micros AS overdraft,
       (SELECT COALESCE(SUM(c.remaining_micros), 0) FROM ledger_entries c
         WHERE {_unexpired_credit_sql("c", "a.id")}) AS credit,
       (SELECT COALESCE(SUM(h.amount_micros), 0) FROM holds h
         WHERE h.account_id = a.id AND h.status = 'open') AS held"""


def _balance_of(money: dict[str, Any]) -> Balance:
    credit, held, overdraft = int(money["credit"]), int(money["held"]), int(money["overdraft"])
    return Balance(credit, held, overdraft, credit - held - overdraft)


def balance(db: Database, account: int | str, now: datetime | None = None) -> Balance:
    column = "id" if isinstance(account, int) else "name"
    with transaction(db, write=False) as tx:
        money = tx.named(
            f"{_ACCOUNT_MONEY}\n  FROM accounts a WHERE a.{column} = :account",
            account=account,
            now=tx.time(now or utcnow()),
        )
    if money is None:
        raise NotFoundError(f"No account {account!r}", param="account")
    return _balance_of(money)


def _credit_in_session(session: Session, account_id: int) -> int:
    """The account's unexpired credit, read in the caller's (ORM) transaction."""
    query = text(
        "SELECT COALESCE(SUM(c.remaining_micros), 0) FROM ledger_entries c"
        f" WHERE {_unexpired_credit_sql('c', ':account_id')}"
    ).bindparams(bindparam("now", type_=UtcDateTime))
    return int(session.scalar(query, {"account_id": account_id, "now": utcnow()}))


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
        check_credit_fits(_credit_in_session(session, row.id), amount_micros)  # money.py bounds
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


_HOLD_FACTS = (
    _ACCOUNT_MONEY
    + """,
       (SELECT COUNT(*) FROM holds d WHERE d.request_id = :request_id) AS duplicates,
       k.display_prefix AS key_prefix, k.revoked_at AS key_revoked_at, k.expires_at AS key_expires_at{price}
  FROM accounts a
  LEFT JOIN api_keys k ON k.id = :key_id{price_join}
 WHERE a.id = :account_id
"""
)
_PRICE_COLUMNS = """,
       p.id AS price_id, p.input_micros_per_m, p.cached_input_micros_per_m, p.output_micros_per_m,
       p.effective_from, p.batch_percent, p.flex_percent, p.priority_percent"""
_PRICE_JOIN = """
  LEFT JOIN (SELECT id, input_micros_per_m, cached_input_micros_per_m, output_micros_per_m, effective_from,
                    batch_percent, flex_percent, priority_percent
               FROM prices WHERE model = :model AND effective_from <= :now
              ORDER BY effective_from DESC LIMIT 1) p ON 1 = 1"""
_FACTS_AT_PRICE = _HOLD_FACTS.format(price="", price_join="")
_FACTS_PRICE_IN_FORCE = _HOLD_FACTS.format(price=_PRICE_COLUMNS, price_join=_PRICE_JOIN)
_INSERT_HOLD = """
INSERT INTO holds (request_id, account_id, key_id, model, price_id, amount_micros, status, owner, created_at,
                   expires_at, client_request_id, service_tier)
VALUES (:request_id, :account_id, :key_id, :model, :price_id, :amount, 'open', :owner, :now, :expires_at,
        :client_request_id, :service_tier)
RETURNING id
"""


def hold_ttl(ttl_s: float | None) -> timedelta:
    """A hold's time to live (`None`: the default), checked: 1 s to a week."""
    return operator_input.seconds(ttl_s, "hold_ttl_s", default=DEFAULT_HOLD_TTL_S, low=1, high=MAX_HOLD_TTL_S)


def _hold(
    db: Database,
    request_id: str,
    account_id: int,
    model: str,
    *,
    price: PriceVersion | None,
    amount_micros: int | None,
    tokens: tuple[int, int] = (0, 0),
    key_id: str | None,
    owner: str | None,
    now: datetime,
    ttl_s: float | None = None,
    client_request_id: str | None = None,
    service_tier: str | None = None,
) -> HoldInfo:
    """One transaction: lock the account, read balance + price + key, insert the hold.

    With `price` None the version in force at `now` is read in the same transaction and the amount is
    the worst case for `tokens` = (prompt, max completion). `key_id` is re-checked here (revoked or
    expired -> 401), so a revocation stops the next admission on every replica, whatever an auth cache
    still holds. On PostgreSQL the account row is locked first (FOR UPDATE), and the balance is read by
    the next statement, whose snapshot then includes every hold and charge committed before the lock.
    The hold's deadline is `now` + `ttl_s` (default DEFAULT_HOLD_TTL_S); progress checkpoints renew it.
    """
    expires_at = now + hold_ttl(ttl_s)
    with transaction(db, write=True, synchronous=db.durable_holds) as tx:
        if tx.postgres:
            if tx.one("SELECT id FROM accounts WHERE id = :id FOR UPDATE", id=account_id) is None:
                raise NotFoundError(f"No account {account_id!r}", param="account")
        facts = tx.named(
            _FACTS_PRICE_IN_FORCE if price is None else _FACTS_AT_PRICE,
            account_id=account_id,
            key_id=key_id,
            request_id=request_id,
            model=model,
            now=tx.time(now),
        )
        if facts is None:
            raise NotFoundError(f"No account {account_id!r}", param="account")
        if key_id is not None:
            check_key_status(facts["key_prefix"], facts["key_revoked_at"], facts["key_expires_at"], now)
        if price is None:
            if facts["price_id"] is None:
                raise PriceNotSetError(f"No price is set for model {model!r}", param="model")
            price = _price_version(facts, model)
            amount_micros = worst_case_cost_micros(price, *tokens, service_tier)
        available = _balance_of(facts).available_micros
        if amount_micros > available:
            raise InsufficientQuotaError(
                "You exceeded your current quota: this request may cost up to "
                f"${format_usd(amount_micros)} and the account has "
                f"${format_usd(max(available, 0))} available."
            )
        if facts["duplicates"]:
            raise HoldStateError(f"Request {request_id!r} already has a hold", param="request_id")
        (hold_id,) = tx.one(
            _INSERT_HOLD,
            request_id=request_id,
            account_id=account_id,
            key_id=key_id,
            model=price.model,
            price_id=price.id,
            amount=amount_micros,
            owner=owner,
            now=tx.time(now),
            expires_at=tx.time(expires_at),
            client_request_id=client_request_id,
            service_tier=service_tier,
        )
    return HoldInfo(
        hold_id,
        request_id,
        account_id,
        key_id,
        price.model,
        price.id,
        amount_micros,
        "open",
        now,
        price,
        expires_at,
        client_request_id,
        service_tier,
    )


def _price_version(row: dict[str, Any], model: str) -> PriceVersion:
    """A price version from a row with the prices table's columns (and `price_id`)."""
    return PriceVersion(
        row["price_id"],
        model,
        row["input_micros_per_m"],
        row["cached_input_micros_per_m"],
        row["output_micros_per_m"],
        read_time(row["effective_from"]),
        row.get("batch_percent", 50),
        row.get("flex_percent", 50),
        row.get("priority_percent", 200),
    )


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
    ttl_s: float | None = None,
) -> HoldInfo:
    """Reserve `amount_micros` for request `request_id`, or raise InsufficientQuotaError (429)."""
    if not isinstance(amount_micros, int) or isinstance(amount_micros, bool) or amount_micros < 0:
        raise InvalidRequestError("hold amount must be a non-negative integer of micro-USD", param="amount")
    return _hold(
        db,
        request_id,
        account_id,
        price.model,
        price=price,
        amount_micros=amount_micros,
        key_id=key_id,
        owner=owner,
        now=now or utcnow(),
        ttl_s=ttl_s,
    )


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
    ttl_s: float | None = None,
    client_request_id: str | None = None,
    service_tier: str | None = None,
) -> HoldInfo:
    """Admission in one transaction: the price in force now, the worst-case cost, the hold.

    With `key_id`, the key is checked again in the same transaction (revoked or expired -> 401).
    `ttl_s`: the hold's deadline after admission or its last progress checkpoint (default one hour).
    `client_request_id`: the client's own id for the request, kept on the hold and its usage record.
    `service_tier`: the tier it is billed at (prices.TIERS; None: default), kept likewise.
    """
    for value, param in ((prompt_tokens, "prompt_tokens"), (max_completion_tokens, "max_completion_tokens")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidRequestError(f"'{param}' must be a non-negative integer", param=param)
    if client_request_id is not None and (
        not isinstance(client_request_id, str) or not 1 <= len(client_request_id) <= MAX_CLIENT_REQUEST_ID
    ):
        raise InvalidRequestError(
            f"'client_request_id' must be 1 to {MAX_CLIENT_REQUEST_ID} characters", param="client_request_id"
        )
    return _hold(
        db,
        request_id,
        account_id,
        model,
        price=None,
        amount_micros=None,
        tokens=(prompt_tokens, max_completion_tokens),
        key_id=key_id,
        owner=owner,
        now=now or utcnow(),
        ttl_s=ttl_s,
        client_request_id=client_request_id,
        service_tier=service_tier,
    )


# The terms a request is billed on: its hold's account, key, model, admission time and price version.
_HOLD_TERMS = """
SELECT h.account_id, h.key_id, h.model, h.price_id, h.created_at AS admitted_at, h.client_request_id,
       h.service_tier, p.input_micros_per_m, p.cached_input_micros_per_m, p.output_micros_per_m,
       p.effective_from, p.batch_percent, p.flex_percent, p.priority_percent
  FROM holds h JOIN prices p ON p.id = h.price_id
 WHERE h.request_id = :request_id
"""
_PRICE_BY_ID = """
SELECT input_micros_per_m, cached_input_micros_per_m, output_micros_per_m, effective_from,
       batch_percent, flex_percent, priority_percent
  FROM prices WHERE id = :id
"""
_INSERT_USAGE = """
INSERT INTO usage_records (request_id, account_id, key_id, model, endpoint, price_id, prompt_tokens,
                           cached_tokens, completion_tokens, cost_micros, status, admitted_at,
                           finished_at, epoch_minute, client_request_id, service_tier)
VALUES (:request_id, :account_id, :key_id, :model, :endpoint, :price_id, :prompt, :cached, :completion,
        :cost, :status, :admitted_at, :now, :epoch_minute, :client_request_id, :service_tier)
ON CONFLICT (request_id) DO NOTHING
"""
_CREDIT_LOTS = f"""
SELECT id, remaining_micros FROM ledger_entries c
 WHERE {_unexpired_credit_sql("c", ":account_id")}
 ORDER BY CASE WHEN expires_at IS NULL THEN 1 ELSE 0 END, expires_at, id
"""
_INSERT_CHARGE = """
INSERT INTO ledger_entries (account_id, kind, amount_micros, request_id, note, created_at)
VALUES (:account_id, 'charge', :amount, :request_id, :note, :now)
"""


def _draw(tx: Transaction, account_id: int, amount: int, now: datetime) -> None:
    """Take `amount` from the credits expiring soonest; what none can cover becomes overdraft."""
    for lot_id, remaining in tx.all(_CREDIT_LOTS, account_id=account_id, now=tx.time(now)):
        if amount == 0:
            return
        take = min(amount, remaining)
        tx.run(
            "UPDATE ledger_entries SET remaining_micros = :left WHERE id = :id",
            left=remaining - take,
            id=lot_id,
        )
        amount -= take
    if amount:
        tx.run(
            "UPDATE accounts SET overdraft_micros = overdraft_micros + :amount WHERE id = :id",
            amount=amount,
            id=account_id,
        )


def _terms_from_admission(tx: Transaction, hold: HoldInfo, now: datetime) -> dict[str, Any] | None:
    """The billing terms from what `hold_for_request` returned (its row's values are never edited)."""
    terms = {
        "account_id": hold.account_id,
        "key_id": hold.key_id,
        "model": hold.model,
        "price_id": hold.price_id,
        "admitted_at": tx.time(hold.created_at or now),
        "client_request_id": hold.client_request_id,
        "service_tier": hold.service_tier,
    }
    if hold.price is not None:
        p = hold.price
        return terms | {
            "input_micros_per_m": p.input_micros_per_m,
            "cached_input_micros_per_m": p.cached_input_micros_per_m,
            "output_micros_per_m": p.output_micros_per_m,
            "effective_from": p.effective_from,
            "batch_percent": p.batch_percent,
            "flex_percent": p.flex_percent,
            "priority_percent": p.priority_percent,
        }
    price = tx.named(_PRICE_BY_ID, id=hold.price_id)
    return None if price is None else terms | price


def _charge(
    tx: Transaction,
    request_id: str,
    terms: dict[str, Any],
    tokens: tuple[int, int, int],
    status: str,
    endpoint: str | None,
    now: datetime,
) -> UsageInfo | None:
    """The one charge of a request, in the caller's transaction: its usage record, the hold closed,
    the credits drawn, the ledger charge. None (and nothing written) when it was settled before.

    Every status is billed for its tokens (prompt, cached, completion): a request that failed or was
    cut short pays for what it was delivered."""
    prompt, cached, completion = tokens
    account_id = terms["account_id"]
    price = _price_version(terms, terms["model"])
    tier = terms.get("service_tier")
    cost = cost_micros(price, prompt, cached, completion, tier)
    if tx.postgres:
        tx.one("SELECT id FROM accounts WHERE id = :id FOR UPDATE", id=account_id)
    inserted = tx.run(
        _INSERT_USAGE,
        request_id=request_id,
        account_id=account_id,
        key_id=terms["key_id"],
        model=price.model,
        endpoint=endpoint,
        price_id=price.id,
        prompt=prompt,
        cached=cached,
        completion=completion,
        cost=cost,
        status=status,
        admitted_at=terms["admitted_at"],
        now=tx.time(now),
        epoch_minute=int(now.timestamp()) // 60,
        client_request_id=terms.get("client_request_id"),
        service_tier=tier,
    )
    if inserted != 1:
        return None
    tx.run(
        "UPDATE holds SET status = 'settled', closed_at = :now WHERE request_id = :request_id",
        now=tx.time(now),
        request_id=request_id,
    )
    if cost:
        _draw(tx, account_id, cost, now)
    tx.run(
        _INSERT_CHARGE,
        account_id=account_id,
        amount=-cost,
        request_id=request_id,
        note=f"{price.model} {status}" + (f" {tier}" if tier else ""),
        now=tx.time(now),
    )
    return UsageInfo(
        request_id,
        account_id,
        terms["key_id"],
        price.model,
        price.id,
        prompt,
        cached,
        completion,
        cost,
        status,
        now,
        terms.get("client_request_id"),
        tier,
    )


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
    hold: HoldInfo | None = None,
) -> UsageInfo:
    """Charge the exact cost of a held request and write its usage record, exactly once.

    `status`: completed, cancelled (the client went away), failed (an error ended it) or interrupted
    (its server died; see holds.py). Every status is billed for the tokens given: what the request
    was delivered is never free. Settling a request that already has a usage record returns that
    record unchanged (so a live server settling a request whose expired hold another replica already
    settled at its last checkpoint charges nothing more). A hold that was released (expired without
    progress) is still settled: the tokens were served.

    One transaction, committed durably before this returns: the usage record (unique by request id:
    a second settle inserts nothing and returns the first record), the hold closed, the credits drawn
    and the ledger charge. On PostgreSQL the account row is locked first, as for a hold.

    `hold`: what `hold_for_request` returned at admission. Given it, a request whose hold row is gone
    (a PostgreSQL crash lost an unflushed hold: db.py `hold_commit`) is still billed, at that hold's
    price version.
    """
    if status not in USAGE_STATUSES:
        raise InvalidRequestError(f"'status' must be one of {', '.join(USAGE_STATUSES)}", param="status")
    tokens = (prompt_tokens, cached_tokens, completion_tokens)  # checked by cost_micros
    now = now or utcnow()
    admitted = hold if hold is not None and hold.request_id == request_id else None
    with transaction(db, write=True) as tx:
        terms = None
        if admitted is None or admitted.price is None:
            terms = tx.named(_HOLD_TERMS, request_id=request_id)
        if terms is None and admitted is not None:
            terms = _terms_from_admission(tx, admitted, now)
        if terms is None:
            raise NotFoundError(f"No hold for request {request_id!r}", param="request_id")
        charged = _charge(tx, request_id, terms, tokens, status, endpoint, now)
    if charged is not None:
        return charged
    existing = get_usage(db, request_id)  # settled before: that record stands
    assert existing is not None
    return existing


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


def open_holds(db: Database, account: int | str) -> list[HoldInfo]:
    with db.read() as session:
        row = find_account(session, account)
        holds = session.scalars(select(Hold).where(Hold.account_id == row.id, Hold.status == "open"))
        return [_hold_info(h) for h in holds]


def find_usage(db: Database, request_id: str) -> list[UsageInfo]:
    """The usage records named by `request_id`: the response's id (x-request-id, at most one record) or
    the client's own X-Client-Request-Id (any number: a client may reuse its ids), oldest first."""
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= MAX_CLIENT_REQUEST_ID:
        raise InvalidRequestError(
            f"'request_id' must be 1 to {MAX_CLIENT_REQUEST_ID} characters", param="request_id"
        )
    with db.read() as session:
        rows = session.scalars(
            select(UsageRecord)
            .where(or_(UsageRecord.request_id == request_id, UsageRecord.client_request_id == request_id))
            .order_by(UsageRecord.finished_at, UsageRecord.id)
        )
        return [_usage_info(row) for row in rows]


def get_usage(db: Database, request_id: str) -> UsageInfo | None:
    with db.read() as session:
        row = session.scalars(select(UsageRecord).where(UsageRecord.request_id == request_id)).one_or_none()
        return _usage_info(row) if row is not None else None
