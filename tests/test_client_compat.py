"""What real clients found (issue 14): guidellm's continuous_usage_stats, the extension fields of vLLM's and
SGLang's servers (SGLang's router sends no_stop_trim on every request), x-request-id / X-Client-Request-Id
tied to the ledger, system_fingerprint, and the operator's own `default` account not throttled like a
stranger's."""

from __future__ import annotations

import json
import os

import httpx
import openai
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from llmaas.billing import (
    FreeGrant,
    create_account,
    create_key,
    get_account,
    get_usage,
    hold_for_request,
    open_database,
    set_price,
    settle,
)
from llmaas.billing.db import MIGRATIONS_DIR
from llmaas.billing.holds import close_owner_holds, record_progress
from llmaas.billing.plans import PLANS
from llmaas.cli import main
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.bootstrap import bootstrap
from tests.test_server_api import HELLO, MODEL, Recorder, make_engine, serve

pytest_plugins = ["tests.billing_services"]  # postgres_url


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.model_factory import make_tiny_checkpoint

    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("compat"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def engine(model_dir):
    aeng = make_engine(model_dir)
    yield aeng
    aeng.shutdown()


@pytest.fixture(scope="module")
def hook():
    return Recorder()


@pytest.fixture(scope="module")
def base_url(engine, hook):
    with serve(create_app({MODEL: engine}, billing_hook=hook)) as url:
        yield url


@pytest.fixture(scope="module")
def raw(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def sse_chunks(response: httpx.Response) -> list[dict]:
    chunks = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunks.append(json.loads(line[len("data: ") :]))
    return chunks


def stream(raw: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, list[dict]]:
    with raw.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return r, sse_chunks(r)


# ------------------------------------------------------------------ continuous_usage_stats
CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def _check_running_usage(chunks: list[dict]) -> None:
    """Every chunk carries usage; prompt fixed, completion never falling; the last is the final usage."""
    *content, final = chunks
    assert final["choices"] == [] and final["usage"]["completion_tokens"] > 0
    prompt = final["usage"]["prompt_tokens"]
    previous = 0
    for chunk in content:
        usage = chunk["usage"]
        assert usage is not None, chunk
        assert usage["prompt_tokens"] == prompt
        assert previous <= usage["completion_tokens"] <= final["usage"]["completion_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        previous = usage["completion_tokens"]
    assert content[-1]["usage"]["completion_tokens"] == final["usage"]["completion_tokens"]


def test_continuous_usage_stats_chat(raw):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "stream_options": CONTINUOUS}
    _, chunks = stream(raw, "/v1/chat/completions", body)
    assert chunks[0]["usage"]["completion_tokens"] == 0  # the role chunk: before any token
    _check_running_usage(chunks)


def test_continuous_usage_stats_completions_with_several_prompts(raw):
    body = {"model": MODEL, "prompt": ["Once upon", "a time"], "max_tokens": 5, "stream_options": CONTINUOUS}
    _, chunks = stream(raw, "/v1/completions", body)
    _check_running_usage(chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_without_continuous_usage_only_the_last_chunk_has_it(raw):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream_options": {"include_usage": True}}
    _, chunks = stream(raw, "/v1/chat/completions", body)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 4


# ------------------------------------------------------------------ extension fields
SGLANG_ROUTER_DEFAULTS = {  # what SGLang's router adds to every chat request it forwards
    "no_stop_trim": False,
    "ignore_eos": False,
    "skip_special_tokens": True,
    "return_hidden_states": False,
    "continue_final_message": False,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "lora_path": None,
    "session_params": None,
    "min_tokens": None,
    "stop_token_ids": None,
    "sampling_seed": None,
}
VLLM_EXTRAS = {
    "min_tokens": 0,
    "include_stop_str_in_output": False,
    "spaces_between_special_tokens": True,
    "add_generation_prompt": True,
    "priority": 0,
    "request_id": "vllm-style-id",
}


def test_extension_fields_of_vllm_and_sglang_are_accepted(raw):
    for extras in (SGLANG_ROUTER_DEFAULTS, VLLM_EXTRAS):
        r = raw.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2, **extras}
        )
        assert r.status_code == 200, r.text
    completion_extras = {k: v for k, v in VLLM_EXTRAS.items() if k != "add_generation_prompt"}  # chat only
    r = raw.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **completion_extras}
    )
    assert r.status_code == 200, r.text
    r = raw.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stream_options": CONTINUOUS, "stream": True},
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"frobnicate": 1}, "frobnicate"),  # a name nobody defines
        ({"lora_path": "adapters/x"}, "lora_path"),
        ({"session_params": {"id": "s"}}, "session_params"),
        ({"return_hidden_states": True}, "return_hidden_states"),
        ({"continue_final_message": True}, "continue_final_message"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop_token_ids": list(range(257))}, "stop_token_ids"),
        ({"stop_token_ids": [10**9]}, "stop_token_ids"),
        ({"no_stop_trim": "yes"}, "no_stop_trim"),
        ({"priority": 2**40}, "priority"),
        ({"request_id": "has space"}, "request_id"),
        ({"rid": "x" * 513}, "rid"),
        ({"stream_options": {"continuous_usage_stats": 1}}, "stream_options.continuous_usage_stats"),
        ({"stream_options": {"continuous_usage_stats": True, "nonsense": True}}, "stream_options.nonsense"),
    ],
)
def test_unknown_and_out_of_range_extension_fields_are_400(raw, extra, param):
    r = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def _complete(raw, **fields) -> dict:
    body = {"model": MODEL, "prompt": "The quick brown fox", "temperature": 0, **fields}
    r = raw.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_no_stop_trim_and_include_stop_str_keep_the_stop_string(raw):
    text = _complete(raw, max_tokens=12)["choices"][0]["text"]
    stop = text[4:7]
    assert stop and stop in text
    cut = _complete(raw, max_tokens=12, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]
    for flag in ("no_stop_trim", "include_stop_str_in_output"):
        kept = _complete(raw, max_tokens=12, stop=[stop], **{flag: True})["choices"][0]
        assert kept["text"] == text[: text.index(stop) + len(stop)], flag


def test_stop_token_ids_and_min_tokens(raw):
    # A token made certain by logit_bias and named as a stop token ends every choice at once...
    forced = 7
    ended = _complete(raw, max_tokens=10, logit_bias={str(forced): 100}, stop_token_ids=[forced])
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["usage"]["completion_tokens"] == 1
    # ...unless min_tokens keeps it out of the first 5: then 5 other tokens, and the stop token 6th.
    later = _complete(
        raw, max_tokens=10, logit_bias={str(forced): 100}, stop_token_ids=[forced], min_tokens=5
    )
    assert later["choices"][0]["finish_reason"] == "stop" and later["usage"]["completion_tokens"] == 6
    assert later["choices"][0]["text"]


def test_sampling_seed_is_the_seed(raw):
    a = _complete(raw, max_tokens=8, temperature=1.0, seed=11)["choices"][0]["text"]
    b = _complete(raw, max_tokens=8, temperature=1.0, sampling_seed=11)["choices"][0]["text"]
    assert a == b


# ------------------------------------------------------------------ request ids
def test_x_request_id_is_the_completion_id_and_the_client_id_is_echoed(raw, hook):
    r = raw.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 2},
        headers={"X-Client-Request-Id": "eval-run-7/item-3"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == r.json()["id"] and r.json()["id"].startswith("chatcmpl-")
    assert r.headers["x-client-request-id"] == "eval-run-7/item-3"
    assert hook.wait_for(r.json()["id"]).client_request_id == "eval-run-7/item-3"

    r, chunks = stream(raw, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3})
    assert {c["id"] for c in chunks} == {r.headers["x-request-id"]} and "x-client-request-id" not in r.headers

    # vLLM's body field counts when no header names the request.
    r = raw.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "request_id": "from-body"}
    )
    assert r.headers["x-client-request-id"] == "from-body"
    assert hook.wait_for(r.json()["id"]).client_request_id == "from-body"


def test_every_response_has_an_x_request_id(raw):
    bad = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    missing = raw.get("/v1/nothing-here")
    unknown_model = raw.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    for r, status in ((bad, 400), (missing, 404), (unknown_model, 404), (raw.get("/health"), 200)):
        assert r.status_code == status and r.headers["x-request-id"], r
    assert bad.headers["x-request-id"].startswith("chatcmpl-")
    assert missing.headers["x-request-id"].startswith("req_")
    ids = {raw.get("/v1/models").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize("value", ["x" * 513, "has space", "tab\there", "caf\u00e9"])
def test_a_bad_client_request_id_is_400(raw, value):
    r = raw.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 2},
        headers={"X-Client-Request-Id": value.encode("utf-8")},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Client-Request-Id"
    assert r.headers["x-request-id"] and "x-client-request-id" not in r.headers


def test_the_longest_client_request_id_passes(raw):
    value = "a" * 512
    r = raw.get("/v1/models", headers={"X-Client-Request-Id": value})
    assert r.status_code == 200 and r.headers["x-client-request-id"] == value


# ------------------------------------------------------------------ ledger (billing)
@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'billing.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = open_database(url)
    if request.param == "postgresql":
        from tests.billing_services import TABLES

        with database.engine.begin() as connection:
            connection.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    bootstrap(database, [MODEL], admin_key="sk-admin-test", say=lambda _line: None)
    set_price(database, MODEL, input_usd="1.00", cached_input_usd="0.50", output_usd="2.00")
    yield database
    database.close()


@pytest.fixture(scope="module")
def billed_url(engine, db):
    with serve(create_app({MODEL: engine}, billing=ServerBilling(db))) as url:
        yield url


def _key(db, name: str, **key_args) -> str:
    create_account(db, name, plan="plus", free_grant=FreeGrant(amount_micros=10_000_000, valid_for=None))
    return create_key(db, name, **key_args).secret


def test_the_sdk_request_id_leads_to_the_ledger_row(billed_url, db):
    client = openai.OpenAI(base_url=billed_url + "/v1", api_key=_key(db, "tied"), max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=3, extra_headers={"X-Client-Request-Id": "lm-eval-0042"}
    )
    resp = raw.parse()
    assert resp._request_id == resp.id == raw.headers["x-request-id"]
    assert raw.headers["x-client-request-id"] == "lm-eval-0042"
    record = get_usage(db, resp._request_id)
    assert record.request_id == resp.id and record.client_request_id == "lm-eval-0042"

    chunks = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True)
    ids = {c.id for c in chunks}
    assert ids == {chunks.response.headers["x-request-id"]}
    assert get_usage(db, ids.pop()).client_request_id is None


def test_x_request_id_on_401_and_429(billed_url, db):
    r = httpx.post(billed_url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 401 and r.headers["x-request-id"]
    secret = _key(db, "once", requests_per_minute=1)
    headers = {"Authorization": f"Bearer {secret}", "X-Client-Request-Id": "burst"}
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    first = httpx.post(billed_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    second = httpx.post(billed_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert first.status_code == 200 and second.status_code == 429
    assert second.headers["x-request-id"].startswith("chatcmpl-")
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert second.headers["x-client-request-id"] == "burst"
    assert get_usage(db, first.headers["x-request-id"]).client_request_id == "burst"


def test_a_hold_closed_after_a_crash_keeps_the_client_id(db):
    create_account(db, "crashed", free_grant=FreeGrant(amount_micros=10_000_000, valid_for=None))
    account = get_account(db, "crashed")
    hold_for_request(db, "chatcmpl-lost", account.id, MODEL, 10, 10, owner="dead-1", client_request_id="c-9")
    record_progress(db, "chatcmpl-lost", 10, 0, 4)  # its tokens so far, then its server died
    close_owner_holds(db, "dead-1")
    record = get_usage(db, "chatcmpl-lost")
    assert record.status == "interrupted" and record.client_request_id == "c-9"


# ------------------------------------------------------------------ the operator's default account
def test_the_default_account_is_on_the_operator_plan_and_not_throttled(engine, tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'billing.sqlite3'}")
    lines: list[str] = []
    bootstrap(database, [MODEL], say=lines.append)
    assert get_account(database, "default").plan == "operator"
    secret = next(line.strip() for line in lines if line.strip().startswith("sk-"))
    operator, free = PLANS["operator"], PLANS["free"]
    assert operator.requests_per_minute > 100 * free.requests_per_minute
    assert free.priority < operator.priority < PLANS["plus"].priority
    # An evaluation's burst: more requests in a minute than the free plan allows, none refused.
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    with serve(create_app({MODEL: engine}, billing=ServerBilling(database))) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as c:
            statuses = [
                c.post("/v1/completions", json=body).status_code for _ in range(free.requests_per_minute + 5)
            ]
    assert statuses == [200] * (free.requests_per_minute + 5)
    database.close()


def test_an_existing_default_account_keeps_its_plan(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'billing.sqlite3'}")
    create_account(database, "default", plan="free")  # a database from before the operator plan
    bootstrap(database, [MODEL], say=lambda _line: None)
    assert get_account(database, "default").plan == "free"  # `llmaas accounts set-plan default operator`
    database.close()


# ------------------------------------------------------------------ system_fingerprint
def test_system_fingerprint_on_every_response_and_chunk(raw, engine):
    fingerprint = engine.system_fingerprint
    assert fingerprint.startswith("fp_") and len(fingerprint) == 13
    r = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert r.json()["system_fingerprint"] == fingerprint
    r = raw.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.json()["system_fingerprint"] == fingerprint
    for path, body in (
        ("/v1/chat/completions", {"messages": HELLO}),
        ("/v1/completions", {"prompt": "Hi"}),
    ):
        _, chunks = stream(
            raw, path, {"model": MODEL, "max_tokens": 3, "stream_options": {"include_usage": True}, **body}
        )
        assert {c["system_fingerprint"] for c in chunks} == {fingerprint}


def test_system_fingerprint_names_the_weights_and_the_engine_config(model_dir):
    def fingerprint(**config) -> str:
        aeng = make_engine(model_dir, **config)  # a server start
        try:
            return aeng.system_fingerprint
        finally:
            aeng.shutdown()

    first = fingerprint()
    assert fingerprint() == first  # a restart with the same configuration
    assert fingerprint(dtype="bfloat16") != first
    assert fingerprint(block_size=8) != first
    weights = next(p for p in model_dir.iterdir() if p.suffix == ".safetensors")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rebuilt weights
    try:
        assert fingerprint() != first
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint() == first


def test_llmaas_usage_finds_a_request_by_either_id(billed_url, db, capsys):
    if db.engine.dialect.name != "sqlite":
        pytest.skip("the CLI reads the same tables on PostgreSQL; once is enough")
    client = openai.OpenAI(base_url=billed_url + "/v1", api_key=_key(db, "cli-co"), max_retries=0, timeout=60)
    resp = client.completions.with_raw_response.create(
        model=MODEL, prompt="Hi", max_tokens=2, extra_headers={"X-Client-Request-Id": "nightly-eval-1"}
    ).parse()
    url = ["--database-url", str(db.engine.url)]
    for wanted in (resp.id, "nightly-eval-1"):
        assert main(["usage", "--request-id", wanted, "--json", *url]) == 0
        (record,) = json.loads(capsys.readouterr().out)["data"]
        assert record["request_id"] == resp.id and record["client_request_id"] == "nightly-eval-1"
        assert record["account"] == "cli-co" and record["completion_tokens"] == resp.usage.completion_tokens
    assert main(["usage", "--request-id", "no-such-id", *url]) == 0
    assert "no usage record" in capsys.readouterr().out
    assert main(["usage", "--request-id", "x" * 513, *url]) == 2


def test_the_0003_migration_keeps_old_rows_and_settles_old_holds(tmp_path):
    """A database at 0002 with an open hold: after the upgrade it settles, with no client id."""
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
        for statement in (
            "INSERT INTO accounts (id, name, plan, overdraft_micros, created_at) "
            "VALUES (1, 'acme', 'free', 0, '2025-01-01 00:00:00.000000')",
            "INSERT INTO prices (id, model, input_micros_per_m, cached_input_micros_per_m, "
            "output_micros_per_m, effective_from, created_at) "
            "VALUES (1, 'smol', 1, 1, 1, '2025-01-01 00:00:00', '2025-01-01 00:00:00')",
            "INSERT INTO holds (request_id, account_id, model, price_id, amount_micros, status, created_at) "
            "VALUES ('old', 1, 'smol', 1, 5, 'open', '2025-01-01 00:00:00.000000')",
        ):
            connection.execute(text(statement))
    engine.dispose()
    database = open_database(url)
    try:
        record = settle(database, "old", 3, 0, 2)
        assert record.client_request_id is None and get_usage(database, "old").client_request_id is None
    finally:
        database.close()
    with create_engine(url).begin() as connection:  # and back down
        config.attributes["connection"] = connection
        command.downgrade(config, "0002")
        columns = {row[1] for row in connection.execute(text("PRAGMA table_info(usage_records)"))}
        assert "client_request_id" not in columns
