"""What each account has in flight: sequences and tokens of requests admitted and not yet finished.

The plan caps both (plans.Plan.max_sequences_in_flight / max_tokens_in_flight) so that one tenant
cannot fill the shared engine's batch and KV cache. `acquire` records one request or refuses it with
429 `concurrency_limit_exceeded`; `release` forgets it and is idempotent (a request is counted once and
released at most once, whichever of finish / abort / failure / a later admission error comes first).

Every entry carries a deadline (`ttl_s` after it was taken): a replica that crashes never releases its
requests, so their entries expire instead of blocking the account forever. A request that outlives the
deadline simply stops counting - the cap is then soft for it, which costs fairness a little for a while,
never correctness. Expired entries are dropped at the next acquire, release or read of the account.

Two implementations behind one interface, like the rate limits: InProcessInFlight (one server process)
and RedisInFlight (inflight_redis.py: replicas share the counts).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

from llmaas.errors import LlmaasError

DEFAULT_TTL_S = 900.0  # longer than any normal request: 8k tokens at a slow 10 tok/s is ~14 min
RETRY_AFTER_S = 1  # in-flight work ends at an unknown time; a short wait is the honest hint


class ConcurrencyLimitExceededError(LlmaasError):
    """Too many sequences or tokens in flight for the account's plan -> 429 with Retry-After."""

    status_code = 429
    error_type = "requests"
    code = "concurrency_limit_exceeded"

    def __init__(self, message: str):
        super().__init__(message)
        self.headers = {"retry-after": str(RETRY_AFTER_S), "retry-after-ms": str(RETRY_AFTER_S * 1000)}


@dataclass(frozen=True)
class InFlight:
    sequences: int
    tokens: int


def refuse(in_flight: InFlight, sequences: int, tokens: int, max_sequences: int, max_tokens: int) -> None:
    """Raise the 429 when adding (sequences, tokens) would exceed either cap (shared by both stores)."""
    if in_flight.sequences + sequences > max_sequences:
        raise ConcurrencyLimitExceededError(
            f"Concurrency limit reached: this account has {in_flight.sequences} sequences in flight and "
            f"its plan allows {max_sequences}; this request needs {sequences}. Retry when one finishes."
        )
    if in_flight.tokens + tokens > max_tokens:
        raise ConcurrencyLimitExceededError(
            f"Concurrency limit reached: this account has {in_flight.tokens} tokens in flight and its "
            f"plan allows {max_tokens}; this request needs up to {tokens}. Retry when one finishes."
        )


class InFlightLimiter(Protocol):
    def acquire(
        self, account: str, request_id: str, sequences: int, tokens: int, max_sequences: int, max_tokens: int
    ) -> InFlight:
        """Count the request, or raise ConcurrencyLimitExceededError counting nothing. Returns the
        account's totals including it. Taking a request id already counted is a no-op."""
        ...

    def release(self, account: str, request_id: str) -> bool:
        """Stop counting the request; False when it was not counted (released already, or expired)."""
        ...

    def usage(self, account: str) -> InFlight:
        """The account's live totals (expired entries dropped)."""
        ...


@dataclass
class _Entry:
    sequences: int
    tokens: int
    deadline: float


class InProcessInFlight:
    """Entries in this process's memory, guarded by one lock."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._accounts: dict[str, dict[str, _Entry]] = {}

    def _live(self, account: str) -> dict[str, _Entry]:
        now = self._clock()
        entries = self._accounts.get(account, {})
        for request_id in [r for r, e in entries.items() if e.deadline <= now]:
            del entries[request_id]
        return entries

    @staticmethod
    def _total(entries: dict[str, _Entry]) -> InFlight:
        return InFlight(sum(e.sequences for e in entries.values()), sum(e.tokens for e in entries.values()))

    def acquire(
        self, account: str, request_id: str, sequences: int, tokens: int, max_sequences: int, max_tokens: int
    ) -> InFlight:
        with self._lock:
            entries = self._live(account)
            if request_id not in entries:
                refuse(self._total(entries), sequences, tokens, max_sequences, max_tokens)
                entries[request_id] = _Entry(sequences, tokens, self._clock() + self.ttl_s)
                self._accounts[account] = entries
            return self._total(entries)

    def release(self, account: str, request_id: str) -> bool:
        with self._lock:
            entries = self._live(account)
            released = entries.pop(request_id, None) is not None
            if not entries:
                self._accounts.pop(account, None)
            return released

    def usage(self, account: str) -> InFlight:
        with self._lock:
            return self._total(self._live(account))
