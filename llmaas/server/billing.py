"""Billing around every request: auth, rate limit and hold at admission, settle at the end.

The walk (design.md): bearer -> `verify_key` (BillingMiddleware, every /v1 path) -> one request from
the rate limit (ServerBilling.begin) -> the prompt's CPU work (AsyncEngine.tokenize) -> its tokens from
the rate limit + `hold_for_request` (ServerBilling.admit) -> engine, with the plan's priority ->
`settle` (ServerBilling.finish, through the BillingHook seam, before the last byte / [DONE]) ->
`usage.cost` in the response. Every database call is synchronous and runs in a worker thread.
While a request runs, its tokens so far are checkpointed on its hold (`progress_checkpoint`,
server/progress.py); if this server dies, another replica bills the hold at that checkpoint once this
instance's lease lapses (server/leases.py, billing/holds.py). Every status is billed for its tokens.

`--no-auth` (auth=False): no key is asked for; everything is billed to the `default` account, with
no rate limit (a local operator does not rate-limit themself). A model with no price in force is
refused (400 price_not_set); `llmaas serve` sets a default price for each served model that has none
at start (bootstrap.py), so a served model is always priced.

Key lookups are cached in this process (KeyCache) for `key_cache_ttl_s` seconds, so the usual request
authenticates without a database read or a thread hop. What that leaves stale, and for how long:

- revocation and expiry: never for inference. Every hold re-reads the key in its own transaction
  (credits._hold), so a key revoked anywhere (this replica, another one, `llmaas keys revoke`) gets 401
  on its next completion request on every replica. A revoke or plan change through this process's
  /admin API also drops the key (or the account's keys) from this cache at once.
- other replicas, for requests that take no hold (`GET /v1/models`): up to the TTL. The organization
  usage and cost endpoints always verify the key afresh.
- plan and per-key limit changes made elsewhere: the plan's rpm/tpm and priority apply from the next
  lookup, within the TTL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llmaas.billing import (
    Database,
    HoldInfo,
    InProcessRateLimiter,
    ModelNotAllowedError,
    NotFoundError,
    Principal,
    RateLimiter,
    UsageInfo,
    get_account,
    hold_for_request,
    record_progress,
    release,
    settle,
)
from llmaas.billing.holds import close_owner_holds
from llmaas.billing.inflight import InFlightLimiter, InProcessInFlight
from llmaas.billing.keys import VerifiedKey, check_key, hash_key, key_expired
from llmaas.billing.plans import get_plan, tier_priority
from llmaas.billing.schema import utcnow
from llmaas.engine.sampling_params import SamplingParams
from llmaas.errors import LlmaasError
from llmaas.server.errors import error_response
from llmaas.server.progress import ProgressCheckpoint, ProgressPolicy
from llmaas.server.usage import RequestUsage

log = logging.getLogger("llmaas.server")

DEFAULT_ACCOUNT = "default"
PRINCIPAL = "llmaas.principal"  # ASGI scope keys
RATE_HEADERS = "llmaas.ratelimit_headers"
# Every status is billed for its tokens (credits.settle): a failed request was delivered them too.
SETTLE_STATUS = {"finished": "completed", "aborted": "cancelled", "failed": "failed"}


class SettlementError(LlmaasError):
    """Settling a finished request failed (the database is unreachable): its usage record could not
    be written, so the response is not completed (no last byte / [DONE] without a ledger record)."""

    status_code = 503
    error_type = "server_error"
    code = "billing_unavailable"
    headers = {"retry-after": "1"}

    def __init__(
        self, message: str = "Billing is unavailable; the request was not completed. Retry shortly."
    ):
        super().__init__(message)


@dataclass
class Admission:
    """What admission decided for one request; `finish` needs it to settle and correct the limits."""

    request_id: str
    account_id: int
    principal: Principal | None  # None: --no-auth
    estimated_tokens: int
    priority: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    hold: HoldInfo | None = None
    prompt_token_ids: list[list[int]] = field(default_factory=list)  # what was priced: the engine's input
    in_flight_account: str | None = None  # counted in flight (fairness): released once when it ends
    client_request_id: str | None = None  # X-Client-Request-Id: kept on the hold and the usage record
    service_tier: str = "default"  # the tier it is billed at and runs in (plans.tier_priority)
    rate_limited: bool = True  # False: a batch line (no rpm/tpm, no in-flight caps)


class KeyCache:
    """Verified keys by the sha256 of their secret (the secret itself is never kept), for `ttl_s`."""

    def __init__(self, ttl_s: float = 5.0, max_entries: int = 10_000, clock=time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[VerifiedKey, float]] = {}

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        verified, fresh_until = entry
        if self._clock() >= fresh_until or key_expired(verified.expires_at, utcnow()):
            with self._lock:
                self._entries.pop(key_hash, None)
            return None
        return verified.principal

    def put(self, key_hash: str, verified: VerifiedKey) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # rare (that many live keys): start over rather than track ages
            self._entries[key_hash] = (verified, self._clock() + self.ttl_s)

    def forget(self, *, key_id: str | None = None, account_id: int | None = None) -> None:
        """Drop a revoked key, or every key of an account whose plan changed."""
        with self._lock:
            for key_hash, (verified, _) in list(self._entries.items()):
                p = verified.principal
                if p.key_id == key_id or p.account_id == account_id:
                    del self._entries[key_hash]


class ServerBilling:
    def __init__(
        self,
        db: Database,
        limiter: RateLimiter | None = None,
        *,
        auth: bool = True,
        owner: str | None = None,
        default_account: str = DEFAULT_ACCOUNT,
        key_cache_ttl_s: float = 5.0,
        hold_ttl_s: float | None = None,
        progress: ProgressPolicy | None = None,
        in_flight: InFlightLimiter | None = None,
    ):
        """`hold_ttl_s`: a hold's deadline after admission or its last progress checkpoint (default
        one hour, credits.DEFAULT_HOLD_TTL_S). `progress`: how often a running request's tokens are
        checkpointed on its hold (default every 5 s or 256 completion tokens, whichever comes first)."""
        self.db = db
        self.hold_ttl_s = hold_ttl_s
        self.progress = progress or ProgressPolicy()
        # Checkpoint writes run here, apart from admissions (asyncio's default executor): a slow ledger
        # makes checkpoints queue among themselves, never delays another request's admission.
        self._progress_writes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmaas-progress")
        self.keys = KeyCache(key_cache_ttl_s)
        self.limiter = limiter or InProcessRateLimiter()
        self.in_flight = in_flight or InProcessInFlight()
        self.auth = auth
        self.owner = owner or f"llmaas-{uuid.uuid4().hex[:12]}"  # the holds' owner: this instance
        self.default_account = default_account
        self._default_account_id: int | None = None

    def release_previous_holds(self) -> int:
        """At start: the holds a previous run of this instance (same owner id) left open are closed,
        each billed at its last progress checkpoint (or released when it made none). Holds of other
        instances expire with their lease (server/leases.py). Returns how many were closed."""
        closed = close_owner_holds(self.db, self.owner)
        if closed.closed:
            log.warning(
                "closed %d open holds left by a previous run of %s: %d billed at their last checkpoint, "
                "%d released",
                closed.closed,
                self.owner,
                closed.settled,
                closed.released,
            )
        return closed.closed

    def record_progress(self, request_id: str, prompt: int, cached: int, completion: int) -> bool:
        """Checkpoint a running request's tokens on its hold (sync: call it from a worker thread)."""
        return record_progress(self.db, request_id, prompt, cached, completion, ttl_s=self.hold_ttl_s)

    def progress_checkpoint(self, request_id: str) -> ProgressCheckpoint:
        """The checkpointer for one running request (server/progress.py)."""
        return ProgressCheckpoint(
            self.record_progress, request_id, self.progress, executor=self._progress_writes
        )

    # ------------------------------------------------------------ sync (thread)
    def cached_principal(self, secret: str | None) -> Principal | None:
        """The key's principal if this process verified it within the TTL (no I/O: call it anywhere)."""
        if not self.auth or not secret:
            return None
        return self.keys.get(hash_key(secret))

    def authenticate(self, secret: str | None, *, fresh: bool = False) -> Principal | None:
        """The key's principal, or None in --no-auth mode. Raises AuthenticationError (401).

        From the cache unless `fresh`; otherwise one database read, whose answer is cached."""
        if not self.auth:
            return None
        if not fresh and (principal := self.cached_principal(secret)) is not None:
            return principal
        verified = check_key(self.db, secret)
        self.keys.put(hash_key(secret), verified)
        return verified.principal

    def account_id(self, principal: Principal | None) -> int:
        """The account a request is billed to: its key's, or (no auth) the default account (a database
        read the first time: call it from a worker thread)."""
        if principal is not None:
            return principal.account_id
        if self._default_account_id is None:
            self._default_account_id = get_account(self.db, self.default_account).id
        return self._default_account_id

    def begin(
        self,
        principal: Principal | None,
        model: str,
        request_id: str,
        client_request_id: str | None = None,
        *,
        service_tier: str = "default",
        rate_limited: bool = True,
    ) -> Admission:
        """Before any work on the prompt: the key's model allow-list (403), its plan's service tiers
        (403 naming the tier) and one request from its requests-per-minute bucket (429, or also when
        its token bucket is in debt). `rate_limited=False` (a batch line): no rate or in-flight limits;
        its hold still bounds what it can spend.

        A request refused after this (a 400 for its prompt, 429 for its tokens or its balance)
        keeps that request used: like OpenAI's, the requests-per-minute limit counts attempts, so a
        key cannot make the server tokenize megabytes more often than its rpm allows. Its tokens are
        never taken, or given back.
        """
        if (
            principal is not None
            and principal.allowed_models is not None
            and model not in principal.allowed_models
        ):
            raise ModelNotAllowedError(f"This API key may not use model {model!r}.", param="model")
        if principal is not None:
            get_plan(principal.plan).check_service_tier(service_tier)
        admission = Admission(request_id, self.account_id(principal), principal, 0)
        admission.client_request_id = client_request_id
        admission.service_tier, admission.rate_limited = service_tier, rate_limited
        admission.priority = tier_priority(principal.priority if principal else 0, service_tier)
        if principal is not None and rate_limited:
            decision = self.limiter.acquire(
                principal.key_id, principal.requests_per_minute, principal.tokens_per_minute, 0
            )
            admission.headers = decision.headers
        return admission

    def admit_prompts(
        self,
        admission: Admission,
        engine,
        model: str,
        token_ids: list[list[int]],
        params: SamplingParams,
    ) -> Admission:
        """`admit` the worst case of tokenized prompts: every prompt token, and per prompt
        n x (max_tokens, or the rest of the context window). `engine`: the model's AsyncEngine (its
        window; the prompts were checked against it already by AsyncEngine.tokenize)."""
        prompt_tokens = completion_tokens = 0
        for ids in token_ids:
            prompt_tokens += len(ids)
            completion_tokens += params.n * engine.resolve_max_tokens(len(ids), params)
        self.admit(admission, model, prompt_tokens, completion_tokens, len(token_ids) * params.n)
        admission.prompt_token_ids = token_ids
        return admission

    def check_request_size(self, admission: Admission, num_prompts: int, n: int) -> None:
        """The plan's cap on one request's sequences (prompts x n): a 400 naming `n` (or `prompt`),
        after `begin` and before the prompts are worked on. --no-auth is not capped."""
        if admission.principal is not None:
            get_plan(admission.principal.plan).check_request_sequences(num_prompts, n)

    def admit(
        self,
        admission: Admission,
        model: str,
        prompt_tokens: int,
        max_completion_tokens: int,
        sequences: int = 1,
    ) -> Admission:
        """After `begin`: the plan's in-flight caps (429 concurrency_limit_exceeded while the account
        has too much running; 400 for a request bigger than the plan ever allows), then `_admit`. The
        in-flight count is released if anything later in admission fails, else by `finish`."""
        limited = admission.principal if admission.rate_limited else None
        account = self._take_in_flight(
            limited, admission.request_id, sequences, prompt_tokens + max_completion_tokens
        )
        try:
            self._admit(admission, model, prompt_tokens, max_completion_tokens)
        except BaseException:
            self._release_in_flight(account, admission.request_id)
            raise
        admission.in_flight_account = account
        return admission

    def _take_in_flight(
        self, principal: Principal | None, request_id: str, sequences: int, tokens: int
    ) -> str | None:
        if principal is None:  # --no-auth: the local operator is not capped, as with rate limits
            return None
        plan = get_plan(principal.plan)
        plan.check_request_tokens(tokens)
        account = str(principal.account_id)
        self.in_flight.acquire(
            account, request_id, sequences, tokens, plan.max_sequences_in_flight, plan.max_tokens_in_flight
        )
        return account

    def _release_in_flight(self, account: str | None, request_id: str) -> None:
        if account is None:
            return
        try:
            self.in_flight.release(account, request_id)
        except Exception:  # an unreachable Redis: the entry expires at its deadline instead
            log.exception("releasing in-flight count of %s failed", request_id)

    def _admit(
        self, admission: Admission, model: str, prompt_tokens: int, max_completion_tokens: int
    ) -> None:
        """The tokens from the rate limit, then hold the worst case. Raises 429 (rate limit, or
        insufficient_quota) before any engine work."""
        principal = admission.principal
        estimated = prompt_tokens + max_completion_tokens
        if principal is not None and admission.rate_limited:
            decision = self.limiter.acquire(
                principal.key_id,
                principal.requests_per_minute,
                principal.tokens_per_minute,
                estimated,
                requests=0,  # taken by `begin`
            )
            admission.headers = decision.headers
        admission.estimated_tokens = estimated
        try:
            admission.hold = hold_for_request(
                self.db,
                admission.request_id,
                admission.account_id,
                model,
                prompt_tokens,
                max_completion_tokens,
                key_id=principal.key_id if principal else None,
                owner=self.owner,
                ttl_s=self.hold_ttl_s,
                client_request_id=admission.client_request_id,
                service_tier=None if admission.service_tier == "default" else admission.service_tier,
            )
        except LlmaasError as exc:
            self._adjust(admission, -estimated)  # never admitted: give the tokens back
            if exc.status_code == 401 and principal is not None:
                self.keys.forget(key_id=principal.key_id)  # revoked or expired since it was cached
            raise

    def finish(self, admission: Admission, usage: RequestUsage) -> UsageInfo | None:
        """`_finish`, then the request stops counting in flight (whatever settling did)."""
        try:
            return self._finish(admission, usage)
        finally:
            self._release_in_flight(admission.in_flight_account, admission.request_id)

    def _finish(self, admission: Admission, usage: RequestUsage) -> UsageInfo | None:
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
            hold=admission.hold,
        )
        self._adjust(admission, usage.prompt_tokens + usage.completion_tokens - admission.estimated_tokens)
        return settled

    def _adjust(self, admission: Admission, delta: int) -> None:
        p = admission.principal
        if p is not None and delta and admission.rate_limited:
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

    On /v1/*: verifies the bearer key (from the KeyCache, else in a thread; 401 in OpenAI's shape
    before the body is read), keeps the principal in the scope for admission, and adds x-ratelimit-*
    headers to every response: those admission stored in the scope, or else (a response that took no
    quota: /v1/models, reports, a 400 before admission) the key's current bucket state.
    """

    def __init__(self, app, billing: ServerBilling):
        self.app = app
        self.billing = billing

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        secret = bearer(scope["headers"])
        fresh = scope["path"].startswith("/v1/organization/")  # reports: never from the cache
        try:
            principal = None if fresh else self.billing.cached_principal(secret)
            if principal is None and self.billing.auth:
                principal = await asyncio.to_thread(self.billing.authenticate, secret, fresh=fresh)
        except LlmaasError as exc:
            await error_response(exc)(scope, receive, send)
            return
        scope[PRINCIPAL] = principal

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = scope.get(RATE_HEADERS)
                if extra is None and principal is not None:  # took no quota: the current state
                    extra = await self._peek(principal)
                if extra:
                    present = {k.lower() for k, _ in message.get("headers", [])}
                    message["headers"] = list(message.get("headers", [])) + [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in extra.items()
                        if k.encode("latin-1") not in present
                    ]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _peek(self, principal: Principal) -> dict[str, str] | None:
        limiter = self.billing.limiter
        args = (principal.key_id, principal.requests_per_minute, principal.tokens_per_minute)
        try:
            if isinstance(limiter, InProcessRateLimiter):
                return limiter.peek(*args).headers
            return (await asyncio.to_thread(limiter.peek, *args)).headers
        except Exception:  # headers are informative: a limiter hiccup must not fail the response
            log.exception("rate limit peek failed")
            return None
