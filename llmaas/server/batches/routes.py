"""/v1/batches: create (from an uploaded file), retrieve, list, cancel. The lines run in the background
(runner.py); an account sees only its own batches."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from llmaas.billing.batches import (
    cancel_batch,
    check_metadata,
    create_batch,
    get_batch,
    list_batches,
    request_counts,
)
from llmaas.billing.schema import Batch
from llmaas.errors import InvalidRequestError
from llmaas.server.batches.input import read_lines
from llmaas.server.batches.runner import ENDPOINTS
from llmaas.server.billing import PRINCIPAL
from llmaas.server.files_api import account_of
from llmaas.server.protocol import ERROR_RESPONSES, Text, _Body

router = APIRouter()


class BatchCreate(_Body):
    input_file_id: Text = Field(max_length=64)
    endpoint: Text = Field(max_length=64)
    completion_window: Text = Field(max_length=16)
    metadata: dict[Text, Text] | None = Field(None, max_length=16)


def _epoch(value) -> int | None:
    return None if value is None else int(value.timestamp())


def batch_object(batch: Batch, counts: dict[str, int]) -> dict[str, Any]:
    # `expiring` (its window ran out, the lines still running finish) shows as OpenAI's `finalizing`.
    status = "finalizing" if batch.status == "expiring" else batch.status
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": _epoch(batch.created_at),
        "in_progress_at": _epoch(batch.in_progress_at),
        "expires_at": _epoch(batch.expires_at),
        "finalizing_at": _epoch(batch.finalizing_at),
        "completed_at": _epoch(batch.completed_at),
        "failed_at": _epoch(batch.failed_at),
        "expired_at": _epoch(batch.expired_at),
        "cancelling_at": _epoch(batch.cancelling_at),
        "cancelled_at": _epoch(batch.cancelled_at),
        "request_counts": counts,
        "metadata": batch.batch_metadata,
    }


def _with_counts(request: Request, batch: Batch) -> dict[str, Any]:
    return batch_object(batch, request_counts(request.app.state.llmaas.billing.db, batch.id))


@router.post("/v1/batches", response_model=None, responses=ERROR_RESPONSES)
async def create(body: BatchCreate, request: Request) -> JSONResponse:
    state = request.app.state.llmaas
    if body.endpoint not in ENDPOINTS:
        raise InvalidRequestError(
            f"'endpoint' must be one of {', '.join(ENDPOINTS)}, got {body.endpoint!r}", param="endpoint"
        )
    check_metadata(body.metadata)
    account = await account_of(request)
    principal = request.scope.get(PRINCIPAL)

    def run() -> dict[str, Any]:
        info, path = state.files.open(account, body.input_file_id, param="input_file_id")
        if info.purpose != "batch":
            raise InvalidRequestError(
                f"File {info.id} has purpose {info.purpose!r}; a batch's input file has purpose 'batch'",
                param="input_file_id",
            )
        lines = read_lines(path.read_bytes(), body.endpoint)
        batch = create_batch(
            state.billing.db,
            account,
            principal.key_id if principal is not None else None,
            body.endpoint,
            info.id,
            body.completion_window,
            body.metadata,
            lines,
        )
        return _with_counts(request, batch)

    created = await asyncio.to_thread(run)
    state.batches.wake.set()
    return JSONResponse(created)


@router.get("/v1/batches/{batch_id}", response_model=None, responses=ERROR_RESPONSES)
async def retrieve(batch_id: str, request: Request) -> JSONResponse:
    account = await account_of(request)
    db = request.app.state.llmaas.billing.db
    return JSONResponse(
        await asyncio.to_thread(lambda: _with_counts(request, get_batch(db, account, batch_id)))
    )


@router.get("/v1/batches", response_model=None, responses=ERROR_RESPONSES)
async def list_(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> JSONResponse:
    account = await account_of(request)
    db = request.app.state.llmaas.billing.db

    def run() -> dict[str, Any]:
        batches = list_batches(db, account, limit + 1, after)
        data = [_with_counts(request, b) for b in batches[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(batches) > limit,
        }

    return JSONResponse(await asyncio.to_thread(run))


@router.post("/v1/batches/{batch_id}/cancel", response_model=None, responses=ERROR_RESPONSES)
async def cancel(batch_id: str, request: Request) -> JSONResponse:
    account = await account_of(request)
    state = request.app.state.llmaas
    cancelled = await asyncio.to_thread(
        lambda: _with_counts(request, cancel_batch(state.billing.db, account, batch_id))
    )
    state.batches.wake.set()
    return JSONResponse(cancelled)
