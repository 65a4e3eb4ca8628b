"""Billing around real HTTP requests: a real server on loopback, a real SQLite ledger, the openai SDK.

Keys and prices are created with the billing library; the server authenticates, rate limits, holds
the worst case and settles; the tests check what the SDK sees and what the ledger says.
"""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest

from llmaas.billing import (
    FreeGrant,
    balance,
    cost_micros,
    create_account,
    create_key,
    current_price,
    get_usage,
    list_keys,
    open_database,
    open_holds,
    revoke_key,
    set_price,
    top_up,
)
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.bootstrap import bootstrap
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import MODEL, make_engine, serve

pytest_plugins = ["tests.billing_services"]  # postgres_url

HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_checkpoint(
        "llama", tmp_path_factory.mktemp("billing"), max_position_embeddings=1024
    )
    aeng = make_engine(model_dir)
    yield aeng
    aeng.shutdown()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request, tmp_path_factory):
    """The server's ledger, on a SQLite file and on PostgreSQL (skipped, or failed in CI, if absent)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'billing.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = open_database(url)
    if request.param == "postgresql":  # other modules leave rows behind in the run's database
        from tests.billing_services import TABLES  # after pytest_plugins registered it

        with database.engine.begin() as connection:
            connection.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    bootstrap(database, [MODEL], admin_key="sk-admin-test", say=lambda _line: None)
    set_price(database, MODEL, input_usd="1.00", cached_input_usd="0.50", output_usd="2.00")
    yield database
    database.close()


@pytest.fixture(scope="module")
def base_url(engine, db):
    with serve(create_app({MODEL: engine}, billing=ServerBilling(db))) as url:
        yield url


def new_account(db, name: str, plan: str = "plus", micros: int = 10_000_000, **key_args):
    create_account(db, name, plan=plan, free_grant=FreeGrant(amount_micros=micros, valid_for=None))
    return create_key(db, name, **key_args).secret


def sdk(base_url: str, key: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, timeout=60, **{"max_retries": 0, **kw})


def test_missing_unknown_and_revoked_keys_get_401(base_url, db):
    with pytest.raises(openai.AuthenticationError) as err:
        sdk(base_url, "sk-not-a-key").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    secret = new_account(db, "revoked-co")
    client = sdk(base_url, secret)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert client.models.list().data  # /v1/models works with a valid key
    key_id = list_keys(db, "revoked-co")[0].id
    revoke_key(db, key_id)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert secret not in r.text


def test_cost_in_usage_equals_the_ledger_and_balance_drops_exactly(base_url, db):
    secret = new_account(db, "acme")
    before = balance(db, "acme")
    client = sdk(base_url, secret)
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=7, temperature=0)
    record = get_usage(db, resp.id)
    price = current_price(db, MODEL)
    u = resp.usage
    expected = cost_micros(price, u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens)
    assert expected > 0 and record.cost_micros == expected and record.status == "completed"
    assert Decimal(str(u.model_extra["cost"])) == Decimal(expected) / 1_000_000
    after = balance(db, "acme")
    assert before.available_micros - after.available_micros == expected
    assert after.held_micros == 0 and open_holds(db, "acme") == []

    # Streaming: the include_usage chunk carries the cost, settled before [DONE].
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    record = get_usage(db, last.id)
    assert Decimal(str(last.usage.model_extra["cost"])) == Decimal(record.cost_micros) / 1_000_000
    assert record.completion_tokens == last.usage.completion_tokens
    assert balance(db, "acme").available_micros == after.available_micros - record.cost_micros


def test_insufficient_quota_is_429_and_the_sdk_does_not_retry(base_url, db):
    secret = new_account(db, "poor", micros=3)  # 3 micro-USD: a few tokens at most
    sent = []
    http = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.url.path)]})
    client = sdk(base_url, secret, max_retries=3, http_client=http)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=50)
    assert err.value.code == "insufficient_quota" and err.value.type == "insufficient_quota"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert sent == ["/v1/chat/completions"]  # one try, no retries
    assert balance(db, "poor").available_micros == 3 and open_holds(db, "poor") == []
    top_up(db, "poor", 10_000_000)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)


def test_rate_limit_headers_and_429(base_url, db):
    secret = new_account(db, "limited", requests_per_minute=1)
    client = sdk(base_url, secret)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-remaining-tokens" in raw.headers
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert err.value.code == "rate_limit_exceeded"
    assert float(err.value.response.headers["retry-after"]) > 0


def test_model_allow_list_and_admin_key_cannot_infer(base_url, db):
    secret = new_account(db, "narrow", allowed_models=["some-other-model"])
    with pytest.raises(openai.PermissionDeniedError):
        sdk(base_url, secret).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        sdk(base_url, "sk-admin-test").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)


def test_no_auth_bills_the_default_account(engine, tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'billing.sqlite3'}")
    lines: list[str] = []
    bootstrap(database, [MODEL], say=lines.append)
    assert any(line.strip().startswith("sk-") for line in lines)  # default key and admin key, once
    again: list[str] = []
    bootstrap(database, [MODEL], say=again.append)
    assert again == []
    before = balance(database, "default").available_micros
    with serve(create_app({MODEL: engine}, billing=ServerBilling(database, auth=False))) as url:
        resp = sdk(url, "anything").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    record = get_usage(database, resp.id)
    assert record.key_id is None and record.cost_micros > 0
    assert before - balance(database, "default").available_micros == record.cost_micros
    database.close()
