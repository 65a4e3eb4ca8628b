"""Opening the billing database: engine, sessions, and the schema migrated to head at start.

SQLite (the default, a file under LLMAAS_HOME) runs in WAL mode with foreign keys on, and every
write transaction starts with BEGIN IMMEDIATE: writers are serialized by SQLite's write lock from
their first statement, so a read-check-write (a hold against a balance) cannot interleave with
another. synchronous=NORMAL in WAL mode: a committed transaction survives a killed process; use
PostgreSQL where it must also survive a power cut. On PostgreSQL, writers lock the account row
(SELECT ... FOR UPDATE) instead; see credits.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from llmaas.paths import llmaas_home

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_READ_ONLY = "llmaas_billing_read_only"
_MIGRATION_LOCK_ID = 4_242_001  # a PostgreSQL advisory lock: replicas starting together migrate once


def default_database_url() -> str:
    return f"sqlite:///{llmaas_home() / 'billing.sqlite3'}"


@dataclass
class Database:
    engine: Engine
    _write_sessions: sessionmaker[Session]
    _read_sessions: sessionmaker[Session]

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in one write transaction: committed on success, rolled back on error."""
        with self._write_sessions.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries only (a plain deferred BEGIN on SQLite: it does not block writers)."""
        with self._read_sessions() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Leave transaction control to us (pysqlite would otherwise BEGIN lazily, and deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _migrate(engine: Engine) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_database(url: str | None = None, *, migrate: bool = True, echo: bool = False) -> Database:
    """Connect to `url` (default: SQLite under LLMAAS_HOME) and upgrade the schema to head."""
    url = url or default_database_url()
    if url.startswith("sqlite"):
        if url.rstrip("/").endswith(":memory:") or url in ("sqlite://", "sqlite:///"):
            raise ValueError("billing needs a SQLite file, not an in-memory database (one per connection)")
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine)
    else:
        engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)
    if migrate:
        _migrate(engine)
    read_engine = engine.execution_options(**{_READ_ONLY: True})
    return Database(
        engine=engine,
        _write_sessions=sessionmaker(engine, expire_on_commit=False),
        _read_sessions=sessionmaker(read_engine, expire_on_commit=False),
    )
