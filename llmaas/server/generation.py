"""The engine requests behind one HTTP request, read as one stream, with abort-on-disconnect.

One engine request per prompt (completions may carry several). The engine thread hands each
request's outputs straight to `EngineRun._on_output` on the event loop, which queues them for the
handler; nothing the handler does (it may be cancelled when the client leaves) can lose them.
Aborting submits the engine aborts; each engine request then ends with its final output (the tokens
produced so far), and once all have ended usage is reported (billing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial

from llmaas.engine.async_engine import AsyncEngine
from llmaas.engine.outputs import RequestFailedError, RequestOutput
from llmaas.engine.sampling_params import SamplingParams
from llmaas.errors import LlmaasError

log = logging.getLogger("llmaas.server")

_ABORTED = object()
# Outputs a stream may hold that its client has not taken yet (one per engine step). A client that
# reads nothing is aborted after the stall timeout (streaming.py); this bounds the memory before that
# on an engine faster than MAX_BUFFERED_OUTPUTS / timeout steps per second.
MAX_BUFFERED_OUTPUTS = 1024
_background: set[asyncio.Task] = set()  # strong references to fire-and-forget tasks


def spawn(coro: Awaitable) -> asyncio.Task:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


class ClientDisconnected(Exception):
    pass


class EngineRun:
    def __init__(
        self,
        engine: AsyncEngine,
        prompts: Sequence[str | list[int]],
        params: SamplingParams,
        request_id: str,
        on_end: Callable[[EngineRun, str], Awaitable[None]],
        priority: int = 0,
        every_step: bool = True,
        on_progress: Callable[[EngineRun], None] | None = None,
    ):
        """`every_step=False` (a non-streaming response): only the first and the final output of each
        prompt come back from the engine thread, not one per step. `on_progress(run)`: called on the
        event loop after each output that did not end its prompt (billing's checkpoints: it must not
        block)."""
        self._on_progress = on_progress
        self.engine = engine
        self.prompts = list(prompts)
        self.priority = priority
        self.every_step = every_step
        self.cost_micros: int | None = None  # set by billing when the request is settled
        self.params = params
        self.request_ids = (
            [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        )
        self.latest: list[RequestOutput | None] = [None] * len(prompts)
        self.done = [False] * len(prompts)  # the handler has seen the finished output
        self.start_time = time.monotonic()
        self.first_token_time: float | None = None
        self.end_time: float | None = None
        self.status: str | None = None  # set once: finished, aborted, rejected (never ran) or failed
        self._on_end = on_end
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = [False] * len(prompts)  # the engine is done with it (finished, aborted or refused)
        self._all_ended = asyncio.get_running_loop().create_future()

    def _on_output(self, index: int, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput):
            self.latest[index] = item
            ended = item.finished
        else:
            ended = True
        if ended:
            self._ended[index] = True
            if all(self._ended) and not self._all_ended.done():
                self._all_ended.set_result(None)
        self._queue.put_nowait((index, item))
        if not ended and self._on_progress is not None:
            self._on_progress(self)
        if self._queue.qsize() > MAX_BUFFERED_OUTPUTS and self.status is None:
            log.warning(
                "%s: %d outputs unread by the client; aborted", self.request_ids[0], self._queue.qsize()
            )
            self.abort()  # billed for the tokens so far, like a disconnect

    async def start(self) -> None:
        """Submit every prompt; returns once the engine accepted them all.

        Validation and overload errors raise here, before any response byte is sent.
        """
        submits = [
            self.engine.submit(
                prompt,
                self.params,
                request_id,
                partial(self._on_output, i),
                priority=self.priority,
                every_step=self.every_step,
            )
            for i, (prompt, request_id) in enumerate(zip(self.prompts, self.request_ids))
        ]
        try:
            if len(submits) == 1:
                await submits[0]
            else:
                await asyncio.gather(*submits)
        except LlmaasError:
            self.abort("rejected")  # stops the prompts that were accepted; usage is still reported
            raise
        except BaseException as exc:
            self.abort("aborted" if isinstance(exc, asyncio.CancelledError) else "failed")
            raise
        if self.status is not None:  # the client left while we waited
            raise ClientDisconnected()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) per engine step, until all are finished."""
        while not all(self.done):
            index, item = await self._queue.get()
            if item is _ABORTED:
                raise ClientDisconnected()
            if isinstance(item, BaseException):
                self.abort("failed")
                raise item
            if item.error is not None:  # failed in the engine; `latest` holds its tokens so far for usage
                self.abort("failed")
                raise RequestFailedError(item.error)
            if self.first_token_time is None and item.completion_tokens:
                self.first_token_time = time.monotonic()
            if item.finished:
                self.done[index] = True
            yield index, item

    async def finish(self) -> None:
        """The normal end: report usage (awaited, so billing settles before the response ends)."""
        if self.status is None:
            self.status = "finished"
            self.end_time = time.monotonic()
            await self._on_end(self, self.status)

    def abort(self, status: str = "aborted") -> None:
        """Stop the engine requests now; usage (tokens so far) is reported in the background once
        their final outputs are in.

        Synchronous on purpose: it is called from `finally` blocks inside cancelled scopes.
        """
        if self.status is not None:
            return
        self.status = status
        self.end_time = time.monotonic()
        for i, request_id in enumerate(self.request_ids):
            if not self._ended[i]:
                self.engine.abort(request_id)
        self._queue.put_nowait((None, _ABORTED))
        spawn(self._report_abort(status))

    async def _report_abort(self, status: str) -> None:
        await self._all_ended  # every engine request ends with its final output (or its error)
        try:
            await self._on_end(self, status)
        except Exception:
            log.exception("usage report failed for an aborted request")

    # ------------------------------------------------------------------ totals
    @property
    def prompt_tokens(self) -> int:
        return sum(o.prompt_tokens for o in self.latest if o is not None)

    @property
    def cached_tokens(self) -> int:
        return sum(o.cached_tokens for o in self.latest if o is not None)

    @property
    def completion_tokens(self) -> int:
        return sum(o.completion_tokens for o in self.latest if o is not None)

    @property
    def finish_reasons(self) -> tuple[str | None, ...]:
        return tuple(c.finish_reason for o in self.latest if o is not None for c in o.outputs)


async def abort_when_gone(gone: Callable[[], Awaitable[None]], run: EngineRun) -> None:
    """Abort `run` once `gone()` returns (its client went away). Cancel this task once the response is
    complete."""
    await gone()
    run.abort()
