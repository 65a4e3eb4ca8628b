"""Billing objects as JSON-ready records: the one shape the /admin API and `llmaas ... --json` print.

Money is a decimal USD string with six places, times are ISO 8601 UTC ending in 'Z' (to the
microsecond when there is one), absent values are None. A key's record never holds its secret or hash.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from llmaas.billing.accounts import AccountInfo
from llmaas.billing.credits import Balance, UsageInfo
from llmaas.billing.keys import KeyInfo
from llmaas.billing.money import format_usd
from llmaas.billing.prices import PriceVersion


def iso_time(value: datetime | None) -> str | None:
    """2026-01-31T12:00:00Z (with .ffffff when it has microseconds); None stays None."""
    if value is None:
        return None
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def account_record(account: AccountInfo, available_micros: int | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": account.id,
        "name": account.name,
        "plan": account.plan,
        "created_at": iso_time(account.created_at),
    }
    if available_micros is not None:
        record["available_usd"] = format_usd(available_micros)
    return record


def key_record(key: KeyInfo, account_name: str | None = None) -> dict[str, Any]:
    return {
        "id": key.id,
        "account_id": key.account_id,
        "account": account_name,
        "display_prefix": key.display_prefix,
        "name": key.name,
        "allowed_models": list(key.allowed_models) if key.allowed_models is not None else None,
        "requests_per_minute": key.requests_per_minute,
        "tokens_per_minute": key.tokens_per_minute,
        "created_at": iso_time(key.created_at),
        "expires_at": iso_time(key.expires_at),
        "revoked_at": iso_time(key.revoked_at),
    }


def balance_record(account: str, balance: Balance) -> dict[str, Any]:
    return {
        "account": account,
        "credit_usd": format_usd(balance.credit_micros),
        "held_usd": format_usd(balance.held_micros),
        "overdraft_usd": format_usd(balance.overdraft_micros),
        "available_usd": format_usd(balance.available_micros),
    }


def credit_record(entry_id: int, kind: str, amount_micros: int, balance: dict[str, Any]) -> dict[str, Any]:
    """A grant or top-up just written, followed by the account's balance record after it."""
    return {"ledger_entry_id": entry_id, "kind": kind, "amount_usd": format_usd(amount_micros), **balance}


def price_record(price: PriceVersion) -> dict[str, Any]:
    return {
        "id": price.id,
        "model": price.model,
        "input_usd_per_1m": format_usd(price.input_micros_per_m),
        "cached_input_usd_per_1m": format_usd(price.cached_input_micros_per_m),
        "output_usd_per_1m": format_usd(price.output_micros_per_m),
        "batch_percent": price.batch_percent,
        "flex_percent": price.flex_percent,
        "priority_percent": price.priority_percent,
        "effective_from": iso_time(price.effective_from),
    }


def usage_record(usage: UsageInfo, account_name: str | None = None) -> dict[str, Any]:
    """One request's usage record: `request_id` is the response's id and x-request-id header,
    `client_request_id` the client's X-Client-Request-Id."""
    return {
        "request_id": usage.request_id,
        "client_request_id": usage.client_request_id,
        "account": account_name if account_name is not None else usage.account_id,
        "key_id": usage.key_id,
        "model": usage.model,
        "status": usage.status,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.cached_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost_usd": format_usd(usage.cost_micros),
        "service_tier": usage.service_tier or "default",
        "finished_at": iso_time(usage.finished_at),
    }
