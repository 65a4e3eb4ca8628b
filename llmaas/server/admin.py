"""The operator's HTTP API under /admin/... (admin key), and OpenAI's organization usage and costs.

/admin/... offers the operations of the `llmaas accounts|keys|credits|prices|usage` verbs, as JSON,
guarded by the admin key (bootstrap.py). Amounts are decimal USD strings, as the CLI takes them.

`GET /v1/organization/usage/completions`, `.../usage/embeddings` and `GET /v1/organization/costs` have
OpenAI's shape (completions' usage leaves embeddings out; costs count every endpoint). An
account's key always sees its own account only; the admin key sees every account (`project_ids` to
narrow it). group_by: model, api_key_id, project_id (= our account).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from llmaas.billing import (
    AuthenticationError,
    balance,
    create_account,
    create_key,
    grant,
    list_accounts,
    list_keys,
    list_prices,
    revoke_key,
    set_plan,
    set_price,
    top_up,
    usage_report,
)
from llmaas.billing import operator_input as check
from llmaas.billing.accounts import check_account_name
from llmaas.billing.money import credit_to_micros
from llmaas.billing.plans import get_plan
from llmaas.billing.prices import price_micros
from llmaas.billing.records import (
    account_record,
    balance_record,
    credit_record,
    key_record,
    price_record,
)
from llmaas.billing.schema import utcnow
from llmaas.billing.usage_report import BUCKET_MINUTES
from llmaas.errors import InvalidRequestError, LlmaasError
from llmaas.server.billing import PRINCIPAL, ServerBilling, bearer
from llmaas.server.bootstrap import ADMIN_ACCOUNT, is_admin_key
from llmaas.server.usage import EMBEDDINGS_ENDPOINT


class BillingDisabledError(LlmaasError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "billing_disabled"


def billing_of(request: Request) -> ServerBilling:
    """The server's billing; 404 billing_disabled when it runs without (the admin API and the console)."""
    billing = request.app.state.llmaas.billing
    if billing is None:
        raise BillingDisabledError("This server runs without billing.")
    return billing


async def require_admin(request: Request) -> ServerBilling:
    billing = billing_of(request)
    secret = bearer(request.scope["headers"])
    if not await asyncio.to_thread(is_admin_key, billing.db, secret):
        raise AuthenticationError("The admin API needs the admin key: 'Authorization: Bearer sk-...'.")
    return billing


def _plan(name: object) -> str:
    return get_plan(check.plan_name(name)).name


def _account_names(db) -> dict[int, str]:
    return {a.id: a.name for a in list_accounts(db)}


Admin = Annotated[ServerBilling, Depends(require_admin)]
admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])  # no route without it

# Bodies: pydantic checks the JSON types; every value's bound is checked by billing.operator_input and
# billing.money (the same checks as the CLI's), before any database work. An unknown field is a 400:
# a misspelt "expires_in_day" must not quietly create a key that never expires.


class AdminBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(AdminBody):
    name: str
    plan: str = "free"
    free_grant: bool = True


class PlanChange(AdminBody):
    plan: str


class KeyCreate(AdminBody):
    account: str
    name: str | None = None
    expires_in_days: int | None = None
    models: list[str] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class Credit(AdminBody):
    amount_usd: str
    expires_in_days: int | None = None  # grants only
    note: str | None = None


class PriceSet(AdminBody):
    model: str
    input: str
    cached_input: str
    output: str
    effective_from: str | None = None  # ISO 8601; without a zone it is UTC (operator_input.parse_time)
    batch_percent: int | None = None  # the tiers' percentages of the price (None: prices.TIERS)
    flex_percent: int | None = None
    priority_percent: int | None = None


def _balance_record(db, account: str) -> dict[str, Any]:
    return balance_record(account, balance(db, account))


@admin.get("/accounts")
async def admin_list_accounts(billing: Admin) -> JSONResponse:
    def run():
        return [
            account_record(a, balance(billing.db, a.id).available_micros) for a in list_accounts(billing.db)
        ]

    return JSONResponse({"object": "list", "data": await asyncio.to_thread(run)})


@admin.post("/accounts")
async def admin_create_account(body: AccountCreate, billing: Admin):
    check_account_name(body.name)
    _plan(body.plan)

    def run():
        kwargs = {} if body.free_grant else {"free_grant": None}
        info = create_account(billing.db, body.name, plan=body.plan, **kwargs)
        return account_record(info, balance(billing.db, info.id).available_micros)

    return JSONResponse(await asyncio.to_thread(run), status_code=201)


@admin.post("/accounts/{account}/plan")  # {account} as in /admin/credits/{account}: errors name it
async def admin_set_plan(account: str, body: PlanChange, billing: Admin):
    check_account_name(account, "account")
    _plan(body.plan)
    info = await asyncio.to_thread(set_plan, billing.db, account, body.plan)
    billing.keys.forget(account_id=info.id)  # this process applies the new plan at once
    return JSONResponse(account_record(info))


@admin.get("/keys")
async def admin_list_keys(billing: Admin, account: str | None = None):
    if account is not None:
        check_account_name(account, "account")

    def run():
        names = _account_names(billing.db)
        return [key_record(k, names.get(k.account_id)) for k in list_keys(billing.db, account)]

    return JSONResponse({"object": "list", "data": await asyncio.to_thread(run)})


@admin.post("/keys")
async def admin_create_key(body: KeyCreate, billing: Admin):
    check_account_name(body.account, "account")
    check.text(body.name, "name", required=False)
    valid_for = check.expires_in_days(body.expires_in_days)
    models = check.model_list(body.models)
    rpm = check.requests_per_minute(body.requests_per_minute)
    tpm = check.tokens_per_minute(body.tokens_per_minute)

    def run():
        return create_key(
            billing.db,
            body.account,
            name=body.name,
            expires_at=utcnow() + valid_for if valid_for else None,
            allowed_models=models,
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
        )

    new = await asyncio.to_thread(run)
    record = {**key_record(new.info, body.account), "secret": new.secret}  # shown once
    return JSONResponse(record, status_code=201)


@admin.post("/keys/{key_id}/revoke")
async def admin_revoke_key(key_id: str, billing: Admin):
    check.key_id(key_id)

    def run():
        info = revoke_key(billing.db, key_id)
        return key_record(info, _account_names(billing.db).get(info.account_id))

    record = await asyncio.to_thread(run)
    billing.keys.forget(key_id=key_id)  # other replicas: their next hold re-checks the key
    return JSONResponse(record)


@admin.get("/credits/{account}")
async def admin_balance(account: str, billing: Admin):
    check_account_name(account, "account")
    return JSONResponse(await asyncio.to_thread(_balance_record, billing.db, account))


@admin.post("/credits/{account}/grant")
async def admin_grant(account: str, body: Credit, billing: Admin):
    check_account_name(account, "account")
    micros = credit_to_micros(body.amount_usd)
    valid_for = check.expires_in_days(body.expires_in_days)
    check.note(body.note)

    def run():
        expires = utcnow() + valid_for if valid_for else None
        entry = grant(billing.db, account, micros, expires_at=expires, note=body.note)
        return credit_record(entry, "grant", micros, _balance_record(billing.db, account))

    return JSONResponse(await asyncio.to_thread(run), status_code=201)


@admin.post("/credits/{account}/top-up")
async def admin_top_up(account: str, body: Credit, billing: Admin):
    check_account_name(account, "account")
    micros = credit_to_micros(body.amount_usd)
    if body.expires_in_days is not None:
        raise InvalidRequestError(
            "a top-up never expires: 'expires_in_days' is for grants", "expires_in_days"
        )
    check.note(body.note)

    def run():
        entry = top_up(billing.db, account, micros, note=body.note)
        return credit_record(entry, "top_up", micros, _balance_record(billing.db, account))

    return JSONResponse(await asyncio.to_thread(run), status_code=201)


@admin.get("/prices")
async def admin_list_prices(billing: Admin, model: str | None = None):
    if model is not None:
        check.model_name(model)
    prices = await asyncio.to_thread(list_prices, billing.db, model)
    return JSONResponse({"object": "list", "data": [price_record(p) for p in prices]})


@admin.post("/prices")
async def admin_set_price(body: PriceSet, billing: Admin):
    check.model_name(body.model)
    for value, param in ((body.input, "input"), (body.cached_input, "cached_input"), (body.output, "output")):
        price_micros(value, param)
    effective_from = check.parse_time(body.effective_from, "effective_from")

    def run():
        return set_price(
            billing.db,
            body.model,
            input_usd=body.input,
            cached_input_usd=body.cached_input,
            output_usd=body.output,
            effective_from=effective_from,
            batch_percent=body.batch_percent,
            flex_percent=body.flex_percent,
            priority_percent=body.priority_percent,
        )

    return JSONResponse(price_record(await asyncio.to_thread(run)), status_code=201)


# ------------------------------------------------------------ organization usage (OpenAI's shape)

organization = APIRouter(prefix="/v1/organization")
_GROUPS = {
    "model": "model",
    "line_item": "model",
    "api_key_id": "api_key_id",
    "project_id": "account",
    "batch": "service_tier",
    "service_tier": "service_tier",
}


# The most buckets one page may hold (`limit`), per width: OpenAI's own maxima.
MAX_PAGE_BUCKETS = {"1m": 1440, "1h": 168, "1d": 31}
_MAX_QUERY_VALUES = 20  # repeated group_by / project_ids parameters


def _query_list(request: Request, names: tuple[str, ...], param: str) -> list[str]:
    """Comma-separated values, also repeated (`a,b` or `x=a&x=b`), bounded and without repeats."""
    values = [v for name in names for v in request.query_params.getlist(name)]
    if len(values) > _MAX_QUERY_VALUES:
        raise InvalidRequestError(f"'{param}' is repeated more than {_MAX_QUERY_VALUES} times", param=param)
    items = [item for value in values for item in value.split(",", check.MAX_FILTER_VALUES) if item]
    return check.distinct(items, param)


def _report_args(request: Request) -> dict[str, Any]:
    """The report's query parameters, each bounded (operator_input), before any database work."""
    q = request.query_params
    if "start_time" not in q:
        raise InvalidRequestError("Missing required parameter: 'start_time'.", param="start_time")
    start = check.epoch_seconds(q["start_time"], "start_time")
    end = check.epoch_seconds(q["end_time"], "end_time") if "end_time" in q else None
    width = q.get("bucket_width", "1d")
    if width not in BUCKET_MINUTES:
        raise InvalidRequestError(
            f"'bucket_width' must be one of {', '.join(BUCKET_MINUTES)}", "bucket_width"
        )
    limit = None
    if "limit" in q:
        limit = check.whole_number(
            check.whole_number_text(q["limit"], "limit"), "limit", 1, MAX_PAGE_BUCKETS[width]
        )
    if "page" in q:  # our cursor: the start of the next bucket, as next_page gave it
        start = max(start, check.epoch_seconds(q["page"], "page"))
    groups = _query_list(request, ("group_by", "group_by[]"), "group_by")
    unknown = [g for g in groups if g not in _GROUPS]
    if unknown:
        raise InvalidRequestError(f"'group_by' takes {', '.join(_GROUPS)}", param="group_by")
    projects = _query_list(request, ("project_ids", "project_ids[]"), "project_ids")
    for project in projects:
        check_account_name(project, "project_ids")
    return {
        "start_time": start,
        "end_time": end,
        "bucket_width": width,
        "group_by": list(dict.fromkeys(_GROUPS[g] for g in groups)),
        "projects": projects,
        "limit": limit,
    }


def _scoped_report(request: Request, args: dict[str, Any]) -> tuple[list, int | None]:
    """Runs in a thread. The admin key sees every account; any other key only its own.

    Returns the buckets of this page and the cursor of the next page (None when this is the last)."""
    billing = billing_of(request)
    principal = request.scope.get(PRINCIPAL)
    projects = args.pop("projects")
    limit = args.pop("limit")
    end = args["end_time"] if args["end_time"] is not None else int(utcnow().timestamp())
    next_page = None
    if limit is not None:
        width = BUCKET_MINUTES[args["bucket_width"]] * 60
        page_end = args["start_time"] // width * width + limit * width
        if page_end < end:
            end, next_page = page_end, page_end
    args["end_time"] = end
    if principal is not None and principal.account_name == ADMIN_ACCOUNT:
        scope = {"accounts": projects} if projects else {}
    else:
        scope = {"account": principal.account_id if principal is not None else billing.account_id(None)}
    return usage_report(billing.db, **args, **scope), next_page


def _bucket_page(buckets, next_page: int | None, result) -> dict[str, Any]:
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
    return {
        "object": "page",
        "data": data,
        "has_more": next_page is not None,
        "next_page": str(next_page) if next_page is not None else None,
    }


@organization.get("/usage/completions")
async def usage_completions(request: Request) -> JSONResponse:
    args = _report_args(request)
    args["exclude_endpoints"] = (EMBEDDINGS_ENDPOINT,)  # those have their own report, below
    grouped = set(args["group_by"])
    buckets, next_page = await asyncio.to_thread(_scoped_report, request, args)

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
            "batch": row.service_tier == "batch" if "service_tier" in grouped else None,
            "service_tier": row.service_tier if "service_tier" in grouped else None,
        }

    return JSONResponse(_bucket_page(buckets, next_page, result))


@organization.get("/usage/embeddings")
async def usage_embeddings(request: Request) -> JSONResponse:
    args = _report_args(request)
    args["endpoints"] = (EMBEDDINGS_ENDPOINT,)
    grouped = set(args["group_by"])
    buckets, next_page = await asyncio.to_thread(_scoped_report, request, args)

    def result(row) -> dict[str, Any]:
        return {
            "object": "organization.usage.embeddings.result",
            "input_tokens": row.input_tokens,
            "num_model_requests": row.num_model_requests,
            "project_id": row.account if "account" in grouped else None,
            "user_id": None,
            "api_key_id": row.api_key_id if "api_key_id" in grouped else None,
            "model": row.model if "model" in grouped else None,
        }

    return JSONResponse(_bucket_page(buckets, next_page, result))


@organization.get("/costs")
async def costs(request: Request) -> JSONResponse:
    args = _report_args(request)
    grouped = set(args["group_by"])
    buckets, next_page = await asyncio.to_thread(_scoped_report, request, args)

    def result(row) -> dict[str, Any]:
        return {
            "object": "organization.costs.result",
            "amount": {"value": float(Decimal(row.cost_micros) / 1_000_000), "currency": "usd"},
            "line_item": row.model if "model" in grouped else None,
            "project_id": row.account if "account" in grouped else None,
            "api_key_id": row.api_key_id if "api_key_id" in grouped else None,
        }

    return JSONResponse(_bucket_page(buckets, next_page, result))


__all__ = ["admin", "organization"]
