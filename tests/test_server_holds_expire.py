"""Holds expire across real `llmaas serve` processes (issue 13, item 4).

A replica killed with `kill -9` mid-stream, then restarted under a NEW --instance-id (SQLite), or
left dead while a second replica runs (PostgreSQL): its hold is closed within the configured lease,
the balance is available again, and the tokens streamed up to the last progress checkpoint are billed
`interrupted`, exactly once. Short lease and checkpoint intervals keep each test to seconds.
"""

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

from llmaas.billing import balance, get_usage, list_holds, open_database
from llmaas.billing.schema import LedgerEntry, UsageRecord
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_cli import LAUNCH, free_port

pytest_plugins = ["tests.billing_services"]  # db_url, postgres_url

LEASE_S = 2.0
HELLO = [{"role": "user", "content": "Tell me a long story"}]
MAX_TOKENS = 900


def start(model_dir, db_url: str, instance: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = ["serve", "--model", str(model_dir), "--served-model-name", "tiny", "--port", str(port)]
    args += ["--dtype", "float32", "--kv-cache-memory", "2MiB", "--block-size", "4", "--log-level", "warning"]
    args += ["--no-auth", "--database-url", db_url, "--instance-id", instance]
    args += ["--hold-lease-seconds", str(LEASE_S), "--progress-interval-seconds", "0.2"]
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


class Stream(threading.Thread):
    """One long streamed chat completion, read until the server dies under it."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.request_id: str | None = None
        self.chunks = 0
        self.done = False

    def run(self) -> None:
        body = {
            "model": "tiny",
            "messages": HELLO,
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "ignore_eos": True,
        }
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[len("data: ") :])
                        self.request_id = chunk["id"]
                        self.chunks += any(c["delta"].get("content") for c in chunk["choices"])
        except httpx.TransportError:
            pass  # the server died under us


def stream_until_checkpointed(db, url: str, tokens: int = 16) -> tuple[Stream, tuple[int, int, int]]:
    """Start a stream and wait until its hold carries a checkpoint of `tokens` completion tokens or
    more (several checkpoints); returns it still open."""
    stream = Stream(url)
    stream.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        open_holds = [h for h in list_holds(db) if h.request_id == stream.request_id]
        if open_holds and open_holds[0].progress_tokens and open_holds[0].progress_tokens[2] >= tokens:
            return stream, open_holds[0].progress_tokens
        assert not stream.done, "the stream finished before its first checkpoint was seen"
        time.sleep(0.02)
    raise AssertionError("no progress checkpoint within 30 s")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def wait_closed(db, request_id: str, within_s: float) -> float:
    """Seconds until the request's hold is no longer open (fails after `within_s`)."""
    t0 = time.monotonic()
    while any(h.request_id == request_id for h in list_holds(db)):
        assert time.monotonic() - t0 < within_s, f"hold of {request_id} still open after {within_s} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def assert_billed_once_at(db, request_id: str, progress: tuple[int, int, int], granted: int) -> None:
    record = get_usage(db, request_id)
    assert record is not None and record.status == "interrupted"
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == progress
    assert 0 < record.completion_tokens < MAX_TOKENS and record.cost_micros > 0
    with db.read() as session:
        records = session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.request_id == request_id)
        )
        charges = session.scalar(
            select(func.sum(LedgerEntry.amount_micros)).where(LedgerEntry.request_id == request_id)
        )
        spent = session.scalar(select(func.sum(UsageRecord.cost_micros)))
    assert records == 1 and charges == -record.cost_micros
    b = balance(db, "default")
    assert b.held_micros == 0 and b.available_micros == granted - spent


def _granted(db) -> int:
    with db.read() as session:
        return session.scalar(select(func.sum(LedgerEntry.amount_micros)).where(LedgerEntry.kind == "grant"))


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_kill_9_mid_stream_then_restart_under_a_new_id_bills_the_checkpoint(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    model_dir = make_tiny_checkpoint("llama", tmp_path, max_position_embeddings=1024)
    proc, url = start(model_dir, db_url, "replica-1")
    db = open_database(db_url)
    try:
        stream, _ = stream_until_checkpointed(db, url)
        kill(proc)
        stream.join(10)
        (hold,) = [h for h in list_holds(db) if h.request_id == stream.request_id]
        progress = hold.progress_tokens  # the last checkpoint: nothing writes after the kill
        assert balance(db, "default").held_micros == hold.amount_micros > 0
        assert stream.chunks >= 1
        killed_at = time.monotonic()
        proc, _ = start(model_dir, db_url, "replica-2")  # a new host: another instance id
        wait_closed(db, stream.request_id, within_s=LEASE_S * 2 + 5)
        print(
            f"checkpoint {progress}, {stream.chunks} chunks received, "
            f"closed {time.monotonic() - killed_at:.1f} s after the kill"
        )
        assert_billed_once_at(db, stream.request_id, progress, _granted(db))
        assert list_holds(db) == []
    finally:
        proc.terminate()
        proc.wait(30)
        db.close()


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_postgres_one_replica_dies_the_other_sweeps_its_holds(tmp_path, postgres_url):
    from tests.billing_services import TABLES

    db = open_database(postgres_url)
    with db.engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    model_dir = make_tiny_checkpoint("llama", tmp_path, max_position_embeddings=1024)
    procs = []
    try:
        for name in ("replica-a", "replica-b"):
            procs.append(start(model_dir, postgres_url, name))
        (dying, url), _ = procs
        stream, _ = stream_until_checkpointed(db, url)
        kill(dying)
        stream.join(10)
        (hold,) = [h for h in list_holds(db) if h.request_id == stream.request_id]
        took = wait_closed(db, stream.request_id, within_s=LEASE_S * 2 + 5)
        print(
            f"checkpoint {hold.progress_tokens}, {stream.chunks} chunks received, "
            f"closed {took:.1f} s after the kill"
        )
        assert_billed_once_at(db, stream.request_id, hold.progress_tokens, _granted(db))
        # The survivor still serves, and bills normally.
        r = httpx.post(
            procs[1][1] + "/v1/chat/completions",
            json={"model": "tiny", "messages": HELLO, "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200 and get_usage(db, r.json()["id"]).status == "completed"
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in procs:
            proc.wait(30)
        db.close()
