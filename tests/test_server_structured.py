"""Structured outputs and tool calling over real HTTP with the openai SDK (docs/structured-outputs.md).

A tiny random llama serves for the mechanics: its texts are gibberish, so only the grammar makes them
parse, which is what these tests check (every output parses and validates; streamed == whole calls).
The real SmolLM2 serves a couple of end-to-end parses (marked slow). The first part tests the request
mapping, the tool grammar (with llguidance, the matcher the engine uses) and the call parser directly.
"""

from __future__ import annotations

import json
import random

import jsonschema
import openai
import pydantic
import pytest

from llmaas.engine.structured import StructuredOutput
from llmaas.errors import InvalidRequestError
from llmaas.server.protocol import ChatCompletionRequest, CompletionRequest
from llmaas.server.structured import structured_output
from llmaas.server.tool_formats import HERMES
from llmaas.server.tools import ToolCallParser, generic_messages, grammar, parse_whole, plan_tools
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import make_engine, serve

MODEL = "tiny-llama"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
SMALL = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def chat_body(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": ASK, **kw})


# ------------------------------------------------------------------------------ request -> constraint
def test_response_format_and_vllm_fields_map_to_one_constraint():
    so = structured_output(
        chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SMALL}})
    )
    assert so == StructuredOutput(
        "json_schema", json.dumps(SMALL, sort_keys=True), "response_format.json_schema.schema"
    )
    assert structured_output(chat_body(response_format={"type": "json_object"})).kind == "json_object"
    assert structured_output(chat_body(response_format={"type": "text"})) is None
    assert structured_output(chat_body(structured_outputs={"regex": "[ab]+"})) == StructuredOutput(
        "regex", "[ab]+", "structured_outputs.regex"
    )
    assert structured_output(chat_body(structured_outputs={"choice": ["yes", "no"]})).spec == '["yes", "no"]'
    assert structured_output(chat_body(structured_outputs={"json": SMALL})).kind == "json_schema"
    assert structured_output(chat_body(guided_json=json.dumps(SMALL))).spec == json.dumps(
        SMALL, sort_keys=True
    )
    assert structured_output(chat_body(guided_choice=["a"])).param == "guided_choice"
    assert structured_output(chat_body(guided_grammar='start: "x"')).kind == "grammar"
    comp = CompletionRequest.model_validate({"model": MODEL, "prompt": "p", "guided_regex": "a+"})
    assert structured_output(comp) == StructuredOutput("regex", "a+", "guided_regex")


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        ({"guided_json": "{not json"}, "guided_json"),
    ],
)
def test_conflicting_or_unsupported_constraints_are_400s_naming_the_field(kw, param):
    with pytest.raises(InvalidRequestError) as info:
        structured_output(chat_body(**kw))
    assert info.value.param == param


# ----------------------------------------------------------------------------- the tool grammar
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("structured"), max_position_embeddings=2048)


@pytest.fixture(scope="module")
def matcher(model_dir):
    llguidance = pytest.importorskip("llguidance")
    llguidance_hf = pytest.importorskip("llguidance.hf")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    lltok = llguidance_hf.from_tokenizer(hf)

    def accepts(structured: StructuredOutput, text: str) -> bool:
        m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(structured.spec))
        assert not m.is_error(), m.get_error()
        return m.consume_tokens(hf.encode(text, add_special_tokens=False)) and m.is_accepting()

    return accepts


def call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


PARIS = call("get_weather", {"city": "Paris", "unit": "C"})
UTC = call("get_time", {"zone": "UTC"})


def test_tool_grammar_allows_what_tool_choice_allows(matcher):
    auto = grammar(plan_tools(chat_body(tools=[WEATHER, TIME]), None))
    assert matcher(auto, "It is sunny.") and matcher(auto, "<b>bold</b>") and matcher(auto, PARIS)
    assert matcher(auto, PARIS + "\n" + UTC)  # parallel by default
    assert not matcher(auto, call("get_weather", {"city": "Paris"}))  # a required argument missing
    assert not matcher(auto, call("get_weather", {"city": "Paris", "unit": "K"}))
    assert not matcher(auto, call("launch", {}))
    required = grammar(plan_tools(chat_body(tools=[WEATHER, TIME], tool_choice="required"), None))
    assert matcher(required, UTC) and not matcher(required, "It is sunny.")
    named = grammar(
        plan_tools(
            chat_body(
                tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}
            ),
            None,
        )
    )
    assert matcher(named, UTC) and not matcher(named, PARIS) and not matcher(named, UTC + "\n" + UTC)
    single = grammar(plan_tools(chat_body(tools=[WEATHER, TIME], parallel_tool_calls=False), None))
    assert matcher(single, PARIS) and not matcher(single, PARIS + "\n" + UTC)


def test_tool_choice_must_name_a_tool_and_none_sends_no_grammar():
    with pytest.raises(InvalidRequestError) as info:
        plan_tools(
            chat_body(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), None
        )
    assert info.value.param == "tool_choice" and "nope" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        plan_tools(chat_body(tools=[WEATHER, WEATHER]), None)
    assert info.value.param == "tools[1].function.name"
    assert plan_tools(chat_body(tools=[WEATHER], tool_choice="none"), None) is None
    assert plan_tools(
        chat_body(functions=[WEATHER["function"]], function_call={"name": "get_weather"}), None
    ).choice == ("get_weather")


def test_history_with_tool_calls_reaches_a_template_without_tool_support():
    plan = plan_tools(chat_body(tools=[WEATHER]), None)
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    out = generic_messages(history, plan)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": call("get_weather", {"city": "Paris"})}
    assert out[3]["role"] == "user" and "18 C" in out[3]["content"] and "call_1" in out[3]["content"]


# ----------------------------------------------------------------------------- the call parser
@pytest.mark.parametrize(
    "text",
    [
        PARIS,
        PARIS + "\n" + UTC,
        '<tool_call>\n{ "name" : "get_time" ,\n "arguments" : { "zone" : "U\\"}{TC" } }\n</tool_call>',
        "Plain answer",
        "<b>not a call</b>",
        "<tool",
        "",
    ],
)
def test_streamed_pieces_reassemble_to_the_whole_parse(text):
    content, calls = parse_whole(text, HERMES)
    for seed in range(20):
        rng = random.Random(seed)
        parser, streamed_content, streamed = ToolCallParser(HERMES), "", {}
        i = 0
        while i < len(text):
            j = i + rng.randint(1, 6)
            piece, deltas = parser.feed(text[i:j])
            streamed_content += piece
            for d in deltas:
                entry = streamed.setdefault(d["index"], {"name": None, "arguments": ""})
                if "id" in d:
                    assert entry["name"] is None and d["function"]["name"]  # the first delta names the call
                    entry["name"] = d["function"]["name"]
                entry["arguments"] += d["function"]["arguments"]
            i = j
        streamed_content += parser.finish()[0]
        assert [(c.name, c.arguments) for c in calls] == [
            (e["name"], e["arguments"]) for e in streamed.values()
        ]
        assert (content if content is not None else "") == streamed_content
    if calls:
        assert content is None and all(isinstance(json.loads(c.arguments), dict) for c in calls)
    else:
        assert content == text


# ------------------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def client(model_dir):
    from llmaas.server import create_app

    engine = make_engine(model_dir, kv_cache_memory=8 * 2**20)
    with serve(create_app({MODEL: engine})) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=120)
    engine.shutdown()


def test_json_schema_outputs_validate(client):
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            seed=seed,
            max_tokens=200,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "small", "schema": SMALL, "strict": True},
            },
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SMALL)


def test_json_object_parses(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, seed=1, max_tokens=300, response_format={"type": "json_object"}
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: a prefix of an object, reported as "length" (OpenAI documents this)
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.lstrip().startswith(
            "{"
        )


def test_regex_and_choice_on_chat_and_completions(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        seed=3,
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[ab]"}},
    )
    assert r.choices[0].finish_reason == "stop"
    import re

    assert re.fullmatch("[0-9]{3}-[ab]", r.choices[0].message.content)
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        seed=3,
        max_tokens=20,
        n=3,
        extra_body={"guided_choice": ["sunny", "rainy"]},
    )
    assert {c.message.content for c in r.choices} <= {"sunny", "rainy"}
    c = client.completions.create(
        model=MODEL,
        prompt="Weather:",
        seed=5,
        max_tokens=20,
        extra_body={"structured_outputs": {"choice": ["hot", "cold"]}},
    )
    assert c.choices[0].text in ("hot", "cold")
    c = client.completions.create(
        model=MODEL,
        prompt="JSON:",
        seed=5,
        max_tokens=200,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SMALL}}
        },
    )
    jsonschema.validate(json.loads(c.choices[0].text), SMALL)


def _check_calls(message, allowed: set[str]):
    assert message.content is None and message.tool_calls
    for tc in message.tool_calls:
        assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name in allowed
        jsonschema.validate(json.loads(tc.function.arguments), SCHEMAS[tc.function.name])


def test_tools_required_and_named_always_validate(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            seed=seed,
            max_tokens=300,
            tools=[WEATHER, TIME],
            tool_choice="required",
        )
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message, {"get_weather", "get_time"})
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        seed=7,
        max_tokens=300,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    _check_calls(r.choices[0].message, {"get_time"})


def test_tools_auto_gives_either_a_reply_or_valid_calls(client):
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, seed=seed, max_tokens=60, tools=[WEATHER, TIME]
        )
        choice = r.choices[0]
        if choice.message.tool_calls:
            if choice.finish_reason == "tool_calls":
                _check_calls(choice.message, {"get_weather", "get_time"})
        else:
            assert isinstance(choice.message.content, str) and not choice.message.content.startswith(
                "<tool_call>"
            )
            assert choice.finish_reason in ("stop", "length")


def _reassemble(stream) -> tuple[str | None, list[tuple[str, str, str]], str]:
    content, calls, reason = "", {}, None
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id is not None:
                    assert entry["id"] is None and d.function.name  # id and name come once, first
                    entry["id"], entry["name"] = d.id, d.function.name
                entry["arguments"] += d.function.arguments or ""
            reason = ch.finish_reason or reason
    listed = [(e["id"][:5], e["name"], e["arguments"]) for e in calls.values()]
    return (content or None), listed, reason


@pytest.mark.parametrize("parallel", [False, True])
def test_streamed_tool_calls_equal_whole_ones(client, parallel):
    kw = dict(
        model=MODEL,
        messages=ASK,
        max_tokens=300,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=parallel,
        temperature=1.0,
    )
    seen_many = False
    for seed in range(6):
        whole = client.chat.completions.create(seed=seed, **kw).choices[0]
        content, calls, reason = _reassemble(client.chat.completions.create(seed=seed, stream=True, **kw))
        assert content is None and reason == whole.finish_reason
        expected = [(t.id[:5], t.function.name, t.function.arguments) for t in whole.message.tool_calls]
        assert calls == expected
        seen_many |= len(calls) > 1
        assert parallel or len(calls) == 1
    assert seen_many == parallel  # parallel calls happen (this model and these seeds write several)


def test_history_with_tool_calls_is_accepted(client):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, seed=0, max_tokens=300, tools=[WEATHER], tool_choice="required"
    )
    tc = first.choices[0].message.tool_calls[0]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[
            *ASK,
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": tc.id, "content": "18 C, sunny"},
        ],
        tools=[WEATHER],
        max_tokens=5,
    )
    assert r.usage.prompt_tokens > first.usage.prompt_tokens


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=10)
    sunny: bool


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, seed=2, max_tokens=200, response_format=Weather
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Weather)


@pytest.mark.parametrize(
    "kw, param",
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strnig"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar"),
    ],
)
def test_bad_tools_and_schemas_are_400s_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=kw)
    assert info.value.status_code == 400 and (info.value.param or "").startswith(param), info.value.param


# --------------------------------------------------------------------------- the real default model
@pytest.fixture(scope="module")
def smollm2():
    from llmaas.engine.async_engine import AsyncEngine
    from llmaas.engine.llm_engine import EngineConfig, LLMEngine
    from llmaas.server import create_app

    try:
        engine = AsyncEngine(LLMEngine(EngineConfig(model="smollm2-135m", kv_cache_memory=64 * 2**20)))
    except Exception as exc:  # noqa: BLE001 - the model file is not on this machine
        pytest.skip(f"smollm2-135m not available: {exc}")
    with serve(create_app({"smollm2": engine})) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=300)
    engine.shutdown()


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    age: int = pydantic.Field(ge=0, le=150)


@pytest.mark.slow
def test_smollm2_parse_and_tool_call(smollm2):
    r = smollm2.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Invent a person: give a name and an age."}],
        response_format=Person,
        temperature=0,
        max_tokens=100,
    )
    assert isinstance(r.choices[0].message.parsed, Person)
    r = smollm2.chat.completions.create(
        model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=100
    )
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message, {"get_weather"})


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>"
    "Call with <tool_call>{}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)


def test_a_template_that_renders_tools_gets_them_and_the_history_as_is(model_dir):
    from llmaas.models.tokenizer import Tokenizer
    from llmaas.server.tools import template_tools

    tokenizer = Tokenizer.from_dir(model_dir)
    tokenizer.chat_template = HERMES_TEMPLATE
    plan = plan_tools(
        chat_body(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}),
        HERMES_TEMPLATE,
    )
    assert plan.native
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
    ]
    text = tokenizer.apply_chat_template(history, tools=template_tools(plan))
    assert "<tools>get_time;</tools>" in text  # forced: only the named tool is shown
    assert "<tool_call>get_weather</tool_call>" in text
    assert not plan_tools(chat_body(tools=[WEATHER]), tiny_model_template()).native


def tiny_model_template() -> str:
    from tests.model_factory import CHAT_TEMPLATE

    return CHAT_TEMPLATE


def test_tools_auto_with_a_json_response_format(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            seed=seed,
            max_tokens=300,
            tools=[TIME],
            response_format={"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL}},
        )
        choice = r.choices[0]
        if choice.message.tool_calls:
            _check_calls(choice.message, {"get_time"})
        else:
            jsonschema.validate(json.loads(choice.message.content), SMALL)


def test_streamed_auto_replies_equal_whole_ones(client):
    kw = dict(model=MODEL, messages=ASK, max_tokens=80, tools=[WEATHER, TIME], temperature=1.0)
    for seed in range(4):
        whole = client.chat.completions.create(seed=seed, **kw).choices[0]
        content, calls, reason = _reassemble(client.chat.completions.create(seed=seed, stream=True, **kw))
        expected = [(t.id[:5], t.function.name, t.function.arguments) for t in whole.message.tool_calls or []]
        assert (content, calls, reason) == (whole.message.content, expected, whole.finish_reason)


def test_chat_template_kwargs_reach_the_template_and_reserved_names_are_refused(client, model_dir):
    """vLLM's chat_template_kwargs: extra template variables (the tiny template ignores unknown ones, so
    the prompt is unchanged), never the server's own; bounded in count and names."""
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    extra = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert extra.usage.prompt_tokens == plain.usage.prompt_tokens
    for kwargs, why in [
        ({"messages": []}, "messages"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"bad-name": 1}, "chat_template_kwargs"),
        ({f"k{i}": i for i in range(33)}, "chat_template_kwargs"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=1, extra_body={"chat_template_kwargs": kwargs}
            )
        assert err.value.body["param"].startswith("chat_template_kwargs"), err.value.body
        assert why in err.value.body["message"] or why == "chat_template_kwargs"


def test_chat_template_kwargs_are_template_variables(model_dir):
    from llmaas.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    tokenizer.chat_template = "{% if greeting %}{{ greeting }} {% endif %}{{ messages[0]['content'] }}"
    tokenizer.__dict__.pop("_compiled_template", None)  # compiled from the template just set
    assert tokenizer.apply_chat_template(ASK, variables={"greeting": "Hi!"}) == "Hi! " + ASK[0]["content"]
    assert tokenizer.apply_chat_template(ASK) == ASK[0]["content"]
