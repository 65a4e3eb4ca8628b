"""API keys: `sk-` + 32 random bytes, shown once, stored only as a sha256 hash.

sha256 (not a slow password hash) is right here: the secret has 256 bits of entropy, so there is
nothing to brute-force, and verification stays one indexed lookup per request. Every lookup reads
the row, so revocation and expiry take effect on the next request. (The server caches lookups for a
few seconds; a hold re-reads the key in its own transaction, so inference still stops at once.)
The secret never appears in a repr, a log line or an error message: only the key id and the short
display prefix do.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from llmaas.billing.accounts import find_account
from llmaas.billing.db import Database
from llmaas.billing.errors import AuthenticationError, ModelNotAllowedError, NotFoundError
from llmaas.billing.plans import get_plan
from llmaas.billing.schema import ApiKey, utcnow
from llmaas.billing.sql import read_time, transaction
from llmaas.errors import InvalidRequestError

KEY_PREFIX = "sk-"
_SECRET_BYTES = 32
_DISPLAY_CHARS = 4  # "sk-" + 4 characters: enough to tell keys apart in a listing, useless to guess


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never the secret, never the hash."""

    id: str
    account_id: int
    display_prefix: str
    name: str | None
    allowed_models: tuple[str, ...] | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class NewKey:
    info: KeyInfo
    secret: str = field(repr=False)  # shown to the operator once, then gone


@dataclass(frozen=True)
class Principal:
    """Who a verified request is: the key, its account, and the limits and priority that apply."""

    key_id: str
    account_id: int
    account_name: str
    plan: str
    requests_per_minute: int
    tokens_per_minute: int
    priority: int
    allowed_models: tuple[str, ...] | None


def _info(key: ApiKey) -> KeyInfo:
    models = tuple(key.allowed_models) if key.allowed_models is not None else None
    return KeyInfo(
        key.id,
        key.account_id,
        key.display_prefix,
        key.name,
        models,
        key.requests_per_minute,
        key.tokens_per_minute,
        key.created_at,
        key.expires_at,
        key.revoked_at,
    )


def _positive_or_none(value: int | None, param: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise InvalidRequestError(f"'{param}' must be a positive integer", param=param)
    return value


def create_key(
    db: Database,
    account: int | str,
    *,
    name: str | None = None,
    expires_at: datetime | None = None,
    allowed_models: list[str] | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
) -> NewKey:
    if allowed_models is not None and (
        isinstance(allowed_models, str) or not all(isinstance(m, str) and m for m in allowed_models)
    ):
        raise InvalidRequestError("'allowed_models' must be a list of model names", param="allowed_models")
    _positive_or_none(requests_per_minute, "requests_per_minute")
    _positive_or_none(tokens_per_minute, "tokens_per_minute")
    secret = KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
    with db.write() as session:
        owner = find_account(session, account)
        row = ApiKey(
            id="key_" + secrets.token_hex(12),
            account_id=owner.id,
            key_hash=hash_key(secret),
            display_prefix=secret[: len(KEY_PREFIX) + _DISPLAY_CHARS],
            name=name,
            allowed_models=sorted(set(allowed_models)) if allowed_models is not None else None,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            created_at=utcnow(),
            expires_at=expires_at,
        )
        session.add(row)
        session.flush()
        return NewKey(_info(row), secret)


_KEY_BY_HASH = """
SELECT k.id, k.account_id, k.display_prefix, k.allowed_models, k.requests_per_minute,
       k.tokens_per_minute, k.expires_at, k.revoked_at, a.name, a.plan
  FROM api_keys k JOIN accounts a ON a.id = k.account_id
 WHERE k.key_hash = :key_hash
"""


def check_key_status(
    display_prefix: str | None, revoked_at: object, expires_at: object, now: datetime
) -> datetime | None:
    """The one rule for whether a key may be used: unknown (no row: `display_prefix` None), revoked or
    expired -> AuthenticationError (401). Takes the columns as read (ORM or driver); returns the expiry.

    Every check of a key's status asks this: `check_key` (auth), `credits._hold` (the re-check at
    admission), the admin key's check (server/bootstrap.py).
    """
    if display_prefix is None:
        raise AuthenticationError("Incorrect API key provided.")
    if revoked_at is not None:
        raise AuthenticationError(f"API key {display_prefix}... has been revoked.")
    expires = read_time(expires_at)
    if key_expired(expires, now):
        raise AuthenticationError(f"API key {display_prefix}... has expired.")
    return expires


def key_expired(expires_at: datetime | None, now: datetime) -> bool:
    """A key expires at `expires_at` exactly (None: never)."""
    return expires_at is not None and expires_at <= now


@dataclass(frozen=True)
class VerifiedKey:
    """A key that passed `verify_key`, and until when that answer holds without a revocation."""

    principal: Principal
    expires_at: datetime | None


def verify_key(
    db: Database, secret: str | None, model: str | None = None, now: datetime | None = None
) -> Principal:
    """The principal for a bearer secret, or AuthenticationError (401) / ModelNotAllowedError (403)."""
    return check_key(db, secret, model, now).principal


def check_key(
    db: Database, secret: str | None, model: str | None = None, now: datetime | None = None
) -> VerifiedKey:
    """`verify_key`, also returning the key's expiry (for callers that cache the answer)."""
    if not secret or not isinstance(secret, str) or not secret.startswith(KEY_PREFIX):
        raise AuthenticationError("Missing or malformed API key. Pass it as 'Authorization: Bearer sk-...'.")
    now = now or utcnow()
    with transaction(db, write=False) as tx:  # one indexed read, on the driver (sql.py)
        found = tx.one(_KEY_BY_HASH, key_hash=hash_key(secret))
    return _verified(found, model, now)


_KEY_BY_ID = _KEY_BY_HASH.replace("k.key_hash = :key_hash", "k.id = :key_id")


def principal_of_key(db: Database, key_id: str, now: datetime | None = None) -> Principal:
    """The principal of a key by its id, checked as `check_key` checks a secret (a batch runs its lines
    under the key that created it: revoked or expired since -> AuthenticationError)."""
    now = now or utcnow()
    with transaction(db, write=False) as tx:
        found = tx.one(_KEY_BY_ID, key_id=key_id)
    return _verified(found, None, now).principal


def _verified(found: Any, model: str | None, now: datetime) -> VerifiedKey:
    if found is None:
        check_key_status(None, None, None, now)
    key_id, account_id, prefix, allowed, rpm, tpm, expires_at, revoked_at, account_name, plan_name = found
    expires_at = check_key_status(prefix, revoked_at, expires_at, now)
    if isinstance(allowed, str):  # a JSON column: text on SQLite, decoded by psycopg
        allowed = json.loads(allowed)
    if model is not None and allowed is not None and model not in allowed:
        raise ModelNotAllowedError(f"This API key may not use model {model!r}.", param="model")
    plan = get_plan(plan_name)
    principal = Principal(
        key_id=key_id,
        account_id=account_id,
        account_name=account_name,
        plan=plan.name,
        requests_per_minute=rpm or plan.requests_per_minute,
        tokens_per_minute=tpm or plan.tokens_per_minute,
        priority=plan.priority,
        allowed_models=tuple(allowed) if allowed is not None else None,
    )
    return VerifiedKey(principal, expires_at)


def revoke_key(db: Database, key_id: str, now: datetime | None = None) -> KeyInfo:
    """Revoke at once (idempotent: a second revoke keeps the first time)."""
    with db.write() as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            raise NotFoundError(f"No API key {key_id!r}", param="key_id")
        if key.revoked_at is None:
            key.revoked_at = now or utcnow()
        return _info(key)


def list_keys(db: Database, account: int | str | None = None) -> list[KeyInfo]:
    with db.read() as session:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if account is not None:
            query = query.where(ApiKey.account_id == find_account(session, account).id)
        return [_info(k) for k in session.scalars(query)]
