"""POST /v1/embeddings: texts or token ids -> vectors, billed per input token.

The walk, as for generation (design.md): body -> pydantic -> the model, which must be an embedding
model -> in one worker thread: one request from the rate limit, the inputs tokenized and checked
against the model's limit, their tokens from the rate limit and a hold of their cost (ServerBilling
begin + admit, the same calls a completion makes, with no completion tokens) -> the engine, which
batches this request's inputs with every other request's -> settle -> response. A request counts as
one sequence in flight for the plan's caps (its inputs run in shared forward passes, not as
sequences of their own); its tokens count in full.
"""

from __future__ import annotations

import base64
import logging
import time

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llmaas.billing.plans import get_plan
from llmaas.engine.async_embedding_engine import AsyncEmbeddingEngine
from llmaas.errors import InvalidRequestError
from llmaas.server import responses as R
from llmaas.server.billing import PRINCIPAL, RATE_HEADERS, Admission
from llmaas.server.caller import bearer_token
from llmaas.server.embeddings_protocol import EmbeddingList, EmbeddingRequest
from llmaas.server.generation import spawn
from llmaas.server.protocol import ERROR_RESPONSES
from llmaas.server.registry import EMBEDDINGS, ServedModel
from llmaas.server.request_ids import CLIENT_REQUEST_ID, adopt_body_request_id, request_id_of
from llmaas.server.state import ServerState, admit_in_thread
from llmaas.server.usage import EMBEDDINGS_ENDPOINT, RequestUsage

log = logging.getLogger("llmaas.server")

router = APIRouter()


def input_list(value: str | list) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids or a list of token-id lists -> inputs."""
    if isinstance(value, str):
        return [value]
    if isinstance(value[0], int):
        return [list(value)]
    return list(value)


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post(
    "/v1/embeddings", response_model=None, responses={200: {"model": EmbeddingList}, **ERROR_RESPONSES}
)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    state: ServerState = request.app.state.llmaas
    model = state.registry.get(body.model, EMBEDDINGS)
    embedder: AsyncEmbeddingEngine = model.engine
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise InvalidRequestError(
            f"The model '{model.name}' makes {embedder.dimensions}-dimension vectors and cannot shorten "
            f"them: 'dimensions' may only be {embedder.dimensions} (or left out).",
            param="dimensions",
            code="unsupported_parameter",
        )
    request_id = request_id_of(request.scope, "embd")
    adopt_body_request_id(request.scope, body.request_id)
    inputs = input_list(body.input)
    start = time.monotonic()
    admission, token_ids = await _admit(state, request, model, inputs, request_id)
    prompt_tokens = sum(len(ids) for ids in token_ids)
    try:
        vectors = await embedder.embed(token_ids, admission.priority if admission else 0)
    except BaseException:
        # Nothing was delivered: the hold is released, nothing is billed.
        spawn(_end(state, request, model, admission, request_id, body.user, 0, "rejected", start))
        raise
    cost = await _end(
        state, request, model, admission, request_id, body.user, prompt_tokens, "finished", start
    )
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    if cost is not None:
        usage["cost"] = R.cost_usd(cost)
    data = [
        {"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return JSONResponse({"object": "list", "data": data, "model": model.name, "usage": usage})


async def _admit(
    state: ServerState, request: Request, model: ServedModel, inputs: list[str | list[int]], request_id: str
) -> tuple[Admission | None, list[list[int]]]:
    """In one worker thread: the rate limit's request, the inputs' tokens (checked), the rate limit's
    tokens and the hold (as ServerState._admit does for a generation). A client gone meanwhile: what
    was admitted is released."""
    billing, embedder = state.billing, model.engine

    def admit() -> tuple[Admission | None, list[list[int]]]:
        if billing is None:
            return None, embedder.prepare(inputs)
        admission = billing.begin(
            request.scope.get(PRINCIPAL), model.name, request_id, request.scope.get(CLIENT_REQUEST_ID)
        )
        request.scope[RATE_HEADERS] = admission.headers  # a refusal from here on still shows them
        token_ids = embedder.prepare(inputs)
        tokens = sum(len(ids) for ids in token_ids)
        if admission.principal is not None:
            plan = get_plan(admission.principal.plan)
            if tokens > plan.max_tokens_in_flight:
                raise InvalidRequestError(
                    f"This request has {tokens} input tokens; the {plan.name} plan allows "
                    f"{plan.max_tokens_in_flight} tokens in flight. Send fewer inputs per request.",
                    param="input",
                )
        billing.admit(admission, model.name, tokens, 0, sequences=1)
        request.scope[RATE_HEADERS] = admission.headers
        return admission, token_ids

    async def release(admission: Admission | None) -> None:
        await _end(state, request, model, admission, request_id, None, 0, "rejected", time.monotonic())

    return await admit_in_thread(admit, release)


async def _end(
    state: ServerState,
    request: Request,
    model: ServedModel,
    admission: Admission | None,
    request_id: str,
    user: str | None,
    prompt_tokens: int,
    status: str,
    start: float,
) -> int | None:
    """Count the request, then settle (finished) or release (rejected) its hold (ServerState.settle).
    Returns the cost in micro-USD when billed. A finished request that cannot be settled is a 503."""
    state.metrics.requests.inc(model=model.name, endpoint=EMBEDDINGS_ENDPOINT, status=status)
    state.metrics.prompt_tokens.inc(prompt_tokens, model=model.name)
    state.metrics.e2e.observe(time.monotonic() - start, model=model.name)
    record = RequestUsage(
        request_id=request_id,
        model=model.name,
        endpoint=EMBEDDINGS_ENDPOINT,
        prompt_tokens=prompt_tokens,
        cached_tokens=0,
        completion_tokens=0,
        status=status,
        finish_reasons=(),
        user=user,
        api_key=bearer_token(request),
        client_request_id=request.scope.get(CLIENT_REQUEST_ID),
    )
    return await state.settle(admission, record)
