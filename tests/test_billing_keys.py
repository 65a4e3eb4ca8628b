"""Accounts, plans and keys: shown once, stored hashed, revocation and expiry at once, allow-lists."""

import logging
from datetime import datetime, timedelta, timezone

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import select, text

from llmaas.billing import (
    AuthenticationError,
    FreeGrant,
    ModelNotAllowedError,
    NotFoundError,
    balance,
    create_account,
    create_key,
    get_account,
    list_accounts,
    list_keys,
    open_database,
    revoke_key,
    set_plan,
    verify_key,
)
from llmaas.billing.db import MIGRATIONS_DIR
from llmaas.billing.keys import hash_key
from llmaas.billing.schema import ApiKey
from llmaas.errors import InvalidRequestError

pytest_plugins = ["tests.billing_services"]


def test_schema_migrates_once_and_reopens(db_url):
    first = open_database(db_url)
    create_account(first, "acme")
    first.close()
    again = open_database(db_url)  # upgrade to head is a no-op on a migrated database
    assert [a.name for a in list_accounts(again)] == ["acme"]
    with again.read() as session:
        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        assert session.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    again.close()


def test_sqlite_pragmas(tmp_path):
    db = open_database(f"sqlite:///{tmp_path / 'b.sqlite3'}")
    with db.read() as session:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
    db.close()
    with pytest.raises(ValueError):
        open_database("sqlite:///:memory:")


def test_new_account_gets_a_free_grant_and_a_plan(db):
    acme = create_account(db, "acme", plan="plus")
    assert get_account(db, "acme") == acme == get_account(db, acme.id)
    assert balance(db, "acme").available_micros == 1_000_000  # default free grant: $1
    create_account(db, "tiny", free_grant=FreeGrant(amount_micros=5, valid_for=None))
    assert balance(db, "tiny").available_micros == 5
    create_account(db, "none", free_grant=None)
    assert balance(db, "none").available_micros == 0
    with pytest.raises(InvalidRequestError) as info:
        create_account(db, "acme")
    assert info.value.param == "name"
    for bad_name in ("", "has space", "x" * 200, "../etc"):
        with pytest.raises(InvalidRequestError):
            create_account(db, bad_name)
    with pytest.raises(InvalidRequestError) as info:
        create_account(db, "gold", plan="gold")
    assert info.value.param == "plan"
    assert set_plan(db, "none", "plus").plan == "plus"
    with pytest.raises(NotFoundError):
        get_account(db, "ghost")


def test_free_grant_expires(db):
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    create_account(db, "trial", free_grant=FreeGrant(amount_micros=100, valid_for=timedelta(days=7)), now=t0)
    assert balance(db, "trial", now=t0 + timedelta(days=6)).available_micros == 100
    assert balance(db, "trial", now=t0 + timedelta(days=7)).available_micros == 0


def test_key_is_shown_once_and_stored_only_as_a_hash(db, caplog):
    create_account(db, "acme")
    caplog.set_level(logging.DEBUG)
    new = create_key(db, "acme", name="ci")
    secret = new.secret
    assert secret.startswith("sk-") and len(secret) >= 3 + 43  # 32 random bytes, base64url
    assert secret not in repr(new) and secret not in str(new.info)
    assert new.info.display_prefix == secret[:7]
    with db.read() as session:
        row = session.scalars(select(ApiKey)).one()
        stored = [str(getattr(row, c.key)) for c in ApiKey.__table__.columns]
    assert row.key_hash == hash_key(secret)
    assert not any(secret in value for value in stored)
    assert not any(secret in repr(k) for k in list_keys(db, "acme"))
    assert secret not in caplog.text
    assert create_key(db, "acme").secret != secret


def test_verify_key(db):
    create_account(db, "acme", plan="plus")
    new = create_key(db, "acme", tokens_per_minute=1234)
    who = verify_key(db, new.secret)
    assert (who.account_name, who.plan, who.key_id) == ("acme", "plus", new.info.id)
    assert (who.requests_per_minute, who.tokens_per_minute, who.priority) == (600, 1234, 10)
    for bad in (None, "", "Bearer x", "sk-" + "A" * 43, new.secret + "x"):
        with pytest.raises(AuthenticationError) as info:
            verify_key(db, bad)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert new.secret not in info.value.message


def test_revocation_is_effective_at_once(db):
    create_account(db, "acme")
    new = create_key(db, "acme")
    verify_key(db, new.secret)
    revoked = revoke_key(db, new.info.id)
    assert revoked.revoked_at is not None
    with pytest.raises(AuthenticationError, match="revoked") as info:
        verify_key(db, new.secret)
    assert new.secret not in info.value.message
    assert revoke_key(db, new.info.id).revoked_at == revoked.revoked_at  # idempotent
    with pytest.raises(NotFoundError):
        revoke_key(db, "key_nope")


def test_expiry(db):
    create_account(db, "acme")
    expires = datetime.now(timezone.utc) + timedelta(hours=1)
    new = create_key(db, "acme", expires_at=expires)
    verify_key(db, new.secret)
    with pytest.raises(AuthenticationError, match="expired"):
        verify_key(db, new.secret, now=expires)


def test_model_allow_list(db):
    create_account(db, "acme")
    new = create_key(db, "acme", allowed_models=["small", "tiny"])
    assert verify_key(db, new.secret, model="small").allowed_models == ("small", "tiny")
    with pytest.raises(ModelNotAllowedError) as info:
        verify_key(db, new.secret, model="large")
    assert info.value.status_code == 403 and info.value.param == "model"
    any_model = create_key(db, "acme")
    assert verify_key(db, any_model.secret, model="large").allowed_models is None
    with pytest.raises(InvalidRequestError):
        create_key(db, "acme", allowed_models="small")


def test_list_keys_per_account(db):
    create_account(db, "a")
    create_account(db, "b")
    ka, kb = create_key(db, "a"), create_key(db, "b")
    assert [k.id for k in list_keys(db, "a")] == [ka.info.id]
    assert {k.id for k in list_keys(db)} == {ka.info.id, kb.info.id}


def test_billing_imports_no_torch_engine_or_server():
    """design.md: billing never imports torch, engine or server. (The package root llmaas/__init__.py
    imports llmaas.engine.sampling_params, which is not billing's doing, so engine is checked in the
    sources.)"""
    import pathlib
    import re
    import subprocess
    import sys

    import llmaas.billing

    code = (
        "import sys, llmaas.billing, llmaas.billing.ratelimit_redis; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('llmaas.server')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    forbidden = re.compile(r"^\s*(from|import)\s+(torch|llmaas\.(engine|server|models))\b", re.M)
    for source in pathlib.Path(llmaas.billing.__file__).parent.rglob("*.py"):
        assert not forbidden.search(source.read_text()), source
