"""The walk every generation request shares, as steps a handler calls in order:

    reply = await start_reply(state, caller, model, prompts, params, body, ...)   # admitted, submitted
    if body.stream:
        return reply.stream(my_events(reply, ...))      # SSE: the handler's events, then [DONE]
    await reply.complete()                              # every output in, usage settled
    return JSONResponse(my_body(reply, ...))

An endpoint packs its start as `Started` (the reply, its whole body, its events) so that `respond` ends
an HTTP request and the batch runner (server/batches/runner.py) runs a line through the same steps:
`await reply.generated()` (every output in, not settled: the line's response is recorded first),
then `await reply.complete()` (settled).

A client that leaves before its answer gets nothing (status 499, `client_left`); its tokens so far are
billed all the same (generation.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from llmaas.engine.outputs import RequestOutput
from llmaas.engine.sampling_params import SamplingParams
from llmaas.errors import LlmaasError
from llmaas.server import responses as R
from llmaas.server.caller import Caller
from llmaas.server.errors import rename_param
from llmaas.server.generation import ClientDisconnected, EngineRun
from llmaas.server.protocol import _SamplingFields
from llmaas.server.registry import ServedModel
from llmaas.server.state import PromptSource, ServerState
from llmaas.server.streaming import DONE, SSEResponse, guarded

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response


@dataclass
class Reply:
    """One request's generation: its id (also the x-request-id header), when it was created, the
    service tier that serves it, and the engine run behind it."""

    run: EngineRun
    id: str
    created: int
    service_tier: str
    _watcher: asyncio.Task | None  # aborts the run when the client disconnects (None: a batch line)
    _stall_timeout_s: float

    def stream(self, events: AsyncIterator[str], done: str | None = DONE) -> SSEResponse:
        """Server-sent `events`, then `done`; an engine error mid-stream becomes an error event."""
        return SSEResponse(guarded(self.run, self._watcher, events, done), self.run, self._stall_timeout_s)

    async def generated(self) -> None:
        """Wait for every output, not yet settling (`complete` settles)."""
        try:
            async for _ in self.run.outputs():
                pass
        except BaseException:
            self._end()
            raise

    async def complete(self) -> None:
        """Wait for every output and settle the usage (a non-streamed response)."""
        try:
            await self.generated()
            await self.run.finish()
        finally:
            self._end()

    def _end(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.run.abort()  # a no-op once finished

    async def settle(self) -> dict[str, Any]:
        """Settle now (idempotent) and return the usage with its cost: a stream's final usage chunk."""
        await self.run.finish()
        return run_usage(self.run)


@dataclass
class Started:
    """An endpoint's request in the engine: its reply, its whole (non-streamed) body and its events."""

    reply: Reply
    whole: Callable[[], dict[str, Any]]
    events: Callable[[], AsyncIterator[str]]


async def respond(started: Started, stream: bool | None) -> Response:
    """The HTTP answer: the events as SSE, or the whole body once every output is in and settled."""
    if stream:
        return started.reply.stream(started.events())
    await started.reply.complete()
    return JSONResponse(started.whole())


async def start_reply(
    state: ServerState,
    caller: Caller,
    model: ServedModel,
    prompts: PromptSource,
    params: SamplingParams,
    body: _SamplingFields,
    *,
    endpoint: str,
    request_id: str,
    param_names: dict[str, str] | None = None,
) -> Reply:
    """Admit (rate limit, hold), tokenize and submit; returns once every prompt is in the engine.
    `param_names`: the endpoint's names for the engine's parameters (e.g. prompt -> messages)."""
    with params_named(param_names or {}):
        run, watcher = await state.start_run(
            caller, model, prompts, params, request_id, endpoint, body.user, every_step=bool(body.stream)
        )
    return Reply(run, request_id, R.now(), caller.service_tier, watcher, state.stream_stall_timeout_s)


async def client_left(request: Request, exc: ClientDisconnected) -> Response:
    """The exception handler for a client that left before its answer."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)


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
