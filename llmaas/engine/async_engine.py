"""AsyncEngine: runs the engine loop in a thread and streams each request's outputs to asyncio.

All engine state is touched only by the loop thread, which also builds the engine when given a
factory (`AsyncEngine.from_config`): torch's OpenMP keeps a worker pool per thread that ever ran a
parallel op, so a model loaded on another thread that stays alive leaves more OpenMP workers than
cores, and every op of the engine thread then pays a wake-up (measured: a batch-1 decode step
25 ms -> 31-41 ms). Callers talk to the loop through a command queue that it drains before every
step, so an add or an abort takes effect within one step and never waits behind a starving lock.
Outputs go back to each event loop once per step (one `call_soon_threadsafe` for all the requests of
a step, not one per request).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from llmaas.engine.llm_engine import EngineConfig, LLMEngine
from llmaas.engine.outputs import RequestOutput
from llmaas.engine.sampling_params import SamplingParams
from llmaas.errors import EngineOverloadedError, LlmaasError

log = logging.getLogger("llmaas.engine")

IDLE_WAIT_S = 0.5  # an idle loop re-checks for shutdown this often
_ACCEPTED = object()  # first item of a stream: the engine took the request


class EngineDeadError(LlmaasError):
    status_code = 500
    error_type = "server_error"
    code = "engine_error"


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_waiting: int = 256):
        """`engine`: an LLMEngine, or a function that builds one, called on the loop thread (preferred:
        see the module docstring). Returns once the engine is built; a build error is raised here."""
        self.engine: LLMEngine = None  # type: ignore[assignment]  # set below or by the loop thread
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # Deliveries of the current step, per event loop; sent in one hop by _flush.
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._closed = False  # set once the loop has ended: commands are refused from then on
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        build = engine if callable(engine) else (lambda: engine)
        self._thread = threading.Thread(target=self._run, args=(build,), name="llmaas-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error

    @classmethod
    def from_config(cls, config: EngineConfig, max_waiting: int = 256) -> AsyncEngine:
        """Load the model and build the engine on the loop thread."""
        return cls(lambda: LLMEngine(config), max_waiting=max_waiting)

    # ------------------------------------------------------------- loop thread
    def _run(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = build()
        except BaseException as exc:  # handed to the constructor
            self._build_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        finally:
            # Shutting down: run what was asked, then end every request with its tokens so far, so that
            # no caller waits forever.
            with self._lock:
                self._closed = True
            self._drain_commands()
            for rid in list(self.engine.requests):
                self._deliver(self.engine.abort_request(rid), rid)
            self._streams.clear()
            self._flush()

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_commands()
            if not self.engine.has_unfinished_requests():
                self._flush()
                self._wakeup.wait(timeout=IDLE_WAIT_S)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug: fail the requests in flight, keep serving new ones
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for out in outputs:
                self._deliver(out, out.request_id)
            self._flush()

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _deliver(self, item: RequestOutput | BaseException | object, request_id: str) -> None:
        """Queue `item` for the request's stream; the stream ends with a finished output or an error."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, BaseException) or (isinstance(item, RequestOutput) and item.finished):
            del self._streams[request_id]
        loop, q = stream
        self._pending.setdefault(loop, []).append((q, item))

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass

    def _fail_all(self, exc: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
            self._deliver(EngineDeadError(f"the engine failed while running this request: {exc}"), rid)
        self._flush()

    def _put(self, command: Callable[[], None]) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._commands.put(command)
        self._wakeup.set()
        return True

    def _submit(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()

        def command() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        if not self._put(command):
            future.set_exception(EngineDeadError("the engine is shut down"))
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

        Validation errors raise before the first yield. `abort(request_id)` ends the stream with the
        request's final output (finish_reason "abort", the tokens produced so far). Leaving the loop
        early (client gone) aborts the request in the engine.
        """
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def add() -> None:
            try:
                if self._stopping:
                    raise EngineDeadError("the engine is shutting down; retry shortly")
                if self.engine.num_waiting >= self.max_waiting:
                    raise EngineOverloadedError(
                        f"the waiting queue is full ({self.max_waiting} requests); retry shortly"
                    )
                self.engine.add_request(request_id, prompt, params, priority)
            except BaseException as exc:
                self._pending.setdefault(loop, []).append((q, exc))
            else:
                self._streams[request_id] = (loop, q)
                self._pending.setdefault(loop, []).append((q, _ACCEPTED))

        if not self._put(add):
            raise EngineDeadError("the engine is shut down")
        accepted = await q.get()
        if isinstance(accepted, BaseException):
            raise accepted
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    finished = True  # the engine already dropped it
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> Future:
        """Cancel a request: its stream ends with the final output (tokens so far), which the future
        also resolves to; None when the request had already finished."""

        def do_abort() -> RequestOutput | None:
            final = self.engine.abort_request(request_id)
            if final is not None:
                self._deliver(final, request_id)
            self._streams.pop(request_id, None)
            self._flush()
            return final

        return self._submit(do_abort)

    def call(self, fn: Callable[[LLMEngine], object]) -> Future:
        """Run fn(engine) on the loop thread (for stats and admin reads)."""
        return self._submit(lambda: fn(self.engine))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop; requests still running end with their tokens so far (finish_reason "abort")."""
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)
