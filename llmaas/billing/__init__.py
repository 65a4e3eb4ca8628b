"""Billing: accounts, keys, plans, prices, credits, holds, ledger, rate limits and usage reports.

A library with no HTTP and no torch; the server calls it around every request:

    db = open_database(url)                                   # migrates the schema to head
    who = verify_key(db, bearer, model=model)                 # 401 / 403
    limiter.acquire(who.key_id, who.requests_per_minute, who.tokens_per_minute, estimated_tokens)  # 429
    hold = hold_for_request(db, request_id, who.account_id, model, prompt_tokens, max_tokens,
                            key_id=who.key_id)                # 429 insufficient_quota
    ... engine runs, with priority=who.priority ...
    record_progress(db, request_id, prompt_tokens, cached_tokens, tokens_so_far)  # every few seconds
    usage = settle(db, request_id, prompt_tokens, cached_tokens, completion_tokens, status="completed")

Holds expire (holds.py): each server instance renews a lease (`renew_lease`), and any replica's
`sweep_expired_holds` settles the holds of dead instances at their last checkpoint (or releases them).
    limiter.adjust(who.key_id, ..., actual_tokens - estimated_tokens)

See docs/billing.md.
"""

from llmaas.billing.accounts import AccountInfo, create_account, get_account, list_accounts, set_plan
from llmaas.billing.credits import (
    Balance,
    HoldInfo,
    UsageInfo,
    balance,
    find_usage,
    get_usage,
    grant,
    hold_for_request,
    open_holds,
    place_hold,
    release,
    settle,
    top_up,
)
from llmaas.billing.db import Database, default_database_url, open_database
from llmaas.billing.errors import (
    AuthenticationError,
    HoldStateError,
    InsufficientQuotaError,
    ModelNotAllowedError,
    NotFoundError,
    PriceNotSetError,
    RateLimitExceededError,
)
from llmaas.billing.holds import (
    HoldView,
    SweepResult,
    close_hold,
    end_lease,
    list_holds,
    record_progress,
    release_stale_holds,
    renew_lease,
    sweep_expired_holds,
)
from llmaas.billing.keys import KeyInfo, NewKey, Principal, create_key, list_keys, revoke_key, verify_key
from llmaas.billing.money import format_usd, micros_to_usd, usd_to_micros
from llmaas.billing.plans import DEFAULT_FREE_GRANT, PLANS, FreeGrant, Plan, get_plan
from llmaas.billing.prices import (
    PriceVersion,
    cost_micros,
    current_price,
    list_prices,
    set_price,
    worst_case_cost_micros,
)
from llmaas.billing.ratelimit import InProcessRateLimiter, RateLimitDecision, RateLimiter
from llmaas.billing.usage_report import UsageBucket, UsageRow, usage_report

__all__ = [
    "DEFAULT_FREE_GRANT",
    "PLANS",
    "AccountInfo",
    "AuthenticationError",
    "Balance",
    "Database",
    "FreeGrant",
    "HoldInfo",
    "HoldStateError",
    "HoldView",
    "InProcessRateLimiter",
    "InsufficientQuotaError",
    "KeyInfo",
    "ModelNotAllowedError",
    "NewKey",
    "NotFoundError",
    "Plan",
    "PriceNotSetError",
    "PriceVersion",
    "Principal",
    "RateLimitDecision",
    "RateLimitExceededError",
    "RateLimiter",
    "SweepResult",
    "UsageBucket",
    "UsageInfo",
    "UsageRow",
    "balance",
    "close_hold",
    "cost_micros",
    "create_account",
    "create_key",
    "current_price",
    "default_database_url",
    "end_lease",
    "format_usd",
    "get_account",
    "get_plan",
    "find_usage",
    "get_usage",
    "grant",
    "hold_for_request",
    "list_accounts",
    "list_holds",
    "list_keys",
    "list_prices",
    "micros_to_usd",
    "open_database",
    "open_holds",
    "place_hold",
    "record_progress",
    "release",
    "release_stale_holds",
    "renew_lease",
    "revoke_key",
    "set_plan",
    "set_price",
    "settle",
    "sweep_expired_holds",
    "top_up",
    "usage_report",
    "usd_to_micros",
    "verify_key",
    "worst_case_cost_micros",
]
