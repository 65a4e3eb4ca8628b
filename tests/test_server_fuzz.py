"""Schema-driven fuzzing: bodies drawn from the server's own /openapi.json, plus junk, never get a 5xx.

Each request property is drawn from its documented schema (often valid, sometimes at the edges) or
from arbitrary JSON; the server must answer 200 or a 4xx in OpenAI's error shape.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmaas.server import create_app
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import make_engine, serve

MODEL = "fuzz"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def from_schema(schema: dict, defs: dict, depth: int = 0, edge: int = 0) -> st.SearchStrategy:
    """Values the schema documents; `edge` > 0 also draws just past numeric bounds."""
    if not isinstance(schema, dict):  # `true`: any value
        return json_values
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, depth, edge)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs, depth, edge) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "integer":
        lo, hi = schema.get("minimum", -5), schema.get("maximum", 40)
        return st.integers(lo - edge, hi + edge)
    if kind == "number":
        lo, hi = schema.get("minimum", -3.0), schema.get("maximum", 3.0)
        return st.floats(lo - edge, hi + edge, allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(max_size=30)
    if kind == "null":
        return st.none()
    if kind == "array" and depth < 3:
        return st.lists(from_schema(schema.get("items", {}), defs, depth + 1, edge), min_size=1, max_size=3)
    if kind == "object" and depth < 3:
        if "properties" in schema:
            props = {k: from_schema(v, defs, depth + 1, edge) for k, v in schema["properties"].items()}
            required = set(schema.get("required", []))
            return st.fixed_dictionaries(
                {k: v for k, v in props.items() if k in required},
                optional={k: v for k, v in props.items() if k not in required},
            )
        values = from_schema(schema.get("additionalProperties", {}), defs, depth + 1, edge)
        return st.dictionaries(st.integers(0, 400).map(str) | st.text(max_size=6), values, max_size=2)
    return json_values


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    model_dir = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("fuzz"))
    engine = make_engine(model_dir, max_model_len=64)  # every generation is short
    try:
        with serve(create_app({MODEL: engine})) as url, httpx.Client(base_url=url, timeout=60) as client:
            yield client, client.get("/openapi.json").json()
    finally:
        engine.shutdown()


def body_strategy(schema: dict, name: str) -> st.SearchStrategy:
    """Half the bodies follow the schema (most run), half mix in edge values and arbitrary JSON."""
    defs = schema["components"]["schemas"]
    request = defs[name]

    def bodies(junk: bool) -> st.SearchStrategy:
        fields = {
            k: st.one_of(from_schema(v, defs, edge=1), json_values) if junk else from_schema(v, defs)
            for k, v in request["properties"].items()
        }
        fields["model"] = (
            st.sampled_from([MODEL, MODEL, MODEL, "nope"]) | json_values if junk else st.just(MODEL)
        )
        if (
            not junk and "messages" in fields
        ):  # the schema allows content-less messages; most should have some
            text = st.text(max_size=12)
            content = text | st.lists(
                st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2
            )
            message = st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": content}
            )
            fields["messages"] = st.lists(message, min_size=1, max_size=2)
        optional = {k: v for k, v in fields.items() if k not in request["required"]}
        if not junk:  # a few fields at a time, so that many bodies are wholly valid
            return st.fixed_dictionaries({k: fields[k] for k in request["required"]}).flatmap(
                lambda base: st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True).flatmap(
                    lambda keys: st.fixed_dictionaries({k: optional[k] for k in keys}).map(
                        lambda extra: {**base, **extra}
                    )
                )
            )
        return st.fixed_dictionaries({k: fields[k] for k in request["required"]}, optional=optional)

    return bodies(False) | bodies(True)


def check(client: httpx.Client, path: str, body: object) -> None:
    with client.stream("POST", path, json=body) as r:
        text = r.read().decode()
    assert r.status_code < 500, (body, r.status_code, text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, text
        assert r.status_code != 422
    elif isinstance(body, dict) and body.get("stream") is True:
        assert text.rstrip().endswith("data: [DONE]"), text[-200:]
        assert '"error"' not in text, text


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.mark.parametrize(
    "path, name",
    [("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")],
)
def test_fuzz_never_5xx(fuzz_server, path, name):
    client, schema = fuzz_server

    @SETTINGS
    @given(body=body_strategy(schema, name))
    def run(body):
        check(client, path, body)

    run()


@SETTINGS
@given(body=json_values)
def test_fuzz_arbitrary_json_never_5xx(fuzz_server, body):
    client, _ = fuzz_server
    for path in ("/v1/chat/completions", "/v1/completions"):
        check(client, path, body)
