"""Versioned prices per model, and the cost of a request at one price version.

A new price never edits an old one: it is a new row with its own effective_from. A request is billed
at the version in force when it was admitted (the hold records that version's id), so a price change
while it runs does not change its cost.

Cached prompt tokens are part of prompt_tokens (as the engine and OpenAI report them): the cost is
    (prompt_tokens - cached_tokens) * input + cached_tokens * cached_input + completion_tokens * output
per 1M tokens, times the service tier's percentage, rounded once, half up, to the micro-USD (see
money.py). Each price version carries its tiers' percentages (TIERS): `default` pays 100%, `flex` and
`batch` 50% and `priority` 200% unless the operator sets others with the version.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from llmaas.billing.db import Database
from llmaas.billing.errors import PriceNotSetError
from llmaas.billing.money import (
    MAX_PRICE_MICROS_PER_M,
    TOKENS_PER_PRICE_UNIT,
    round_half_up_div,
    usd_to_micros,
)
from llmaas.billing.operator_input import model_name, time_in_window
from llmaas.billing.schema import Price, utcnow
from llmaas.errors import InvalidRequestError


@dataclass(frozen=True)
class PriceVersion:
    id: int
    model: str
    input_micros_per_m: int
    cached_input_micros_per_m: int
    output_micros_per_m: int
    effective_from: datetime
    batch_percent: int = 50
    flex_percent: int = 50
    priority_percent: int = 200

    def tier_percent(self, tier: str | None) -> int:
        """What `tier` pays, in percent of this version's prices (None and `default`: 100)."""
        if tier in (None, "default"):
            return 100
        if tier not in TIERS:
            raise InvalidRequestError(f"Unknown service tier {tier!r}", param="service_tier")
        return getattr(self, f"{tier}_percent")


# The tiers a request may be billed at besides `default`, with their default percentage of the price.
TIERS = {"batch": 50, "flex": 50, "priority": 200}
MAX_TIER_PERCENT = 1_000
# Cached prompt tokens cost this percent of the input price unless a price says otherwise.
DEFAULT_CACHED_INPUT_PERCENT = 10


def _version(row: Price) -> PriceVersion:
    return PriceVersion(
        row.id,
        row.model,
        row.input_micros_per_m,
        row.cached_input_micros_per_m,
        row.output_micros_per_m,
        row.effective_from,
        row.batch_percent,
        row.flex_percent,
        row.priority_percent,
    )


def tier_percent(value: int | str | None, tier: str) -> int:
    """An operator's percentage for `tier` (None: the default), an integer 1 to MAX_TIER_PERCENT."""
    if value is None:
        return TIERS[tier]
    param = f"{tier}_percent"
    try:
        number = int(str(value).strip().rstrip("%"))
    except ValueError:
        raise InvalidRequestError(
            f"'{param}' must be a whole percentage, got {value!r}", param=param
        ) from None
    if not 1 <= number <= MAX_TIER_PERCENT:
        raise InvalidRequestError(f"'{param}' must be 1 to {MAX_TIER_PERCENT}, got {number}", param=param)
    return number


def price_micros(usd: str | Decimal, param: str) -> int:
    """A price in USD per 1M tokens as micro-USD per 1M tokens, within MAX_PRICE_MICROS_PER_M."""
    return usd_to_micros(usd, param, maximum=MAX_PRICE_MICROS_PER_M)


def set_price(
    db: Database,
    model: str,
    *,
    input_usd: str | Decimal,
    cached_input_usd: str | Decimal,
    output_usd: str | Decimal,
    effective_from: datetime | None = None,
    batch_percent: int | str | None = None,
    flex_percent: int | str | None = None,
    priority_percent: int | str | None = None,
) -> PriceVersion:
    """A new price version for `model`, in USD per 1M tokens (decimal strings or Decimal, not floats),
    with its tiers' percentages (None: TIERS' defaults).

    Each price is at most MAX_PRICE_MICROS_PER_M; `effective_from` (naive = UTC) lies in the window of
    operator_input.time_in_window."""
    model_name(model)
    row = Price(
        batch_percent=tier_percent(batch_percent, "batch"),
        flex_percent=tier_percent(flex_percent, "flex"),
        priority_percent=tier_percent(priority_percent, "priority"),
        model=model,
        input_micros_per_m=price_micros(input_usd, "input"),
        cached_input_micros_per_m=price_micros(cached_input_usd, "cached_input"),
        output_micros_per_m=price_micros(output_usd, "output"),
        effective_from=time_in_window(effective_from, "effective_from") if effective_from else utcnow(),
        created_at=utcnow(),
    )
    try:
        with db.write() as session:
            session.add(row)
            session.flush()
            return _version(row)
    except IntegrityError:
        raise InvalidRequestError(
            f"A price for {model!r} already starts at {row.effective_from.isoformat()}",
            param="effective_from",
        ) from None


def price_in_force(session: Session, model: str, at: datetime | None = None) -> PriceVersion:
    at = at or utcnow()
    row = session.scalars(
        select(Price)
        .where(Price.model == model, Price.effective_from <= at)
        .order_by(Price.effective_from.desc())
        .limit(1)
    ).one_or_none()
    if row is None:
        raise PriceNotSetError(f"No price is set for model {model!r}", param="model")
    return _version(row)


def current_price(db: Database, model: str, at: datetime | None = None) -> PriceVersion:
    with db.read() as session:
        return price_in_force(session, model, at)


def get_price_version(session: Session, price_id: int) -> PriceVersion:
    return _version(session.get_one(Price, price_id))


def list_prices(db: Database, model: str | None = None) -> list[PriceVersion]:
    """Every version, oldest first (a model's history when `model` is given)."""
    with db.read() as session:
        query = select(Price).order_by(Price.model, Price.effective_from)
        if model is not None:
            query = query.where(Price.model == model)
        return [_version(p) for p in session.scalars(query)]


def _count(value: int, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequestError(f"'{param}' must be a non-negative integer", param=param)
    return value


def cost_micros(
    price: PriceVersion,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    tier: str | None = None,
) -> int:
    """Exact cost of one request in micro-USD at `tier` (None: default), rounded once, half up."""
    prompt = _count(prompt_tokens, "prompt_tokens")
    cached = _count(cached_tokens, "cached_tokens")
    completion = _count(completion_tokens, "completion_tokens")
    if cached > prompt:
        raise InvalidRequestError("'cached_tokens' cannot exceed 'prompt_tokens'", param="cached_tokens")
    scaled = (
        (prompt - cached) * price.input_micros_per_m
        + cached * price.cached_input_micros_per_m
        + completion * price.output_micros_per_m
    )
    return round_half_up_div(scaled * price.tier_percent(tier), TOKENS_PER_PRICE_UNIT * 100)


def worst_case_cost_micros(
    price: PriceVersion, prompt_tokens: int, max_completion_tokens: int, tier: str | None = None
) -> int:
    """What a hold must cover: every prompt token at the dearer input price, every allowed output token."""
    uncached = cost_micros(price, prompt_tokens, 0, max_completion_tokens, tier)
    all_cached = cost_micros(price, prompt_tokens, prompt_tokens, max_completion_tokens, tier)
    return max(uncached, all_cached)
