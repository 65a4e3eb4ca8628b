"""How requests that do not end normally are billed; first kill -9 of `llmaas serve` under load
(SQLite and PostgreSQL).

Every response the client received in full has exactly one usage record (settled before its last
byte), the holds of requests that died with the server are released at restart (same --instance-id),
and the balance equals the credit minus the settled costs. Then a client that leaves mid-stream.
"""
# ruff: noqa: F811  (the engine fixture is imported and requested by name)

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from llmaas.billing import balance, get_usage, open_database, open_holds
from llmaas.billing.schema import LedgerEntry, UsageRecord
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.bootstrap import bootstrap
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import MODEL, serve
from tests.test_server_billing import HELLO, engine  # noqa: F401
from tests.test_server_cli import LAUNCH, free_port

pytest_plugins = ["tests.billing_services"]  # db_url: SQLite and PostgreSQL


def start(model_dir, db_url: str, port: int, extra: list[str] = ()) -> subprocess.Popen:
    args = ["serve", "--model", str(model_dir), "--served-model-name", "tiny", "--port", str(port)]
    args += ["--dtype", "float32", "--kv-cache-memory", "1MiB", "--block-size", "4", "--log-level", "warning"]
    args += ["--no-auth", "--database-url", db_url, "--instance-id", "replica-1", *extra]
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "server exited"
        assert time.monotonic() < deadline, "server did not become healthy"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_kill_9_under_load_then_restart(tmp_path, db_url):
    """On SQLite and on PostgreSQL (db_url: a fresh file, or the run's database emptied)."""
    model_dir = make_tiny_checkpoint("llama", tmp_path, max_position_embeddings=1024)
    port = free_port()
    proc = start(model_dir, db_url, port)
    completed: list[str] = []
    stop = threading.Event()

    def client() -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 64,
        }
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/chat/completions", json=body)
                except httpx.TransportError:
                    return  # the server died under us
                if r.status_code == 200:
                    completed.append(r.json()["id"])

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 180  # generous: a loaded 2-core machine serves slowly; we stop at 10
    while len(completed) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(completed) >= 10

    db = open_database(db_url)
    for request_id in completed:
        record = get_usage(db, request_id)
        assert record is not None and record.status == "completed" and record.cost_micros > 0
    proc = start(model_dir, db_url, port)  # same --instance-id: releases the dead requests' holds
    try:
        assert open_holds(db, "default") == []
        with db.read() as session:
            spent = session.scalar(select(func.sum(UsageRecord.cost_micros)))
            granted = session.scalar(
                select(func.sum(LedgerEntry.amount_micros)).where(LedgerEntry.kind == "grant")
            )
            per_request = session.execute(
                select(UsageRecord.request_id, func.count()).group_by(UsageRecord.request_id)
            ).all()
            charges = session.scalar(
                select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "charge")
            )
        assert all(count == 1 for _, count in per_request) and charges == len(per_request)
        b = balance(db, "default")
        assert b.held_micros == 0 and b.available_micros == granted - spent
    finally:
        proc.terminate()
        proc.wait(30)
        db.close()


def test_a_client_leaving_mid_stream_is_billed_for_what_was_produced(engine, tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'billing.sqlite3'}")
    bootstrap(database, [MODEL], say=lambda _line: None)
    before = balance(database, "default").available_micros
    with serve(create_app({MODEL: engine}, billing=ServerBilling(database, auth=False))) as url:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 400, "stream": True, "ignore_eos": True}
        with (
            httpx.Client(base_url=url, timeout=30) as c,
            c.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            request_id = json.loads(first[len("data: ") :])["id"]
            for _ in range(3):
                next(lines)
        deadline = time.monotonic() + 10
        while (record := get_usage(database, request_id)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
    assert record is not None and record.status == "cancelled"
    assert 0 < record.completion_tokens < 400 and record.cost_micros > 0
    assert open_holds(database, "default") == []
    assert before - balance(database, "default").available_micros == record.cost_micros
    database.close()
