"""Accounts: a name, a plan, and a free grant when created.

Names are 1-128 letters, digits, '_', '.' and '-', kept as written but unique ignoring case: `Admin`
beside `admin` (or `ACME` beside `acme`) would read as the same account in every listing, report and
log line, so the second is refused. Lookups stay exact (the name is what the API reports as
project_id). RESERVED_ACCOUNT_NAMES are the server's own accounts: operators cannot create them, in
any case (`bootstrap` creates them through `create_account(..., reserved=True)`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from llmaas.billing.db import Database
from llmaas.billing.errors import NotFoundError
from llmaas.billing.money import shown
from llmaas.billing.plans import DEFAULT_FREE_GRANT, FreeGrant, get_plan
from llmaas.billing.schema import Account, LedgerEntry, utcnow
from llmaas.errors import InvalidRequestError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
RESERVED_ACCOUNT_NAMES = ("admin",)  # the admin key's account (server/bootstrap.py)
# PostgreSQL: account creations take this transaction-scoped advisory lock, so two that differ only
# in case cannot both pass the case-insensitive check (SQLite's BEGIN IMMEDIATE serializes them).
_CREATE_LOCK = 0x6C6C6D61  # "llma"


def check_account_name(name: object, param: str = "name") -> str:
    """A well-formed account name (for creation and for lookups from the outside), else 400."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            "Account names are 1-128 characters of letters, digits, '_', '.' and '-', "
            f"starting with a letter or digit; got {shown(name)}",
            param=param,
        )
    return name


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
    *,
    reserved: bool = False,
) -> AccountInfo:
    """A new account; `reserved` only for the server's own (RESERVED_ACCOUNT_NAMES)."""
    check_account_name(name)
    if not reserved and name.lower() in RESERVED_ACCOUNT_NAMES:
        raise InvalidRequestError(f"The account name {name!r} is reserved", param="name")
    get_plan(plan)
    now = now or utcnow()
    try:
        with db.write() as session:
            if db.dialect == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK})
            same = session.scalar(select(Account.name).where(func.lower(Account.name) == name.lower()))
            if same is not None:
                raise InvalidRequestError(f"An account named {same!r} already exists", param="name")
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
