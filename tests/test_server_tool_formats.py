"""Tool calls in the model's own convention: Hermes/Qwen, Llama 3 JSON, Mistral (docs/structured-outputs.md).

No model of these families ships offline, so each is a tiny random llama with a tokenizer that has the
family's control tokens as special tokens and a chat template written here after the family's
documented conventions (our own Jinja, not the vendors' text). Their outputs are gibberish: only the
grammar makes them parse, which is what these tests check, through the real server and the openai SDK.
The first part tests detection, the parser (on hand-written replies split at every character) and
the grammar (with llguidance, the engine's matcher) directly.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from llmaas.errors import InvalidRequestError
from llmaas.server.protocol import ChatCompletionRequest
from llmaas.server.structured import structured_output
from llmaas.server.tool_formats import HERMES, LLAMA3_JSON, MISTRAL, detect_format
from llmaas.server.tools import (
    ToolCallParser,
    grammar,
    parse_whole,
    plan_tools,
    prompt_messages,
)
from tests.model_factory import CHAT_TEMPLATE, make_tiny_checkpoint
from tests.test_server_api import make_engine, serve
from tests.test_server_structured import ASK, SCHEMAS, SMALL, TIME, WEATHER

# --------------------------------------------------------------------------------- the templates
LLAMA3_TEMPLATE = (
    "{%- set ns = namespace(tools_shown=false) -%}"
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "{% if tools %}Environment: ipython\n{% endif %}"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}{% endif %}<|eot_id|>"
    "{% for m in messages if m.role != 'system' %}"
    "{% if m.role == 'user' %}<|start_header_id|>user<|end_header_id|>\n\n"
    "{% if tools and not ns.tools_shown %}{% set ns.tools_shown = true %}"
    'To call a function, answer {"name": function name, "parameters": its arguments as an object}.\n\n'
    "{% for t in tools %}{{ t.function | tojson }}\n\n{% endfor %}{% endif %}"
    "{{ m.content }}<|eot_id|>"
    "{% elif m.role == 'assistant' and m.tool_calls %}"
    "{% if m.tool_calls | length != 1 %}{{ raise_exception('one tool call per assistant turn') }}{% endif %}"
    "{% set call = m.tool_calls[0].function %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    '{"name": "{{ call.name }}", "parameters": {{ call.arguments | tojson }}}<|eot_id|>'
    "{% elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>")

_NINE = "{% if {id} is not string or {id} | length != 9 or not {id}.isalnum() %}"
_REFUSE_ID = "{{ raise_exception('tool call ids must be 9 letters or digits') }}{% endif %}"
MISTRAL_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}"
    "{% if tools and loop.index0 == ns.last_user %}"
    "[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST]{{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS]["
    "{% for c in m.tool_calls %}" + _NINE.replace("{id}", "c.id") + _REFUSE_ID + "{"
    '"name": {{ c.function.name | tojson }}, "arguments": {{ c.function.arguments | tojson }}, '
    '"id": "{{ c.id }}"}'
    "{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}"
    "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}"
    "{% elif m.role == 'tool' %}" + _NINE.replace("{id}", "m.tool_call_id") + _REFUSE_ID + "[TOOL_RESULTS]"
    '{"content": {{ m.content | tojson }}, "call_id": "{{ m.tool_call_id }}"}[/TOOL_RESULTS]'
    "{% endif %}{% endfor %}"
)
MISTRAL_TOKENS = (
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n\n"
    'Call a function with <tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call><|im_end|>\n'
    "{% endif %}{% for m in messages %}"
    "{% if m.role == 'system' %}{% if not tools %}<|im_start|>system\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% if m.content %}{{ m.content }}\n{% endif %}{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% if not loop.last %}\n{% endif %}{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HERMES_TOKENS = ("<tool_call>", "</tool_call>")

FAMILIES = {  # served name -> (template, special tokens, format)
    "llama3": (LLAMA3_TEMPLATE, LLAMA3_TOKENS, LLAMA3_JSON),
    "mistral": (MISTRAL_TEMPLATE, MISTRAL_TOKENS, MISTRAL),
    "hermes": (HERMES_TEMPLATE, HERMES_TOKENS, HERMES),
}


def body(model: str = "llama3", **kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": model, "messages": ASK, **kw})


# --------------------------------------------------------------------------------- detection
def test_the_convention_is_detected_from_the_template():
    assert detect_format(LLAMA3_TEMPLATE) == LLAMA3_JSON
    assert detect_format(MISTRAL_TEMPLATE) == MISTRAL
    assert detect_format(HERMES_TEMPLATE) == HERMES
    spaced = detect_format(MISTRAL_TEMPLATE.replace("[TOOL_CALLS][", "[TOOL_CALLS] ["))
    assert spaced.name == "mistral" and spaced.block_open == "[TOOL_CALLS] ["
    # the later Mistral convention ([TOOL_CALLS]name[ARGS]{...}) is another one: generic format
    assert detect_format(MISTRAL_TEMPLATE.replace("[TOOL_CALLS][", "[TOOL_CALLS]{{ n }}[ARGS]")) is None
    assert detect_format(CHAT_TEMPLATE) is None  # takes no tools
    assert detect_format("{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert detect_format(None) is None


# --------------------------------------------------------------------------------- the parser
PARIS = {"city": "Paris", "unit": "C"}
UTC = {"zone": "UTC"}
REPLIES = {
    LLAMA3_JSON: [
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}',
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}; {"name": "get_time", '
        '"parameters": {"zone": "UTC"}}',
        '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}',
        '<|python_tag|> { "name" : "get_time" ,\n "parameters" : { "zone" : "U\\"}{TC" } } ;\n'
        '{"name": "get_time", "parameters": {}}',
        "Plain {x}",
        '{"nam',
        "Plain answer",
        "",
    ],
    MISTRAL: [
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]',
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, '
        '{"name": "get_time", "arguments": {"zone": "UTC"}}]',
        '[TOOL_CALLS] [ {"name": "get_time", "arguments": {"zone": "]"}} ,{"name": "get_time", '
        '"arguments": {"zone": "UTC"}} ]',
        "[TOOL",
        '[TOOL_CALLS][{"name": "get_time", "arguments": {"zo',
        "[INST] is not a call",
        "",
    ],
    HERMES: [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
        "<b>not a call</b>",
        "<tool",
        '<tool_call>\n{"name": "get_time", "argu',
    ],
}
CUT = {  # replies cut by max_tokens inside a call -> (name, arguments so far) of the calls begun
    '{"nam': [],
    '[TOOL_CALLS][{"name": "get_time", "arguments": {"zo': [("get_time", '{"zo')],
    '<tool_call>\n{"name": "get_time", "argu': [],
}
EXPECTED_CALLS = {  # reply -> [(name, arguments object)] for the replies with calls
    REPLIES[LLAMA3_JSON][1]: [("get_weather", PARIS), ("get_time", UTC)],
    REPLIES[LLAMA3_JSON][3]: [("get_time", {"zone": 'U"}{TC'}), ("get_time", {})],
    REPLIES[MISTRAL][2]: [("get_time", {"zone": "]"}), ("get_time", UTC)],
    REPLIES[HERMES][1]: [("get_time", UTC), ("get_time", {"zone": "CET"})],
}


def _streamed(fmt, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    parser, content, calls = ToolCallParser(fmt), "", {}
    for piece in pieces:
        text, deltas = parser.feed(piece)
        content += text
        for d in deltas:
            entry = calls.setdefault(d["index"], [None, ""])
            if "id" in d:
                assert entry[0] is None and d["function"]["name"]  # the first delta names the call
                assert d["id"] == parser.calls[d["index"]].id
                entry[0] = d["function"]["name"]
            entry[1] += d["function"]["arguments"]
    content += parser.finish()[0]
    return content, [tuple(e) for e in calls.values()]


@pytest.mark.parametrize("fmt, text", [(f, t) for f, texts in REPLIES.items() for t in texts])
def test_every_split_of_a_reply_parses_as_the_whole(fmt, text):
    content, calls = parse_whole(text, fmt)
    whole = ("" if content is None else content, [(c.name, c.arguments) for c in calls])
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        assert _streamed(fmt, pieces) == whole, pieces
    if text in CUT:
        assert content is None and [(c.name, c.arguments) for c in calls] == CUT[text]
    elif calls:
        assert content is None
        objects = [(c.name, json.loads(c.arguments)) for c in calls]
        assert objects == EXPECTED_CALLS.get(text, objects)
        assert all(isinstance(o, dict) for _, o in objects)
        if text in (REPLIES[LLAMA3_JSON][0], REPLIES[MISTRAL][0], REPLIES[HERMES][0]):
            assert objects == [("get_weather", PARIS)]
    else:
        assert content == text


def test_call_ids_follow_the_format():
    _, calls = parse_whole(REPLIES[MISTRAL][1], MISTRAL)
    assert all(re.fullmatch("[A-Za-z0-9]{9}", c.id) for c in calls) and calls[0].id != calls[1].id
    _, calls = parse_whole(REPLIES[LLAMA3_JSON][1], LLAMA3_JSON)
    assert all(re.fullmatch("call_[0-9a-f]{24}", c.id) for c in calls)
    assert MISTRAL.template_call_id("abcDEF123") == "abcDEF123"
    derived = MISTRAL.template_call_id("call_0123456789")
    assert re.fullmatch("[A-Za-z0-9]{9}", derived) and derived == MISTRAL.template_call_id("call_0123456789")
    assert LLAMA3_JSON.template_call_id("call_0123456789") == "call_0123456789"


# --------------------------------------------------------------------------------- the models
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-formats")
    return {
        name: make_tiny_checkpoint(
            "llama", root, extra_special_tokens=tokens, chat_template=template, max_position_embeddings=2048
        )
        for name, (template, tokens, _) in FAMILIES.items()
    }


@pytest.fixture(scope="module")
def engines(model_dirs):
    built = {name: make_engine(d, kv_cache_memory=8 * 2**20) for name, d in model_dirs.items()}
    yield built
    for engine in built.values():
        engine.shutdown()


def plan_for(engines, model: str, **kw):
    engine = engines[model]
    return plan_tools(body(model, **kw), engine.chat_template, engine.special_token_id)


@pytest.fixture(scope="module")
def matcher(model_dirs):
    llguidance = pytest.importorskip("llguidance")
    from llmaas.models.tokenizer import Tokenizer

    tokenizers = {name: Tokenizer.from_dir(d) for name, d in model_dirs.items()}

    def accepts(model: str, structured, text: str | list[int]) -> bool:
        tok = tokenizers[model]
        lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.backend.get_vocab_size())
        m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(structured.spec), log_level=0)
        assert not m.is_error(), m.get_error()
        ids = tok.encode(text) if isinstance(text, str) else text
        return m.consume_tokens(ids) and m.is_accepting()

    return accepts


def _write(fmt, *calls) -> str:
    return fmt.write_calls(list(calls))


@pytest.mark.parametrize("model", list(FAMILIES))
def test_the_grammar_allows_what_tool_choice_allows_in_each_format(engines, matcher, model):
    fmt = FAMILIES[model][2]
    paris, utc = ("get_weather", PARIS), ("get_time", UTC)
    auto = grammar(plan_for(engines, model, tools=[WEATHER, TIME]))
    special = plan_for(engines, model, tools=[WEATHER]).special_tokens
    assert {marker for marker, _ in special} == set(fmt.markers)  # each one special token here ...
    assert all(f"<[{token_id}]>" in auto.spec for _, token_id in special)  # ... that the grammar names
    assert matcher(model, auto, "It is sunny.") and matcher(model, auto, _write(fmt, paris))
    assert matcher(model, auto, _write(fmt, paris, utc))
    assert not matcher(model, auto, fmt.lead + "is how a call starts, so a reply cannot")
    assert not matcher(model, auto, _write(fmt, ("get_weather", {"city": "Paris"})))  # "unit" missing
    assert not matcher(model, auto, _write(fmt, ("launch", {})))
    wrong_key = "parameters" if fmt.arguments_key == "arguments" else "arguments"
    assert not matcher(model, auto, _write(fmt, paris).replace(f'"{fmt.arguments_key}"', f'"{wrong_key}"'))
    required = grammar(plan_for(engines, model, tools=[WEATHER, TIME], tool_choice="required"))
    assert matcher(model, required, _write(fmt, utc)) and not matcher(model, required, "It is sunny.")
    named = grammar(
        plan_for(
            engines,
            model,
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    )
    assert matcher(model, named, _write(fmt, utc)) and not matcher(model, named, _write(fmt, paris))
    assert not matcher(model, named, _write(fmt, utc, utc))
    single = grammar(plan_for(engines, model, tools=[WEATHER, TIME], parallel_tool_calls=False))
    assert matcher(model, single, _write(fmt, paris)) and not matcher(model, single, _write(fmt, paris, utc))


def test_llama_python_tag_may_come_first_as_its_token_only(engines, matcher, model_dirs):
    plan = plan_for(engines, "llama3", tools=[TIME], tool_choice="required")
    tag = dict(plan.special_tokens)["<|python_tag|>"]
    call = _write(LLAMA3_JSON, ("get_time", UTC))
    assert matcher("llama3", grammar(plan), "<|python_tag|>" + call)  # encoded as the special token
    assert matcher("llama3", grammar(plan), call)  # and it is not required
    auto = grammar(plan_for(engines, "llama3", tools=[TIME]))
    assert f"<[{tag}]>?" in auto.spec
    from llmaas.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dirs["llama3"])
    spelled = tok.encode("<|python") + tok.encode("_tag|> hello")  # the marker's text in ordinary tokens
    assert tag not in spelled and tok.decode(spelled) == "<|python_tag|> hello"
    assert not matcher("llama3", auto, spelled)  # a normal reply may not look like a call's start
    assert matcher("llama3", auto, tok.encode("<|python") + tok.encode("_tig|> hello"))


def test_a_json_reply_beside_llama_calls_is_refused_naming_the_field(engines):
    plan = plan_for(engines, "llama3", tools=[TIME])
    reply = structured_output(
        body("llama3", response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SMALL}})
    )
    with pytest.raises(InvalidRequestError) as info:
        grammar(plan, reply)
    assert info.value.param == "response_format.json_schema.schema" and "llama3_json" in info.value.message
    grammar(plan_for(engines, "mistral", tools=[TIME]), reply)  # a marker tells them apart: allowed


# --------------------------------------------------------------------------------- history
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(PARIS)},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": json.dumps(UTC)},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]


def _render(engines, model: str, messages, **kw) -> str:
    engine = engines[model]
    plan = plan_tools(body(model, **kw), engine.chat_template, engine.special_token_id)
    msgs, tools = prompt_messages(messages, plan, engine.chat_template)
    return engine.render_chat(msgs, tools=tools)


def test_history_renders_through_each_template_in_its_convention(engines):
    text = _render(engines, "llama3", HISTORY, tools=[WEATHER, TIME])
    assert '{"name": "get_weather", "description": "Current weather in a city"' in text  # tools, natively
    # two calls in one turn: written as the model writes them (Llama's template takes one per turn)
    assert (
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}; {"name": "get_time", ' in text
    )
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18 C<|eot_id|>" in text
    one = [*HISTORY[:1], {**HISTORY[1], "tool_calls": HISTORY[1]["tool_calls"][:1]}, HISTORY[2]]
    text = _render(engines, "llama3", one, tools=[WEATHER])  # one call: the template's own rendering
    assert (
        '<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}<|eot_id|>'
        in text
    )

    with pytest.raises(InvalidRequestError):  # the raw history breaks Mistral's rule on ids ...
        engines["mistral"].render_chat(HISTORY, tools=None)
    text = _render(engines, "mistral", HISTORY, tools=[WEATHER, TIME])  # ... ours satisfies it
    ids = re.findall(r'"id": "([A-Za-z0-9]{9})"', text)
    assert len(set(ids)) == 2 and text.index("[AVAILABLE_TOOLS]") < text.index("[INST]")
    assert (
        f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {json.dumps(PARIS)}, "id": "{ids[0]}"}}' in text
    )
    assert f'[TOOL_RESULTS]{{"content": "18 C", "call_id": "{ids[0]}"}}[/TOOL_RESULTS]' in text
    assert f'{{"content": "12:00", "call_id": "{ids[1]}"}}' in text

    text = _render(engines, "hermes", HISTORY, tools=[WEATHER])
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(PARIS)}}}\n</tool_call>' in text
    # tool_choice "none": no tools shown, the history still in the model's own convention
    text = _render(engines, "mistral", HISTORY, tools=[WEATHER], tool_choice="none")
    assert "[AVAILABLE_TOOLS]" not in text and "[TOOL_CALLS][" in text


# --------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def client(engines):
    from llmaas.server import create_app

    with serve(create_app(dict(engines))) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=120)


def _check_calls(message, fmt, allowed: set[str]):
    assert message.content is None and message.tool_calls
    for tc in message.tool_calls:
        assert tc.type == "function" and tc.function.name in allowed
        assert re.fullmatch("[A-Za-z0-9]{9}" if fmt.short_ids else "call_[0-9a-f]{24}", tc.id)
        jsonschema.validate(json.loads(tc.function.arguments), SCHEMAS[tc.function.name])


def _prompt_tokens(engines, model: str, messages, **kw) -> int:
    return len(engines[model].tokenize([_render(engines, model, messages, **kw)], _params())[0])


def _params():
    from llmaas.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=1)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_required_and_named_calls_validate_and_the_prompt_is_native(client, engines, model):
    fmt = FAMILIES[model][2]
    for seed in range(3):
        r = client.chat.completions.create(
            model=model,
            messages=ASK,
            seed=seed,
            max_tokens=300,
            tools=[WEATHER, TIME],
            tool_choice="required",
        )
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message, fmt, {"get_weather", "get_time"})
    assert r.usage.prompt_tokens == _prompt_tokens(engines, model, ASK, tools=[WEATHER, TIME])
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(
        model=model, messages=ASK, seed=7, max_tokens=300, tools=[WEATHER, TIME], tool_choice=named
    )
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    _check_calls(r.choices[0].message, fmt, {"get_time"})
    assert r.usage.prompt_tokens == _prompt_tokens(
        engines, model, ASK, tools=[WEATHER, TIME], tool_choice=named
    )


def _reassemble(stream):
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
    return (content or None), [(e["name"], e["arguments"]) for e in calls.values()], reason


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("model", list(FAMILIES))
def test_streamed_calls_equal_whole_ones(client, model, parallel):
    kw = dict(
        model=model,
        messages=ASK,
        max_tokens=300,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=parallel,
        temperature=1.0,
    )
    seen_many = False
    for seed in range(12):
        whole = client.chat.completions.create(seed=seed, **kw).choices[0]
        content, calls, reason = _reassemble(client.chat.completions.create(seed=seed, stream=True, **kw))
        assert content is None and reason == whole.finish_reason == "tool_calls"
        assert calls == [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
        seen_many |= len(calls) > 1
        assert parallel or len(calls) == 1
        if seen_many and seed >= 3:
            break
    assert seen_many == parallel  # parallel calls happen (this model and these seeds write several)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_auto_gives_text_or_valid_calls_and_streams_the_same(client, model):
    fmt = FAMILIES[model][2]
    kw = dict(model=model, messages=ASK, max_tokens=40, tools=[WEATHER, TIME], temperature=1.0)
    texts = 0
    for seed in range(6):
        whole = client.chat.completions.create(seed=seed, **kw).choices[0]
        if whole.message.tool_calls:
            if whole.finish_reason == "tool_calls":
                _check_calls(whole.message, fmt, {"get_weather", "get_time"})
        else:
            texts += 1
            assert not any(whole.message.content.startswith(lead) for lead in fmt.leads)
        content, calls, reason = _reassemble(client.chat.completions.create(seed=seed, stream=True, **kw))
        expected = [(t.function.name, t.function.arguments) for t in whole.message.tool_calls or []]
        assert (content, calls, reason) == (whole.message.content, expected, whole.finish_reason)
    assert texts  # a normal reply is possible


@pytest.mark.parametrize("model", list(FAMILIES))
def test_a_conversation_with_calls_and_results_round_trips(client, engines, model):
    kw = dict(model=model, seed=1, max_tokens=300, tools=[WEATHER, TIME], tool_choice="required")
    first = client.chat.completions.create(messages=ASK, **kw)
    message = first.choices[0].message.model_dump(exclude_none=True)
    results = [
        {"role": "tool", "tool_call_id": tc.id, "content": "18 C"}
        for tc in first.choices[0].message.tool_calls
    ]
    history = [*ASK, message, *results]
    r = client.chat.completions.create(model=model, messages=history, tools=[WEATHER, TIME], max_tokens=5)
    assert r.usage.prompt_tokens == _prompt_tokens(engines, model, history, tools=[WEATHER, TIME])
    assert r.usage.prompt_tokens > first.usage.prompt_tokens
    # a conversation begun elsewhere, with ids of another shape, is taken too
    r = client.chat.completions.create(model=model, messages=HISTORY, tools=[WEATHER, TIME], max_tokens=5)
    assert r.usage.prompt_tokens == _prompt_tokens(engines, model, HISTORY, tools=[WEATHER, TIME])
