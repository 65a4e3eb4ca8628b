"""The operator's HTTP API under /admin/... and OpenAI's organization usage and costs, over real HTTP."""
# ruff: noqa: F811  (the fixtures are imported from test_server_billing and requested by name)

from __future__ import annotations

import time
from decimal import Decimal

import httpx
import openai
import pytest

from llmaas.billing import get_usage
from tests.test_server_billing import HELLO, MODEL, base_url, db, engine, new_account, sdk  # noqa: F401

pytest_plugins = ["tests.billing_services"]  # postgres_url


def test_admin_http_needs_the_admin_key_and_does_what_the_cli_does(base_url, db):
    admin = httpx.Client(base_url=base_url, headers={"Authorization": "Bearer sk-admin-test"}, timeout=30)
    assert httpx.get(base_url + "/admin/accounts").status_code == 401
    customer = new_account(db, "not-admin")
    r = httpx.get(base_url + "/admin/accounts", headers={"Authorization": f"Bearer {customer}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    r = admin.post("/admin/accounts", json={"name": "globex", "plan": "plus", "free_grant": False})
    assert r.status_code == 201 and r.json()["plan"] == "plus"
    assert "globex" in [a["name"] for a in admin.get("/admin/accounts").json()["data"]]
    r = admin.post("/admin/credits/globex/top-up", json={"amount_usd": "2.50"})
    assert r.status_code == 201 and r.json()["available_usd"] == "2.500000"
    assert admin.post("/admin/credits/globex/top-up", json={"amount_usd": "1.0000001"}).status_code == 400
    r = admin.post("/admin/keys", json={"account": "globex", "name": "ci"})
    assert r.status_code == 201
    key_id, secret = r.json()["id"], r.json()["secret"]
    listing = admin.get("/admin/keys", params={"account": "globex"}).text
    assert key_id in listing and secret not in listing
    sdk(base_url, secret).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert admin.post(f"/admin/keys/{key_id}/revoke").json()["revoked_at"] is not None
    with pytest.raises(openai.AuthenticationError):
        sdk(base_url, secret).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    r = admin.post(
        "/admin/prices", json={"model": "other", "input": "0.1", "cached_input": "0.05", "output": "0.4"}
    )
    assert r.status_code == 201 and r.json()["output_usd_per_1m"] == "0.400000"
    assert [p["model"] for p in admin.get("/admin/prices", params={"model": "other"}).json()["data"]] == [
        "other"
    ]
    assert admin.post("/admin/accounts/globex/plan", json={"plan": "free"}).json()["plan"] == "free"


def test_organization_usage_and_costs_show_a_key_its_own_account_only(base_url, db):
    start = int(time.time()) - 60
    mine, theirs = new_account(db, "org-a"), new_account(db, "org-b")
    resp = sdk(base_url, mine).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    sdk(base_url, theirs).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    sdk(base_url, theirs).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    params = {
        "start_time": start,
        "end_time": start + 3600,
        "bucket_width": "1h",
        "group_by": "model,project_id",
    }
    headers = {"Authorization": f"Bearer {mine}"}
    usage = httpx.get(base_url + "/v1/organization/usage/completions", params=params, headers=headers).json()
    rows = [r for b in usage["data"] for r in b["results"]]
    assert usage["object"] == "page" and rows
    assert {r["project_id"] for r in rows} == {"org-a"}
    assert sum(r["num_model_requests"] for r in rows) == 1
    assert sum(r["output_tokens"] for r in rows) == resp.usage.completion_tokens
    costs = httpx.get(base_url + "/v1/organization/costs", params=params, headers=headers).json()
    total = sum(Decimal(str(r["amount"]["value"])) for b in costs["data"] for r in b["results"])
    assert total == Decimal(get_usage(db, resp.id).cost_micros) / 1_000_000
    admin = {"Authorization": "Bearer sk-admin-test"}
    everyone = httpx.get(base_url + "/v1/organization/usage/completions", params=params, headers=admin).json()
    projects = {r["project_id"] for b in everyone["data"] for r in b["results"]}
    assert {"org-a", "org-b"} <= projects
    assert httpx.get(base_url + "/v1/organization/costs", params={"start_time": start}).status_code == 401
