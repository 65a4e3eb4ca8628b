"""The billing tables (SQLAlchemy 2 ORM). Alembic migrations in migrations/versions create them.

Money columns are BigInteger micro-USD. Times are stored as naive UTC and read back as aware UTC,
the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator):
    """Aware UTC datetimes in Python, naive UTC in the database (portable across dialects)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("billing datetimes must be timezone-aware")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=timezone.utc)


MAX_CLIENT_REQUEST_ID = 512  # characters of a client's request id (OpenAI's limit for the header)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    plan: Mapped[str] = mapped_column(String(32))
    # Charges that no credit could cover (an under-estimated hold); paid first by the next credit.
    overdraft_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "key_" + hex, safe to show
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret
    display_prefix: Mapped[str] = mapped_column(String(16))  # "sk-ab12", never more
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # None: every model
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: the plan's
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Price(Base):
    """One version of a model's prices; the version in force is the latest effective_from <= now."""

    __tablename__ = "prices"
    __table_args__ = (UniqueConstraint("model", "effective_from"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    input_micros_per_m: Mapped[int] = mapped_column(BigInteger)
    cached_input_micros_per_m: Mapped[int] = mapped_column(BigInteger)
    output_micros_per_m: Mapped[int] = mapped_column(BigInteger)
    effective_from: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # What the batch, flex and priority tiers pay, in percent of the prices above (prices.TIERS). 0005.
    batch_percent: Mapped[int] = mapped_column(Integer, default=50)
    flex_percent: Mapped[int] = mapped_column(Integer, default=50)
    priority_percent: Mapped[int] = mapped_column(Integer, default=200)


class LedgerEntry(Base):
    """Append-only money movements: grant and top_up (positive), charge (negative).

    Credits also track `remaining_micros`: charges draw from the credits that expire first, so an
    expiring grant is used before a top-up and only its unused rest is lost when it expires.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (Index("ix_ledger_account_kind", "account_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    kind: Mapped[str] = mapped_column(String(16))  # grant | top_up | charge
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    remaining_micros: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # credits only
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)  # grants only
    request_id: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)  # charges
    note: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Hold(Base):
    __tablename__ = "holds"
    __table_args__ = (
        Index("ix_holds_account_status", "account_id", "status"),
        Index("ix_holds_status_expires", "status", "expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    model: Mapped[str] = mapped_column(String(128))
    price_id: Mapped[int] = mapped_column(ForeignKey("prices.id"))  # the version in force at admission
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | settled | released
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)  # server instance (its lease)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # The hold's deadline: admission or the last progress checkpoint + the hold TTL. Past it (or once its
    # owner's lease lapsed) any replica closes the hold (holds.py). None: a hold from before 0002.
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Tokens produced so far, checkpointed while the request runs, so a crash still bills them.
    progress_prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_cached_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # The client's own id for the request (X-Client-Request-Id), copied to its usage record. 0003.
    client_request_id: Mapped[str | None] = mapped_column(String(MAX_CLIENT_REQUEST_ID), nullable=True)
    # The tier it is billed at (prices.TIERS), copied to its usage record; None: default. 0005.
    service_tier: Mapped[str | None] = mapped_column(String(16), nullable=True)


class Instance(Base):
    """A server instance's lease: it holds its holds while `lease_until` is in the future.

    Renewed every few seconds by the instance's heartbeat (server/leases.py); ended at a clean exit.
    """

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # --instance-id, the holds' owner
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime)
    lease_until: Mapped[datetime] = mapped_column(UtcDateTime)


class UsageRecord(Base):
    """One row per billable request, never two: request_id is unique."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_account_minute", "account_id", "epoch_minute"),
        Index("ix_usage_minute", "epoch_minute"),
        Index("ix_usage_client_request_id", "client_request_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    model: Mapped[str] = mapped_column(String(128))
    endpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    price_id: Mapped[int] = mapped_column(ForeignKey("prices.id"))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cost_micros: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # completed | cancelled | failed | interrupted
    admitted_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime] = mapped_column(UtcDateTime)
    epoch_minute: Mapped[int] = mapped_column(BigInteger)  # finished_at // 60s, for portable bucketing
    # `request_id` is the response's id and x-request-id header; this is the client's own id for the
    # request (X-Client-Request-Id), when it sent one. 0003.
    client_request_id: Mapped[str | None] = mapped_column(String(MAX_CLIENT_REQUEST_ID), nullable=True)
    service_tier: Mapped[str | None] = mapped_column(String(16), nullable=True)  # None: default. 0005.


class StoredResponse(Base):
    """A response of /v1/responses kept for retrieval and for `previous_response_id` (store: true),
    readable only by its account, until `expires_at` (the server's retention setting). 0004."""

    __tablename__ = "stored_responses"
    __table_args__ = (Index("ix_stored_responses_expires", "expires_at"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # the response's id (resp-...)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    previous_response_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    response: Mapped[dict] = mapped_column(JSON)  # the response object as it was returned
    input_items: Mapped[list] = mapped_column(JSON)  # this turn's input items (not the earlier turns')


class StoredFile(Base):
    """An uploaded file (/v1/files) or a batch's output or error file: its bytes lie under the files
    directory (billing/files.py) named by `id`; readable only by its account. 0005."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # file-...
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))  # batch | batch_output | batch_error
    filename: Mapped[str] = mapped_column(String(256))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Batch(Base):
    """A batch (/v1/batches): its lines are rows of batch_lines; billing/batches.py moves it through
    OpenAI's statuses. 0005."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_status", "status"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # batch_...
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)  # billed under it
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    batch_metadata: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    errors: Mapped[list | None] = mapped_column(JSON, nullable=True)  # why validation failed
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    in_progress_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finalizing_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    expired_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    cancelling_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class BatchLine(Base):
    """One request of a batch. Its ledger request id is `{batch id}-{line}` (billing/batches.py), so the
    ledger's unique request_id bills it at most once whatever restarts. 0005.

    status: pending -> running (claimed by `claimed_by`) -> generated (its response recorded, not yet
    settled) -> succeeded; or failed (its error recorded), or cancelled / expired (never ran)."""

    __tablename__ = "batch_lines"
    __table_args__ = (
        UniqueConstraint("batch_id", "line"),
        Index("ix_batch_lines_batch_status", "batch_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"))
    line: Mapped[int] = mapped_column(Integer)  # 0-based line number in the input file
    custom_id: Mapped[str | None] = mapped_column(String(256), nullable=True)  # None: a line without one
    body: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the server instance
    response: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the endpoint's response body
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {"code", "message"}
