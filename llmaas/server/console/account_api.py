"""The console's JSON for a signed-in customer, and signing in and out.

What the existing APIs already answer is not repeated here: usage and spend come from
/v1/organization/usage/completions and /v1/organization/costs, models and chat from /v1. This adds
what a customer could not see with their own key: their plan, their credits one by one, and their keys.
Every route reads the account from the key the request carries (the session's, see sessions.py), so an
account's session reaches its own account only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from llmaas.billing import (
    AuthenticationError,
    NotFoundError,
    balance,
    create_key,
    get_account,
    list_keys,
    revoke_key,
)
from llmaas.billing import operator_input as check
from llmaas.billing.credit_lines import credit_lines
from llmaas.billing.keys import KEY_PREFIX
from llmaas.billing.money import format_usd
from llmaas.billing.plans import get_plan
from llmaas.billing.records import balance_record, iso_time, key_record
from llmaas.billing.schema import utcnow
from llmaas.server.admin import billing_of
from llmaas.server.billing import ServerBilling, bearer
from llmaas.server.bootstrap import ADMIN_ACCOUNT, is_admin_key
from llmaas.server.console.sessions import (
    SessionStore,
    check_csrf,
    check_origin,
    cookie_header,
    session_id_from,
)

MAX_KEY_CHARS = 256  # far above a key's 46 characters: a pasted key with stray text is still refused early


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api_key: str = Field(default="", max_length=MAX_KEY_CHARS)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    expires_in_days: int | None = None


async def _customer(billing: ServerBilling, request: Request, store: SessionStore) -> tuple[str, int]:
    """(account name, id) of the key this request carries. --no-auth: the default account, for a signed-in
    browser only (its session's CSRF token was checked; a request from nowhere gets 401)."""
    principal = await asyncio.to_thread(billing.authenticate, bearer(request.scope["headers"]), fresh=True)
    if principal is None:
        if store.get(session_id_from(request.scope)) is None:
            raise AuthenticationError("Sign in to the console first.")
        return billing.default_account, billing.account_id(None)
    if principal.account_name == ADMIN_ACCOUNT:
        raise AuthenticationError("The admin key has no account of its own: use the operator's pages.")
    return principal.account_name, principal.account_id


def router(store: SessionStore) -> APIRouter:
    api = APIRouter(prefix="/console/api", include_in_schema=False)

    def secure(request: Request) -> bool:
        return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"

    @api.post("/session")
    async def sign_in(body: SignIn, request: Request) -> JSONResponse:
        check_origin(request.scope)  # no signing a browser in from another site's page
        billing = billing_of(request)
        secret = body.api_key.strip() or None
        if billing.auth and (secret is None or not secret.startswith(KEY_PREFIX)):
            raise AuthenticationError("Sign in with an API key: 'sk-...'.", param="api_key")
        admin = secret is not None and await asyncio.to_thread(is_admin_key, billing.db, secret)
        if admin:
            account = ADMIN_ACCOUNT
        else:
            principal = await asyncio.to_thread(billing.authenticate, secret, fresh=True)
            account = principal.account_name if principal is not None else billing.default_account
        session = store.open(secret if billing.auth or admin else None, account, admin)
        answer = {
            "account": account,
            "role": "admin" if admin else "customer",
            "csrf_token": session.csrf_token,
        }
        return JSONResponse(answer, headers={"set-cookie": cookie_header(session, secure(request))})

    @api.get("/session")
    async def who(request: Request) -> JSONResponse:
        session = store.get(session_id_from(request.scope))
        if session is None:  # a plain answer, not a 401: the sign-in page asks before anyone signed in
            return JSONResponse({"account": None, "role": None, "csrf_token": None})
        role = "admin" if session.is_admin else "customer"
        return JSONResponse({"account": session.account, "role": role, "csrf_token": session.csrf_token})

    @api.delete("/session")
    async def sign_out(request: Request) -> JSONResponse:
        session_id = session_id_from(request.scope)
        session = store.get(session_id)
        if session is not None:
            check_csrf(request.scope, session)
            store.close(session_id)
        return JSONResponse(
            {"signed_out": True}, headers={"set-cookie": cookie_header(None, secure(request))}
        )

    @api.get("/account")
    async def account(request: Request) -> JSONResponse:
        billing = billing_of(request)
        name, account_id = await _customer(billing, request, store)

        def run() -> dict[str, Any]:
            plan = get_plan(get_account(billing.db, account_id).plan)
            lines = credit_lines(billing.db, account_id)
            return {
                "account": name,
                "plan": plan.as_dict(),
                "balance": balance_record(name, balance(billing.db, account_id)),
                "credits": [
                    {
                        "id": c.id,
                        "kind": c.kind,
                        "amount_usd": format_usd(c.amount_micros),
                        "remaining_usd": format_usd(c.remaining_micros),
                        "created_at": iso_time(c.created_at),
                        "expires_at": iso_time(c.expires_at),
                        "note": c.note,
                        "usable": c.usable,
                    }
                    for c in lines
                ],
            }

        return JSONResponse(await asyncio.to_thread(run))

    @api.get("/keys")
    async def keys(request: Request) -> JSONResponse:
        billing = billing_of(request)
        name, account_id = await _customer(billing, request, store)
        found = await asyncio.to_thread(list_keys, billing.db, account_id)
        return JSONResponse({"object": "list", "data": [key_record(k, name) for k in found]})

    @api.post("/keys")
    async def new_key(body: KeyCreate, request: Request) -> JSONResponse:
        billing = billing_of(request)
        check.text(body.name, "name", required=False)
        valid_for = check.expires_in_days(body.expires_in_days)
        name, account_id = await _customer(billing, request, store)
        expires = utcnow() + valid_for if valid_for else None
        new = await asyncio.to_thread(create_key, billing.db, account_id, name=body.name, expires_at=expires)
        return JSONResponse(
            {**key_record(new.info, name), "secret": new.secret}, status_code=201
        )  # shown once

    @api.post("/keys/{key_id}/revoke")
    async def revoke(key_id: str, request: Request) -> JSONResponse:
        billing = billing_of(request)
        check.key_id(key_id)
        name, account_id = await _customer(billing, request, store)

        def run():
            if key_id not in {k.id for k in list_keys(billing.db, account_id)}:
                raise NotFoundError(f"No API key {key_id!r}", param="key_id")  # another account's: not found
            return revoke_key(billing.db, key_id)

        info = await asyncio.to_thread(run)
        billing.keys.forget(key_id=key_id)
        return JSONResponse(key_record(info, name))

    return api
