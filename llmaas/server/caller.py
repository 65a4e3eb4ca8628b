"""Who a run is for, as a plain object: what admission, billing and the engine need to know of the HTTP
request (`http_caller`) or of a batch line (server/batches/runner.py), so both walk the same path
(ServerState.start_run) without a batch line pretending to be an HTTP request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from llmaas.billing import Principal
from llmaas.errors import InvalidRequestError
from llmaas.server.billing import PRINCIPAL
from llmaas.server.request_ids import CLIENT_REQUEST_ID, adopt_body_request_id

# What `service_tier` may ask for on a request; `auto` is served as `default`. `batch` is the Batch API's.
REQUESTABLE_TIERS = ("auto", "default", "flex", "priority")


@dataclass
class Caller:
    principal: Principal | None  # None: --no-auth (billed to the default account)
    client_request_id: str | None  # the client's own id for the request, kept on the hold and record
    service_tier: str = "default"  # default | flex | priority | batch: its price and engine priority
    # Returns once the caller has gone (the client disconnected): the run is then aborted. None: never.
    gone: Callable[[], Awaitable[None]] | None = None
    # Where admission leaves the rate-limit headers: the ASGI scope, whose BillingMiddleware sends them.
    scope: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)  # the bearer token, for a billing hook
    # An HTTP client gets its tokens as they are made, so a run cut short is billed for them (and they
    # are checkpointed on the hold while it runs). A batch line delivers only its whole response: a run
    # cut short delivered nothing, its hold is released, and the line runs again (batches/runner.py).
    billed_in_part: bool = True
    # A batch line runs without the key's rate and in-flight limits (the batch runner sets its pace).
    rate_limited: bool = True


def service_tier(value: str | None) -> str:
    """The tier a request asked for (None and `auto`: default); anything else is a 400 naming it."""
    if value in (None, "auto", "default"):
        return "default"
    if value not in REQUESTABLE_TIERS:
        raise InvalidRequestError(
            f"'service_tier' must be one of {', '.join(REQUESTABLE_TIERS)}, got {value!r}",
            param="service_tier",
        )
    return value


def bearer_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def http_caller(request: Request, tier: str | None, *body_request_ids: str | None) -> Caller:
    """The caller behind an HTTP request. `body_request_ids`: vLLM's `request_id` / SGLang's `rid`,
    which name the request when no X-Client-Request-Id header did."""
    scope = request.scope
    adopt_body_request_id(scope, *body_request_ids)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return Caller(
        principal=scope.get(PRINCIPAL),
        client_request_id=scope.get(CLIENT_REQUEST_ID),
        service_tier=service_tier(tier),
        gone=disconnected,
        scope=scope,
        api_key=bearer_token(request),
    )
