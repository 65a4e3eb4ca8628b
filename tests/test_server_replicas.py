"""Two `llmaas serve` processes sharing one PostgreSQL and one Redis keep one truth.

The rate limit of a key holds across both replicas, and concurrent requests through both against a
small balance never drive it below zero; the ledger's identity holds afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from llmaas.billing import (
    FreeGrant,
    balance,
    create_account,
    create_key,
    current_price,
    open_database,
    open_holds,
    set_price,
    worst_case_cost_micros,
)
from llmaas.billing.schema import UsageRecord
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_cli import LAUNCH, free_port

pytest_plugins = ["tests.billing_services"]  # postgres_url, redis_prefix

HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


def start(model_dir, db_url: str, redis_url: str, instance: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = ["serve", "--model", str(model_dir), "--served-model-name", "tiny", "--port", str(port)]
    args += ["--dtype", "float32", "--kv-cache-memory", "1MiB", "--block-size", "4", "--log-level", "warning"]
    args += ["--database-url", db_url, "--redis-url", redis_url, "--instance-id", instance]
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "server exited"
        assert time.monotonic() < deadline, "server did not become healthy"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)


@pytest.fixture
def replicas(tmp_path, postgres_url, redis_prefix):
    from tests.billing_services import REDIS_URL, TABLES

    db = open_database(postgres_url)
    with db.engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    model_dir = make_tiny_checkpoint("llama", tmp_path, max_position_embeddings=1024)
    procs, urls = [], []
    try:
        for name in ("replica-a", "replica-b"):
            proc, url = start(model_dir, postgres_url, REDIS_URL, name)
            procs.append(proc)
            urls.append(url)
        yield db, urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        db.close()


def post(url: str, key: str, max_tokens: int) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"model": "tiny", "messages": HELLO, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_limits_and_balances_hold_across_two_replicas(replicas):
    db, (a, b) = replicas
    set_price(db, "tiny", input_usd="1.00", cached_input_usd="0.50", output_usd="2.00")

    # Rate limit: 3 requests a minute for this key, whichever replica gets them.
    create_account(db, "limited", plan="plus", free_grant=FreeGrant(10_000_000, None))
    limited = create_key(db, "limited", requests_per_minute=3).secret
    codes = [post(url, limited, 2).status_code for url in (a, b, a, b, a, b)]
    assert codes.count(200) == 3 and codes.count(429) == 3

    # Balance: enough for 4 worst-case holds; 16 concurrent requests through both replicas.
    price = current_price(db, "tiny")
    worst = worst_case_cost_micros(price, 40, 50)  # more than the prompt's real length: a safe bound
    small_account = create_account(db, "small", plan="plus", free_grant=FreeGrant(4 * worst, None))
    small = create_key(db, "small").secret
    results: list[int] = []

    def one(url: str) -> None:
        results.append(post(url, small, 50).status_code)

    threads = [threading.Thread(target=one, args=(a if i % 2 else b,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results) <= {200, 429} and results.count(200) >= 4
    after = balance(db, "small")
    assert after.available_micros >= 0 and after.overdraft_micros == 0 and after.held_micros == 0
    assert open_holds(db, "small") == []
    with db.read() as session:
        spent = session.scalar(
            select(func.sum(UsageRecord.cost_micros)).where(UsageRecord.account_id == small_account.id)
        )
    assert spent == 4 * worst - after.available_micros and spent > 0
