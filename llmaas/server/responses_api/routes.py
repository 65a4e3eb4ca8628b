"""POST /v1/responses, GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items.

A response is generated as the chat completion it translates to (convert.py; chat.prepare_chat), so
templates, tools, JSON schemas, limits and billing are chat's own; the endpoint is recorded in the
ledger as "responses".
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from llmaas.errors import InvalidRequestError, LlmaasError
from llmaas.server.billing import PRINCIPAL
from llmaas.server.caller import http_caller
from llmaas.server.chat import prepare_chat
from llmaas.server.protocol import ERROR_RESPONSES
from llmaas.server.reply import run_usage, start_reply
from llmaas.server.request_ids import request_id_of
from llmaas.server.responses_api import convert
from llmaas.server.responses_api.events import response_events
from llmaas.server.responses_api.protocol import ResponseCreateRequest
from llmaas.server.responses_api.store import ResponseStore
from llmaas.server.state import ServerState
from llmaas.server.tools import parse_whole

router = APIRouter()

# Engine and chat parameters in this endpoint's words.
_NAMES = {"prompt": "input", "max_tokens": "max_output_tokens", "messages": "input"}


async def _owner(request: Request) -> int | None:
    """The account whose responses these are (None: a server without billing)."""
    billing = request.app.state.llmaas.billing
    if billing is None:
        return None
    return await asyncio.to_thread(billing.account_id, request.scope.get(PRINCIPAL))


def _store(request: Request) -> ResponseStore:
    return request.app.state.llmaas.responses


@router.post("/v1/responses", response_model=None, responses=ERROR_RESPONSES)
async def create_response(body: ResponseCreateRequest, request: Request) -> Response:
    state: ServerState = request.app.state.llmaas
    model = state.registry.get(body.model)
    items = convert.input_items(body)
    store = _store(request)
    owner = await _owner(request) if body.store is not False or body.previous_response_id else None
    # The chat request carries this turn's messages; the whole conversation (earlier turns read from the
    # store) is built where the prompt is rendered: in a worker thread, after the rate-limit slot.
    chat = convert.chat_request(body, convert.chat_messages(body.instructions, items))

    def conversation() -> list[dict[str, Any]]:
        earlier = store.history(body.previous_response_id, owner) if body.previous_response_id else []
        return convert.chat_messages(body.instructions, earlier + items)

    try:
        plan, params, render = prepare_chat(chat, model, _NAMES, conversation=conversation)
        caller = http_caller(request, body.service_tier, chat.request_id, chat.rid)
        request_id = request_id_of(request.scope, "resp")
        reply = await start_reply(
            state,
            caller,
            model,
            render,
            params,
            chat,
            endpoint="responses",
            request_id=request_id,
            param_names=_NAMES,
        )
    except LlmaasError as exc:
        raise convert.renamed(exc) from None
    snapshot = partial(convert.response_object, reply.id, reply.created, body, model.name)

    async def finish(response: dict[str, Any]) -> None:
        if body.store is not False:
            await asyncio.to_thread(store.save, reply.id, owner, body.previous_response_id, response, items)

    if body.stream:
        return reply.stream(
            response_events(reply, snapshot, plan.format if plan is not None else None, finish), done=None
        )
    await reply.complete()
    choice = reply.run.latest[0].outputs[0]
    content, calls = parse_whole(choice.text, plan.format) if plan is not None else (choice.text, [])
    status, incomplete = convert.status_of(choice.finish_reason)
    usage = run_usage(reply.run)
    response = snapshot(
        status=status,
        output=convert.output_items(content, calls, status),
        usage=convert.usage(usage),
        incomplete_details=incomplete,
    )
    await finish(response)
    return JSONResponse(response)


@router.get("/v1/responses/{response_id}", response_model=None, responses=ERROR_RESPONSES)
async def retrieve_response(response_id: str, request: Request) -> JSONResponse:
    owner = await _owner(request)
    record = await asyncio.to_thread(_store(request).load, response_id, owner)
    return JSONResponse(record.response)


@router.delete("/v1/responses/{response_id}", response_model=None, responses=ERROR_RESPONSES)
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    owner = await _owner(request)
    await asyncio.to_thread(_store(request).delete, response_id, owner)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.get("/v1/responses/{response_id}/input_items", response_model=None, responses=ERROR_RESPONSES)
async def list_input_items(
    response_id: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[str | None, Query(max_length=128)] = None,
) -> JSONResponse:
    """This response's own input items (not the earlier turns'), newest first unless order=asc."""
    owner = await _owner(request)
    record = await asyncio.to_thread(_store(request).load, response_id, owner)
    items = record.input_items if order == "asc" else list(reversed(record.input_items))
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidRequestError(
                f"'after': {after!r} is not an input item of this response", param="after"
            )
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return JSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )
