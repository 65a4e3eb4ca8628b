"""The console's JSON for the operator (admin key), beside /admin/...: what /admin does not answer yet.

- GET /console/api/admin/holds: open holds (`llmaas holds list`), optionally of one account.
- GET /console/api/admin/margin: revenue, machine cost and margin per model and UTC day.
- GET /console/api/admin/engine: what the server measures now (the numbers behind /metrics).

Accounts, credits, keys and prices are /admin/... itself (server/admin.py); the pages call it.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from llmaas.bench.cost import machine_cost
from llmaas.billing import PLANS, list_accounts, list_holds, usage_report
from llmaas.billing import operator_input as check
from llmaas.billing.accounts import check_account_name
from llmaas.billing.money import format_usd
from llmaas.billing.records import iso_time
from llmaas.billing.schema import utcnow
from llmaas.errors import InvalidRequestError
from llmaas.server.admin import Admin, require_admin
from llmaas.server.console.machine_costs import MachineCosts
from llmaas.server.metrics import engine_stats

DAY_S = 86400
MAX_MARGIN_DAYS = 366
MAX_HOLDS_SHOWN = 500


def _ceil(value: Fraction) -> int:
    return -(-value.numerator // value.denominator)


def _per_model(counter) -> dict[str, float]:
    """A Counter's values summed by their `model` label."""
    sums: dict[str, float] = defaultdict(float)
    for labels, value in counter.values.items():
        sums[dict(labels).get("model", "")] += value
    return dict(sums)


def router(machine_costs: Callable[[], MachineCosts]) -> APIRouter:
    """`machine_costs()`: the configuration in force (`llmaas serve` sets it after building the app)."""

    api = APIRouter(
        prefix="/console/api/admin", include_in_schema=False, dependencies=[Depends(require_admin)]
    )

    @api.get("/plans")
    async def plans_known() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [p.as_dict() for p in PLANS.values()]})

    @api.get("/holds")
    async def holds(billing: Admin, account: str | None = None) -> JSONResponse:
        if account is not None:
            check_account_name(account, "account")
        found = await asyncio.to_thread(list_holds, billing.db, account, limit=MAX_HOLDS_SHOWN)
        data = [
            {
                "id": h.id,
                "request_id": h.request_id,
                "account": h.account,
                "model": h.model,
                "amount_usd": format_usd(h.amount_micros),
                "owner": h.owner,
                "created_at": iso_time(h.created_at),
                "expires_at": iso_time(h.expires_at),
                "expired": h.expired,
            }
            for h in found
        ]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/margin")
    async def margin(
        billing: Admin, start_time: str, end_time: str | None = None, usd_per_hour: str | None = None
    ) -> JSONResponse:
        start = check.epoch_seconds(start_time, "start_time")
        end = check.epoch_seconds(end_time, "end_time") if end_time is not None else int(time.time())
        if end - start > MAX_MARGIN_DAYS * DAY_S:
            raise InvalidRequestError(f"at most {MAX_MARGIN_DAYS} days at once", "end_time")
        costs = machine_costs()
        levels = costs.levels(usd_per_hour)
        buckets = await asyncio.to_thread(
            usage_report, billing.db, start, end, bucket_width="1d", group_by=["model"]
        )
        rows = []
        for bucket in buckets:
            for r in bucket.results:
                level = levels.get(r.model)
                machine = (
                    _ceil(
                        machine_cost(
                            level[1],
                            r.input_tokens,
                            r.input_cached_tokens,
                            r.output_tokens,
                            costs.cached_input_ratio,
                        )
                    )
                    if level is not None
                    else None
                )
                rows.append(
                    {
                        "day": bucket.start_time,
                        "model": r.model,
                        "requests": r.num_model_requests,
                        "input_tokens": r.input_tokens,
                        "input_cached_tokens": r.input_cached_tokens,
                        "output_tokens": r.output_tokens,
                        "revenue_usd": format_usd(r.cost_micros),
                        "machine_usd": format_usd(machine) if machine is not None else None,
                        "margin_usd": format_usd(r.cost_micros - machine) if machine is not None else None,
                    }
                )
        rates = {
            model: {
                "bench": path,
                "concurrency": level.concurrency,
                "output_tok_per_s": level.output_tok_per_s,
                "input_cost_usd_per_1m": format_usd(_ceil(level.input_cost_per_m)),
                "output_cost_usd_per_1m": format_usd(_ceil(level.output_cost_per_m)),
            }
            for model, (path, level) in levels.items()
        }
        body = {
            "usd_per_hour": usd_per_hour or costs.usd_per_hour,
            "rates": rates,
            "days": [b.start_time for b in buckets],
            "data": rows,
        }
        return JSONResponse(body)

    @api.get("/engine")
    async def engine(request: Request, billing: Admin) -> JSONResponse:
        state = request.app.state.llmaas
        stats = await engine_stats(state.registry.models)
        metrics = state.metrics
        completion = _per_model(metrics.completion_tokens)
        prompt = _per_model(metrics.prompt_tokens)
        cached = _per_model(metrics.cached_tokens)

        def plans() -> dict[str, Any]:
            plan_of = {a.name: a.plan for a in list_accounts(billing.db)}
            per_plan: dict[str, dict[str, int]] = defaultdict(lambda: {"requests": 0, "held_micros": 0})
            for h in list_holds(billing.db, limit=10_000):
                entry = per_plan[plan_of.get(h.account, "?")]
                entry["requests"] += 1
                entry["held_micros"] += h.amount_micros
            return {
                p: {"requests": v["requests"], "held_usd": format_usd(v["held_micros"])}
                for p, v in per_plan.items()
            }

        models = {}
        for name, model in state.registry.models.items():
            s = {k: v for k, v in stats.get(name, {}).items() if k != "expert_tokens"}
            models[name] = {
                "loaded": model.engine is not None,
                **s,
                "prompt_tokens_total": int(prompt.get(name, 0)),
                "cached_tokens_total": int(cached.get(name, 0)),
                "completion_tokens_total": int(completion.get(name, 0)),
            }
        body = {
            "time": time.time(),
            "at": iso_time(utcnow()),
            "models": models,
            "plans": await asyncio.to_thread(plans),
        }
        return JSONResponse(body)

    return api
