"""Plans: default rate limits, concurrency caps and the engine priority of an account's requests.

Higher priority is admitted first by the engine's scheduler (llmaas.engine.scheduler) and preempts
lower-priority running work: a plus request overtakes free ones that queued or started earlier. A key
may override the plan's rate limits (api_keys columns); the concurrency caps are the plan's alone.

The caps bound what one tenant can make the shared engine do at once, so no tenant can starve another
(issue 13: one free request of 2 prompts x n=128 took a plus tenant's latency from 0.08 s to 6 s):

- `max_sequences_per_request`: prompts x n (completions: prompts x best_of), checked at admission ->
  400 naming `n` (or `best_of`, or `prompt` when it is the number of prompts that tips it over).
- `max_sequences_in_flight` and `max_tokens_in_flight`: summed over the account's requests admitted and
  not yet finished (tokens: prompt + worst-case completion, what the hold is sized for) -> 429
  `concurrency_limit_exceeded` (billing.inflight).

Free: 8 sequences a request, 16 and 32,768 tokens in flight - two full-size requests at once, a few
percent of one replica's batch (64 sequences by default) and KV cache. Plus: 128 (the API's largest n)
a request, 256 sequences and 2,097,152 tokens (256 x an 8k window) in flight - several replicas' worth.

Service tiers (`service_tier`): every plan may run `default`, `flex` and batches; `priority` is for plus
and operator keys (free asks get 403 naming the tier). `tier_priority` turns a tier into the engine
priority.

Operator: the plan of the first start's `default` account (server/bootstrap.py), the operator's own
account. Its owner runs evaluation and load tools against their own server (lm-eval, guidellm), which
send hundreds of requests a minute and ignore Retry-After: 20 requests a minute would fail them with
429s. It has plus's concurrency caps (a runaway eval cannot take more of the engine than a paying plus
tenant may) and a rate limit far above any one replica's throughput, at a priority between free and
plus: the operator's own load yields to paying customers but is not queued behind strangers. Still
billed like every account: its credit runs out like anyone's (`llmaas credits top-up default ...`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta

from llmaas.billing.errors import ServiceTierNotAllowedError
from llmaas.errors import InvalidRequestError

# Engine priority by service tier: `priority` runs above every plan's default work and preempts it,
# `flex` below every plan's default work, a batch line below everything (in idle capacity). Plans'
# own priorities lie well inside +-TIER_PRIORITY_STEP.
TIER_PRIORITY_STEP = 100
BATCH_PRIORITY = -1_000
ALL_TIERS = frozenset({"default", "flex", "priority", "batch"})


def tier_priority(plan_priority: int, tier: str) -> int:
    """The engine priority of a request of a plan at `tier` (default, flex, priority or batch)."""
    if tier == "batch":
        return BATCH_PRIORITY
    return plan_priority + {"default": 0, "flex": -TIER_PRIORITY_STEP, "priority": TIER_PRIORITY_STEP}[tier]


@dataclass(frozen=True)
class Plan:
    name: str
    requests_per_minute: int
    tokens_per_minute: int
    priority: int
    max_sequences_per_request: int
    max_sequences_in_flight: int
    max_tokens_in_flight: int
    service_tiers: frozenset[str] = ALL_TIERS  # the tiers its keys may ask for

    def as_dict(self) -> dict:
        """The plan as JSON (its tiers a sorted list)."""
        return {**asdict(self), "service_tiers": sorted(self.service_tiers)}

    def check_service_tier(self, tier: str) -> None:
        """403 naming the tier when the plan does not offer it."""
        if tier not in self.service_tiers:
            offered = ", ".join(sorted(self.service_tiers))
            raise ServiceTierNotAllowedError(
                f"The {self.name} plan does not offer service_tier {tier!r}; it offers {offered}.",
                param="service_tier",
            )

    def check_request_sequences(self, prompts: int, n: int) -> None:
        """400 when one request asks for more sequences (prompts x n) than the plan lets one request run."""
        cap = self.max_sequences_per_request
        if n > cap:
            raise InvalidRequestError(
                f"'n' is {n}; the {self.name} plan runs at most {cap} sequences per request", param="n"
            )
        if prompts * n > cap:
            raise InvalidRequestError(
                f"{prompts} prompts x n={n} is {prompts * n} sequences; the {self.name} plan runs at "
                f"most {cap} sequences per request",
                param="prompt",
            )

    def check_request_tokens(self, tokens: int) -> None:
        """400 when one request alone needs more tokens in flight than the account may ever have."""
        if tokens > self.max_tokens_in_flight:
            raise InvalidRequestError(
                f"This request may need {tokens} tokens (prompt + max_tokens x n); the {self.name} plan "
                f"allows {self.max_tokens_in_flight} tokens in flight. Lower 'max_tokens' or 'n'.",
                param="max_tokens",
            )


PLANS: dict[str, Plan] = {
    "free": Plan(
        "free",
        requests_per_minute=20,
        tokens_per_minute=40_000,
        priority=0,
        max_sequences_per_request=8,
        max_sequences_in_flight=16,
        max_tokens_in_flight=32_768,
        service_tiers=frozenset({"default", "flex", "batch"}),
    ),
    "plus": Plan(
        "plus",
        requests_per_minute=600,
        tokens_per_minute=2_000_000,
        priority=10,
        max_sequences_per_request=128,
        max_sequences_in_flight=256,
        max_tokens_in_flight=2_097_152,
    ),
    "operator": Plan(
        "operator",
        requests_per_minute=100_000,
        tokens_per_minute=100_000_000,
        priority=5,
        max_sequences_per_request=128,
        max_sequences_in_flight=256,
        max_tokens_in_flight=2_097_152,
    ),
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
