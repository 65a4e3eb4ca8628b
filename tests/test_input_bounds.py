"""Every field of every HTTP endpoint, given hostile values, is answered 2xx or a 4xx naming it.

The table: every operation of the app's /openapi.json (public and /admin), every body field (nested
ones included), query and path parameter, times every value of input_bounds_cases.HOSTILE (2**64,
NaN as a bare token, "1_000", a 1 MB string, a 100k-element list, lone surrogates, naive dates...).
The organization endpoints read their query by hand, so their parameters are listed here; a route
that is neither in the openapi table nor listed fails test_every_route_is_in_the_table.

What must hold for each case: no 5xx, no traceback text, OpenAI's error shape, and a 400 names the
parameter that was changed (the rest of the request is valid). Cases that fail on today's code are
xfail(strict=True) with the item of issue 13 that fixes them: when a fix lands, its cases XPASS,
which fails, and the marker comes off.
"""

from __future__ import annotations

import itertools
import json
import time
from contextlib import contextmanager
from urllib.parse import quote

import httpx
import pytest

from llmaas.billing import FreeGrant, create_account, create_key, list_keys, open_database, set_price, top_up
from llmaas.engine.async_embedding_engine import AsyncEmbeddingEngine
from llmaas.engine.llm_engine import EngineConfig
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.bootstrap import bootstrap
from tests.input_bounds_cases import (
    HOSTILE,
    MB_STRING,
    Hostile,
    body_text,
    field_paths,
    names_the_field,
    param_name,
)
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import make_engine, serve

pytest_plugins = ["tests.billing_services"]  # postgres_url

MODEL = "tiny"
EMBEDDING_MODEL = "minilm-l6"  # the real one: no tiny BERT checkpoint ships with a tokenizer
ADMIN_KEY = "sk-admin-bounds"
SPEC = create_app().openapi()  # routes only: no engine, no billing needed to document them
DEFS = SPEC["components"]["schemas"]

# A valid body per operation; the case then changes one field. `fresh` names a new account.
BASE_BODIES = {
    ("post", "/v1/chat/completions"): lambda fresh: {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    },
    ("post", "/v1/completions"): lambda fresh: {"model": MODEL, "prompt": "hi", "max_tokens": 2},
    ("post", "/v1/responses"): lambda fresh: {"model": MODEL, "input": "hi", "max_output_tokens": 2},
    ("post", "/v1/embeddings"): lambda fresh: {"model": EMBEDDING_MODEL, "input": "hi"},
    ("post", "/admin/accounts"): lambda fresh: {"name": fresh(create=False)},
    ("post", "/admin/accounts/{account}/plan"): lambda fresh: {"plan": "plus"},
    ("post", "/admin/keys"): lambda fresh: {"account": fresh()},
    ("post", "/admin/credits/{account}/grant"): lambda fresh: {"amount_usd": "1.00"},
    ("post", "/admin/credits/{account}/top-up"): lambda fresh: {"amount_usd": "1.00"},
    ("post", "/admin/prices"): lambda fresh: {
        "model": "priced",
        "input": "0.1",
        "cached_input": "0.05",
        "output": "0.2",
    },
}
# Routes that parse their query themselves (no openapi parameters): the parameters they read.
_REPORT_QUERY = ["start_time", "end_time", "bucket_width", "group_by", "project_ids"]
HAND_PARSED_QUERY = {
    ("get", "/v1/organization/usage/completions"): _REPORT_QUERY,
    ("get", "/v1/organization/usage/embeddings"): _REPORT_QUERY,
    ("get", "/v1/organization/costs"): _REPORT_QUERY,
}
BASE_QUERY = {"start_time": str(int(time.time()) - 86_400), "bucket_width": "1d", "group_by": "model"}
# Parameters checked against each other: naming either is naming the fault.
RELATED = {
    name: {"start_time", "end_time", "bucket_width"} for name in ("start_time", "end_time", "bucket_width")
}
# Tools are rendered into the prompt: a conversation too long for the context window names `messages`.
# (`input` on /v1/responses, where the instructions are rendered too).
RELATED |= {"tools": {"messages", "input"}, "functions": {"messages"}, "instructions": {"input"}}
NO_INPUT = {("get", "/health"), ("get", "/metrics"), ("get", "/v1/models"), ("get", "/admin/accounts")}
# Fields the walk cannot see (map values); changed like any other.
EXTRA_PATHS = {
    ("post", "/v1/chat/completions"): [("logit_bias", "5"), ("metadata", "k"), ("chat_template_kwargs", "k")],
    ("post", "/v1/completions"): [("logit_bias", "5")],
    ("post", "/v1/responses"): [("metadata", "k")],
}
ENGINE_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def _operations():
    for path, ops in SPEC["paths"].items():
        for method, op in ops.items():
            yield method, path, op


def _cases():
    cases = []
    for method, path, op in _operations():
        schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        if schema is not None:
            for field in field_paths(schema, DEFS) + EXTRA_PATHS.get((method, path), []):
                cases += [(method, path, "body", field, h) for h in HOSTILE]
        params = [(p["in"], p["name"]) for p in op.get("parameters", [])]
        params += [("query", n) for n in HAND_PARSED_QUERY.get((method, path), [])]
        for where, name in params:
            # a URL cannot carry 1 MB (clients refuse past 64 KiB): the 60 KB string stands for it
            cases += [(method, path, where, (name,), h) for h in HOSTILE if h.text not in (None, MB_STRING)]
    return cases


def _case_id(case) -> str:
    method, path, where, field, hostile = case
    return f"{method.upper()} {path} {where}:{param_name(field)}={hostile.name}"


# Cases that fail on today's code, with the issue 13 item whose fix makes them pass: strict, so a fix
# makes them XPASS, which fails, and the entry comes off.
KNOWN_FAILURES: dict[str, str] = {}


def _params():
    out = []
    for case in _cases():
        case_id = _case_id(case)
        marks = []
        if case_id in KNOWN_FAILURES:
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[case_id])]
        out.append(pytest.param(*case, id=case_id, marks=marks))
    return out


class Server:
    def __init__(self, client: httpx.Client, db, customer: str, engine):
        self.client, self.db, self.customer, self.engine = client, db, customer, engine
        self._names = itertools.count()

    def fresh(self, create: bool = True) -> str:
        """A new account name (created, with credit, unless create=False)."""
        name = f"acct-{next(self._names)}"
        if create:
            create_account(self.db, name, plan="plus", free_grant=FreeGrant(10_000_000, None))
        return name

    def fresh_key_id(self) -> str:
        account = self.fresh()
        create_key(self.db, account)
        return list_keys(self.db, account)[0].id


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("bounds"), max_position_embeddings=1024)
    engine = make_engine(model_dir, max_model_len=128)  # every generation is short
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def embedder():
    engine = AsyncEmbeddingEngine.from_config(EngineConfig(model=EMBEDDING_MODEL, dtype="float32"))
    yield engine
    engine.shutdown()


@contextmanager
def _serving(engine, url: str, embedder=None):
    db = open_database(url)
    bootstrap(db, [MODEL, EMBEDDING_MODEL], admin_key=ADMIN_KEY, say=lambda _line: None)
    set_price(db, MODEL, input_usd="1.00", cached_input_usd="0.50", output_usd="2.00")
    create_account(db, "customer", plan="plus", free_grant=None)
    top_up(db, "customer", 1_000_000_000)  # $1,000: no case is refused for its balance
    customer = create_key(db, "customer", requests_per_minute=10**6, tokens_per_minute=10**9).secret
    try:
        engines = {MODEL: engine, **({EMBEDDING_MODEL: embedder} if embedder is not None else {})}
        with serve(create_app(engines, billing=ServerBilling(db))) as base_url:
            with httpx.Client(base_url=base_url, timeout=120) as client:
                yield Server(client, db, customer, engine)
    finally:
        db.close()


@pytest.fixture(scope="module")
def server(engine, embedder, tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'billing.sqlite3'}"
    with _serving(engine, url, embedder) as server:
        yield server


@pytest.fixture(scope="module")
def pg_server(engine, postgres_url):
    """The same server on PostgreSQL, whose integers and text overflow differently from SQLite's."""
    from tests.billing_services import TABLES  # after pytest_plugins registered it

    database = open_database(postgres_url)
    with database.engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    database.close()
    with _serving(engine, postgres_url) as server:
        yield server


def _quote(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _request(server: Server, method: str, path: str, where: str, field: tuple, hostile: Hostile):
    path_values = {
        "name": server.fresh,
        "account": server.fresh,
        "key_id": server.fresh_key_id,
        "model_id": lambda: MODEL,
        "response_id": lambda: "resp-unknown",
    }
    url = path
    for name, value in path_values.items():
        if "{" + name + "}" in url:
            text = hostile.text if (where == "path" and field == (name,)) else value()
            url = url.replace("{" + name + "}", _quote(text))
    query = dict(BASE_QUERY) if (method, path) in HAND_PARSED_QUERY else {}
    if where == "query":
        query[field[0]] = hostile.text
    if query:
        url += "?" + "&".join(f"{k}={_quote(v)}" for k, v in query.items())
    key = server.customer if path.startswith("/v1/") else ADMIN_KEY
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    content = None
    if (method, path) in BASE_BODIES:
        base = BASE_BODIES[(method, path)](server.fresh)
        if where == "body":
            op = SPEC["paths"][path][method]
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            content = body_text(base, field, hostile, schema, DEFS)
        else:
            content = json.dumps(base)
    with server.client.stream(method.upper(), url, content=content, headers=headers) as r:
        text = r.read().decode("utf-8", "replace")
    if r.status_code >= 500:  # uvicorn drops the connection after an unhandled error: start afresh
        server.client.close()
        server.client = httpx.Client(base_url=server.client.base_url, timeout=120)
    return r, text


def assert_no_work_left_behind(server: Server, timeout: float = 10.0) -> None:
    """An answered request, refused or not, leaves nothing running or queued for the next client."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.engine.call(lambda e: e.stats()).result(timeout)
        if stats["running"] == 0 and stats["waiting"] == 0:
            return
        assert time.monotonic() < deadline, f"the engine still has work after the answer: {stats}"
        time.sleep(0.02)


def assert_answered_as_a_client_error(r: httpx.Response, text: str, field: tuple | None) -> None:
    assert r.status_code < 500, f"{r.status_code}: {text[:300]}"
    assert "Traceback" not in text and 'File "' not in text, text[:300]
    if r.status_code >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, text[:300]
        if r.status_code == 400 and field is not None:
            related = RELATED.get(field[0], set())
            assert names_the_field(error["param"], field, related), f"param {error['param']!r}: {text[:200]}"
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        last = text.rstrip().rsplit("\n\n", 1)[-1]
        # chat and completions end with [DONE]; /v1/responses with its final typed event
        assert last == "data: [DONE]" or last.startswith(
            ("event: response.completed", "event: response.incomplete")
        ), text[-300:]
        failed = ("event: error", "event: response.failed") if last.startswith("event:") else ('"error"',)
        assert not any(sign in text for sign in failed), text[-300:]


@pytest.mark.parametrize("method, path, where, field, hostile", _params())
def test_hostile_value(server, method, path, where, field, hostile):
    r, text = _request(server, method, path, where, field, hostile)
    try:
        assert_answered_as_a_client_error(r, text, None if hostile.unparsable else field)
    finally:
        if path in ENGINE_ROUTES:
            assert_no_work_left_behind(server)


# On PostgreSQL: the operator's routes (what reaches the ledger), with the values that overflow a
# column or its encoding; the public routes' bounds do not depend on the database.
PG_HOSTILE = {
    "2**64", "-2**64", "2**63", "1e308", "2**64-string", "1e30-string", "5e12-usd-string",
    "1MB-string", "lone-surrogates", "naive-date-min", "date-max",
}  # fmt: skip
PG_KNOWN_FAILURES: dict[str, str] = {}  # PostgreSQL-only failures, each with its issue 13 item


def _pg_params():
    out = []
    for case in _cases():
        method, path, where, field, hostile = case
        if path.startswith("/admin") and hostile.name in PG_HOSTILE:
            case_id = _case_id(case)
            reason = PG_KNOWN_FAILURES.get(case_id)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(*case, id=case_id, marks=marks))
    return out


@pytest.mark.parametrize("method, path, where, field, hostile", _pg_params())
def test_hostile_admin_value_on_postgresql(pg_server, method, path, where, field, hostile):
    r, text = _request(pg_server, method, path, where, field, hostile)
    assert_answered_as_a_client_error(r, text, None if hostile.unparsable else field)


def test_every_route_is_in_the_table():
    """A new route gets a valid base body (or its hand-parsed query listed) before it ships."""
    for method, path, op in _operations():
        has_body = "requestBody" in op
        assert not has_body or (method, path) in BASE_BODIES, f"add a base body for {method} {path}"
        if (method, path) not in BASE_BODIES | HAND_PARSED_QUERY and not op.get("parameters"):
            assert (method, path) in NO_INPUT, f"{method} {path} takes no input? list it in NO_INPUT"
    assert len(_cases()) > 2000


MONEY_FIELDS = [
    ("/admin/credits/{account}/grant", "amount_usd"),
    ("/admin/credits/{account}/top-up", "amount_usd"),
    ("/admin/prices", "input"),
    ("/admin/prices", "cached_input"),
    ("/admin/prices", "output"),
]


@pytest.mark.parametrize("path, field", MONEY_FIELDS)
def test_money_is_plain_decimal_text(server, path, field):
    """Underscores are Python's digit grouping, not money: '1_000' is refused, not read as $1,000."""
    r, text = _request(server, "post", path, "body", (field,), Hostile("1_000", '"1_000"', None))
    assert r.status_code == 400 and json.loads(text)["error"]["param"] == field, text[:300]


def test_no_account_name_differs_from_admin_by_case_only(server):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = server.client.post("/admin/accounts", json={"name": "Admin"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text


def test_the_server_still_serves_everyone_after_the_table(server):
    """Last in the module: no case left the server, the ledger or an account listing broken."""
    headers = {"Authorization": f"Bearer {server.customer}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert server.client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert server.client.get("/admin/accounts", headers=admin).status_code == 200
    assert server.client.get("/health").status_code == 200
