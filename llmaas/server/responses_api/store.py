"""Stored responses (/v1/responses with store: true): kept in the billing database under the account
that made them, until the retention runs out; an account can read, chain from or delete only its own
(another's id answers exactly as an unknown id does: not found).

A server without billing (an embedded test app) keeps them in process memory instead, bounded.
Every method blocks (database I/O): callers run them in a worker thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, select

from llmaas.billing.db import Database
from llmaas.billing.schema import StoredResponse
from llmaas.errors import InvalidRequestError, NotFoundError

DEFAULT_RETENTION_S = 30 * 86_400  # OpenAI keeps responses 30 days
MAX_RETENTION_S = 3650 * 86_400
MAX_IN_MEMORY = 10_000
MAX_CHAIN = 1_000  # previous_response_id hops one request may follow
PURGE_BATCH = 500  # expired rows deleted per save: the table never grows past what retention allows


@dataclass
class Stored:
    id: str
    owner: int | None  # the account id (None: a server without billing)
    created_at: datetime
    expires_at: datetime
    previous_response_id: str | None
    response: dict[str, Any]
    input_items: list[dict[str, Any]]


def not_found(response_id: str, param: str | None = None) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id}' not found.", param=param)


class ResponseStore:
    def __init__(self, db: Database | None, retention_s: float = DEFAULT_RETENTION_S):
        if not 0 < retention_s <= MAX_RETENTION_S:
            raise InvalidRequestError(
                f"response retention must be more than 0 and at most {MAX_RETENTION_S // 86_400} days",
                param="response-retention-days",
            )
        self.db, self.retention = db, timedelta(seconds=retention_s)
        self._memory: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- writes
    def save(
        self,
        response_id: str,
        owner: int | None,
        previous_response_id: str | None,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
    ) -> None:
        now = datetime.now(timezone.utc)
        record = Stored(
            response_id, owner, now, now + self.retention, previous_response_id, response, input_items
        )
        if self.db is None:
            with self._lock:
                self._memory[response_id] = record
                while len(self._memory) > MAX_IN_MEMORY:
                    self._memory.popitem(last=False)
            return
        with self.db.write() as session:
            expired = select(StoredResponse.id).where(StoredResponse.expires_at < now).limit(PURGE_BATCH)
            session.execute(delete(StoredResponse).where(StoredResponse.id.in_(expired)))
            session.add(
                StoredResponse(
                    id=response_id,
                    account_id=owner,
                    created_at=now,
                    expires_at=record.expires_at,
                    previous_response_id=previous_response_id,
                    response=response,
                    input_items=input_items,
                )
            )

    def delete(self, response_id: str, owner: int | None) -> None:
        self.load(response_id, owner)  # not found (or another's) -> 404
        if self.db is None:
            with self._lock:
                self._memory.pop(response_id, None)
            return
        with self.db.write() as session:
            session.execute(delete(StoredResponse).where(StoredResponse.id == response_id))

    # -------------------------------------------------------------------------------------- reads
    def load(self, response_id: str, owner: int | None, param: str | None = None) -> Stored:
        now = datetime.now(timezone.utc)
        if self.db is None:
            with self._lock:
                record = self._memory.get(response_id)
        else:
            with self.db.read() as session:
                row = session.get(StoredResponse, response_id)
                record = (
                    None
                    if row is None
                    else Stored(
                        row.id,
                        row.account_id,
                        row.created_at,
                        row.expires_at,
                        row.previous_response_id,
                        row.response,
                        row.input_items,
                    )
                )
        if record is None or record.owner != owner or record.expires_at <= now:
            raise not_found(response_id, param)
        return record

    def history(self, response_id: str, owner: int | None) -> list[dict[str, Any]]:
        """The conversation up to and including `response_id`: every turn's input items and output
        items, oldest first (previous_response_id)."""
        turns: list[Stored] = []
        seen: set[str] = set()
        current: str | None = response_id
        while current is not None:
            if len(turns) >= MAX_CHAIN or current in seen:
                raise InvalidRequestError(
                    f"the conversation behind '{response_id}' is longer than {MAX_CHAIN} responses",
                    param="previous_response_id",
                )
            seen.add(current)
            try:
                record = self.load(current, owner)
            except NotFoundError:
                if current == response_id:
                    raise InvalidRequestError(
                        f"Previous response with id '{response_id}' not found.",
                        param="previous_response_id",
                        code="previous_response_not_found",
                    ) from None
                raise InvalidRequestError(
                    f"an earlier response of this conversation ('{current}') has expired or was deleted",
                    param="previous_response_id",
                    code="previous_response_not_found",
                ) from None
            turns.append(record)
            current = record.previous_response_id
        items: list[dict[str, Any]] = []
        for record in reversed(turns):
            items.extend(record.input_items)
            items.extend(record.response.get("output", []))
        return items
