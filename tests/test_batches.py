"""The Batch API through the openai SDK against a live server with a real ledger: files, batches, the
output and error files, the batch price in the ledger, cancel mid-run, and accounts kept apart."""
# ruff: noqa: F811  (the engine fixture is imported and requested by name)

from __future__ import annotations

import json
import time
from decimal import ROUND_HALF_UP, Decimal

import openai
import pytest

from llmaas.billing import cost_micros, current_price, get_usage, open_database, open_holds, set_price
from llmaas.billing.batches import line_request_id
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.bootstrap import bootstrap
from tests.test_server_api import MODEL, serve
from tests.test_server_billing import HELLO, engine, new_account, sdk  # noqa: F401

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    database = open_database(f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'billing.sqlite3'}")
    bootstrap(database, [MODEL], admin_key="sk-admin-test", say=lambda _line: None)
    set_price(database, MODEL, input_usd="1.00", cached_input_usd="0.10", output_usd="2.00")
    yield database
    database.close()


@pytest.fixture(scope="module")
def base_url(engine, db, tmp_path_factory):
    files = tmp_path_factory.mktemp("files")
    app = create_app({MODEL: engine}, billing=ServerBilling(db), files_dir=str(files), batch_concurrency=2)
    with serve(app) as url:
        yield url


def half_price(price, prompt: int, cached: int, completion: int) -> int:
    """The batch price by hand: half the sync price, rounded once (half up) to the micro-USD."""
    scaled = (
        (prompt - cached) * price.input_micros_per_m
        + cached * price.cached_input_micros_per_m
        + completion * price.output_micros_per_m
    )
    return int((Decimal(scaled) / 2 / 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def chat_line(custom_id: str, max_tokens: int = 4, **body) -> dict:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": max_tokens, "temperature": 0, **body}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def jsonl(items: list) -> bytes:
    return "".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items).encode()


def wait_for(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 180):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.2)


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_a_batch_runs_every_good_line_once_at_the_batch_price(base_url, db):
    client = sdk(base_url, new_account(db, "batch-co"))
    good = [chat_line(f"q{i}", max_tokens=3 + i) for i in range(5)]
    items = [
        *good[:2],
        "{not json",
        chat_line("wrong-url") | {"url": "/v1/completions"},
        chat_line("bad-body", temperature=7),
        chat_line("q0"),  # a repeated custom_id
        *good[2:],
    ]
    uploaded = client.files.create(file=("requests.jsonl", jsonl(items)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(items))
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert client.files.content(uploaded.id).content == jsonl(items)
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h", metadata={"job": "nightly"}
    )
    assert batch.status == "in_progress" and batch.metadata == {"job": "nightly"}
    batch = wait_for(client, batch.id, ("completed",))
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (9, 5, 4)
    assert batch.id in [b.id for b in client.batches.list().data]

    output = read_jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in output] == [f"q{i}" for i in range(5)]
    price = current_price(db, MODEL)
    for item, line in zip(output, (0, 1, 6, 7, 8)):
        response = item["response"]
        assert response["status_code"] == 200 and response["request_id"] == line_request_id(batch.id, line)
        body = response["body"]
        assert body["object"] == "chat.completion" and body["service_tier"] == "batch"
        record = get_usage(db, response["request_id"])
        u = body["usage"]
        tokens = (u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"], u["completion_tokens"])
        assert record.service_tier == "batch" and record.client_request_id == item["custom_id"]
        assert record.cost_micros == cost_micros(price, *tokens, "batch") == half_price(price, *tokens)
        assert u["cost"] == record.cost_micros / 1_000_000
    errors = {e["custom_id"]: e for e in read_jsonl(client, batch.error_file_id)}
    assert set(errors) == {None, "wrong-url", "bad-body", "q0"}
    assert "not valid JSON" in errors[None]["error"]["message"]
    assert "url" in errors["wrong-url"]["error"]["message"]
    refused = errors["bad-body"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "temperature"
    assert get_usage(db, refused["request_id"]) is None  # refused before any work: never billed
    assert open_holds(db, "batch-co") == []


def test_files_and_batches_are_the_accounts_own(base_url, db):
    owner = sdk(base_url, new_account(db, "owner-co"))
    other = sdk(base_url, new_account(db, "other-co"))
    uploaded = owner.files.create(file=("mine.jsonl", jsonl([chat_line("a")])), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    assert uploaded.id not in [f.id for f in other.files.list().data]
    batch = owner.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.BadRequestError) as err:
        owner.batches.create(input_file_id=uploaded.id, endpoint="/v1/images", completion_window="24h")
    assert err.value.param == "endpoint"
    with pytest.raises(openai.BadRequestError) as err:
        owner.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert err.value.param == "purpose"
    wait_for(owner, batch.id, ("completed",))
    assert owner.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        owner.files.retrieve(uploaded.id)


def test_cancel_mid_run_bills_the_finished_lines_and_never_runs_the_rest(base_url, db):
    client = sdk(base_url, new_account(db, "cancel-co"))
    items = [chat_line(f"c{i}", max_tokens=24) for i in range(40)]
    uploaded = client.files.create(file=("many.jsonl", jsonl(items)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = wait_for(client, batch.id, ("cancelled",))
    output = read_jsonl(client, batch.output_file_id)
    errors = read_jsonl(client, batch.error_file_id)
    assert 2 <= len(output) < 40 and len(output) + len(errors) == 40
    assert batch.request_counts.completed == len(output)
    for item in output:
        assert get_usage(db, item["response"]["request_id"]).status == "completed"
    for item in errors:
        assert item["error"]["code"] == "batch_cancelled" and item["response"] is None
        line = int(item["id"].rsplit("-", 1)[1])
        assert get_usage(db, line_request_id(batch.id, line)) is None
    assert open_holds(db, "cancel-co") == []
