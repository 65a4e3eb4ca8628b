"""The seam billing plugs into: one RequestUsage per HTTP request, reported when it ends.

Reported for every request that reached the engine: finished, aborted (client gone; the tokens
produced until the abort are counted) or failed. Billing turns the counts into money; the server
knows nothing of prices.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

EMBEDDINGS_ENDPOINT = "embeddings"  # usage reports show these apart from completions


@dataclass(frozen=True)
class RequestUsage:
    request_id: str
    model: str
    endpoint: str  # "chat.completions", "completions" or EMBEDDINGS_ENDPOINT
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served by the prefix cache
    completion_tokens: int
    status: str  # "finished", "aborted" (client gone), "rejected" (400/503 before any work) or "failed"
    finish_reasons: tuple[str | None, ...]  # per choice: "stop", "length", "abort", ...
    user: str | None = None
    # The bearer token the request carried, for a billing hook to resolve; kept out of the repr so that
    # logging a RequestUsage never writes a key to a log.
    api_key: str | None = field(default=None, repr=False)
    client_request_id: str | None = None  # the client's own id (X-Client-Request-Id); request_id is ours
    service_tier: str = "default"  # default | flex | priority | batch


# A plain function or a coroutine function; awaited before the response completes when possible.
BillingHook = Callable[[RequestUsage], Awaitable[None] | None]
