"""A live server for the console's tests: a tiny model, a SQLite ledger, the admin key, two customers."""

from __future__ import annotations

from dataclasses import dataclass

from llmaas.billing import Database, FreeGrant, create_account, create_key, open_database, set_price
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.bootstrap import bootstrap
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import MODEL, make_engine, serve

ADMIN_KEY = "sk-admin-console-test"


@dataclass
class ConsoleServer:
    url: str
    app: object  # the FastAPI app (a test sets its console's machine costs)
    db: Database
    acme_key: str  # a plus account with $5 of credit
    globex_key: str  # another account: what acme must never see


def start_console_server(tmp_path_factory):
    """A generator for a module fixture: yields a ConsoleServer, shuts it down afterwards."""
    model_dir = make_tiny_checkpoint(
        "llama", tmp_path_factory.mktemp("console"), max_position_embeddings=1024
    )
    engine = make_engine(model_dir)
    db = open_database(f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'billing.sqlite3'}")
    bootstrap(db, [MODEL], admin_key=ADMIN_KEY, say=lambda _line: None)
    set_price(db, MODEL, input_usd="1.00", cached_input_usd="0.50", output_usd="2.00")
    keys = []
    for name in ("acme", "globex"):
        create_account(db, name, plan="plus", free_grant=FreeGrant(amount_micros=5_000_000, valid_for=None))
        keys.append(create_key(db, name, name="first").secret)
    try:
        app = create_app({MODEL: engine}, billing=ServerBilling(db))
        with serve(app) as url:
            yield ConsoleServer(url, app, db, *keys)
    finally:
        engine.shutdown()
        db.close()


def bench_result(model: str) -> dict:
    """A `llmaas bench` result of one level (what `llmaas cost` and the margin page read)."""
    level = {
        "concurrency": 4, "request_rate": None, "completed": 10, "errors": 0, "duration_s": 10.0,
        "input_tokens": 20_000, "output_tokens": 5_000, "ttft_sum_s": 5.0, "e2e_sum_s": 40.0,
        "output_tok_per_s": 500.0, "ttft_s": {"p99": 0.6},
    }  # fmt: skip
    return {"model": model, "levels": [level]}
