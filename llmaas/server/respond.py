"""The walk every generation request shares (chat and completions): submit the engine requests, then
answer either as server-sent events or as one JSON body; a client that leaves gets nothing (499).

The endpoint supplies only what differs: how outputs become SSE events, the usage chunk, the body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from llmaas.engine.outputs import RequestOutput
from llmaas.engine.sampling_params import SamplingParams
from llmaas.errors import LlmaasError
from llmaas.server import responses as R
from llmaas.server.errors import rename_param
from llmaas.server.generation import ClientDisconnected, EngineRun
from llmaas.server.prompts import PromptSource
from llmaas.server.protocol import _SamplingFields
from llmaas.server.registry import ServedModel
from llmaas.server.request_ids import adopt_body_request_id, request_id_of
from llmaas.server.state import ServerState
from llmaas.server.streaming import event, guarded, sse_response

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response

Events = Callable[[EngineRun, str, int], AsyncIterator[str]]  # (run, id, created) -> SSE text
UsageChunk = Callable[[str, int, dict[str, Any]], dict[str, Any]]  # (id, created, usage) -> chunk
Body = Callable[[EngineRun, str, int], dict[str, Any]]  # (run, id, created) -> the JSON body


@contextmanager
def params_named(names: dict[str, str]) -> Iterator[None]:
    """Engine errors name the endpoint's parameter (e.g. prompt -> messages for chat)."""
    try:
        yield
    except LlmaasError as exc:
        raise rename_param(exc, names) from None


def wants_usage_chunk(body: _SamplingFields) -> bool:
    """stream_options.include_usage: a final chunk with the usage (and `"usage": null` in the others)."""
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def wants_continuous_usage(body: _SamplingFields) -> bool:
    """vLLM's stream_options.continuous_usage_stats (with include_usage, as vLLM reads it): every chunk
    carries the usage so far; the final usage chunk still comes, with the cost."""
    return wants_usage_chunk(body) and bool(body.stream_options.continuous_usage_stats)


def run_usage(run: EngineRun) -> dict[str, Any]:
    return R.usage(run.prompt_tokens, run.cached_tokens, run.completion_tokens, run.cost_micros)


def usage_so_far(run: EngineRun, sent: Iterable[RequestOutput | None]) -> dict[str, Any]:
    """The usage a stream has delivered: every prompt (known once the run started), the completion
    tokens of the outputs sent so far (the latest of each prompt; None: none yet). No cost: that is
    settled at the end and comes in the final usage chunk."""
    completion = sum(out.completion_tokens for out in sent if out is not None)
    return R.usage(run.prompt_tokens, run.cached_tokens, completion)


async def respond(
    request: Request,
    model: ServedModel,
    prompts: PromptSource,
    params: SamplingParams,
    body: _SamplingFields,
    *,
    endpoint: str,
    id_prefix: str,
    param_names: dict[str, str],
    events: Events,
    usage_chunk: UsageChunk,
    whole: Body,
) -> Response:
    """`body`: the request (for stream, stream_options and user); `whole` builds a non-streamed body."""
    state: ServerState = request.app.state.llmaas
    stream = bool(body.stream)
    request_id = request_id_of(request.scope, id_prefix)  # also the x-request-id header (request_ids.py)
    adopt_body_request_id(request.scope, body.request_id, body.rid)
    try:
        with params_named(param_names):
            run, watcher = await state.start_run(
                request,
                model,
                prompts,
                params,
                request_id,
                endpoint,
                body.user,
                every_step=stream,  # a whole response needs only the final output
            )
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    created = R.now()
    if stream:

        def final() -> str | None:
            if not wants_usage_chunk(body):
                return None
            return event(usage_chunk(request_id, created, run_usage(run)))

        body_events = guarded(run, watcher, events(run, request_id, created), final)
        return sse_response(body_events, run, state.stream_stall_timeout_s)
    try:
        async for _ in run.outputs():
            pass
        await run.finish()
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        watcher.cancel()
        run.abort()  # a no-op once finished
    return JSONResponse(whole(run, request_id, created))
