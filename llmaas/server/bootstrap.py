"""First start of `llmaas serve`: the `default` account and its key, the admin key, default prices.

Idempotent: each step happens only when what it creates is missing, so a restart prints nothing.

The admin key is an API key of the reserved account `admin` (no credit, an empty model allow-list, so
it can never run inference; stored hashed like every key, listed and revocable like every key).
`LLMAAS_ADMIN_KEY`, when set, is that key (its hash is stored on start); otherwise one is generated and
printed once.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Sequence

from sqlalchemy import select

from llmaas.billing import (
    AuthenticationError,
    Database,
    NotFoundError,
    PriceNotSetError,
    create_account,
    create_key,
    current_price,
)
from llmaas.billing.keys import KEY_PREFIX, check_key_status, hash_key
from llmaas.billing.prices import set_price
from llmaas.billing.schema import Account, ApiKey, utcnow
from llmaas.errors import InvalidRequestError
from llmaas.server.billing import DEFAULT_ACCOUNT

log = logging.getLogger("llmaas.server")

ADMIN_ACCOUNT = "admin"
ADMIN_KEY_ENV = "LLMAAS_ADMIN_KEY"
# The operator's own account is not rate limited like a stranger's (billing/plans.py). Set only when the
# account is created: a database from before keeps its plan (`llmaas accounts set-plan default operator`).
DEFAULT_ACCOUNT_PLAN = "operator"
# USD per 1M tokens for a served model with no price yet (the operator changes it with `llmaas prices set`).
DEFAULT_PRICE = {"input_usd": "0.05", "cached_input_usd": "0.005", "output_usd": "0.20"}  # cached: 10%
# An embedding model reads input only: one input price (no prefix cache, no output).
DEFAULT_EMBEDDING_PRICE = {"input_usd": "0.02", "cached_input_usd": "0.02", "output_usd": "0"}


def _account_exists(db: Database, name: str) -> bool:
    with db.read() as session:
        return session.scalar(select(Account.id).where(Account.name == name)) is not None


def ensure_admin_key(db: Database, env_key: str | None) -> str | None:
    """The admin key's secret when it was created now (to print once), else None."""
    if not _account_exists(db, ADMIN_ACCOUNT):
        try:
            create_account(db, ADMIN_ACCOUNT, plan="free", free_grant=None, reserved=True)
        except InvalidRequestError:  # a replica starting at the same time created it
            pass
    with db.write() as session:
        admin = session.scalars(select(Account).where(Account.name == ADMIN_ACCOUNT)).one()
        if env_key:
            if session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(env_key))) is None:
                session.add(_admin_key_row(admin.id, env_key))
            return None
        active = session.scalar(
            select(ApiKey.id).where(ApiKey.account_id == admin.id, ApiKey.revoked_at.is_(None))
        )
        if active is not None:
            return None
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        session.add(_admin_key_row(admin.id, secret))
        return secret


def _admin_key_row(account_id: int, secret: str) -> ApiKey:
    return ApiKey(
        id="key_" + secrets.token_hex(12),
        account_id=account_id,
        key_hash=hash_key(secret),
        display_prefix=secret[:7],
        name="admin",
        allowed_models=[],  # no inference with the admin key
        created_at=utcnow(),
    )


def is_admin_key(db: Database, secret: str | None) -> bool:
    if not secret:
        return False
    with db.read() as session:
        row = session.execute(
            select(ApiKey)
            .join(Account, Account.id == ApiKey.account_id)
            .where(ApiKey.key_hash == hash_key(secret), Account.name == ADMIN_ACCOUNT)
        ).scalar_one_or_none()
    if row is None:
        return False
    try:
        check_key_status(row.display_prefix, row.revoked_at, row.expires_at, utcnow())
    except AuthenticationError:
        return False
    return True


def bootstrap(
    db: Database,
    served_models: Sequence[str],
    *,
    admin_key: str | None = None,
    embedding_models: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> None:
    """Create what a fresh database lacks; print new secrets once through `say`. `embedding_models`:
    those of `served_models` that get the embedding default price."""
    admin_key = admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV) or None
    created = False
    if not _account_exists(db, DEFAULT_ACCOUNT):
        try:
            create_account(db, DEFAULT_ACCOUNT, plan=DEFAULT_ACCOUNT_PLAN)
            created = True
        except InvalidRequestError:  # a replica starting at the same time created it
            pass
    if created:
        key = create_key(db, DEFAULT_ACCOUNT, name="default")
        say(
            f"Created account '{DEFAULT_ACCOUNT}' ({DEFAULT_ACCOUNT_PLAN} plan, free grant). "
            "Its API key (shown once):"
        )
        say(f"    {key.secret}")
    new_admin = ensure_admin_key(db, admin_key)
    if new_admin is not None:
        say(f"Admin key for /admin/... (shown once; set {ADMIN_KEY_ENV} to choose your own):")
        say(f"    {new_admin}")
    for model in served_models:
        try:
            current_price(db, model)
        except (PriceNotSetError, NotFoundError):
            price = DEFAULT_EMBEDDING_PRICE if model in embedding_models else DEFAULT_PRICE
            set_price(db, model, **price)
            log.warning(
                "model %s had no price: set the default $%s in / $%s cached / $%s out per 1M tokens "
                "(change it with `llmaas prices set`)",
                model,
                price["input_usd"],
                price["cached_input_usd"],
                price["output_usd"],
            )
