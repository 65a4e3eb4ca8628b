"""The operator's HTTP API under /admin/... (admin key), and OpenAI's organization usage and costs.

/admin/... offers the operations of the `llmaas accounts|keys|credits|prices|usage` verbs, as JSON,
guarded by the admin key (bootstrap.py). Amounts are decimal USD strings, as the CLI takes them.

`GET /v1/organization/usage/completions` and `GET /v1/organization/costs` have OpenAI's shape. An
account's key always sees its own account only; the admin key sees every account (`project_ids` to
narrow it). group_by: model, api_key_id, project_id (= our account).
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from llmaas.billing import (
    AuthenticationError,
    balance,
    create_account,
    create_key,
    format_usd,
    grant,
    list_accounts,
    list_keys,
    list_prices,
    revoke_key,
    set_plan,
    set_price,
    top_up,
    usage_report,
    usd_to_micros,
)
from llmaas.billing.schema import utcnow
from llmaas.errors import InvalidRequestError, LlmaasError
from llmaas.server.billing import PRINCIPAL, ServerBilling, bearer
from llmaas.server.bootstrap import ADMIN_ACCOUNT, is_admin_key


class BillingDisabledError(LlmaasError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "billing_disabled"


def _billing(request: Request) -> ServerBilling:
    billing = request.app.state.llmaas.billing
    if billing is None:
        raise BillingDisabledError("This server runs without billing.")
    return billing


async def require_admin(request: Request) -> ServerBilling:
    billing = _billing(request)
    secret = bearer(request.scope["headers"])
    if not await asyncio.to_thread(is_admin_key, billing.db, secret):
        raise AuthenticationError("The admin API needs the admin key: 'Authorization: Bearer sk-...'.")
    return billing


def _json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return _json(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _usd(micros: int) -> str:
    return format_usd(micros)


def _days(days: int | None, param: str) -> timedelta | None:
    if days is None:
        return None
    if days <= 0:
        raise InvalidRequestError(f"'{param}' must be a positive number of days", param=param)
    return timedelta(days=days)


Admin = Annotated[ServerBilling, Depends(require_admin)]
admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])  # no route without it


class AccountCreate(BaseModel):
    name: str
    plan: str = "free"
    free_grant: bool = True


class PlanChange(BaseModel):
    plan: str


class KeyCreate(BaseModel):
    account: str
    name: str | None = None
    expires_in_days: int | None = None
    models: list[str] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class Credit(BaseModel):
    amount_usd: str
    expires_in_days: int | None = None  # grants only
    note: str | None = None


class PriceSet(BaseModel):
    model: str
    input: str
    cached_input: str
    output: str
    effective_from: datetime | None = None


def _balance_record(db, account: str) -> dict[str, str]:
    b = balance(db, account)
    return {
        "account": account,
        "credit_usd": _usd(b.credit_micros),
        "held_usd": _usd(b.held_micros),
        "overdraft_usd": _usd(b.overdraft_micros),
        "available_usd": _usd(b.available_micros),
    }


def _price_record(p) -> dict[str, object]:
    return {
        "id": p.id,
        "model": p.model,
        "input_usd_per_1m": _usd(p.input_micros_per_m),
        "cached_input_usd_per_1m": _usd(p.cached_input_micros_per_m),
        "output_usd_per_1m": _usd(p.output_micros_per_m),
        "effective_from": p.effective_from.isoformat(),
    }


@admin.get("/accounts")
async def admin_list_accounts(billing: Admin) -> JSONResponse:
    return JSONResponse({"object": "list", "data": _json(await asyncio.to_thread(list_accounts, billing.db))})


@admin.post("/accounts")
async def admin_create_account(body: AccountCreate, billing: Admin):
    def run():
        kwargs = {} if body.free_grant else {"free_grant": None}
        return create_account(billing.db, body.name, plan=body.plan, **kwargs)

    return JSONResponse(_json(await asyncio.to_thread(run)), status_code=201)


@admin.post("/accounts/{name}/plan")
async def admin_set_plan(name: str, body: PlanChange, billing: Admin):
    info = await asyncio.to_thread(set_plan, billing.db, name, body.plan)
    billing.keys.forget(account_id=info.id)  # this process applies the new plan at once
    return JSONResponse(_json(info))


@admin.get("/keys")
async def admin_list_keys(billing: Admin, account: str | None = None):
    keys = await asyncio.to_thread(list_keys, billing.db, account)
    return JSONResponse({"object": "list", "data": _json(keys)})


@admin.post("/keys")
async def admin_create_key(body: KeyCreate, billing: Admin):
    valid_for = _days(body.expires_in_days, "expires_in_days")

    def run():
        return create_key(
            billing.db,
            body.account,
            name=body.name,
            expires_at=utcnow() + valid_for if valid_for else None,
            allowed_models=body.models,
            requests_per_minute=body.requests_per_minute,
            tokens_per_minute=body.tokens_per_minute,
        )

    new = await asyncio.to_thread(run)
    return JSONResponse({**_json(new.info), "secret": new.secret}, status_code=201)  # shown once


@admin.post("/keys/{key_id}/revoke")
async def admin_revoke_key(key_id: str, billing: Admin):
    info = await asyncio.to_thread(revoke_key, billing.db, key_id)
    billing.keys.forget(key_id=key_id)  # other replicas: their next hold re-checks the key
    return JSONResponse(_json(info))


@admin.get("/credits/{account}")
async def admin_balance(account: str, billing: Admin):
    return JSONResponse(await asyncio.to_thread(_balance_record, billing.db, account))


@admin.post("/credits/{account}/grant")
async def admin_grant(account: str, body: Credit, billing: Admin):
    micros = usd_to_micros(body.amount_usd, "amount_usd")
    valid_for = _days(body.expires_in_days, "expires_in_days")

    def run():
        expires = utcnow() + valid_for if valid_for else None
        entry = grant(billing.db, account, micros, expires_at=expires, note=body.note)
        return {"ledger_entry_id": entry, "kind": "grant", "amount_usd": _usd(micros)} | _balance_record(
            billing.db, account
        )

    return JSONResponse(await asyncio.to_thread(run), status_code=201)


@admin.post("/credits/{account}/top-up")
async def admin_top_up(account: str, body: Credit, billing: Admin):
    micros = usd_to_micros(body.amount_usd, "amount_usd")

    def run():
        entry = top_up(billing.db, account, micros, note=body.note)
        return {"ledger_entry_id": entry, "kind": "top_up", "amount_usd": _usd(micros)} | _balance_record(
            billing.db, account
        )

    return JSONResponse(await asyncio.to_thread(run), status_code=201)


@admin.get("/prices")
async def admin_list_prices(billing: Admin, model: str | None = None):
    prices = await asyncio.to_thread(list_prices, billing.db, model)
    return JSONResponse({"object": "list", "data": [_price_record(p) for p in prices]})


@admin.post("/prices")
async def admin_set_price(body: PriceSet, billing: Admin):
    def run():
        return set_price(
            billing.db,
            body.model,
            input_usd=body.input,
            cached_input_usd=body.cached_input,
            output_usd=body.output,
            effective_from=body.effective_from,
        )

    return JSONResponse(_price_record(await asyncio.to_thread(run)), status_code=201)


# ------------------------------------------------------------ organization usage (OpenAI's shape)

organization = APIRouter(prefix="/v1/organization")
_GROUPS = {"model": "model", "line_item": "model", "api_key_id": "api_key_id", "project_id": "account"}


def _report_args(request: Request) -> dict[str, Any]:
    q = request.query_params
    try:
        start = int(q["start_time"])
        end = int(q["end_time"]) if "end_time" in q else None
    except KeyError:
        raise InvalidRequestError("Missing required parameter: 'start_time'.", param="start_time") from None
    except ValueError:
        raise InvalidRequestError(
            "'start_time' and 'end_time' are epoch seconds", param="start_time"
        ) from None
    groups = [g for value in q.getlist("group_by") + q.getlist("group_by[]") for g in value.split(",") if g]
    unknown = [g for g in groups if g not in _GROUPS]
    if unknown:
        raise InvalidRequestError(f"'group_by' takes {', '.join(_GROUPS)}", param="group_by")
    return {
        "start_time": start,
        "end_time": end,
        "bucket_width": q.get("bucket_width", "1d"),
        "group_by": [_GROUPS[g] for g in groups],
        "projects": [p for value in q.getlist("project_ids") for p in value.split(",") if p],
    }


def _scoped_report(request: Request, args: dict[str, Any]) -> list:
    """Runs in a thread. The admin key sees every account; any other key only its own."""
    billing = _billing(request)
    principal = request.scope.get(PRINCIPAL)
    projects = args.pop("projects")
    if principal is not None and principal.account_name == ADMIN_ACCOUNT:
        accounts = projects or [None]
    else:
        own = principal.account_id if principal is not None else billing._account_id(None)
        accounts = [own]
    buckets = [usage_report(billing.db, account=a, **args) for a in accounts]
    if len(buckets) == 1:
        return buckets[0]
    merged = buckets[0]
    for other in buckets[1:]:
        merged = [dataclasses.replace(b, results=b.results + o.results) for b, o in zip(merged, other)]
    return merged


def _page(data: list) -> dict[str, Any]:
    return {"object": "page", "data": data, "has_more": False, "next_page": None}


def _bucket_page(buckets, result) -> dict[str, Any]:
    """OpenAI's page of time buckets, each row of a bucket shaped by `result`."""
    data = [
        {
            "object": "bucket",
            "start_time": b.start_time,
            "end_time": b.end_time,
            "results": [result(r) for r in b.results],
        }
        for b in buckets
    ]
    return _page(data)


@organization.get("/usage/completions")
async def usage_completions(request: Request) -> JSONResponse:
    args = _report_args(request)
    grouped = set(args["group_by"])
    buckets = await asyncio.to_thread(_scoped_report, request, args)

    def result(row) -> dict[str, Any]:
        return {
            "object": "organization.usage.completions.result",
            "input_tokens": row.input_tokens,
            "output_tokens": row.output_tokens,
            "input_cached_tokens": row.input_cached_tokens,
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
            "num_model_requests": row.num_model_requests,
            "project_id": row.account if "account" in grouped else None,
            "user_id": None,
            "api_key_id": row.api_key_id if "api_key_id" in grouped else None,
            "model": row.model if "model" in grouped else None,
            "batch": None,
        }

    return JSONResponse(_bucket_page(buckets, result))


@organization.get("/costs")
async def costs(request: Request) -> JSONResponse:
    args = _report_args(request)
    grouped = set(args["group_by"])
    buckets = await asyncio.to_thread(_scoped_report, request, args)

    def result(row) -> dict[str, Any]:
        return {
            "object": "organization.costs.result",
            "amount": {"value": float(Decimal(row.cost_micros) / 1_000_000), "currency": "usd"},
            "line_item": row.model if "model" in grouped else None,
            "project_id": row.account if "account" in grouped else None,
            "api_key_id": row.api_key_id if "api_key_id" in grouped else None,
        }

    return JSONResponse(_bucket_page(buckets, result))


__all__ = ["admin", "organization"]
