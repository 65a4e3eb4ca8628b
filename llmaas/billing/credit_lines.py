"""An account's credits one by one: each grant and top-up, what is left of it and when it expires.

`balance` (credits.py) sums them; this lists them, so a customer sees which free grant runs out when.
Whether a credit still counts is credits' one rule (`unexpired`), asked here, not restated.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select, text

from llmaas.billing.accounts import find_account
from llmaas.billing.credits import CREDIT_KINDS, _unexpired_credit_sql
from llmaas.billing.db import Database
from llmaas.billing.schema import LedgerEntry, UtcDateTime, utcnow

MAX_CREDIT_LINES = 200  # newest first; an account with more sees its 200 latest


@dataclass(frozen=True)
class CreditLine:
    id: int
    kind: str  # "grant" (free, may expire) or "top_up" (paid, never expires)
    amount_micros: int
    remaining_micros: int
    created_at: datetime
    expires_at: datetime | None
    note: str | None
    usable: bool  # something left and not expired: part of the balance's credit


def credit_lines(db: Database, account: int | str, now: datetime | None = None) -> list[CreditLine]:
    now = now or utcnow()
    with db.read() as session:
        owner = find_account(session, account)
        rows = session.scalars(
            select(LedgerEntry)
            .where(LedgerEntry.account_id == owner.id, LedgerEntry.kind.in_(CREDIT_KINDS))
            .order_by(LedgerEntry.id.desc())
            .limit(MAX_CREDIT_LINES)
        )
        usable = text(f"SELECT c.id FROM ledger_entries c WHERE {_unexpired_credit_sql('c', ':account_id')}")
        usable_ids = set(
            session.scalars(
                usable.bindparams(bindparam("now", type_=UtcDateTime)), {"account_id": owner.id, "now": now}
            )
        )
        return [
            CreditLine(
                id=row.id,
                kind=row.kind,
                amount_micros=row.amount_micros,
                remaining_micros=row.remaining_micros or 0,
                created_at=row.created_at,
                expires_at=row.expires_at,
                note=row.note,
                usable=row.id in usable_ids,
            )
            for row in rows
        ]
