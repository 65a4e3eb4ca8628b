"""AsyncEngine: runs the engine loop in a thread and streams each request's outputs to asyncio.

All engine state is touched only by the loop thread, which also builds the engine when given a
factory (`AsyncEngine.from_config`): torch's OpenMP keeps a worker pool per thread that ever ran a
parallel op, so a model loaded on another thread that stays alive leaves more OpenMP workers than
cores, and every op of the engine thread then pays a wake-up (measured: a batch-1 decode step
25 ms -> 31-41 ms). Callers talk to the loop through a command queue that it drains before every
step, so an add or an abort takes effect within one step and never waits behind a starving lock.
Outputs go back to each event loop once per step (one `call_soon_threadsafe` for all the requests of
a step, not one per request), straight to each request's callback (`submit`), or through a queue
(`generate`).

A structured request (params.structured) has its grammar compiled by `submit` before the add command
is queued, in the compiler's worker threads (cached, time-limited): the engine loop never waits for a
compile, and a schema it cannot enforce is refused from `submit` like any invalid parameter.

A request that fails in the engine ends with its final RequestOutput, `error` set and its tokens so
far (see llm_engine.py): `generate` yields it like any last output, so callers check `out.error`. A
step that raises as a whole (a bug outside the runner) ends every request in flight that way too;
only if even that fails does a request get an EngineDeadError instead of an output.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future

from llmaas.engine.engine_thread import start_engine_thread
from llmaas.engine.llm_engine import EngineConfig, LLMEngine
from llmaas.engine.outputs import RequestOutput
from llmaas.engine.sampling_params import SamplingParams
from llmaas.errors import EngineOverloadedError, LlmaasError

log = logging.getLogger("llmaas.engine")

IDLE_WAIT_S = 0.5  # an idle loop re-checks for shutdown this often

OnOutput = Callable[[RequestOutput | BaseException], None]


class EngineDeadError(LlmaasError):
    status_code = 500
    error_type = "server_error"
    code = "engine_error"


def _call_all(calls: list[tuple[Callable[[object], None], object]]) -> None:
    for fn, arg in calls:
        try:
            fn(arg)
        except Exception:  # one caller's bug must not cost the others their outputs
            log.exception("output callback failed")


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller stopped waiting (cancelled)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _Stream:
    __slots__ = ("loop", "on_output", "every_step", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_output: OnOutput, every_step: bool):
        self.loop, self.on_output, self.every_step, self.sent = loop, on_output, every_step, False


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_waiting: int = 256):
        """`engine`: an LLMEngine, or a function that builds one, called on the loop thread (preferred:
        see the module docstring). Returns once the engine is built; a build error is raised here."""
        self.engine: LLMEngine = None  # type: ignore[assignment]  # set below or by the loop thread
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        # Calls for the current step, per event loop; sent in one hop by _flush.
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[object], None], object]]] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._closed = False  # set once the loop has ended: commands are refused from then on
        self._lock = threading.Lock()
        build = engine if callable(engine) else (lambda: engine)
        self._thread, self.engine = start_engine_thread(build, self._serve, "llmaas-engine")

    @classmethod
    def from_config(cls, config: EngineConfig, max_waiting: int = 256) -> AsyncEngine:
        """Load the model and build the engine on the loop thread."""
        return cls(lambda: LLMEngine(config), max_waiting=max_waiting)

    # ------------------------------------------------------------- loop thread
    def _serve(self, engine: LLMEngine) -> None:
        self.engine = engine  # before the loop: it may run before the constructor has returned
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

    def _later(self, loop: asyncio.AbstractEventLoop, fn: Callable[[object], None], arg: object) -> None:
        """fn(arg) on `loop`, with the rest of this step's calls."""
        self._pending.setdefault(loop, []).append((fn, arg))

    def _deliver(self, item: RequestOutput | BaseException, request_id: str) -> None:
        """Hand `item` to the request's callback; the last one is a finished output or an error."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._streams[request_id]
        elif stream.sent and not stream.every_step:
            return  # only the first and the last output are wanted
        stream.sent = True
        self._later(stream.loop, stream.on_output, item)

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, calls in pending.items():
            try:
                loop.call_soon_threadsafe(_call_all, calls)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass

    def _fail_all(self, exc: Exception) -> None:
        """The step failed outside the runner: end every request in flight with its tokens so far."""
        message = f"the engine failed while running this request ({type(exc).__name__}: {str(exc)[:200]})"
        try:
            outputs = self.engine.fail_requests(dict.fromkeys(self.engine.requests, message))
        except Exception:
            log.exception("failing the requests in flight failed")
            outputs = []
        for out in outputs:
            self._deliver(out, out.request_id)
        for rid in list(self._streams):  # ending it failed too: no caller may wait forever
            self._deliver(EngineDeadError(message), rid)
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
    async def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None,
        request_id: str,
        on_output: OnOutput,
        *,
        priority: int = 0,
        every_step: bool = True,
    ) -> None:
        """Queue a request; returns once the engine accepted it (a validation or overload error raises
        here). `on_output(item)` is then called on this event loop with the request's outputs, each step
        (`every_step`) or only the first and the last, and exactly once with a terminal item: the
        finished output, or an exception (also when the request was refused). `abort(request_id)` makes
        the finished output (finish_reason "abort", the tokens so far) come at once."""
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        grammar = None
        if params is not None and params.structured is not None:
            try:
                grammar = await self.engine.grammars.compile_async(params.structured)
            except Exception as exc:
                on_output(exc)
                raise

        def add() -> None:
            try:
                if self._stopping:
                    raise EngineDeadError("the engine is shutting down; retry shortly")
                if self.engine.num_waiting >= self.max_waiting:
                    raise EngineOverloadedError(
                        f"the waiting queue is full ({self.max_waiting} requests); retry shortly"
                    )
                self.engine.add_request(request_id, prompt, params, priority, grammar=grammar)
            except BaseException as exc:
                self._later(loop, on_output, exc)
                self._later(loop, lambda error: _settle(accepted, error), exc)
            else:
                self._streams[request_id] = _Stream(loop, on_output, every_step)
                self._later(loop, lambda _: _settle(accepted, None), None)

        if not self._put(add):
            error = EngineDeadError("the engine is shut down")
            on_output(error)
            raise error
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been added meanwhile
            raise

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
        q: asyncio.Queue = asyncio.Queue()
        await self.submit(prompt, params, request_id, q.put_nowait, priority=priority)
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

    # ------------------------------------------- the model's text side, for any thread
    # The tokenizer and the window are fixed once the engine is built, so these run in the caller's
    # thread (the server's worker threads), never queued behind engine steps.
    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (None: it has none)."""
        return self.engine.tokenizer.chat_template

    def render_chat(
        self, messages: list[dict], tools: list[dict] | None = None, variables: dict | None = None
    ) -> str:
        return self.engine.render_chat(messages, tools, variables)

    @functools.lru_cache(maxsize=64)  # noqa: B019 (a handful of marker texts per model)
    def special_token_id(self, text: str) -> int | None:
        """The id of `text` when it is one special token for the grammar matcher (a tool-call
        format's marker such as "[TOOL_CALLS]"), else None (GrammarCompiler.special_token_id)."""
        return self.engine.grammars.special_token_id(text)

    def tokenize(self, prompts: Sequence[str | list[int]], params: SamplingParams) -> list[list[int]]:
        """Token ids of each prompt (texts tokenized, id lists checked), each checked against the context
        window with `params.max_tokens`: the engine's own rule (LLMEngine.tokenize_prompt and
        resolve_max_tokens), so a request refused here would be refused by `submit` too. 400s name
        `prompt` or `max_tokens`."""
        token_ids = []
        for prompt in prompts:
            ids = self.engine.tokenize_prompt(prompt)
            self.engine.resolve_max_tokens(len(ids), params)
            token_ids.append(ids)
        return token_ids

    def resolve_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """The completion tokens a prompt may get: max_tokens, or the rest of the context window."""
        return self.engine.resolve_max_tokens(num_prompt_tokens, params)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.engine.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one engine per served model, alive as long as it)
    def token_text(self, token_id: int) -> str:
        """One token's text, as logprobs show it (cached: logprobs ask for the same ids again and again)."""
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def token_bytes(self, token_id: int) -> list[int]:
        return list(self.engine.tokenizer.token_bytes(token_id))

    def describe(self) -> dict:
        """What the model costs to run: its family, total and active parameters, KV bytes per token."""
        return {"family": self.engine.model_config.family, **self.engine.model_report.as_dict()}

    @property
    def system_fingerprint(self) -> str:
        """The model build and engine configuration this engine runs (engine/fingerprint.py)."""
        return self.engine.system_fingerprint

    def call(self, fn: Callable[[LLMEngine], object]) -> Future:
        """Run fn(engine) on the loop thread (for stats and admin reads)."""
        return self._submit(lambda: fn(self.engine))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop; requests still running end with their tokens so far (finish_reason "abort")."""
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)
