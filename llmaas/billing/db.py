"""Opening the billing database: engine, sessions, and the schema migrated to head at start.

SQLite (the default, a file under LLMAAS_HOME) runs in WAL mode with foreign keys on, and every
write transaction starts with BEGIN IMMEDIATE: writers are serialized by SQLite's write lock from
their first statement, so a read-check-write (a hold against a balance) cannot interleave with
another. On PostgreSQL, writers lock the account row (SELECT ... FOR UPDATE) instead; see credits.py.

Durability, chosen in the URL (the option is taken out before the driver sees the URL):

- SQLite `?synchronous=normal` (default): in WAL mode a commit is written to the WAL file before it
  returns but not fsynced, so a committed transaction survives `kill -9` of the server (the OS has the
  bytes) but not a power cut or kernel crash, which may lose the last commits. `?synchronous=full`
  fsyncs every commit (survives a power cut; each commit then costs a disk flush).
- PostgreSQL `?hold_commit=async` (default): a hold's transaction commits without waiting for its
  WAL flush (`synchronous_commit = off` for that transaction only). It is visible to every replica at
  once, like any commit; only a crash of the PostgreSQL server itself can lose the last holds, and
  settling then still bills the request from what admission returned (credits.settle). Settles, the
  ledger, always wait for the flush. `?hold_commit=sync` waits for holds too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from llmaas.paths import llmaas_home

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_READ_ONLY = "llmaas_billing_read_only"
_MIGRATION_LOCK_ID = 4_242_001  # a PostgreSQL advisory lock: replicas starting together migrate once


def default_database_url() -> str:
    return f"sqlite:///{llmaas_home() / 'billing.sqlite3'}"


class ThreadConnections:
    """SQLite: one driver connection per thread for the per-request statements (sql.py), kept open.

    Taking a connection from SQLAlchemy's pool and giving it back costs ~0.03-0.06 ms per transaction
    here, a tenth of a request's billing. Each is taken from the pool once (so db.py's connect-time
    PRAGMAs apply) and detached from it; `Database.close()` closes them all.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list = []

    def get(self, engine: Engine):
        connection = getattr(self._local, "connection", None)
        if connection is None:
            pooled = engine.raw_connection()
            connection = pooled.driver_connection
            pooled.detach()
            self._local.connection = connection
            with self._lock:
                self._open.append(connection)
        return connection

    def discard(self) -> None:
        """Close this thread's connection (after a failure that may have left it mid-transaction)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            self._local.connection = None
            with self._lock:
                self._open.remove(connection)
            connection.close()

    def close_all(self) -> None:
        with self._lock:
            for connection in self._open:
                connection.close()
            self._open.clear()
        self._local = threading.local()


SQLITE_SYNCHRONOUS = ("normal", "full")
HOLD_COMMITS = ("async", "sync")


@dataclass
class Database:
    engine: Engine
    _write_sessions: sessionmaker[Session]
    _read_sessions: sessionmaker[Session]
    durable_holds: bool = False  # PostgreSQL: wait for the WAL flush of hold transactions too
    thread_connections: ThreadConnections = field(default_factory=ThreadConnections)  # SQLite

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
        self.thread_connections.close_all()
        self.engine.dispose()


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Leave transaction control to us (pysqlite would otherwise BEGIN lazily, and deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
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
    """Connect to `url` (default: SQLite under LLMAAS_HOME) and upgrade the schema to head.

    Durability options in the URL's query (see the module docstring): SQLite `synchronous=normal|full`,
    PostgreSQL `hold_commit=async|sync`.
    """
    parsed = make_url(url or default_database_url())
    options = dict(parsed.query)
    synchronous = _option(options, "synchronous", SQLITE_SYNCHRONOUS, parsed.drivername, "sqlite")
    hold_commit = _option(options, "hold_commit", HOLD_COMMITS, parsed.drivername, "postgresql")
    parsed = parsed.set(query={k: v for k, v in options.items() if k not in ("synchronous", "hold_commit")})
    if parsed.drivername.startswith("sqlite"):
        if parsed.database in (None, "", ":memory:"):
            raise ValueError("billing needs a SQLite file, not an in-memory database (one per connection)")
        engine = create_engine(parsed, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine, synchronous or "normal")
    else:
        engine = create_engine(parsed, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)
    if migrate:
        _migrate(engine)
    read_engine = engine.execution_options(**{_READ_ONLY: True})
    return Database(
        engine=engine,
        _write_sessions=sessionmaker(engine, expire_on_commit=False),
        _read_sessions=sessionmaker(read_engine, expire_on_commit=False),
        durable_holds=hold_commit == "sync",
    )


def _option(options: dict, name: str, allowed: tuple[str, ...], driver: str, dialect: str) -> str | None:
    value = options.get(name)
    if value is None:
        return None
    if not driver.startswith(dialect):
        raise ValueError(f"the database URL option {name!r} is for {dialect} only")
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"the database URL option {name!r} must be one of {', '.join(allowed)}")
    return value.lower()
