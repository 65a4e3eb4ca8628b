"""A bounded schemathesis run against the app's own /openapi.json: what it says is what it does.

Every operation, with data that follows the schema (positive) and data that breaks it (negative),
is sent over loopback to a real server (tiny model, SQLite ledger, billing on). Checks: no 5xx
(not_a_server_error), every status answered is documented (status_code_conformance), and a JSON
body has the documented shape (response_schema_conformance). Derandomized with a bounded number of
examples per operation and mode, so a run is the same every time and takes well under a minute.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from llmaas.billing import FreeGrant, create_account, create_key, open_database, set_price, top_up
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.bootstrap import bootstrap
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import make_engine, serve

MODEL = "tiny"
ADMIN_KEY = "sk-admin-conformance"
MAX_EXAMPLES = 25
SPEC = create_app().openapi()
OPERATIONS = [(method, path) for path, ops in SPEC["paths"].items() for method in ops]

# Operations known not to conform yet, each with the issue item that fixes it (none left).
KNOWN_FAILURES: dict[str, str] = {}


def _can_be_broken(method: str, path: str) -> bool:
    """Negative data needs something with a constraint: a body or a non-path parameter (any string
    is a valid path segment)."""
    op = SPEC["paths"][path][method]
    return "requestBody" in op or any(p["in"] != "path" for p in op.get("parameters", []))


def _params():
    out = []
    for method, path in OPERATIONS:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not _can_be_broken(method, path):
                continue
            case_id = f"{method.upper()} {path} {mode.value}"
            reason = KNOWN_FAILURES.get(case_id)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(method, path, mode, id=case_id, marks=marks))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conformance")
    model_dir = make_tiny_checkpoint("llama", tmp, max_position_embeddings=1024)
    engine = make_engine(model_dir, max_model_len=128)
    db = open_database(f"sqlite:///{tmp / 'billing.sqlite3'}")
    bootstrap(db, [MODEL], admin_key=ADMIN_KEY, say=lambda _line: None)
    set_price(db, MODEL, input_usd="1.00", cached_input_usd="0.50", output_usd="2.00")
    create_account(db, "customer", plan="plus", free_grant=FreeGrant(10_000_000, None))
    top_up(db, "customer", 1_000_000_000)
    customer = create_key(db, "customer", requests_per_minute=10**6, tokens_per_minute=10**9).secret
    try:
        with serve(create_app({MODEL: engine}, billing=ServerBilling(db))) as url:
            yield url, customer
    finally:
        engine.shutdown()
        db.close()


@pytest.fixture(scope="module")
def schema(server):
    import httpx

    url, _ = server
    return schemathesis.openapi.from_dict(httpx.get(url + "/openapi.json").json())


@pytest.mark.parametrize("method, path, mode", _params())
def test_operation_conforms(server, schema, method, path, mode):
    url, customer = server
    key = ADMIN_KEY if path.startswith("/admin") else customer
    operation = schema[path][method.upper()]

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        case.validate_response(
            response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance]
        )

    run()
