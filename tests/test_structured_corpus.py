"""Every schema of the corpus (tests/structured_corpus.py, 200+) through constrained decoding.

A tiny random-weight model is enough: the grammar, not the weights, guarantees the structure, and random
weights sample far stranger paths through a schema than a trained model would. For each schema:
- the engine enforces it: every output that finishes with "stop" parses and validates with `jsonschema`
  (formats checked too), and an output cut by max_tokens says "length" and used all of them; or
- the engine refuses it before any work with InvalidRequestError naming a keyword the schema holds,
  param "response_format" (a 400 at the API) -- never an unconstrained answer.
Schemas whose keywords the issue requires (must_enforce) may not be refused.

The engine-level run batches the whole corpus in one LLM; a slice goes over HTTP through
response_format to check the same promise end to end (chat and completions).
"""

from __future__ import annotations

import copy
import json
import re

import httpx
import jsonschema
import pytest

from llmaas import LLM, SamplingParams
from llmaas.engine.structured import StructuredOutput
from llmaas.errors import InvalidRequestError
from tests.model_factory import make_tiny_checkpoint
from tests.structured_corpus import HAND_WRITTEN, Schema, corpus
from tests.test_server_api import make_engine, serve

MAX_TOKENS = 192
PROMPT = "Reply with JSON:"
# Draft 2020-12's own format checks. jsonschema checks "time" and "date-time" only with an extra package
# (and the draft-3 "time" of a bare FormatChecker() refuses offsets), so RFC 3339's grammar is checked here.
FORMATS = copy.deepcopy(jsonschema.Draft202012Validator.FORMAT_CHECKER)
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([zZ]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"


@FORMATS.checks("time")
def _is_time(value: object) -> bool:
    return not isinstance(value, str) or re.fullmatch(_TIME, value) is not None


@FORMATS.checks("date-time")
def _is_date_time(value: object) -> bool:
    return not isinstance(value, str) or re.fullmatch(f"{_DATE}[tT ]{_TIME}", value) is not None


def keywords(schema: object) -> set[str]:
    """Every key that appears anywhere in the schema (keywords and property names alike)."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            found.add(key)
            found |= keywords(value)
    elif isinstance(schema, list):
        for value in schema:
            found |= keywords(value)
    return found


def structured(schema: Schema) -> StructuredOutput:
    return StructuredOutput(kind="json_schema", spec=json.dumps(schema, sort_keys=True))


def check_refusal(name: str, schema: Schema, must_enforce: bool, error: InvalidRequestError) -> None:
    assert not must_enforce, f"{name}: a required keyword was refused: {error.message}"
    # The engine names StructuredOutput.param ("response_format"); the API may name the field inside it.
    assert error.param == "response_format" or error.param.startswith("response_format."), (name, error.param)
    named = [k for k in keywords(schema) if k in error.message]
    assert named, f"{name}: the 400 names no keyword of the schema: {error.message}"


def check_output(name: str, schema: Schema, text: str, finish_reason: str, n_tokens: int) -> bool:
    """True when the output completed (and validated); False when max_tokens cut it."""
    if finish_reason == "length":
        assert n_tokens == MAX_TOKENS, (name, n_tokens)
        return False
    assert finish_reason == "stop", (name, finish_reason)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{name}: finished output is not JSON: {text!r}") from e
    try:
        jsonschema.validate(value, schema, format_checker=FORMATS)
    except jsonschema.ValidationError as e:
        raise AssertionError(f"{name}: output {text!r} does not validate: {e.message}") from e
    return True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("corpus"), max_position_embeddings=1024)


def test_corpus_is_large_and_covers_the_required_keywords():
    cases = corpus()
    assert len(cases) >= 200
    seen = set().union(*(keywords(schema) for _, schema, _ in cases))
    for keyword in ["properties", "required", "additionalProperties", "minItems", "maxItems", "enum", "const",
                    "anyOf", "oneOf", "$defs", "$ref", "minimum", "maximum", "exclusiveMinimum", "pattern",
                    "format", "minLength", "maxLength"]:  # fmt: skip
        assert keyword in seen, keyword


def test_every_corpus_schema_is_enforced_or_refused_by_name(model_dir):
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory=32 * 2**20, block_size=16)
    engine = llm.engine
    cases = corpus()
    pending: dict[str, tuple[str, Schema]] = {}
    refused, problems = [], []  # every problem of the corpus at once, not only the first
    for i, (name, schema, must_enforce) in enumerate(cases):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, structured=structured(schema))
        try:
            engine.add_request(f"corpus-{i}", PROMPT, params)
        except InvalidRequestError as error:
            refused.append(name)
            try:
                check_refusal(name, schema, must_enforce, error)
            except AssertionError as e:
                problems.append(str(e))
            continue
        pending[f"corpus-{i}"] = (name, schema)

    completed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                name, schema = pending.pop(out.request_id)
                o = out.outputs[0]
                try:
                    assert out.error is None, (name, out.error)
                    completed += check_output(name, schema, o.text, o.finish_reason, len(o.token_ids))
                except AssertionError as e:
                    problems.append(str(e))
    assert not pending
    assert not problems, "\n".join(problems)
    accepted = len(cases) - len(refused)
    # The corpus bounds every string and array so outputs can close: if most did not, the test checked
    # little (and something stops outputs from completing).
    assert completed >= 0.8 * accepted, f"only {completed} of {accepted} outputs completed; refused {refused}"


# -- the same promise over HTTP --------------------------------------------------------------------------


HTTP_SLICE = HAND_WRITTEN[::2]


@pytest.fixture(scope="module")
def base_url(model_dir):
    from llmaas.server import create_app

    engine = make_engine(model_dir, kv_cache_memory=8 * 2**20, block_size=16)
    with serve(create_app({"tiny-llama": engine})) as url:
        yield url


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_http_response_format_is_enforced_or_refused_by_name(base_url, endpoint):
    with httpx.Client(base_url=base_url, timeout=120) as http:
        for i, (name, schema, must_enforce) in enumerate(HTTP_SLICE):
            body = {
                "model": "tiny-llama",
                "max_tokens": MAX_TOKENS,
                "seed": i,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": schema, "strict": True},
                },
            }
            if endpoint == "chat":
                r = http.post(
                    "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": PROMPT}]}
                )
            else:
                r = http.post("/v1/completions", json={**body, "prompt": PROMPT})
            if r.status_code == 400:
                error = r.json()["error"]
                check_refusal(
                    name, schema, must_enforce, InvalidRequestError(error["message"], param=error["param"])
                )
                continue
            assert r.status_code == 200, (name, r.status_code, r.text)
            choice = r.json()["choices"][0]
            text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
            n_tokens = r.json()["usage"]["completion_tokens"]
            check_output(name, schema, text, choice["finish_reason"], n_tokens)


def test_http_json_object_always_gives_an_object(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as http:
        for seed in range(4):
            r = http.post(
                "/v1/chat/completions",
                json={
                    "model": "tiny-llama",
                    "messages": [{"role": "user", "content": PROMPT}],
                    "max_tokens": MAX_TOKENS,
                    "seed": seed,
                    "response_format": {"type": "json_object"},
                },
            )
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            if choice["finish_reason"] == "stop":
                assert isinstance(json.loads(choice["message"]["content"]), dict)
            else:
                assert choice["finish_reason"] == "length"
