"""AsyncEngine: runs the engine loop in a thread and streams each request's outputs to asyncio.

All engine state is touched only by the loop thread. Callers talk to it through a command queue
that the loop drains before every step, so an add or an abort takes effect within one step and never
waits behind a starving lock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from llmaas.engine.llm_engine import LLMEngine
from llmaas.engine.outputs import RequestOutput
from llmaas.engine.sampling_params import SamplingParams
from llmaas.errors import EngineOverloadedError, LlmaasError

log = logging.getLogger("llmaas.engine")


class EngineDeadError(LlmaasError):
    status_code = 500
    error_type = "server_error"
    code = "engine_error"


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256):
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llmaas-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- loop thread
    def _loop(self) -> None:
        while not self._stopping:
            self._drain_commands()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug: fail the requests in flight, keep serving new ones
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for out in outputs:
                self._deliver(out)

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _deliver(self, out: RequestOutput | BaseException, request_id: str | None = None) -> None:
        rid = request_id or out.request_id  # type: ignore[union-attr]
        stream = self._streams.get(rid)
        if stream is None:
            return
        loop, q = stream
        if isinstance(out, BaseException) or out.finished:
            self._streams.pop(rid, None)
        loop.call_soon_threadsafe(q.put_nowait, out)

    def _fail_all(self, exc: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
            self._deliver(EngineDeadError(f"the engine failed while running this request: {exc}"), rid)

    def _submit(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        self._commands.put((fn, future))
        self._wakeup.set()
        return future

    # ----------------------------------------------------------------- callers
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput each step the request advances; the last one has finished=True.

        Validation errors raise before the first yield. Leaving the loop early (client gone)
        aborts the request in the engine.
        """
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def add() -> list[int]:
            if self.engine.num_waiting >= self.max_waiting:
                raise EngineOverloadedError(
                    f"the waiting queue is full ({self.max_waiting} requests); retry shortly"
                )
            ids = self.engine.add_request(request_id, prompt, params, priority)
            self._streams[request_id] = (loop, q)
            return ids

        await asyncio.wrap_future(self._submit(add))
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> Future:
        """Cancel a request; the future resolves to its final output (tokens so far) or None."""

        def do_abort() -> RequestOutput | None:
            self._streams.pop(request_id, None)
            return self.engine.abort_request(request_id)

        return self._submit(do_abort)

    def call(self, fn: Callable[[LLMEngine], object]) -> Future:
        """Run fn(engine) on the loop thread (for stats and admin reads)."""
        return self._submit(lambda: fn(self.engine))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)
