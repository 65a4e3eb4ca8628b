"""The console's sessions and JSON over real HTTP: how a key becomes a cookie, and what a cookie may do."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from llmaas.bench.cost import bench_costs, choose_level, machine_cost, parse_cost_args
from llmaas.billing import get_usage
from llmaas.billing.money import format_usd, usd_to_micros
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.console import MachineCosts
from tests.console_server import ADMIN_KEY, bench_result, start_console_server
from tests.test_server_api import MODEL, serve


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_console_server(tmp_path_factory)


def sign_in(server, key: str) -> tuple[httpx.Client, dict]:
    client = httpx.Client(base_url=server.url, timeout=60)
    r = client.post("/console/api/session", json={"api_key": key})
    assert r.status_code == 200, r.text
    return client, {"x-csrf-token": r.json()["csrf_token"]}


def test_the_session_cookie_is_httponly_strict_and_holds_no_key(server):
    client = httpx.Client(base_url=server.url)
    r = client.post("/console/api/session", json={"api_key": server.acme_key})
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=3600" in cookie
    assert server.acme_key not in cookie and server.acme_key not in r.text
    assert r.json()["account"] == "acme" and r.json()["role"] == "customer"
    for bad in ("sk-not-a-key", "", "no-prefix"):
        refused = httpx.post(server.url + "/console/api/session", json={"api_key": bad})
        assert refused.status_code == 401 and "set-cookie" not in refused.headers
    elsewhere = httpx.post(
        server.url + "/console/api/session",
        json={"api_key": server.acme_key},
        headers={"origin": "https://evil.example"},
    )
    assert elsewhere.status_code == 403 and "set-cookie" not in elsewhere.headers
    too_long = httpx.post(server.url + "/console/api/session", json={"api_key": "sk-" + "x" * 300})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "api_key"


def test_pages_carry_a_content_security_policy_and_no_inline_script(server):
    r = httpx.get(server.url + "/console/")
    policy = r.headers["content-security-policy"]
    assert (
        "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    )
    assert "<script>" not in r.text and 'type="module" src="/console/static/' in r.text
    assert httpx.get(server.url + "/").headers["location"] == "/console/"
    assert httpx.get(server.url + "/console/usage").status_code == 303  # no session: to the sign-in page
    assert httpx.get(server.url + "/console/static/../app.py").status_code == 404


def test_a_session_needs_its_csrf_token_and_this_origin(server):
    client, csrf = sign_in(server, server.acme_key)
    assert client.get("/console/api/account").status_code == 403
    assert client.get("/console/api/account", headers={"x-csrf-token": "wrong"}).status_code == 403
    assert client.get("/console/api/account", headers=csrf).status_code == 200
    foreign = {**csrf, "origin": "https://evil.example"}
    r = client.post("/console/api/keys", json={"name": "x"}, headers=foreign)
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    r = client.post(
        "/v1/chat/completions",
        headers=foreign,
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    )
    assert r.status_code == 403
    assert client.delete("/console/api/session").status_code == 403  # signing out needs the token too
    assert client.delete("/console/api/session", headers=csrf).status_code == 200
    assert client.get("/console/api/account", headers=csrf).status_code == 401  # the session is gone


def test_an_account_sees_only_its_own_data(server):
    mine, csrf = sign_in(server, server.acme_key)
    theirs = openai.OpenAI(base_url=server.url + "/v1", api_key=server.globex_key, max_retries=0)
    theirs.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Secret"}], max_tokens=4
    )
    account = mine.get("/console/api/account", headers=csrf).json()
    assert account["account"] == "acme" and account["balance"]["account"] == "acme"
    keys = mine.get("/console/api/keys", headers=csrf).json()["data"]
    assert keys and {k["account"] for k in keys} == {"acme"}
    start = int(time.time()) - 3600
    params = {"start_time": start, "group_by": "project_id", "bucket_width": "1h"}
    usage = mine.get("/v1/organization/usage/completions", params=params, headers=csrf).json()
    assert {r["project_id"] for b in usage["data"] for r in b["results"]} <= {"acme"}
    narrowed = mine.get(
        "/v1/organization/usage/completions", params={**params, "project_ids": "globex"}, headers=csrf
    ).json()
    assert {r["project_id"] for b in narrowed["data"] for r in b["results"]} <= {"acme"}
    globex_key_id = _key_id_of(server, server.globex_key)
    r = mine.post(f"/console/api/keys/{globex_key_id}/revoke", headers=csrf)
    assert r.status_code == 404  # another account's key is not found, and stays active
    theirs.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Still"}], max_tokens=2)
    assert mine.get("/admin/accounts", headers=csrf).status_code == 401
    assert mine.get("/console/api/admin/engine", headers=csrf).status_code == 401
    assert mine.get("/console/admin/accounts").status_code == 403


def _key_id_of(server, key: str) -> str:
    client, csrf = sign_in(server, key)
    return client.get("/console/api/keys", headers=csrf).json()["data"][0]["id"]


def test_a_revoked_keys_session_stops_working_at_once(server):
    admin, admin_csrf = sign_in(server, ADMIN_KEY)
    assert (
        admin.post(
            "/admin/accounts", json={"name": "initech", "plan": "free"}, headers=admin_csrf
        ).status_code
        == 201
    )
    made = admin.post("/admin/keys", json={"account": "initech"}, headers=admin_csrf).json()
    client, csrf = sign_in(server, made["secret"])
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=chat, headers=csrf).status_code == 200
    assert admin.post(f"/admin/keys/{made['id']}/revoke", headers=admin_csrf).status_code == 200
    assert client.post("/v1/chat/completions", json=chat, headers=csrf).status_code == 401
    assert client.get("/console/api/account", headers=csrf).status_code == 401
    assert client.get("/console/api/keys", headers=csrf).status_code == 401


def test_the_playgrounds_stream_is_billed_like_the_api(server):
    client, csrf = sign_in(server, server.acme_key)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_object"},
    }
    with client.stream("POST", "/v1/chat/completions", json=body, headers=csrf) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        request_id = r.headers["x-request-id"]
    usage = chunks[-1]["usage"]
    record = get_usage(server.db, request_id)
    assert round(usage["cost"] * 1e6) == record.cost_micros > 0
    assert usage["completion_tokens"] == record.completion_tokens


def test_the_margin_page_costs_tokens_as_llmaas_cost_does(server, tmp_path):
    bench_file = tmp_path / "bench.json"
    bench_file.write_text(json.dumps(bench_result(MODEL)))
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=server.acme_key, max_retries=0)
    sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Cost?"}], max_tokens=5)
    admin, csrf = sign_in(server, ADMIN_KEY)
    server.app.state.console_machine_costs = MachineCosts.load("0.36", [str(bench_file)])
    start = int(time.time()) // 86400 * 86400
    body = admin.get("/console/api/admin/margin", params={"start_time": start, "end_time": start + 86400},
                     headers=csrf).json()  # fmt: skip
    (row,) = [r for r in body["data"] if r["model"] == MODEL]
    level = choose_level(bench_costs(bench_result(MODEL), parse_cost_args("0.36", "0", None, "0.1")))
    expected = machine_cost(level, row["input_tokens"], row["input_cached_tokens"], row["output_tokens"])
    expected_micros = -(-expected.numerator // expected.denominator)
    assert row["machine_usd"] == format_usd(expected_micros)
    revenue = usd_to_micros(row["revenue_usd"])
    assert row["margin_usd"] == format_usd(revenue - expected_micros)
    assert body["rates"][MODEL]["concurrency"] == 4 and body["usd_per_hour"] == "0.36"
    what_if = admin.get("/console/api/admin/margin", params={"start_time": start, "usd_per_hour": "0.72"},
                        headers=csrf).json()  # fmt: skip
    assert what_if["usd_per_hour"] == "0.72"
    assert admin.get("/console/api/admin/margin", params={"start_time": start, "usd_per_hour": "-1"},
                     headers=csrf).status_code == 400  # fmt: skip


def test_without_auth_the_console_signs_in_as_default_and_only_a_signed_in_browser(server):
    app = create_app({}, billing=ServerBilling(server.db, auth=False))  # no model needed for the console
    with serve(app) as url:
        assert httpx.get(url + "/console/api/account").status_code == 401  # a request from nowhere
        assert httpx.post(url + "/console/api/keys", json={}).status_code == 401
        client = httpx.Client(base_url=url)
        r = client.post("/console/api/session", json={"api_key": ""})
        assert r.status_code == 200 and r.json()["account"] == "default"
        csrf = {"x-csrf-token": r.json()["csrf_token"]}
        assert client.get("/console/api/account", headers=csrf).json()["account"] == "default"
        assert client.get("/console/api/account").status_code == 403  # still CSRF-checked
        admin = httpx.post(url + "/console/api/session", json={"api_key": ADMIN_KEY}).json()
        assert admin["role"] == "admin"
