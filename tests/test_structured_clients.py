"""Structured output and tool calls through the clients people use, against `llmaas serve` with the real
default model (smollm2-135m).

A 135M model writes poor content, so these tests never judge the content: they check the STRUCTURE,
which constrained decoding guarantees whatever the weights: every client gets output it parses and
validates itself (pydantic through the openai SDK, LangChain, instructor and litellm; `jsonschema` on the
raw JSON), and every reply finishes with "stop" or "tool_calls" within a bounded max_tokens. One server
serves the whole module; greedy decoding keeps runs repeatable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.test_server_cli import LAUNCH, free_port

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
MAX_TOKENS = 160  # every schema below is small enough to close well within this


# Every model forbids extra keys (additionalProperties: false), as OpenAI's strict mode requires: without it
# JSON Schema allows any extra key, and a greedy 135M model may add keys until max_tokens (valid, but cut).


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=30)


class Weather(BaseModel):
    """Get the current weather in a city."""

    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=24, description="the city's name")
    unit: Literal["celsius", "fahrenheit"]


class AnyObject(BaseModel):
    """Any JSON object (and only an object: a list, a string or a number fails to validate)."""

    model_config = ConfigDict(extra="allow")


CITY_PROMPT = [{"role": "user", "content": "Describe Paris, the capital of France, as JSON."}]
PET_PROMPT = [{"role": "user", "content": "Tell me about a pet: its kind, name and age."}]
JSON_OK_PROMPT = [{"role": "user", "content": 'Reply with a JSON object whose key "ok" is true.'}]
WEATHER_PROMPT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`llmaas serve` with the default model in a subprocess; yields its base URL (no auth)."""
    tmp = tmp_path_factory.mktemp("clients")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "serve", "--model", MODEL, "--port", str(port), "--no-auth"]
        + ["--log-level", "warning", "--database-url", f"sqlite:///{tmp / 'billing.sqlite3'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "server did not become healthy"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def validates(model: type[BaseModel], text: str) -> dict:
    """The raw JSON text parses and validates with jsonschema against the model's own schema."""
    value = json.loads(text)
    jsonschema.validate(value, model.model_json_schema())
    return value


# -- the openai SDK ----------------------------------------------------------------------------------------


def test_openai_sdk_parse_returns_the_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=CITY_PROMPT, response_format=City, max_tokens=MAX_TOKENS, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    validates(City, choice.message.content)


def test_openai_sdk_parse_with_a_forced_tool_gives_parsed_arguments(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=WEATHER_PROMPT,
        tools=[openai.pydantic_function_tool(Weather, name="get_weather")],
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert isinstance(call.function.parsed_arguments, Weather)


def test_openai_sdk_responses_plain_streamed_and_stored(client):
    """client.responses.*: a reply, the same reply streamed (its deltas are its text), retrieve, delete."""
    kw = dict(model=MODEL, input="Name three colours.", max_output_tokens=40, temperature=0)
    whole = client.responses.create(**kw)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    events = list(client.responses.create(**kw, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == whole.output_text  # greedy: the same text
    assert client.responses.retrieve(whole.id).output_text == whole.output_text
    client.responses.delete(whole.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(whole.id)


def test_openai_sdk_responses_parse_and_previous_response_id(client):
    first = client.responses.parse(
        model=MODEL, input="Describe Paris, the capital of France, as JSON.", text_format=City,
        max_output_tokens=MAX_TOKENS, temperature=0,
    )  # fmt: skip
    assert first.status == "completed" and isinstance(first.output_parsed, City)
    validates(City, first.output_text)
    second = client.responses.create(
        model=MODEL, input="Which country was that city in?", previous_response_id=first.id,
        max_output_tokens=20, temperature=0,
    )  # fmt: skip
    # The second turn's prompt holds the first turn: its tokens come from the prefix cache.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0


def test_openai_sdk_responses_function_tool_round_trip(client):
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    asked = client.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[tool], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=MAX_TOKENS, temperature=0,
    )  # fmt: skip
    (call,) = [item for item in asked.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(Weather.model_validate_json(call.arguments), Weather)
    answer = client.responses.create(
        model=MODEL, previous_response_id=asked.id, tools=[tool], max_output_tokens=30, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'}],
    )  # fmt: skip
    assert answer.output_text and answer.output[0].type == "message"


# -- LangChain ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=MODEL,
        base_url=server + "/v1",
        api_key="unused",
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_the_pydantic_model(chat_model, method):
    structured = chat_model.with_structured_output(Pet, method=method, include_raw=True)
    result = structured.invoke(PET_PROMPT)
    assert result["parsing_error"] is None, result["raw"]
    assert isinstance(result["parsed"], Pet), result["raw"]


def test_langchain_json_mode_returns_a_json_object(chat_model):
    # json_mode promises a JSON object, not the schema's shape (the schema only goes in the prompt), so
    # the check is the object; a dict schema makes LangChain hand back the parsed dict.
    structured = chat_model.with_structured_output(
        Pet.model_json_schema(), method="json_mode", include_raw=True
    )
    result = structured.invoke(
        [{"role": "system", "content": "Reply in JSON with keys kind, name and age."}] + PET_PROMPT
    )
    assert result["parsing_error"] is None, result["raw"]
    assert isinstance(result["parsed"], dict)
    assert result["raw"].response_metadata["finish_reason"] == "stop"


def test_langchain_bind_tools_calls_the_tool_with_valid_arguments_then_reads_the_result(chat_model):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool(args_schema=Weather)  # bounded arguments: a greedy 135M model may repeat a free string forever
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Get the current weather in a city."""
        return f"22 degrees {unit} in {city}"

    # strict=True: LangChain then sends additionalProperties false (its schema conversion drops it otherwise).
    first = chat_model.bind_tools([get_weather], tool_choice="required", strict=True).invoke(
        [HumanMessage(WEATHER_PROMPT[0]["content"])]
    )
    assert first.response_metadata["finish_reason"] == "tool_calls"
    assert first.tool_calls and not first.invalid_tool_calls
    call = first.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], get_weather.tool_call_schema.model_json_schema())

    # The history (an assistant turn with tool_calls, then the tool's result) goes back through the
    # template; with tool_choice auto the model may answer in words or call again, both well formed.
    history = [
        HumanMessage(WEATHER_PROMPT[0]["content"]),
        first,
        ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]),
    ]
    second = chat_model.bind_tools([get_weather]).invoke(history)
    assert second.response_metadata["finish_reason"] in ("stop", "tool_calls")
    assert not second.invalid_tool_calls
    if second.response_metadata["finish_reason"] == "stop":
        assert second.content and not second.tool_calls
    else:
        assert second.tool_calls


# -- instructor --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA", "JSON"])
def test_instructor_returns_the_pydantic_model(server, mode):
    import instructor

    patched = instructor.from_openai(
        openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120),
        mode=getattr(instructor.Mode, mode),
    )
    # JSON mode sends response_format json_object and puts the schema only in the prompt: the server
    # guarantees a JSON object, not the schema's shape (as OpenAI's json_object), and a 135M model copies
    # the schema's text into its answer. So JSON mode gets a model any object validates against, and a
    # prompt with a short answer: json_object bounds no string or number, and greedy SmolLM2 asked about a
    # pet or a city writes one that never ends (a 150-digit number, a looping description).
    response_model = AnyObject if mode == "JSON" else City
    prompt = JSON_OK_PROMPT if mode == "JSON" else CITY_PROMPT
    city = patched.chat.completions.create(
        model=MODEL,
        messages=prompt,
        response_model=response_model,
        max_retries=0,  # a retry would hide a first answer that did not validate
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert isinstance(city, response_model)


# -- litellm -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list at import
    import litellm

    return litellm


def test_litellm_response_format_json_schema(server, litellm):
    schema = {"name": "city", "schema": City.model_json_schema(), "strict": True}
    response = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=server + "/v1",
        api_key="unused",
        messages=CITY_PROMPT,
        response_format={"type": "json_schema", "json_schema": schema},
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    City.model_validate(validates(City, choice.message.content))


def test_litellm_response_format_pydantic_model(server, litellm):
    response = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=server + "/v1",
        api_key="unused",
        messages=PET_PROMPT,
        response_format=Pet,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    Pet.model_validate(validates(Pet, choice.message.content))


# -- streaming: the re-assembled stream is the non-streamed reply --------------------------------------------


def test_streamed_tool_call_reassembles_to_the_non_streamed_one(client):
    kwargs = dict(
        model=MODEL,
        messages=WEATHER_PROMPT,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                if delta.id:
                    assert call["id"] is None, "the id comes once, in the call's first delta"
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    assert finish == whole.finish_reason == "tool_calls"
    # Byte for byte: the same seed-free greedy run gives the same call, streamed or not.
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == expected
    for _, arguments in expected:
        jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])


# -- vLLM users' code, unchanged ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra_body, check",
    [
        (
            {"structured_outputs": {"choice": ["positive", "negative"]}},
            lambda t: t in ("positive", "negative"),
        ),
        (
            {"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}},
            lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t),
        ),
        ({"guided_json": City.model_json_schema()}, lambda t: City.model_validate(validates(City, t))),
    ],
    ids=["structured_outputs.choice", "structured_outputs.regex", "guided_json"],
)
def test_vllm_extension_fields_through_the_openai_sdk(client, extra_body, check):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is this review positive? 'I loved it.' Answer:"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=extra_body,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert check(choice.message.content), choice.message.content
