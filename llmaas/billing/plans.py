"""Plans: default rate limits and the engine priority of an account's requests.

Higher priority is admitted first by the engine's scheduler (llmaas.engine.sequence): a plus request
overtakes free ones that queued earlier. A key may override the plan's limits (api_keys columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from llmaas.errors import InvalidRequestError


@dataclass(frozen=True)
class Plan:
    name: str
    requests_per_minute: int
    tokens_per_minute: int
    priority: int


PLANS: dict[str, Plan] = {
    "free": Plan("free", requests_per_minute=20, tokens_per_minute=40_000, priority=0),
    "plus": Plan("plus", requests_per_minute=600, tokens_per_minute=2_000_000, priority=10),
}


@dataclass(frozen=True)
class FreeGrant:
    """Credit every new account receives, like the providers' free trial grants."""

    amount_micros: int = 1_000_000  # $1.00
    valid_for: timedelta | None = timedelta(days=30)  # None: never expires


DEFAULT_FREE_GRANT = FreeGrant()


def get_plan(name: str) -> Plan:
    try:
        return PLANS[name]
    except KeyError:
        raise InvalidRequestError(
            f"Unknown plan {name!r}; known plans: {', '.join(sorted(PLANS))}", param="plan"
        ) from None
