"""Progress checkpoints: a running request's tokens so far, written to its hold every few seconds.

If the server dies mid-request, whichever replica closes the expired hold bills it at its last
checkpoint (billing/holds.py), so a crash loses at most one interval of delivered tokens: by default
5 seconds or 256 completion tokens of the request, whichever comes first.

The check runs on the event loop for every engine output of the request and costs a clock read and a
comparison; the write goes to a worker thread of the server's own checkpoint pool (not the default
executor that admissions use), at most one in flight per request (an output that
arrives while one is in flight is skipped: the next one after it completes carries the newer count).
Nothing here blocks the event loop or the engine, and a failed write is logged, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

from llmaas.errors import InvalidRequestError

log = logging.getLogger("llmaas.server")

MAX_PROGRESS_INTERVAL_S = 3600.0
MAX_PROGRESS_INTERVAL_TOKENS = 1_000_000


@dataclass(frozen=True)
class ProgressPolicy:
    """Checkpoint every `every_s` seconds or `every_tokens` completion tokens, whichever comes first."""

    every_s: float = 5.0
    every_tokens: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.every_s, bool) or not 0.05 <= self.every_s <= MAX_PROGRESS_INTERVAL_S:
            raise InvalidRequestError(
                f"'progress_interval_s' must be between 0.05 and {MAX_PROGRESS_INTERVAL_S:.0f}",
                param="progress_interval_s",
            )
        if (
            isinstance(self.every_tokens, bool)
            or not isinstance(self.every_tokens, int)
            or not 1 <= self.every_tokens <= MAX_PROGRESS_INTERVAL_TOKENS
        ):
            raise InvalidRequestError(
                f"'progress_interval_tokens' must be between 1 and {MAX_PROGRESS_INTERVAL_TOKENS}",
                param="progress_interval_tokens",
            )


class TokenCounts(Protocol):
    """What a checkpoint reads: the request's totals so far (EngineRun has them)."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


class ProgressCheckpoint:
    """One request's checkpoints; call it with the run after each engine output, `close()` at the end."""

    def __init__(
        self,
        write: Callable[[str, int, int, int], object],
        request_id: str,
        policy: ProgressPolicy,
        clock: Callable[[], float] = time.monotonic,
        executor: Executor | None = None,
    ):
        """`executor`: where the writes run (None: the loop's default executor). The server gives its own,
        so that slow ledger writes queue among themselves, never ahead of other requests' admissions."""
        self._write = write  # (request_id, prompt, cached, completion), blocking: run in a thread
        self.request_id = request_id
        self.policy = policy
        self._clock = clock
        self._executor = executor
        self._last_at = clock()
        self._last_tokens = 0
        self._in_flight = False
        self._closed = False
        self.writes = 0  # checkpoints written (for tests and metrics)

    def __call__(self, run: TokenCounts) -> None:
        if self._in_flight or self._closed:
            return
        try:
            tokens = run.completion_tokens
            now = self._clock()
            if tokens <= self._last_tokens:
                return  # nothing new to record
            due = tokens - self._last_tokens >= self.policy.every_tokens
            if not due and now - self._last_at < self.policy.every_s:
                return
            self._in_flight = True
            self._last_at, self._last_tokens = now, tokens
            counts = (run.prompt_tokens, run.cached_tokens, tokens)
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, self._write, self.request_id, *counts
            )
            future.add_done_callback(self._written)
        except Exception:  # a checkpoint must never break the request's stream
            self._in_flight = False
            log.exception("progress checkpoint of %s failed", self.request_id)

    def _written(self, future: asyncio.Future) -> None:
        self._in_flight = False
        if future.cancelled():
            return
        if future.exception() is not None:
            log.warning("progress checkpoint of %s failed: %r", self.request_id, future.exception())
        else:
            self.writes += 1

    def close(self) -> None:
        """The request ended (it is being settled): no more checkpoints."""
        self._closed = True
