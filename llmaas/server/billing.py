"""Billing around every request: auth, rate limit and hold at admission, settle at the end.

The walk (design.md): bearer -> `verify_key` (BillingMiddleware, every /v1 path) -> after tokenizing,
`limiter.acquire` + `hold_for_request` (ServerBilling.admit) -> engine, with the plan's priority ->
`settle` (ServerBilling.finish, through the BillingHook seam, before the last byte / [DONE]) ->
`usage.cost` in the response. Every database call is synchronous and runs in a worker thread.

`--no-auth` (auth=False): no key is asked for; everything is billed to the `default` account, with
no rate limit (a local operator does not rate-limit themself). A model with no price in force is
refused (400 price_not_set); `llmaas serve` sets a default price for each served model that has none
at start (bootstrap.py), so a served model is always priced.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from llmaas.billing import (
    Database,
    InProcessRateLimiter,
    ModelNotAllowedError,
    NotFoundError,
    Principal,
    RateLimiter,
    UsageInfo,
    get_account,
    hold_for_request,
    release,
    release_stale_holds,
    settle,
    verify_key,
)
from llmaas.errors import LlmaasError
from llmaas.server.errors import error_response
from llmaas.server.usage import RequestUsage

log = logging.getLogger("llmaas.server")

DEFAULT_ACCOUNT = "default"
PRINCIPAL = "llmaas.principal"  # ASGI scope keys
RATE_HEADERS = "llmaas.ratelimit_headers"
SETTLE_STATUS = {"finished": "completed", "aborted": "cancelled", "failed": "failed"}


@dataclass
class Admission:
    """What admission decided for one request; `finish` needs it to settle and correct the limits."""

    request_id: str
    account_id: int
    principal: Principal | None  # None: --no-auth
    estimated_tokens: int
    priority: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class ServerBilling:
    def __init__(
        self,
        db: Database,
        limiter: RateLimiter | None = None,
        *,
        auth: bool = True,
        owner: str | None = None,
        default_account: str = DEFAULT_ACCOUNT,
    ):
        self.db = db
        self.limiter = limiter or InProcessRateLimiter()
        self.auth = auth
        self.owner = owner or f"llmaas-{uuid.uuid4().hex[:12]}"  # the holds' owner: this instance
        self.default_account = default_account
        self._default_account_id: int | None = None

    def release_previous_holds(self) -> int:
        """At start: holds this instance (same owner id) left open when it died are released."""
        released = release_stale_holds(self.db, owner=self.owner)
        if released:
            log.warning("released %d open holds left by a previous run of %s", released, self.owner)
        return released

    # ------------------------------------------------------------ sync (thread)
    def authenticate(self, secret: str | None) -> Principal | None:
        """The key's principal, or None in --no-auth mode. Raises AuthenticationError (401)."""
        if not self.auth:
            return None
        return verify_key(self.db, secret)

    def _account_id(self, principal: Principal | None) -> int:
        if principal is not None:
            return principal.account_id
        if self._default_account_id is None:
            self._default_account_id = get_account(self.db, self.default_account).id
        return self._default_account_id

    def admit(
        self,
        principal: Principal | None,
        model: str,
        request_id: str,
        prompt_tokens: int,
        max_completion_tokens: int,
    ) -> Admission:
        """Allow-list, rate limit, then hold the worst case. Raises 403 / 429 before any work."""
        if (
            principal is not None
            and principal.allowed_models is not None
            and model not in principal.allowed_models
        ):
            raise ModelNotAllowedError(f"This API key may not use model {model!r}.", param="model")
        estimated = prompt_tokens + max_completion_tokens
        admission = Admission(request_id, self._account_id(principal), principal, estimated)
        if principal is not None:
            decision = self.limiter.acquire(
                principal.key_id, principal.requests_per_minute, principal.tokens_per_minute, estimated
            )
            admission.headers = decision.headers
            admission.priority = principal.priority
        try:
            hold_for_request(
                self.db,
                request_id,
                admission.account_id,
                model,
                prompt_tokens,
                max_completion_tokens,
                key_id=principal.key_id if principal else None,
                owner=self.owner,
            )
        except LlmaasError:
            self._adjust(admission, -estimated)  # never admitted: give the tokens back
            raise
        return admission

    def finish(self, admission: Admission, usage: RequestUsage) -> UsageInfo | None:
        """Settle (or release, for a request the engine rejected); correct the token bucket."""
        if usage.status == "rejected":
            try:
                release(self.db, admission.request_id)
            except NotFoundError:
                pass
            self._adjust(admission, -admission.estimated_tokens)
            return None
        settled = settle(
            self.db,
            admission.request_id,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
            status=SETTLE_STATUS.get(usage.status, "failed"),
            endpoint=usage.endpoint,
        )
        self._adjust(admission, usage.prompt_tokens + usage.completion_tokens - admission.estimated_tokens)
        return settled

    def _adjust(self, admission: Admission, delta: int) -> None:
        p = admission.principal
        if p is not None and delta:
            try:
                self.limiter.adjust(p.key_id, p.requests_per_minute, p.tokens_per_minute, delta)
            except Exception:  # a limiter hiccup must not lose the settlement
                log.exception("rate limit adjust failed")


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class BillingMiddleware:
    """Pure ASGI (the handlers' `receive` stays untouched, so disconnects are still seen).

    On /v1/*: verifies the bearer key in a thread (401 in OpenAI's shape before the body is read),
    keeps the principal in the scope for admission, and adds the x-ratelimit-* headers that admission
    stored in the scope to the response.
    """

    def __init__(self, app, billing: ServerBilling):
        self.app = app
        self.billing = billing

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        try:
            principal = await asyncio.to_thread(self.billing.authenticate, bearer(scope["headers"]))
        except LlmaasError as exc:
            await error_response(exc)(scope, receive, send)
            return
        scope[PRINCIPAL] = principal

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = scope.get(RATE_HEADERS)
                if extra:
                    present = {k.lower() for k, _ in message.get("headers", [])}
                    message["headers"] = list(message.get("headers", [])) + [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in extra.items()
                        if k.encode("latin-1") not in present
                    ]
            await send(message)

        await self.app(scope, receive, send_with_headers)
