"""Billing in a real server, end to end: prompts tokenized once, x-ratelimit-* headers on every /v1
response, the key cache, a plus request admitted before free ones queued earlier, and kill -9 of
`llmaas serve` on PostgreSQL."""
# ruff: noqa: F811  (fixtures are imported and requested by name)

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from llmaas.billing import (
    FreeGrant,
    create_account,
    create_key,
    get_usage,
    list_keys,
    open_database,
    open_holds,
    revoke_key,
    set_price,
)
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import MODEL, make_engine, serve
from tests.test_server_billing import HELLO, base_url, db, engine, new_account, sdk  # noqa: F401

pytest_plugins = ["tests.billing_services"]


def wait_until(condition, guard_s: float = 180.0) -> None:
    """Poll `condition`; the guard only stops a broken run from hanging (it is not what is tested)."""
    deadline = time.monotonic() + guard_s
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting (see the server's errors)"
        time.sleep(0.01)


def test_prompts_are_tokenized_once(engine, base_url, db):
    tokenizer = engine.engine.tokenizer
    calls = []
    encode = tokenizer.encode

    def counting(text, *args, **kwargs):
        calls.append(text)
        return encode(text, *args, **kwargs)

    tokenizer.encode = counting
    try:
        secret = new_account(db, "once")
        client = sdk(base_url, secret)
        chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert len(calls) == 1 and chat.usage.prompt_tokens == len(encode(calls[0]))
        calls.clear()
        done = client.completions.create(model=MODEL, prompt=["One prompt", "and another"], max_tokens=2)
        assert sorted(calls) == ["One prompt", "and another"] and done.usage.prompt_tokens > 0
    finally:
        del tokenizer.encode  # back to the class's method


def test_rate_limit_headers_on_every_v1_response(base_url, db):
    secret = new_account(db, "headers", requests_per_minute=50)
    client = sdk(base_url, secret)
    models = client.models.with_raw_response.list()
    assert models.headers["x-ratelimit-limit-requests"] == "50"
    assert models.headers["x-ratelimit-remaining-requests"] == "50"  # listing takes nothing
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    usage = httpx.get(
        base_url + "/v1/organization/usage/completions",
        params={"start_time": int(time.time()) - 3600},
        headers={"authorization": f"Bearer {secret}"},
    )
    assert usage.status_code == 200 and usage.headers["x-ratelimit-remaining-requests"] == "49"
    bad = httpx.post(
        base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": -1},
        headers={"authorization": f"Bearer {secret}"},
    )
    assert bad.status_code == 400 and bad.headers["x-ratelimit-limit-tokens"]


def test_a_cached_key_revoked_elsewhere_gets_401_on_its_next_completion(base_url, db):
    secret = new_account(db, "cached")
    client = sdk(base_url, secret)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # the key is now cached
    revoke_key(db, list_keys(db, "cached")[0].id)  # as `llmaas keys revoke` or another replica would
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):  # dropped from the cache by that refusal
        client.models.list()
    assert open_holds(db, "cached") == []


def test_revoking_through_the_admin_api_drops_the_cached_key_at_once(base_url, db):
    secret = new_account(db, "admin-revoked")
    client = sdk(base_url, secret)
    assert client.models.list().data  # cached
    key_id = list_keys(db, "admin-revoked")[0].id
    admin = {"authorization": "Bearer sk-admin-test"}
    assert httpx.post(f"{base_url}/admin/keys/{key_id}/revoke", headers=admin).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_a_plus_request_is_admitted_before_free_ones_queued_earlier(tmp_path_factory):
    """One sequence at a time: a free request runs, three free ones queue, then a plus one arrives.
    It preempts the running one and goes first; the free ones keep their order."""
    model_dir = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("prio"), max_position_embeddings=1024)
    aeng = make_engine(model_dir, max_num_seqs=1, kv_cache_memory=4 * 2**20)
    database = open_database(f"sqlite:///{tmp_path_factory.mktemp('prio-ledger') / 'billing.sqlite3'}")
    set_price(database, MODEL, input_usd="0.05", cached_input_usd="0.025", output_usd="0.20")
    keys = {}
    for name, plan in (("free-co", "free"), ("plus-co", "plus")):
        create_account(database, name, plan=plan, free_grant=FreeGrant(10**9, valid_for=None))
        keys[name] = create_key(database, name).secret

    def queued(n: int):
        return lambda: aeng.call(lambda e: e.num_waiting).result(10) >= n

    finished: list[str] = []
    lock = threading.Lock()
    try:
        with serve(create_app({MODEL: aeng}, billing=ServerBilling(database))) as url:

            def post(label: str, key: str) -> None:
                body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "ignore_eos": True}
                r = httpx.post(
                    url + "/v1/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {key}"},
                    timeout=120,
                )
                assert r.status_code == 200, r.text
                with lock:
                    finished.append(label)

            long_body = {
                "model": MODEL,
                "messages": HELLO,
                "max_tokens": 900,
                "ignore_eos": True,
                "stream": True,
            }
            with (
                httpx.Client(base_url=url, timeout=120) as c,
                c.stream(
                    "POST",
                    "/v1/chat/completions",
                    json=long_body,
                    headers={"authorization": f"Bearer {keys['free-co']}"},
                ) as occupant,
            ):
                lines = occupant.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                occupant_id = first.split('"id":"', 1)[1].split('"', 1)[0]
                threads = []
                for label, key in (("free-1", "free-co"), ("free-2", "free-co"), ("free-3", "free-co")):
                    threads.append(threading.Thread(target=post, args=(label, keys[key])))
                    threads[-1].start()
                    wait_until(queued(len(threads)))  # queued in this order
                # The plus request preempts the running free occupant (issue 13) instead of queueing
                # behind it: it finishes while the occupant's stream is still open.
                post("plus", keys["plus-co"])
                assert finished == ["plus"]
            # Leaving the stream aborts the occupant; the free ones follow in the order they queued.
            for t in threads:
                t.join(120)
        occupant = get_usage(database, occupant_id)
        assert occupant is not None and occupant.status == "cancelled", "the occupant ended before the test"
        assert finished == ["plus", "free-1", "free-2", "free-3"]
    finally:
        aeng.shutdown()
        database.close()


def test_a_response_whose_settlement_fails_is_not_completed(engine, tmp_path, monkeypatch):
    database = open_database(f"sqlite:///{tmp_path / 'billing.sqlite3'}")
    set_price(database, MODEL, input_usd="1", cached_input_usd="0.5", output_usd="2")
    create_account(database, "default", free_grant=FreeGrant(10**9, valid_for=None))
    billing = ServerBilling(database, auth=False)

    def unreachable(*_args, **_kwargs):
        raise OSError("the database went away")

    monkeypatch.setattr(billing, "finish", unreachable)
    with serve(create_app({MODEL: engine}, billing=billing)) as url:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 3}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "billing_unavailable"
        stream = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60)
        assert "billing_unavailable" in stream.text and "[DONE]" not in stream.text
    database.close()


def test_keys_never_reach_the_logs(base_url, db, caplog):
    secret = new_account(db, "logged")
    with caplog.at_level("DEBUG"):
        client = sdk(base_url, secret)
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            sdk(base_url, secret + "x").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        revoke_key(db, list_keys(db, "logged")[0].id)
        with pytest.raises(openai.AuthenticationError) as err:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert secret not in err.value.response.text
    assert caplog.records and not any(
        secret in r.getMessage() or secret in (r.exc_text or "") for r in caplog.records
    )
