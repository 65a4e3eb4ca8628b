"""The operator's HTTP API under /admin/... and OpenAI's organization usage and costs, over real HTTP."""
# ruff: noqa: F811  (the fixtures are imported from test_server_billing and requested by name)

from __future__ import annotations

import json
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


# ------------------------------------------------------------ bounds on every /admin and report input

HUGE = "9" * 1_000_000
NUMBERS = [2**64, -(2**64), 2**70, 1e308, -1, 0, "NaN", 10**12]
AMOUNTS = [
    "NaN",
    "Infinity",
    "1_000",
    "1e30",
    "5000000000000",
    "-1",
    "0",
    "1.0000001",
    HUGE,
    "\ud800",
    2**64,
    1e308,
]
NAMES = ["Admin", "admin", "x" * 129, HUGE, "a b", "", "\ud800", "a\x00b", 2**64, None]
TEXTS = ["x" * 300, HUGE, "a\x00b", "\ud800", 2**64]
PRICES = [a for a in AMOUNTS if a != "0"] + ["1000000000000000", "100000.000001"]  # a price may be 0
DATES = ["0001-01-01T00:00:00", "9999-12-31T23:59:59-05:00", "2200-01-01", "not a date", HUGE, 2**64]


def _cases() -> list[tuple[str, str, dict | None, dict | None, str]]:
    """(method, path, json body, query, param): every field of every /admin body and query."""
    key = {"account": "bounded"}
    cases = []
    cases += [("POST", "/admin/accounts", {"name": v}, None, "name") for v in NAMES]
    cases += [
        ("POST", "/admin/accounts", {"name": "fine", "plan": v}, None, "plan") for v in TEXTS + ["gold"]
    ]
    cases += [("POST", "/admin/accounts/bounded/plan", {"plan": v}, None, "plan") for v in TEXTS]
    cases += [
        ("POST", f"/admin/accounts/{v}/plan", {"plan": "free"}, None, "account") for v in ("x" * 5000, "a b")
    ]
    cases += [("POST", "/admin/keys", {"account": v}, None, "account") for v in NAMES[2:]]
    cases += [("POST", "/admin/keys", {**key, "name": v}, None, "name") for v in TEXTS]
    for field in ("expires_in_days", "requests_per_minute", "tokens_per_minute"):
        cases += [("POST", "/admin/keys", {**key, field: v}, None, field) for v in NUMBERS]
    cases += [("POST", "/admin/keys", {**key, "expires_in_days": 1_000_000_000_000}, None, "expires_in_days")]
    for models in (["m"] * 101, [""], ["x" * 129], ["\ud800"], "m", [2**64]):
        cases.append(("POST", "/admin/keys", {**key, "models": models}, None, "models"))
    for verb in ("grant", "top-up"):
        path = f"/admin/credits/bounded/{verb}"
        cases += [("POST", path, {"amount_usd": v}, None, "amount_usd") for v in AMOUNTS]
        cases += [("POST", path, {"amount_usd": "1", "note": v}, None, "note") for v in TEXTS]
        cases += [
            ("POST", f"/admin/credits/{v}/{verb}", {"amount_usd": "1"}, None, "account")
            for v in ("x" * 5000,)
        ]
    cases += [
        (
            "POST",
            "/admin/credits/bounded/grant",
            {"amount_usd": "1", "expires_in_days": v},
            None,
            "expires_in_days",
        )
        for v in NUMBERS
    ]
    cases += [("GET", "/admin/credits/" + "x" * 5000, None, None, "account")]
    cases += [("POST", "/admin/keys", {**key, "expires_in_day": 5}, None, "expires_in_day")]  # misspelt
    cases += [
        (
            "POST",
            "/admin/credits/bounded/top-up",
            {"amount_usd": "1", "expires_in_days": 5},
            None,
            "expires_in_days",
        )
    ]
    cases += [("GET", "/admin/keys", None, {"account": "x" * 5000}, "account")]
    cases += [("GET", "/admin/prices", None, {"model": "x" * 5000}, "model")]
    cases += [("POST", "/admin/keys/key_" + "x" * 5000 + "/revoke", None, None, "key_id")]
    price = {"model": "bounded-model", "input": "1", "cached_input": "0.5", "output": "2"}
    for field in ("input", "cached_input", "output"):
        cases += [("POST", "/admin/prices", {**price, field: v}, None, field) for v in PRICES]
    cases += [("POST", "/admin/prices", {**price, "model": v}, None, "model") for v in TEXTS + [""]]
    cases += [
        ("POST", "/admin/prices", {**price, "effective_from": v}, None, "effective_from") for v in DATES
    ]
    report = {"start_time": "1700000000"}
    for path in ("/v1/organization/usage/completions", "/v1/organization/costs"):
        for field, values in {
            "start_time": ["1e30", str(10**15), "-1", "NaN", HUGE[:5000], str(2**64)],
            "end_time": [str(10**15), "1e30", str(2**64)],
            "bucket_width": ["2h", "x" * 5000],
            "limit": ["0", "32", str(2**64), "NaN", "1e3"],
            "page": [str(10**15), "x"],
            "group_by": ["project", ",".join(["model"] * 1000)],
            "project_ids": [",".join(f"p{i}" for i in range(101)), "x" * 5000, "a b"],
        }.items():
            cases += [("GET", path, None, {**report, field: v}, field) for v in values]
    return cases


def test_every_admin_field_is_bounded_400_naming_it_and_the_account_keeps_working(base_url, db):
    """2**64, 1e308, NaN, '1_000', '1e30', huge strings and lists, naive and out-of-range dates."""
    admin = httpx.Client(base_url=base_url, headers={"Authorization": "Bearer sk-admin-test"}, timeout=60)
    secret = new_account(db, "bounded")
    before = admin.get("/admin/credits/bounded").json()
    failures = []
    for method, path, body, query, param in _cases():
        content = None if body is None else json.dumps(body)  # json.dumps writes NaN for 1e308*10, too
        r = admin.request(
            method, path, content=content, params=query, headers={"content-type": "application/json"}
        )
        error = (
            r.json().get("error")
            if r.headers.get("content-type", "").startswith("application/json")
            else None
        )
        if (
            r.status_code != 400
            or error is None
            or error["param"].split("[")[0] != param
            or len(r.text) > 600
        ):
            failures.append(
                (method, path[:60], str(body)[:80], str(query)[:80], param, r.status_code, r.text[:200])
            )
    assert failures == [], "\n".join(map(str, failures))
    assert admin.get("/admin/credits/bounded").json() == before
    assert "bounded" in [a["name"] for a in admin.get("/admin/accounts").json()["data"]]
    sdk(base_url, secret).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)


def test_json_nan_and_infinity_tokens_are_400(base_url, db):
    new_account(db, "nan-co")
    admin = httpx.Client(base_url=base_url, headers={"Authorization": "Bearer sk-admin-test"}, timeout=30)
    for body, param in (
        ('{"account": "nan-co", "expires_in_days": NaN}', "expires_in_days"),
        ('{"account": "nan-co", "requests_per_minute": Infinity}', "requests_per_minute"),
        ('{"amount_usd": NaN}', "amount_usd"),
    ):
        path = "/admin/keys" if "account" in body else "/admin/credits/nan-co/top-up"
        r = admin.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_huge_top_ups_never_overflow_the_ledger(base_url, db):
    """Two top-ups of $5e12 once overflowed SQLite's INTEGER: a 500 after committing, then every read
    of that account (and `accounts list`) failed; on PostgreSQL 'bigint out of range'."""
    admin = httpx.Client(base_url=base_url, headers={"Authorization": "Bearer sk-admin-test"}, timeout=30)
    secret = new_account(db, "whale")
    for amount in ("5000000000000", "5000000000000", "1e30"):
        r = admin.post("/admin/credits/whale/top-up", json={"amount_usd": amount})
        assert r.status_code == 400 and r.json()["error"]["param"] == "amount_usd", r.text
    for _ in range(9):  # $1e9 is the most one top-up may add; $1e10 the most an account may hold ($10 is in)
        assert admin.post("/admin/credits/whale/top-up", json={"amount_usd": "1000000000"}).status_code == 201
    r = admin.post("/admin/credits/whale/top-up", json={"amount_usd": "1000000000"})
    assert r.status_code == 400 and "most one account may hold" in r.json()["error"]["message"]
    assert admin.get("/admin/credits/whale").status_code == 200
    assert admin.get("/admin/accounts").status_code == 200
    sdk(base_url, secret).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)


def test_admin_account_names_ignore_case_and_dates_naive_are_utc(base_url, db):
    admin = httpx.Client(base_url=base_url, headers={"Authorization": "Bearer sk-admin-test"}, timeout=30)
    assert admin.post("/admin/accounts", json={"name": "Initech"}).status_code == 201
    for name in ("initech", "INITECH", "Admin", "ADMIN"):
        r = admin.post("/admin/accounts", json={"name": name})
        assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
    body = {
        "model": "dated",
        "input": "1",
        "cached_input": "1",
        "output": "1",
        "effective_from": "2030-01-01T00:00:00",
    }
    r = admin.post("/admin/prices", json=body)
    assert r.status_code == 201 and r.json()["effective_from"] == "2030-01-01T00:00:00Z"


def test_usage_report_counts_a_repeated_project_once(base_url, db):
    """group_by=project_id,api_key_id&project_ids=probe x3 once returned every row three times."""
    start = int(time.time()) - 60
    secret = new_account(db, "probe")
    sdk(base_url, secret).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    headers = {"Authorization": "Bearer sk-admin-test"}
    url = base_url + "/v1/organization/usage/completions"
    query = f"start_time={start}&end_time={start + 3600}&bucket_width=1h&group_by=project_id,api_key_id"
    once = httpx.get(f"{url}?{query}&project_ids=probe", headers=headers).json()
    thrice = httpx.get(
        f"{url}?{query}&project_ids=probe&project_ids=probe&project_ids=probe", headers=headers
    )
    assert thrice.json()["data"] == once["data"]
    rows = [r for b in once["data"] for r in b["results"]]
    assert [r["num_model_requests"] for r in rows] == [1]


def test_usage_report_pages_by_limit(base_url, db):
    headers = {"Authorization": "Bearer sk-admin-test"}
    url = base_url + "/v1/organization/costs"
    start = 1_700_000_000 // 86400 * 86400
    page = httpx.get(
        url, params={"start_time": start, "end_time": start + 10 * 86400, "limit": 3}, headers=headers
    )
    body = page.json()
    assert len(body["data"]) == 3 and body["has_more"] and body["next_page"] == str(start + 3 * 86400)
    params = {"start_time": start, "end_time": start + 10 * 86400, "limit": 31, "page": body["next_page"]}
    rest = httpx.get(url, params=params, headers=headers).json()
    assert len(rest["data"]) == 7 and not rest["has_more"] and rest["next_page"] is None
