"""kill -9 of `llmaas serve` in the middle of a batch, then a restart under the same --instance-id: the
batch resumes and every line is in the output once and in the ledger once (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import time

import openai
import pytest
from sqlalchemy import func, select

from llmaas.billing import balance, open_database, open_holds
from llmaas.billing.batches import line_request_id
from llmaas.billing.schema import LedgerEntry, UsageRecord
from tests.model_factory import make_tiny_checkpoint
from tests.test_batches import chat_line, jsonl
from tests.test_server_cli import free_port
from tests.test_server_crash import start

pytest_plugins = ["tests.billing_services"]  # db_url: SQLite and PostgreSQL

LINES = 24


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_kill_9_mid_batch_then_restart_bills_every_line_exactly_once(tmp_path, db_url):
    model_dir = make_tiny_checkpoint("llama", tmp_path, max_position_embeddings=1024)
    port = free_port()
    extra = ["--files-dir", str(tmp_path / "files"), "--batch-concurrency", "2"]
    proc = start(model_dir, db_url, port, extra)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    items = [chat_line(f"line-{i}", max_tokens=32, model="tiny") for i in range(LINES)]
    uploaded = client.files.create(file=("crash.jsonl", jsonl(items)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 4:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    db = open_database(db_url)
    with db.read() as session:
        billed_before = session.scalar(select(func.count()).select_from(UsageRecord))
    assert 4 <= billed_before < LINES  # killed mid-batch

    proc = start(model_dir, db_url, port, extra)
    try:
        deadline = time.monotonic() + 240
        while (done := client.batches.retrieve(batch.id)).status != "completed":
            assert time.monotonic() < deadline, done.request_counts
            time.sleep(0.2)
        assert (done.request_counts.total, done.request_counts.completed) == (LINES, LINES)
        output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
        assert sorted(o["custom_id"] for o in output) == sorted(f"line-{i}" for i in range(LINES))
        assert done.error_file_id is None
        with db.read() as session:
            records = dict(session.execute(select(UsageRecord.request_id, UsageRecord.cost_micros)).all())
            charges = session.execute(
                select(LedgerEntry.request_id, func.count())
                .where(LedgerEntry.kind == "charge")
                .group_by(LedgerEntry.request_id)
            ).all()
        assert set(records) == {line_request_id(batch.id, i) for i in range(LINES)}
        assert len(charges) == LINES and all(count == 1 for _, count in charges)
        for item in output:  # what each line's response says it cost is what the ledger charged
            assert (
                round(item["response"]["body"]["usage"]["cost"] * 1_000_000)
                == records[item["response"]["request_id"]]
            )
        assert open_holds(db, "default") == []
        assert balance(db, "default").held_micros == 0
    finally:
        proc.terminate()
        proc.wait(30)
        db.close()
