"""AsyncEmbeddingEngine: one thread runs the encoder for every request; asyncio callers await vectors.

Concurrent requests share forward passes: each step the loop thread takes inputs from every waiting
request, one input per request in turn (higher priority first, then arrival), until the step's token
budget is full, then runs them as one packed forward pass (EmbeddingEngine). A request with thousands
of inputs thus spreads over several steps and a one-sentence request that arrives meanwhile rides in
the next step instead of waiting behind it. The model is built and run on this one thread for the
reason AsyncEngine gives (torch's OpenMP pools per thread).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from llmaas.engine.async_engine import IDLE_WAIT_S, EngineDeadError
from llmaas.engine.embedding_engine import EmbeddingEngine
from llmaas.engine.engine_thread import start_engine_thread
from llmaas.engine.llm_engine import EngineConfig
from llmaas.errors import EngineOverloadedError

log = logging.getLogger("llmaas.engine")


class _Job:
    """One request's inputs; `vectors` fills as its inputs are run."""

    def __init__(self, inputs: list[list[int]], priority: int, order: int, loop, future: asyncio.Future):
        self.inputs, self.priority, self.order = inputs, priority, order
        self.loop, self.future = loop, future
        self.next = 0  # the first input not yet scheduled
        self.left = len(inputs)  # inputs not yet embedded
        self.vectors: torch.Tensor | None = None

    def deliver(self, result: torch.Tensor | BaseException) -> None:
        def settle() -> None:
            if self.future.done():  # the caller stopped waiting
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # that event loop is closed: nobody is listening
            pass


class AsyncEmbeddingEngine:
    def __init__(self, engine: EmbeddingEngine | Callable[[], EmbeddingEngine], max_waiting: int = 256):
        """`engine`, or a function that builds it on the loop thread (preferred). Returns once built; a
        build error is raised here. More than `max_waiting` requests queued: 503 (EngineOverloadedError)."""
        self.max_waiting = max_waiting
        self._incoming: queue.SimpleQueue[_Job | Callable[[], None]] = queue.SimpleQueue()
        self._jobs: list[_Job] = []  # loop thread only
        self._queued = 0  # jobs submitted and not finished (any thread; under _lock)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._order = itertools.count()
        self._stopping = False
        build = engine if callable(engine) else (lambda: engine)
        self._thread, self.engine = start_engine_thread(build, self._serve, "llmaas-embeddings")

    @classmethod
    def from_config(cls, config: EngineConfig, max_waiting: int = 256) -> AsyncEmbeddingEngine:
        return cls(lambda: EmbeddingEngine(config), max_waiting=max_waiting)

    @property
    def system_fingerprint(self) -> str:
        return self.engine.system_fingerprint

    @property
    def dimensions(self) -> int:
        return self.engine.dimensions

    def describe(self) -> dict[str, int | str]:
        """What the model is and costs to run (/v1/models metadata): family, parameters, dimensions."""
        e = self.engine
        return {"family": e.model_config.family, **e.model_report.as_dict(), "dimensions": e.dimensions}

    def prepare(self, inputs: list[str | list[int]]) -> list[list[int]]:
        """Texts or token ids -> the ids `embed` takes (EmbeddingEngine.prepare; thread-safe, CPU work:
        call it from a worker thread)."""
        return self.engine.prepare(inputs)

    # ------------------------------------------------------------- loop thread
    def _serve(self, engine: EmbeddingEngine) -> None:
        self.engine = engine
        try:
            while not self._stopping:
                self._take_incoming()
                if not self._jobs:
                    self._wakeup.wait(IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                self._step()
        finally:
            self._take_incoming()
            for job in self._jobs:
                job.deliver(EngineDeadError("the embedding engine shut down before this request finished"))
            self._jobs.clear()

    def _take_incoming(self) -> None:
        while True:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job):
                self._jobs.append(item)
            else:
                item()

    def _schedule(self) -> list[tuple[_Job, int]]:
        """(job, input index) pairs for one forward pass: one input per job in turn within the budget."""
        budget = self.engine.max_batch_tokens
        jobs = sorted(
            (j for j in self._jobs if not j.future.cancelled()), key=lambda j: (-j.priority, j.order)
        )
        chosen: list[tuple[_Job, int]] = []
        while jobs:
            still = []
            for job in jobs:
                size = len(job.inputs[job.next])
                if size > budget:
                    continue
                chosen.append((job, job.next))
                budget -= size
                job.next += 1
                if job.next < len(job.inputs):
                    still.append(job)
            jobs = still if budget > 0 else []
        return chosen

    def _step(self) -> None:
        chosen = self._schedule()
        try:
            vectors = self.engine.embed([job.inputs[i] for job, i in chosen]) if chosen else None
        except Exception as exc:  # a bug or a device error: fail this step's requests, keep serving
            log.exception("embedding forward failed")
            failed = {id(job): job for job, _ in chosen}
            for job in failed.values():
                job.deliver(
                    EngineDeadError(f"the embedding engine failed ({type(exc).__name__}: {exc})"[:300])
                )
            self._finish(set(failed))
            return
        done = set()
        for row, (job, i) in enumerate(chosen):
            if job.vectors is None:
                job.vectors = torch.empty(len(job.inputs), vectors.shape[1], dtype=vectors.dtype)
            job.vectors[i] = vectors[row]
            job.left -= 1
            if job.left == 0:
                job.deliver(job.vectors)
                done.add(id(job))
        cancelled = {id(j) for j in self._jobs if j.future.cancelled()}
        self._finish(done | cancelled)

    def _finish(self, job_ids: set[int]) -> None:
        if not job_ids:
            return
        self._jobs = [j for j in self._jobs if id(j) not in job_ids]
        with self._lock:
            self._queued -= len(job_ids)

    # ----------------------------------------------------------------- callers
    async def embed(self, inputs: list[list[int]], priority: int = 0) -> torch.Tensor:
        """[len(inputs), dimensions] fp32 vectors of token-id inputs (each already framed and checked
        by the engine's `frame`/`tokenize` and `check_input`). Cancelling drops the request's inputs
        that have not run yet."""
        if not inputs:
            raise ValueError("no inputs")
        for ids in inputs:
            self.engine.check_input(ids)  # so that every input fits a step's token budget
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._stopping:
                raise EngineDeadError("the embedding engine is shutting down; retry shortly")
            if self._queued >= self.max_waiting:
                raise EngineOverloadedError(
                    f"the waiting queue is full ({self.max_waiting} requests); retry shortly"
                )
            self._queued += 1
            self._incoming.put(_Job(inputs, priority, next(self._order), loop, future))
        self._wakeup.set()
        return await future

    def call(self, fn: Callable[[EmbeddingEngine], object]) -> Future:
        """Run fn(engine) on the loop thread (stats)."""
        result: Future = Future()

        def command() -> None:
            try:
                result.set_result(fn(self.engine))
            except BaseException as exc:
                result.set_exception(exc)

        self._incoming.put(command)
        self._wakeup.set()
        return result

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)
