"""Constrained decoding in the engine (grammar.py): every output matches its schema / regex / choices /
grammar, end-of-sequence only where the grammar accepts, refusals name the keyword and its path, and a
constrained request never costs another request anything.

A tiny random llama checks the mechanics (its text is noise, which is the hard case for a grammar: the
model never "wants" valid JSON); the real SmolLM2 checks real outputs (marked slow).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import jsonschema
import pytest

from llmaas import SamplingParams
from llmaas.engine import grammar as grammar_module
from llmaas.engine.async_engine import AsyncEngine
from llmaas.engine.grammar import GrammarError, GrammarMatcher
from llmaas.engine.llm_engine import EngineConfig, LLMEngine
from llmaas.engine.structured import StructuredOutput
from llmaas.errors import InvalidRequestError
from llmaas.llm import LLM
from tests.model_factory import EOS_ID, make_tiny_checkpoint

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "kind": {"const": "person"},
        "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
    },
    "required": ["name", "age", "tags", "kind"],
    "additionalProperties": False,
}
NESTED = {  # bounded everywhere: the tiny model's noise must still reach the end within max_tokens
    "type": "object",
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50}},
            "required": ["x"],
            "additionalProperties": False,
        }
    },
    "properties": {
        "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 2},
        "label": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "ok": {"type": "boolean"},
    },
    "required": ["points", "label", "ok"],
    "additionalProperties": False,
}


def schema_output(schema: dict, param: str = "response_format") -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(schema, sort_keys=True), param)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("structured"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir)


def make_llm(model_dir, **kw) -> LLM:
    kw.setdefault("dtype", "float32")
    kw.setdefault("block_size", 4)
    kw.setdefault("kv_cache_memory", 2**20)
    return LLM(config=EngineConfig(model=str(model_dir), **kw))


def texts(outs) -> list[str]:
    return [c.text for out in outs for c in out.outputs]


def assert_valid(outs, schema: dict) -> None:
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop", (c.finish_reason, c.text)
            jsonschema.validate(json.loads(c.text), schema)


# ------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("schema", [PERSON, NESTED], ids=["person", "nested"])
def test_json_schema_outputs_validate_greedy_and_sampled(llm, schema):
    so = schema_output(schema)
    greedy = llm.generate(
        ["Hello", "The quick brown"], SamplingParams(max_tokens=200, temperature=0, structured=so)
    )
    assert_valid(greedy, schema)
    sampled = llm.generate(
        ["Hello", "Numbers:"],
        SamplingParams(max_tokens=200, temperature=1.0, n=3, seed=7, structured=so),
    )
    assert_valid(sampled, schema)
    assert len(set(texts(sampled))) > 1  # each sample has its own matcher and its own draw


def test_every_sampling_knob_still_yields_valid_output(llm):
    """The mask comes first: penalties, a +100 bias on a forbidden token, top-k/p/min-p cannot undo it."""
    so = schema_output(PERSON)
    bias = {llm.tokenizer.encode("x")[0]: 100.0, EOS_ID: 100.0}
    params = SamplingParams(
        max_tokens=200,
        temperature=1.5,
        top_k=5,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.3,
        presence_penalty=1.0,
        frequency_penalty=1.0,
        logit_bias=bias,
        n=4,
        seed=3,
        structured=so,
    )
    assert_valid(llm.generate(["Hello"], params), PERSON)


def test_json_object_regex_choice_and_grammar(llm):
    outs = llm.generate(
        ["Hello"] * 5,
        [
            SamplingParams(
                max_tokens=120, temperature=0.9, seed=1, structured=StructuredOutput("json_object")
            ),
            SamplingParams(
                max_tokens=30,
                temperature=1.0,
                seed=2,
                structured=StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,4}"),
            ),
            SamplingParams(
                max_tokens=30,
                temperature=1.0,
                n=4,
                seed=3,
                structured=StructuredOutput("choice", '["yes", "no", "maybe so"]'),
            ),
            SamplingParams(
                max_tokens=30,
                temperature=1.0,
                seed=4,
                structured=StructuredOutput("grammar", 'start: "ab" ("," "ab" | "," "cd")* ";"'),
            ),
            SamplingParams(
                max_tokens=30,
                temperature=1.0,
                seed=5,
                structured=StructuredOutput("grammar", 'root ::= "yes" | "no"'),
            ),
        ],
    )
    obj, regex, choice, lark, gbnf = outs
    assert isinstance(json.loads(obj.outputs[0].text), dict) and obj.outputs[0].finish_reason == "stop"
    import re

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", regex.outputs[0].text)
    assert all(c.text in ("yes", "no", "maybe so") and c.finish_reason == "stop" for c in choice.outputs)
    assert re.fullmatch(r"ab(,ab|,cd)*;", lark.outputs[0].text) and lark.outputs[0].finish_reason == "stop"
    assert gbnf.outputs[0].text in ("yes", "no")


def test_end_of_sequence_only_where_the_grammar_accepts(llm):
    pushed = {EOS_ID: 100.0}  # the model would end at once
    plain = llm.generate(["Hello"], SamplingParams(max_tokens=20, temperature=0, logit_bias=pushed))
    assert plain[0].outputs[0].token_ids == [EOS_ID]
    so = StructuredOutput("regex", "[a-z]{4}[0-9]*")  # accepting after four letters, not before
    out = llm.generate(
        ["Hello"], SamplingParams(max_tokens=20, temperature=0, logit_bias=pushed, structured=so)
    )
    c = out[0].outputs[0]
    assert len(c.text) == 4 and c.text.isalpha() and c.token_ids[-1] == EOS_ID and c.finish_reason == "stop"


def test_a_complete_output_stops_even_when_the_model_never_would(llm):
    so = StructuredOutput("choice", '["alpha", "beta"]')
    params = SamplingParams(
        max_tokens=50, temperature=0, ignore_eos=True, logit_bias={EOS_ID: -100}, structured=so
    )
    c = llm.generate(["Hello"], params)[0].outputs[0]
    assert c.text in ("alpha", "beta") and c.finish_reason == "stop" and EOS_ID not in c.token_ids


def test_max_tokens_cut_is_length(llm):
    so = schema_output(PERSON)
    out = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, structured=so))
    c = out[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    assert c.text.startswith("{")


def test_logprobs_are_those_of_the_raw_distribution(llm):
    prompt = llm.tokenizer.encode("The quick brown")
    raw = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0].outputs[0]
    so = StructuredOutput("regex", "[0-9]+")
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0, logprobs=5, structured=so))[0]
    first = out.outputs[0].logprobs[0]
    assert llm.tokenizer.decode([first.token_id]).isdigit()
    assert [t for t, _ in first.top] == [t for t, _ in raw.logprobs[0].top]  # the unmasked top 5
    assert [v for _, v in first.top] == pytest.approx([v for _, v in raw.logprobs[0].top], abs=1e-5)
    # the chosen token's logprob under the raw distribution, read as a prompt logprob
    scored = llm.generate([[*prompt, first.token_id]], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert first.logprob == pytest.approx(scored.prompt_logprobs[-1].logprob, abs=1e-5)


def test_a_constrained_and_an_unconstrained_request_in_one_batch(llm):
    plain = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = llm.generate(["The quick brown"], plain)[0].outputs[0].token_ids
    so = schema_output(PERSON)
    outs = llm.generate(
        ["The quick brown", "Hello", "Numbers:"],
        [plain, SamplingParams(max_tokens=200, temperature=0, structured=so), plain],
    )
    assert outs[0].outputs[0].token_ids == alone
    assert_valid([outs[1]], PERSON)
    assert outs[2].outputs[0].finish_reason == "length"


def test_preemption_under_kv_pressure_keeps_outputs_valid(model_dir):
    roomy = make_llm(model_dir, kv_cache_memory=2**20)
    tight = make_llm(model_dir, kv_cache_memory=2**20 // 16, max_num_seqs=8)
    so = schema_output(NESTED)
    params = SamplingParams(max_tokens=80, temperature=0, n=6, structured=so)
    prompts = ["Hello", "The quick brown fox"]
    expected = roomy.generate(prompts, params)
    got = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert texts(got) == texts(expected)
    for out in got:
        for c in out.outputs:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), NESTED)
            else:
                assert c.finish_reason == "length"


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "schema, keyword, path",
    [
        (
            {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}},
            "uniqueItems",
            "#/properties/tags",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}},
            },
            "not",
            "#/properties/a/anyOf/1",
        ),
        (
            {"$defs": {"d": {"type": "string", "format": "no-such-format"}}, "$ref": "#/$defs/d"},
            "format",
            "#/$defs/d",
        ),
        (
            {"type": "object", "properties": {"s": {"type": "string", "pattern": "(?<=a)b"}}},
            "pattern",
            "#/properties/s",
        ),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired", "#"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf", "#"),
    ],
    ids=["uniqueItems", "not", "format", "lookbehind", "dependentRequired", "overlapping-oneOf"],
)
def test_unsupported_keyword_is_refused_naming_it_and_its_path(llm, schema, keyword, path):
    so = schema_output(schema, param="response_format.json_schema.schema")
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(["Hello"], SamplingParams(max_tokens=5, structured=so))
    assert err.value.param == "response_format.json_schema.schema"
    assert f"'{keyword}'" in err.value.message and f"'{path}'" in err.value.message
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "so, words",
    [
        (StructuredOutput("json_schema", "{not json"), "not valid JSON"),
        (StructuredOutput("json_schema", "[1, 2]"), "must be an object"),
        (StructuredOutput("regex", "[0-9]{3}-(", "structured_outputs.regex"), "unclosed group"),
        (StructuredOutput("choice", "[]", "structured_outputs.choice"), "non-empty list"),
        (StructuredOutput("choice", '["a", 3]'), "non-empty list"),
        (
            StructuredOutput("grammar", "start: undefined_rule", "structured_outputs.grammar"),
            "undefined_rule",
        ),
        (StructuredOutput("json_schema", json.dumps({"$ref": "#/$defs/missing"})), "/$defs/missing"),
        (StructuredOutput("json_schema", "x" * (2**20 + 1)), "at most"),
        (StructuredOutput("tables", "{}"), "kind must be one of"),
    ],
)
def test_bad_specifications_are_refused_naming_the_field(llm, so, words):
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(["Hello"], SamplingParams(max_tokens=5, structured=so))
    assert err.value.param == so.param and words in err.value.message


def test_structured_must_be_a_structured_output(llm):
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(["Hello"], SamplingParams(structured={"type": "json_object"}))  # type: ignore[arg-type]
    assert err.value.param == "structured"


def test_a_grammar_is_compiled_once_per_value(model_dir):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=2**20))
    spec = json.dumps(PERSON, sort_keys=True)
    before = engine.grammars.num_builds
    for i, param in enumerate(["response_format", "tools[0].function.parameters", "response_format"]):
        engine.add_request(
            f"r{i}",
            "Hello",
            SamplingParams(max_tokens=2, structured=StructuredOutput("json_schema", spec, param)),
        )
    assert engine.grammars.num_builds == before + 1
    bad = json.dumps({"type": "array", "uniqueItems": True})
    for param in ("a", "b"):  # a refusal is cached too, and names each request's own field
        with pytest.raises(InvalidRequestError) as err:
            engine.add_request(
                f"bad-{param}",
                "Hello",
                SamplingParams(structured=StructuredOutput("json_schema", bad, param)),
            )
        assert err.value.param == param and err.value.message.startswith(f"{param}: ")
    assert engine.grammars.num_builds == before + 2


# ----------------------------------------------------------------------------- async + time limit
def pathological_schema() -> dict:
    """allOf of anyOf: llguidance multiplies the options out (8**4 object shapes, ~0.5 s on one core)."""
    return {
        "allOf": [
            {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {f"k{j}_{i}": {"type": "integer"}},
                        "required": [f"k{j}_{i}"],
                    }
                    for i in range(8)
                ]
            }
            for j in range(4)
        ]
    }


def test_a_slow_grammar_is_refused_and_never_stalls_the_engine(model_dir):
    engine = AsyncEngine(
        LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=2**20))
    )
    engine.engine.grammars.timeout_s = 0.02  # the real limit is 2 s; this schema takes ~0.5 s to build
    steps: list[float] = []
    real_step = engine.engine.step

    def step():
        steps.append(time.monotonic())
        return real_step()

    engine.engine.step = step

    async def main():
        plain = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
        running = asyncio.ensure_future(collect(engine.generate("Hello", plain)))
        while not steps:
            await asyncio.sleep(0.001)
        so = schema_output(pathological_schema(), "response_format.json_schema.schema")
        t0 = time.monotonic()
        with pytest.raises(InvalidRequestError) as err:
            await collect(engine.generate("Hi", SamplingParams(max_tokens=5, structured=so)))
        refused_after = time.monotonic() - t0
        assert err.value.param == "response_format.json_schema.schema" and "longer than" in err.value.message
        assert refused_after < 0.4  # refused at the limit, not when the build ends
        outs = await running
        return outs, t0, refused_after

    try:
        outs, t0, refused_after = asyncio.run(main())
        assert outs[-1].finished and outs[-1].error is None and len(outs[-1].outputs[0].token_ids) == 150
        during = [s for s in steps if t0 <= s <= t0 + refused_after]
        assert during, "the engine took no step while the grammar was compiling"
        while engine.engine.grammars.num_builds < 1:  # the build ends on its own; then it stays refused
            time.sleep(0.05)
        t1 = time.monotonic()
        with pytest.raises(InvalidRequestError):
            asyncio.run(
                collect(engine.generate("Hi", SamplingParams(max_tokens=5, structured=so_of_pathological())))
            )
        assert time.monotonic() - t1 < 0.2
    finally:
        engine.shutdown()


def so_of_pathological() -> StructuredOutput:
    return schema_output(pathological_schema(), "response_format.json_schema.schema")


async def collect(stream) -> list:
    return [out async for out in stream]


def test_async_submit_compiles_off_the_engine_thread(model_dir):
    engine = AsyncEngine(
        LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=2**20))
    )
    threads: list[str] = []
    real_build = engine.engine.grammars._build_grammar

    def build(*args):
        threads.append(threading.current_thread().name)
        return real_build(*args)

    engine.engine.grammars._build_grammar = build
    try:
        so = schema_output(NESTED)
        outs = asyncio.run(
            collect(engine.generate("Hello", SamplingParams(max_tokens=200, temperature=0, structured=so)))
        )
        jsonschema.validate(json.loads(outs[-1].outputs[0].text), NESTED)
        assert threads and all(name.startswith("llmaas-grammar") for name in threads)
        with pytest.raises(InvalidRequestError) as err:
            bad = schema_output(
                {"type": "array", "contains": {"type": "integer"}}, "tools[1].function.parameters"
            )
            asyncio.run(collect(engine.generate("Hello", SamplingParams(structured=bad))))
        assert err.value.param == "tools[1].function.parameters" and "'contains'" in err.value.message
    finally:
        engine.shutdown()


# ------------------------------------------------------------------------------------ isolation
def test_a_grammar_fault_fails_that_request_alone(model_dir, monkeypatch):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=2**20))
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    so = schema_output(PERSON)
    engine.add_request("plain", "Hello", plain)
    engine.add_request("bad", "Hello", SamplingParams(max_tokens=50, temperature=0, structured=so))
    engine.add_request("good", "Hi", SamplingParams(max_tokens=200, temperature=0, structured=so))
    bad_matcher = engine.requests["bad"].seqs[0].matcher
    real_advance = GrammarMatcher.advance

    def advance(self, token):
        if self is bad_matcher:
            raise GrammarError("injected")
        return real_advance(self, token)

    monkeypatch.setattr(GrammarMatcher, "advance", advance)
    finished = run_to_end(engine)
    assert finished["bad"].error and "GrammarError" in finished["bad"].error
    assert finished["bad"].outputs[0].finish_reason == "error"
    assert finished["plain"].error is None and len(finished["plain"].outputs[0].token_ids) == 10
    assert finished["good"].error is None
    jsonschema.validate(json.loads(finished["good"].outputs[0].text), PERSON)


def test_a_mask_fault_fails_that_request_alone(model_dir, monkeypatch):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=2**20))
    so = schema_output(PERSON)
    engine.add_request("plain", "Hello", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    engine.add_request("bad", "Hello", SamplingParams(max_tokens=50, temperature=0, structured=so))
    engine.add_request("good", "Hi", SamplingParams(max_tokens=200, temperature=0, structured=so))
    bad_matcher = engine.requests["bad"].seqs[0].matcher
    real_fill, real_one = grammar_module.fill_masks, grammar_module.fill_mask

    def fill_masks(matchers, packed):
        if any(m is bad_matcher for m in matchers):
            raise RuntimeError("injected batched mask fault")
        return real_fill(matchers, packed)

    def fill_mask(matcher, packed, row):
        if matcher is bad_matcher:
            raise RuntimeError("injected mask fault")
        return real_one(matcher, packed, row)

    monkeypatch.setattr(grammar_module, "fill_masks", fill_masks)
    monkeypatch.setattr(grammar_module, "fill_mask", fill_mask)
    finished = run_to_end(engine)
    assert finished["bad"].error and "injected mask fault" in finished["bad"].error
    assert finished["plain"].error is None and len(finished["plain"].outputs[0].token_ids) == 10
    jsonschema.validate(json.loads(finished["good"].outputs[0].text), PERSON)


def test_a_matcher_in_its_error_state_fails_the_request_never_stops_it(model_dir):
    """Fail closed: llguidance's matcher enters an error state (e.g. a lexer limit hit while computing a
    mask) and then allows only end-of-sequence; that must be an error, not a "stop" with half a JSON."""
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=2**20))
    so = schema_output(PERSON)
    engine.add_request("broken", "Hello", SamplingParams(max_tokens=50, temperature=0, structured=so))
    engine.add_request("good", "Hi", SamplingParams(max_tokens=200, temperature=0, structured=so))
    engine.step()
    matcher = engine.requests["broken"].seqs[0].matcher
    assert not matcher.inner.consume_token(engine.tokenizer.encode("zz")[0])  # "{zz": not JSON
    assert matcher.inner.is_error()
    finished = run_to_end(engine)
    assert (
        finished["broken"].outputs[0].finish_reason == "error" and "GrammarError" in finished["broken"].error
    )
    jsonschema.validate(json.loads(finished["good"].outputs[0].text), PERSON)


def test_unconstrained_steps_do_no_mask_work(llm, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("mask work in a step without a constrained sequence")

    monkeypatch.setattr(llm.engine.runner, "_masks", forbidden)
    monkeypatch.setattr(grammar_module, "mask_bias", forbidden)
    outs = llm.generate(["Hello", "Hi"], SamplingParams(max_tokens=8, temperature=0.7, n=2, seed=1))
    assert all(out.error is None for out in outs)


def test_abort_frees_the_matchers(model_dir):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=2**20))
    engine.add_request(
        "r", "Hello", SamplingParams(max_tokens=50, n=3, temperature=1.0, structured=schema_output(PERSON))
    )
    seqs = engine.requests["r"].seqs
    assert all(s.matcher is not None for s in seqs)
    engine.step()
    final = engine.abort_request("r")
    assert final.finished and all(c.finish_reason == "abort" for c in final.outputs)
    assert all(s.matcher is None for s in seqs) and not engine.has_unfinished_requests()


def run_to_end(engine: LLMEngine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smollm():
    return LLM("smollm2-135m", dtype="float32", kv_cache_memory=64 * 2**20)


RECIPE = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "servings": {"type": "integer", "minimum": 1, "maximum": 12},
        "ingredients": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "minItems": 1,
            "maxItems": 5,
        },
        "vegetarian": {"type": "boolean"},
    },
    "required": ["title", "servings", "ingredients", "vegetarian"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_real_model_json_schema_outputs_validate(smollm):
    conv = [{"role": "user", "content": "Give me a simple pancake recipe as JSON."}]
    prompt = smollm.tokenizer.apply_chat_template(conv, add_generation_prompt=True)
    so = schema_output(RECIPE)
    greedy = smollm.generate([prompt], SamplingParams(max_tokens=300, temperature=0, structured=so))
    assert_valid(greedy, RECIPE)
    assert "pancake" in greedy[0].outputs[0].text.lower()
    sampled = smollm.generate(
        [prompt], SamplingParams(max_tokens=200, temperature=0.8, n=3, seed=11, structured=so)
    )
    assert_valid(sampled, RECIPE)


@pytest.mark.slow
def test_real_model_choice_and_regex(smollm):
    choice = StructuredOutput("choice", '[" London", " Berlin", " Paris"]')
    params = SamplingParams(max_tokens=10, temperature=0, structured=choice)
    out = smollm.generate(["The capital of France is"], params)[0]
    assert out.outputs[0].text == " Paris" and out.outputs[0].finish_reason == "stop"
    conv = [{"role": "user", "content": "What is today's date? Use the form YYYY-MM-DD."}]
    prompt = smollm.tokenizer.apply_chat_template(conv, add_generation_prompt=True)
    date = StructuredOutput("regex", r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])")
    out = smollm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, structured=date))[0]
    import re

    assert re.fullmatch(r"20\d\d-\d\d-\d\d", out.outputs[0].text) and out.outputs[0].finish_reason == "stop"
