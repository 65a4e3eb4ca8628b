"""The engine requests behind one HTTP request, read as one stream, with abort-on-disconnect.

One engine request per prompt (completions may carry several). Each is pumped by its own task into
one queue, so a cancelled HTTP handler never cancels `AsyncEngine.generate` itself. Aborting submits
the engine aborts; each engine stream then ends with the request's final output (the tokens produced
so far), which the pumps record, and only when all pumps are done is usage reported (billing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from llmaas.engine.async_engine import AsyncEngine
from llmaas.engine.outputs import RequestOutput
from llmaas.engine.sampling_params import SamplingParams
from llmaas.errors import LlmaasError

log = logging.getLogger("llmaas.server")

_ABORTED = object()
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
        scoring_only: bool = False,
    ):
        self.engine = engine
        # Scoring a prompt (completions' max_tokens=0 + echo): the one token the engine samples is
        # neither returned nor counted.
        self.scoring_only = scoring_only
        self.priority = priority
        self.cost_micros: int | None = None  # set by billing when the request is settled
        self.params = params
        self.request_ids = (
            [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        )
        self.latest: list[RequestOutput | None] = [None] * len(prompts)
        self.done = [False] * len(prompts)
        self.start_time = time.monotonic()
        self.first_token_time: float | None = None
        self.end_time: float | None = None
        self.status: str | None = None  # set once: finished, aborted, rejected (never ran) or failed
        self._on_end = on_end
        self._queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._started = [loop.create_future() for _ in prompts]
        self._pumps = [
            loop.create_task(self._pump(i, prompt, rid))
            for i, (prompt, rid) in enumerate(zip(prompts, self.request_ids))
        ]

    async def _pump(self, index: int, prompt: str | list[int], request_id: str) -> None:
        started = self._started[index]
        try:
            async for out in self.engine.generate(
                prompt, self.params, request_id=request_id, priority=self.priority
            ):
                if not started.done():
                    started.set_result(None)
                self.latest[index] = out
                self._queue.put_nowait((index, out))
        except asyncio.CancelledError:  # the event loop is closing
            if not started.done():
                started.set_exception(ClientDisconnected())
                started.exception()
            self._queue.put_nowait((None, _ABORTED))
            raise
        except Exception as exc:
            if not started.done():
                started.set_exception(exc)
                started.exception()  # mark retrieved: start() may have stopped waiting already
            self._queue.put_nowait((index, exc))

    async def start(self) -> None:
        """Wait until every engine request was accepted and produced its first output.

        Validation and overload errors raise here, before any response byte is sent.
        """
        try:
            for started in self._started:
                await asyncio.shield(started)
        except LlmaasError:
            self.abort("rejected")  # stops the prompts that were accepted; usage is still reported
            raise
        except BaseException:
            self.abort("failed" if self._started_error() is not None else "aborted")
            raise
        if self.status is not None:  # the client left while we waited
            raise ClientDisconnected()

    def _started_error(self) -> BaseException | None:
        for started in self._started:
            if started.done() and not started.cancelled() and started.exception() is not None:
                return started.exception()
        return None

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) per engine step, until all are finished."""
        while not all(self.done):
            index, item = await self._queue.get()
            if item is _ABORTED:
                raise ClientDisconnected()
            if isinstance(item, BaseException):
                self.abort("failed")
                raise item
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
            if not self.done[i]:
                self.engine.abort(request_id)
        self._queue.put_nowait((None, _ABORTED))
        spawn(self._report_abort(status))

    async def _report_abort(self, status: str) -> None:
        await asyncio.gather(*self._pumps, return_exceptions=True)  # each ends with its final output
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
        if self.scoring_only:
            return 0
        return sum(o.completion_tokens for o in self.latest if o is not None)

    @property
    def finish_reasons(self) -> tuple[str | None, ...]:
        reasons = tuple(c.finish_reason for o in self.latest if o is not None for c in o.outputs)
        if self.scoring_only:
            return tuple(None if r is None else "length" for r in reasons)
        return reasons


async def watch_disconnect(receive: Callable[[], Awaitable[dict]], run: EngineRun) -> None:
    """Abort `run` when the client goes away. Cancel this task once the response is complete."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            run.abort()
            return
