"""/v1/responses through the openai SDK, over real HTTP with a real SQLite ledger (docs/responses-api.md).

A tiny random llama serves: its texts are gibberish, so these tests check the mechanics (shapes, event
order, storage, chaining, ownership, billing, errors) and, where a grammar constrains the output (a
json_schema format, a required tool), that the output validates. The real SmolLM2 round trips are in
tests/test_structured_clients.py (slow).
"""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pydantic
import pytest
from sqlalchemy import text

from llmaas.billing import get_usage, open_database, set_price
from llmaas.errors import NotFoundError
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.bootstrap import bootstrap
from llmaas.server.responses_api.store import ResponseStore
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import make_engine, serve
from tests.test_server_edge import new_key
from tests.test_server_structured import SCHEMAS, SMALL, WEATHER

MODEL = "tiny-llama"
WEATHER_TOOL = {"type": "function", **WEATHER["function"]}  # the Responses API's flat function tool
LONG = "Tell me a long story about a lighthouse keeper and the ships that pass by at night. " * 3


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_checkpoint(
        "llama", tmp_path_factory.mktemp("responses"), max_position_embeddings=2048
    )
    aeng = make_engine(model_dir, kv_cache_memory=8 * 2**20)
    yield aeng
    aeng.shutdown()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    database = open_database(f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'billing.sqlite3'}")
    bootstrap(database, [MODEL], admin_key="sk-admin-test", say=lambda _line: None)
    set_price(database, MODEL, input_usd="1.00", cached_input_usd="0.10", output_usd="2.00")
    yield database
    database.close()


@pytest.fixture(scope="module")
def base_url(engine, db):
    with serve(create_app({MODEL: engine}, billing=ServerBilling(db))) as url:
        yield url


def sdk(base_url: str, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=secret, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def alice(base_url, db):
    return sdk(base_url, new_key(db, "resp-alice"))


@pytest.fixture(scope="module")
def bob(base_url, db):
    return sdk(base_url, new_key(db, "resp-bob"))


def test_a_plain_response_has_openai_shape_usage_cost_and_a_ledger_row(alice, db):
    r = alice.responses.with_raw_response.create(
        model=MODEL, input="Hello there!", max_output_tokens=8, extra_body={"seed": 1}
    )
    response = r.parse()
    assert r.headers["x-request-id"] == response.id and response.id.startswith("resp")
    assert response.object == "response" and response.model == MODEL
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.output_text == message.content[0].text
    usage = response.usage
    assert usage.input_tokens > 0 and 1 <= usage.output_tokens <= 8
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.model_extra["cost"] > 0
    row = get_usage(db, response.id)
    assert row.prompt_tokens == usage.input_tokens and row.cost_micros / 1e6 == usage.model_extra["cost"]
    with db.read() as session:
        endpoint = session.execute(
            text("SELECT endpoint FROM usage_records WHERE request_id = :r"), {"r": response.id}
        )
        assert endpoint.scalar() == "responses"
    assert row.completion_tokens == usage.output_tokens


def test_a_stream_sends_the_typed_events_in_order_and_its_deltas_are_the_text(alice):
    events = list(
        alice.responses.create(model=MODEL, input="Say something.", max_output_tokens=12, stream=True)
    )
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    end = "response.completed" if kinds[-1] == "response.completed" else "response.incomplete"
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        end,
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == final.output_text
    assert final.usage.output_tokens >= 1 and final.output[0].id == events[2].item.id
    assert alice.responses.retrieve(final.id).output_text == deltas  # stored before `completed` was sent


class Small(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    ok: bool
    n: int = pydantic.Field(ge=0, le=9)


def test_the_sdk_stream_helper_parses_and_equals_the_whole_response(alice):
    kw = dict(
        model=MODEL, input="JSON please", text_format=Small, max_output_tokens=60, extra_body={"seed": 3}
    )
    with alice.responses.stream(**kw) as stream:
        streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == streamed and isinstance(final.output_parsed, Small)
    whole = alice.responses.parse(**kw)
    assert whole.output_text == streamed and whole.output_parsed == final.output_parsed  # streamed == whole


def test_previous_response_id_carries_three_turns_and_the_prefix_cache_bills_them_cached(alice, engine):
    first = alice.responses.create(
        model=MODEL, input=LONG, instructions="Be brief.", max_output_tokens=5, extra_body={"seed": 0}
    )
    second = alice.responses.create(
        model=MODEL,
        input="And then?",
        previous_response_id=first.id,
        max_output_tokens=5,
        extra_body={"seed": 0},
    )
    third = alice.responses.create(
        model=MODEL,
        input="How did it end?",
        previous_response_id=second.id,
        max_output_tokens=5,
        extra_body={"seed": 0},
    )
    # The third turn's prompt is the whole conversation: the first turn's input and output included.
    conversation = [
        {"role": "user", "content": LONG},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "How did it end?"},
    ]
    expected = engine.tokenize([engine.render_chat(conversation)], params_for_count())[0]
    assert third.usage.input_tokens == len(expected)
    assert third.previous_response_id == second.id
    # Instructions are not carried over (as OpenAI documents); the shared history hits the prefix cache.
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert third.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens_details.cached_tokens


def params_for_count():
    from llmaas.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=1)


def test_a_json_schema_format_validates_and_the_sdk_parses_it(alice):
    fmt = {"type": "json_schema", "name": "small", "schema": SMALL, "strict": True}
    for seed in range(3):
        r = alice.responses.create(
            model=MODEL,
            input="Give me JSON.",
            text={"format": fmt},
            extra_body={"seed": seed},
            max_output_tokens=60,
        )
        assert r.status == "completed", r.output_text
        jsonschema.validate(json.loads(r.output_text), SMALL)
        assert r.text.format.type == "json_schema"


def test_a_function_tool_round_trip(alice):
    asked = alice.responses.create(
        model=MODEL,
        input="Weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        extra_body={"seed": 2},
        max_output_tokens=200,
    )
    calls = [item for item in asked.output if item.type == "function_call"]
    assert calls and asked.status == "completed"
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    outputs = [
        {"type": "function_call_output", "call_id": c.call_id, "output": '{"temp": 21}'} for c in calls
    ]
    answered = alice.responses.create(
        model=MODEL,
        input=outputs,
        previous_response_id=asked.id,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_output_tokens=6,
    )
    assert answered.output[0].type == "message" and answered.status in ("completed", "incomplete")
    # The same history sent in full (no previous_response_id) renders the same prompt.
    history = [{"role": "user", "content": "Weather in Paris?"}]
    history += [
        {"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments}
        for c in calls
    ]
    resent = alice.responses.create(
        model=MODEL, input=history + outputs, tools=[WEATHER_TOOL], tool_choice="none", max_output_tokens=6
    )
    assert resent.usage.input_tokens == answered.usage.input_tokens


def test_streamed_function_calls_equal_whole_ones(alice):
    kw = dict(
        model=MODEL,
        input="Weather?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        extra_body={"seed": 5},
        max_output_tokens=200,
    )
    whole = alice.responses.create(**kw)
    events = list(alice.responses.create(**kw, stream=True))
    final = events[-1].response
    pick = lambda r: [(i.name, i.arguments) for i in r.output if i.type == "function_call"]  # noqa: E731
    assert pick(final) == pick(whole) and pick(whole)
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == "".join(a for _, a in pick(whole))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.name, e.arguments) for e in done] == pick(whole)


def test_retrieve_input_items_and_delete(alice):
    r = alice.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
        max_output_tokens=3,
    )
    assert alice.responses.retrieve(r.id).id == r.id
    items = alice.responses.input_items.list(r.id)
    assert [i.content[0].text for i in items.data] == ["two", "one"]  # newest first, as OpenAI lists
    asc = alice.responses.input_items.list(r.id, order="asc", limit=1)
    assert [i.content[0].text for i in asc.data] == ["one"] and asc.has_more
    alice.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(r.id)
    unstored = alice.responses.create(model=MODEL, input="x", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(unstored.id)


def test_an_account_never_reads_another_accounts_responses(alice, bob):
    mine = alice.responses.create(model=MODEL, input="secret plans", max_output_tokens=3)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(mine.id)
    with pytest.raises(openai.BadRequestError) as err:
        bob.responses.create(model=MODEL, input="go on", previous_response_id=mine.id, max_output_tokens=2)
    assert err.value.body["param"] == "previous_response_id"
    assert err.value.body["code"] == "previous_response_not_found"
    assert alice.responses.retrieve(mine.id).id == mine.id  # still there for its owner


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"input": []}, "input"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER_TOOL]}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        (
            {
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "string", "format": "hostname-x"}},
                        },
                    }
                }
            },
            "text.format.schema",
        ),
        ({"previous_response_id": "resp-nothing"}, "previous_response_id"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
            "input",
        ),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"frequency": 1}, "frequency"),
        ({"input": "z" * 300_000}, "input"),
    ],
)
def test_bad_inputs_are_400s_naming_the_parameter(base_url, db, kw, param):
    secret = new_key(db, f"resp-bad-{abs(hash(json.dumps(kw, sort_keys=True))) % 10**9}")
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, **kw}
    r = httpx.post(
        base_url + "/v1/responses", json=body, headers={"authorization": f"Bearer {secret}"}, timeout=60
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()


def test_stored_responses_expire_after_the_retention(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'b.sqlite3'}")
    bootstrap(database, [MODEL], admin_key="sk-admin-x", say=lambda _line: None)
    store = ResponseStore(database, retention_s=0.2)
    from llmaas.billing import get_account

    owner = get_account(database, "default").id
    store.save("resp-old", owner, None, {"id": "resp-old", "output": []}, [])
    assert store.load("resp-old", owner).id == "resp-old"
    with pytest.raises(NotFoundError):
        store.load("resp-old", owner + 1)  # another account
    time.sleep(0.3)
    with pytest.raises(NotFoundError):
        store.load("resp-old", owner)
    store.save("resp-new", owner, None, {"id": "resp-new", "output": []}, [])  # purges the expired row
    with database.read() as session:
        assert session.execute(text("SELECT id FROM stored_responses")).scalars().all() == ["resp-new"]
    database.close()
