"""Accounts: a name, a plan, and a free grant when created."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from llmaas.billing.db import Database
from llmaas.billing.errors import NotFoundError
from llmaas.billing.plans import DEFAULT_FREE_GRANT, FreeGrant, get_plan
from llmaas.billing.schema import Account, LedgerEntry, utcnow
from llmaas.errors import InvalidRequestError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class AccountInfo:
    id: int
    name: str
    plan: str
    created_at: datetime


def _info(account: Account) -> AccountInfo:
    return AccountInfo(account.id, account.name, account.plan, account.created_at)


def find_account(session: Session, account: int | str, *, lock: bool = False) -> Account:
    """The account row by id or name; `lock` takes its row lock (PostgreSQL FOR UPDATE)."""
    column = Account.id if isinstance(account, int) else Account.name
    query = select(Account).where(column == account)
    if lock:
        query = query.with_for_update()
    row = session.scalars(query).one_or_none()
    if row is None:
        raise NotFoundError(f"No account {account!r}", param="account")
    return row


def create_account(
    db: Database,
    name: str,
    plan: str = "free",
    free_grant: FreeGrant | None = DEFAULT_FREE_GRANT,
    now: datetime | None = None,
) -> AccountInfo:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError(
            "Account names are 1-128 characters of letters, digits, '_', '.' and '-'", param="name"
        )
    get_plan(plan)
    now = now or utcnow()
    try:
        with db.write() as session:
            account = Account(name=name, plan=plan, overdraft_micros=0, created_at=now)
            session.add(account)
            session.flush()
            if free_grant is not None and free_grant.amount_micros > 0:
                expires = now + free_grant.valid_for if free_grant.valid_for is not None else None
                session.add(
                    LedgerEntry(
                        account_id=account.id,
                        kind="grant",
                        amount_micros=free_grant.amount_micros,
                        remaining_micros=free_grant.amount_micros,
                        expires_at=expires,
                        note="free grant",
                        created_at=now,
                    )
                )
            return _info(account)
    except IntegrityError:
        raise InvalidRequestError(f"An account named {name!r} already exists", param="name") from None


def get_account(db: Database, account: int | str) -> AccountInfo:
    with db.read() as session:
        return _info(find_account(session, account))


def list_accounts(db: Database) -> list[AccountInfo]:
    with db.read() as session:
        return [_info(a) for a in session.scalars(select(Account).order_by(Account.id))]


def set_plan(db: Database, account: int | str, plan: str) -> AccountInfo:
    get_plan(plan)
    with db.write() as session:
        row = find_account(session, account, lock=True)
        row.plan = plan
        return _info(row)
