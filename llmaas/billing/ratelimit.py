"""Per-key rate limits: requests and tokens per minute, as two token buckets.

Each bucket holds up to a minute's allowance and refills continuously at limit/60 per second, so a
key may burst its whole minute and then proceeds at the steady rate. `acquire` takes one request
and the request's estimated tokens from both buckets or from neither (or, in two steps, the request
before any work on the prompt and its tokens once they are counted: `requests=0` for the second);
`adjust` corrects the token bucket at settle by (actual - estimated) tokens, which may leave it below
zero for a while.

Two implementations behind one interface: InProcessRateLimiter (one server process) and
RedisRateLimiter (ratelimit_redis.py: several processes share the buckets). Both return a
RateLimitDecision carrying what the server needs: `headers` (x-ratelimit-*) for every response and,
when refused, RateLimitExceededError with Retry-After.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from llmaas.billing.errors import RateLimitExceededError
from llmaas.errors import InvalidRequestError


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1s', '6m0s'."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class RateLimitDecision:
    allowed: bool
    limit_requests: int
    remaining_requests: int
    reset_requests_s: float  # until the request bucket is full again
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float
    retry_after_s: float | None  # when refused: until both buckets can cover it; None if they never can
    refused_for_requests: bool = False  # refused because the request bucket was empty

    @property
    def headers(self) -> dict[str, str]:
        out = {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-requests": str(self.remaining_requests),
            "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
            "x-ratelimit-reset-requests": format_reset(self.reset_requests_s),
            "x-ratelimit-reset-tokens": format_reset(self.reset_tokens_s),
        }
        if not self.allowed and self.retry_after_s is not None:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
            out["retry-after-ms"] = str(math.ceil(self.retry_after_s * 1000))
        return out


def decide(
    allowed: bool,
    request_level: float,
    token_level: float,
    requests_per_minute: int,
    tokens_per_minute: int,
    tokens: int,
    requests: int = 1,
) -> RateLimitDecision:
    """A decision from bucket levels after the attempt (shared by both implementations)."""
    request_rate = requests_per_minute / 60.0
    token_rate = tokens_per_minute / 60.0
    retry: float | None = None
    if not allowed:
        if tokens > tokens_per_minute:
            retry = None  # larger than a whole minute's allowance: waiting cannot help
        else:
            retry = max(
                0.0,
                (requests - request_level) / request_rate,
                (tokens - token_level) / token_rate,
            )
    return RateLimitDecision(
        allowed=allowed,
        limit_requests=requests_per_minute,
        remaining_requests=max(0, math.floor(request_level)),
        reset_requests_s=max(0.0, (requests_per_minute - request_level) / request_rate),
        limit_tokens=tokens_per_minute,
        remaining_tokens=max(0, math.floor(token_level)),
        reset_tokens_s=max(0.0, (tokens_per_minute - token_level) / token_rate),
        retry_after_s=retry,
        refused_for_requests=not allowed and request_level < requests,
    )


def check_limits(requests_per_minute: int, tokens_per_minute: int, tokens: int, requests: int = 1) -> None:
    for value, param in (
        (requests_per_minute, "requests_per_minute"),
        (tokens_per_minute, "tokens_per_minute"),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidRequestError(f"'{param}' must be a positive integer", param=param)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise InvalidRequestError("'tokens' must be a non-negative integer", param="tokens")
    if requests not in (0, 1):
        raise InvalidRequestError("'requests' must be 0 or 1", param="requests")


def raise_if_refused(decision: RateLimitDecision) -> RateLimitDecision:
    if decision.allowed:
        return decision
    if decision.retry_after_s is None:
        message = (
            f"Request too large: it needs more tokens than this key's limit of "
            f"{decision.limit_tokens} tokens per minute."
        )
    elif decision.refused_for_requests:
        message = f"Rate limit reached: {decision.limit_requests} requests per minute."
    else:
        message = f"Rate limit reached: {decision.limit_tokens} tokens per minute."
    raise RateLimitExceededError(message, decision.headers, decision.retry_after_s)


class RateLimiter(Protocol):
    def acquire(
        self, key_id: str, requests_per_minute: int, tokens_per_minute: int, tokens: int, requests: int = 1
    ) -> RateLimitDecision:
        """Take `requests` (1, or 0 when the request was taken earlier) and `tokens` from the key's
        buckets, or refuse (raise RateLimitExceededError)."""
        ...

    def adjust(self, key_id: str, requests_per_minute: int, tokens_per_minute: int, token_delta: int) -> None:
        """Correct the token bucket by actual - estimated tokens (positive: more were used)."""
        ...

    def peek(self, key_id: str, requests_per_minute: int, tokens_per_minute: int) -> RateLimitDecision:
        """The buckets' state, taking nothing (the headers of a /v1 response that uses no quota)."""
        ...


@dataclass
class _Buckets:
    requests: float
    tokens: float
    at: float


class InProcessRateLimiter:
    """Token buckets in this process's memory, guarded by one lock."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Buckets] = {}

    def _refilled(self, key_id: str, rpm: int, tpm: int) -> _Buckets:
        now = self._clock()
        b = self._buckets.get(key_id)
        if b is None:
            b = self._buckets[key_id] = _Buckets(float(rpm), float(tpm), now)
        elapsed = max(0.0, now - b.at)
        b.requests = min(float(rpm), b.requests + elapsed * rpm / 60.0)
        b.tokens = min(float(tpm), b.tokens + elapsed * tpm / 60.0)
        b.at = now
        return b

    def acquire(
        self, key_id: str, requests_per_minute: int, tokens_per_minute: int, tokens: int, requests: int = 1
    ) -> RateLimitDecision:
        check_limits(requests_per_minute, tokens_per_minute, tokens, requests)
        with self._lock:
            b = self._refilled(key_id, requests_per_minute, tokens_per_minute)
            allowed = b.requests >= requests and b.tokens >= tokens
            if allowed:
                b.requests -= requests
                b.tokens -= tokens
            decision = decide(
                allowed, b.requests, b.tokens, requests_per_minute, tokens_per_minute, tokens, requests
            )
        return raise_if_refused(decision)

    def adjust(self, key_id: str, requests_per_minute: int, tokens_per_minute: int, token_delta: int) -> None:
        with self._lock:
            b = self._refilled(key_id, requests_per_minute, tokens_per_minute)
            b.tokens = min(float(tokens_per_minute), b.tokens - token_delta)

    def peek(self, key_id: str, requests_per_minute: int, tokens_per_minute: int) -> RateLimitDecision:
        check_limits(requests_per_minute, tokens_per_minute, 0)
        with self._lock:
            b = self._refilled(key_id, requests_per_minute, tokens_per_minute)
            return decide(True, b.requests, b.tokens, requests_per_minute, tokens_per_minute, 0)
