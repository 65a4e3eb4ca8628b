"""Plain SQL on the driver's own connection, for the statements every request runs.

The per-request path (key lookup, hold, settle) is a handful of small statements; through the ORM they
cost ~10 ms of Python per request on this machine, through the driver ~0.02 ms each. So that path is
written here as plain SQL against the same tables, on connections of the same engine (the connect-time
PRAGMAs of db.py apply: on SQLite one kept per thread, on PostgreSQL the pool's), while everything else
keeps the ORM.

SQL is written once with `:name` parameters (sqlite3's named style) and rewritten to psycopg's
`%(name)s` for PostgreSQL. Datetimes are stored exactly as the ORM's UtcDateTime stores them: naive
UTC, which on SQLite is the text 'YYYY-MM-DD HH:MM:SS.ffffff' (string order = time order).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from llmaas.billing.db import Database

_NAMED = re.compile(r"(?<![:\w]):(\w+)")


@lru_cache(maxsize=256)
def _pyformat(sql: str) -> str:
    return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))


class Transaction:
    """One transaction on a driver connection: `one`, `all` and `run` take `:name` SQL."""

    def __init__(self, connection, postgres: bool):
        self.connection = connection
        self.postgres = postgres
        self.cursor = connection.cursor()

    def _execute(self, sql: str, params: dict[str, Any]):
        self.cursor.execute(_pyformat(sql) if self.postgres else sql, params)
        return self.cursor

    def one(self, sql: str, **params) -> tuple | None:
        return self._execute(sql, params).fetchone()

    def all(self, sql: str, **params) -> list[tuple]:
        return self._execute(sql, params).fetchall()

    def named(self, sql: str, **params) -> dict[str, Any] | None:
        """The first row as {column name: value} (names from the SELECT's aliases), or None."""
        cursor = self._execute(sql, params)
        row = cursor.fetchone()
        return None if row is None else dict(zip((d[0] for d in cursor.description), row))

    def named_all(self, sql: str, **params) -> list[dict[str, Any]]:
        cursor = self._execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def run(self, sql: str, **params) -> int:
        return self._execute(sql, params).rowcount

    def time(self, value: datetime) -> Any:
        """A parameter for a UtcDateTime column."""
        naive = value.astimezone(timezone.utc).replace(tzinfo=None)
        return naive if self.postgres else naive.isoformat(" ", "microseconds")


def read_time(value: Any) -> datetime | None:
    """A UtcDateTime column's value as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


@contextmanager
def transaction(db: Database, *, write: bool, synchronous: bool = True) -> Iterator[Transaction]:
    """A driver-level transaction, committed on success and rolled back on error.

    SQLite: `BEGIN IMMEDIATE` for a write (the database's write lock from the first statement, as in
    db.py), a deferred `BEGIN` for a read. PostgreSQL: the driver begins implicitly; `synchronous=False`
    commits this one transaction without waiting for its WAL flush (`SET LOCAL synchronous_commit`).
    """
    postgres = db.dialect == "postgresql"
    if postgres:
        pooled = db.engine.raw_connection()
        driver = pooled.driver_connection
    else:
        pooled, driver = None, db.thread_connections.get(db.engine)
    try:
        tx = Transaction(driver, postgres)
        if not postgres:
            tx.cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        elif not synchronous:
            tx.cursor.execute("SET LOCAL synchronous_commit = off")
        try:
            yield tx
        except BaseException:
            if postgres:
                if not driver.closed:
                    driver.rollback()
            elif driver.in_transaction:  # SQLite may have rolled back itself (e.g. a failed COMMIT)
                tx.cursor.execute("ROLLBACK")
            raise
        if postgres:
            driver.commit()
        else:
            tx.cursor.execute("COMMIT")
    except BaseException:
        if postgres and driver.closed:
            pooled.invalidate()  # a lost connection must not go back to the pool
        elif not postgres and driver.in_transaction:
            db.thread_connections.discard()  # wedged mid-transaction: start this thread afresh
        raise
    finally:
        if pooled is not None:
            pooled.close()  # back to the pool (a no-op after invalidate)
