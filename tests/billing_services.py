"""Fixtures for the billing tests: a fresh billing database on SQLite and on PostgreSQL, and Redis.

PostgreSQL: one database `llmaas_test_<random>` per test run (dropped at the end), emptied between
tests. Redis: one key prefix per test run. When a service is unreachable its tests skip and say why;
with LLMAAS_REQUIRE_SERVICES=1 (CI) they fail instead. Used via `pytest_plugins` in the test modules.
"""

from __future__ import annotations

import os
import secrets

import pytest

from llmaas.billing.db import open_database

POSTGRES_URLS = (
    [os.environ["LLMAAS_TEST_POSTGRES_URL"]]
    if os.environ.get("LLMAAS_TEST_POSTGRES_URL")
    else ["postgresql://postgres@127.0.0.1:5432/test", "postgresql://root@127.0.0.1:5432/test"]
)
REDIS_URL = os.environ.get("LLMAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TABLES = (
    "batch_lines, batches, files, usage_records, holds, instances, ledger_entries, prices, api_keys, accounts"
)


def unavailable(reason: str):
    if os.environ.get("LLMAAS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (LLMAAS_REQUIRE_SERVICES=1 forbids skipping)")
    pytest.skip(reason)


def _postgres_admin():
    import psycopg

    errors = []
    for url in POSTGRES_URLS:
        try:
            return url, psycopg.connect(url, autocommit=True, connect_timeout=3)
        except psycopg.Error as exc:
            errors.append(f"{url.split('@')[-1]}: {str(exc).strip().splitlines()[0]}")
    return None, "; ".join(errors)


@pytest.fixture(scope="session")
def postgres_url():
    """A database created for this test run, as a SQLAlchemy URL; dropped afterwards."""
    admin_url, admin = _postgres_admin()
    if admin_url is None:
        unavailable(f"PostgreSQL unreachable ({admin})")
    name = f"llmaas_test_{secrets.token_hex(6)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    open_database(url).close()  # migrate once
    yield url
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    url = request.getfixturevalue("postgres_url")
    database = open_database(url, migrate=False)
    with database.engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    database.close()
    return url


@pytest.fixture
def db(db_url):
    database = open_database(db_url)
    yield database
    database.close()


@pytest.fixture(scope="session")
def redis_prefix():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis unreachable at {REDIS_URL} ({exc})")
    prefix = f"llmaas_test_{secrets.token_hex(6)}:"
    yield prefix
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    client.close()
