"""Function calling: tools -> the prompt and a grammar; the model's output -> tool calls (whole or streamed).

Calls are written in the model's own convention (tool_formats.py: Hermes/Qwen, Llama 3 JSON, Mistral),
detected from its chat template, which then renders the tools and the history itself. A template
without tool support (SmolLM2's), or one in a convention not known here, gets the generic format: a
system message describing the tools, and calls in the Hermes format:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Either way the output is constrained by a grammar built from the format: `auto` allows a normal reply
(one that does not start like a call) or calls; `required` and a named function allow only calls, each
call's arguments constrained to its function's schema.

Streamed and whole replies go through the same incremental parser (`ToolCallParser`), so the calls a
stream re-assembles to are exactly the calls of the whole reply; `arguments` is the JSON text the model
wrote for the arguments object (under "arguments" or, in Llama's format, "parameters").
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmaas.engine.structured import StructuredOutput
from llmaas.errors import InvalidRequestError
from llmaas.server.protocol import ChatCompletionRequest
from llmaas.server.tool_formats import HERMES, ToolFormat, detect_format

_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
# One JSON spelling, {"a": 1, "b": [1, 2]}, as the engine uses for json_schema (engine/grammar.py): free
# whitespace lets a small model pad a call with newlines until max_tokens.
_COMPACT = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask of the prompt and of the output."""

    functions: tuple[tuple[str, str, dict[str, Any]], ...]  # (name, description, parameters schema)
    choice: str  # "auto" | "required" | a function name (forced)
    parallel: bool
    native: bool  # the chat template renders the tools itself, in `format`
    format: ToolFormat = HERMES  # how calls are written (the generic format: Hermes)
    special_tokens: tuple[tuple[str, int], ...] = ()  # the format's markers that are one special token

    @property
    def allows_text(self) -> bool:
        return self.choice == "auto"


def plan_tools(
    body: ChatCompletionRequest,
    chat_template: str | None,
    special_token_id: Callable[[str], int | None] | None = None,
) -> ToolPlan | None:
    """None when the request has no tools or tool_choice is "none" (a plain reply, tools unrendered).
    `special_token_id`: the engine's lookup of marker texts that are one special token
    (AsyncEngine.special_token_id); without it markers are matched as text."""
    if body.tools is not None and body.functions is not None:
        raise InvalidRequestError("send 'tools' or the deprecated 'functions', not both", param="functions")
    if body.tool_choice is not None and body.function_call is not None:
        raise InvalidRequestError(
            "send 'tool_choice' or the deprecated 'function_call', not both", param="function_call"
        )
    if body.functions is not None:
        defs, defs_param, choice, choice_param = (
            body.functions,
            "functions",
            body.function_call,
            "function_call",
        )
    else:
        defs = [t.function for t in body.tools or []]
        defs_param, choice, choice_param = "tools", body.tool_choice, "tool_choice"
    names: list[str] = []
    functions = []
    for i, d in enumerate(defs):
        where = f"{defs_param}[{i}]" if defs_param == "functions" else f"tools[{i}].function"
        if d.name in names:
            raise InvalidRequestError(f"function name {d.name!r} appears twice", param=f"{where}.name")
        parameters = d.parameters if d.parameters is not None else _NO_ARGUMENTS
        if parameters.get("type", "object") != "object":
            raise InvalidRequestError(
                f"'{where}.parameters' must be a JSON Schema of type 'object' (the arguments object)",
                param=f"{where}.parameters",
            )
        names.append(d.name)
        functions.append((d.name, d.description or "", parameters))
    if choice is None:
        choice = "auto"
    elif not isinstance(choice, str):
        named = choice.function.name if hasattr(choice, "function") else choice.name
        if named not in names:
            raise InvalidRequestError(
                f"'{choice_param}' names function {named!r}, which is not among the {defs_param}",
                param=choice_param,
            )
        choice = named
    if not functions:
        if choice in ("auto", "none"):
            return None
        raise InvalidRequestError(f"'{choice_param}' {choice!r} needs at least one tool", param=choice_param)
    if choice == "none":
        return None
    parallel = body.parallel_tool_calls is not False and choice in ("auto", "required")
    native = detect_format(chat_template)
    fmt = native or HERMES
    special = ()
    if special_token_id is not None:
        found = ((marker, special_token_id(marker)) for marker in fmt.markers)
        special = tuple((marker, token_id) for marker, token_id in found if token_id is not None)
    return ToolPlan(tuple(functions), choice, parallel, native is not None, fmt, special)


# ------------------------------------------------------------------------------------------ the grammar
def _call_schema(fmt: ToolFormat, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        **_COMPACT,
        "type": "object",
        "properties": {"name": {"const": name}, fmt.arguments_key: parameters},
        "required": ["name", fmt.arguments_key],
        "additionalProperties": False,
    }


def _lark_literal(text: str, special: dict[str, int]) -> str:
    """`text` as Lark items: each marker that is a special token as that token (`<[id]>`: no string
    literal matches a special token), the rest as strings."""
    if not text:
        return ""
    pieces = re.split("(" + "|".join(map(re.escape, special)) + ")", text) if special else [text]
    return " ".join(f"<[{special[p]}]>" if p in special else json.dumps(p) for p in pieces if p)


def _lark_regex_literal(text: str) -> str:
    return "".join("\\" + ch if ch in "\\.+*?()|[]{}^$/" else ch for ch in text)


def grammar(plan: ToolPlan, reply: StructuredOutput | None = None) -> StructuredOutput:
    """A Lark grammar (llguidance's dialect, with %json) in the plan's format: the calls, or (auto) a
    normal reply instead. `reply`: a JSON constraint on the normal reply (response_format with tools)."""
    fmt, special = plan.format, dict(plan.special_tokens)
    wanted = [f for f in plan.functions if plan.choice in ("auto", "required") or f[0] == plan.choice]
    lines = [
        f"call_{i}: %json {json.dumps(_call_schema(fmt, name, params))}"
        for i, (name, _, params) in enumerate(wanted)
    ]
    body = " | ".join(f"call_{i}" for i in range(len(wanted)))
    optional = ""
    if fmt.optional_open in special:  # only as its token: spelled out, it would be a normal reply's start
        optional = f"<[{special[fmt.optional_open]}]>?"
    more = f"({_lark_literal(fmt.separator, special)} call)*" if plan.parallel else ""
    calls = [
        optional,
        _lark_literal(fmt.block_open, special),
        "call",
        more,
        _lark_literal(fmt.block_close, special),
    ]
    call = [_lark_literal(fmt.call_open, special), "call_body", _lark_literal(fmt.call_close, special)]
    rules = [
        "calls: " + " ".join(filter(None, calls)),
        "call: " + " ".join(filter(None, call)),
        f"call_body: {body}",
        *lines,
    ]
    if not plan.allows_text:
        start = "start: calls"
    elif reply is None:
        start = "start: calls | TEXT"
        leads = "|".join(_lark_regex_literal(lead) for lead in fmt.leads)
        rules.append(f"TEXT: /(?s:.*)/ & ~/(?:{leads})(?s:.*)/")
    else:
        if fmt.lead.startswith("{"):
            raise InvalidRequestError(
                f"'{reply.param}' cannot be combined with tools on this model: its tool calls ({fmt.name}) "
                "are bare JSON objects, which a JSON reply could not be told apart from",
                param=reply.param,
            )
        schema = json.loads(reply.spec) if reply.kind == "json_schema" else {"type": "object"}
        start = "start: calls | reply"
        rules.append(f"reply: %json {json.dumps({**schema, **_COMPACT})}")
    return StructuredOutput("grammar", "\n".join([start, *rules]) + "\n", param="tools")


# ------------------------------------------------------------------------------------------ the prompt
def _arguments_object(arguments: Any) -> Any:
    """History arguments as an object (what templates render with tojson), when their JSON text is one."""
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content or ""


def _calls_as_text(message: dict[str, Any], fmt: ToolFormat) -> dict[str, Any]:
    """An assistant turn with its calls written into the content, as the model writes them."""
    calls = [
        (c.get("function", {}).get("name", ""), _arguments_object(c.get("function", {}).get("arguments", {})))
        for c in message["tool_calls"]
        if isinstance(c, dict)
    ]
    text = _text(message.get("content"))
    written = fmt.write_calls(calls)
    return {"role": "assistant", "content": f"{text}\n{written}" if text else written}


def system_text(plan: ToolPlan) -> str:
    """The generic format's description of the tools, for templates that do not render tools."""
    described = "\n".join(
        json.dumps({"name": name, "description": desc, "parameters": params})
        for name, desc, params in plan.functions
    )
    if plan.choice == "auto":
        when = "You may call one or more of these functions, or answer normally without calling any."
    elif plan.choice == "required":
        when = "Call one or more of these functions now."
    else:
        when = f"Call the function {plan.choice!r} now."
    call = f'{{"name": <function name>, "{HERMES.arguments_key}": <JSON object>}}'
    how = f"To call a function, reply with {HERMES.call_open}{call}{HERMES.call_close}"
    if plan.parallel:
        how += " (one block per call)."
    return f"# Tools\n\n{when}\n\nFunctions:\n{described}\n\n{how}"


def generic_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """The conversation for a template without tool support: the tools in a system message, earlier
    assistant calls written out in the Hermes format, tool results as user turns naming their call."""
    out = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            out.append(_calls_as_text(m, HERMES))
        elif role == "tool":
            content, call_id = _text(m.get("content")), m.get("tool_call_id") or ""
            out.append(
                {
                    "role": "user",
                    "content": f"<tool_response id={json.dumps(call_id)}>\n{content}\n</tool_response>",
                }
            )
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if plan is not None:
        tools = system_text(plan)
        if out and out[0].get("role") in ("system", "developer") and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{tools}"}
        else:
            out.insert(0, {"role": "system", "content": tools})
    return out


def _template_call(call: dict[str, Any], fmt: ToolFormat) -> dict[str, Any]:
    function = call.get("function")
    if isinstance(function, dict) and "arguments" in function:
        call = {**call, "function": {**function, "arguments": _arguments_object(function["arguments"])}}
    if "id" in call:
        call = {**call, "id": fmt.template_call_id(call["id"])}
    return call


def native_messages(messages: list[dict[str, Any]], fmt: ToolFormat) -> list[dict[str, Any]]:
    """The conversation for a template that renders tools in `fmt`: calls' arguments as objects (the
    shape templates expect), ids as the template accepts them (Mistral: 9 letters/digits), and, where
    the template renders one call per turn (Llama), a turn of several calls written as the model
    wrote it."""
    out = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [c for c in m["tool_calls"] if isinstance(c, dict)]
            if fmt.one_call_per_turn and len(calls) > 1:
                out.append(_calls_as_text(m, fmt))
                continue
            m = {**m, "tool_calls": [_template_call(c, fmt) for c in calls]}
        elif role == "tool" and "tool_call_id" in m:
            m = {**m, "tool_call_id": fmt.template_call_id(m["tool_call_id"])}
        out.append(m)
    return out


def template_tools(plan: ToolPlan) -> list[dict[str, Any]]:
    """OpenAI's tools list, for a template that renders them itself (forced: only the named one)."""
    return [
        {"type": "function", "function": {"name": n, "description": d, "parameters": p}}
        for n, d, p in plan.functions
        if plan.choice in ("auto", "required") or n == plan.choice
    ]


def prompt_messages(
    messages: list[dict[str, Any]], plan: ToolPlan | None, chat_template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render with the model's template: in its own convention when it has one
    (history too, with tool_choice "none"), else the generic format."""
    if plan is not None:
        if plan.native:
            return native_messages(messages, plan.format), template_tools(plan)
        return generic_messages(messages, plan), None
    fmt = detect_format(chat_template)
    if fmt is not None:
        return native_messages(messages, fmt), None
    return generic_messages(messages, None), None


# ------------------------------------------------------------------------------------------ the parser
def _loose(text: str, markers: tuple[str, ...]) -> str:
    """A regex for `text` that allows any whitespace before and between its parts (markers and runs of
    other non-space characters): the grammar writes one spelling, a detokenizer may space it out."""
    split = re.compile("(" + "|".join(map(re.escape, markers)) + ")") if markers else None
    parts = [p for chunk in text.split() for p in (split.split(chunk) if split else [chunk]) if p]
    return "".join(r"\s*" + re.escape(p) for p in parts)


@dataclass(frozen=True)
class _Patterns:
    open: re.Pattern[str]  # from the start of a reply of calls to the first call object
    head: re.Pattern[str]  # a call object up to its arguments' value (group 1: the name)
    tail: re.Pattern[str]  # after the arguments: the object's end and the call's close
    next: re.Pattern[str]  # between two calls
    end: re.Pattern[str] | None  # after the last call


@functools.lru_cache(maxsize=16)
def _patterns(fmt: ToolFormat) -> _Patterns:
    optional = f"(?:{re.escape(fmt.optional_open)})?" if fmt.optional_open else ""
    key = re.escape(json.dumps(fmt.arguments_key))
    return _Patterns(
        open=re.compile(r"\s*" + optional + _loose(fmt.block_open + fmt.call_open, fmt.markers)),
        head=re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*' + key + r"\s*:\s*"),
        tail=re.compile(r"\s*\}" + _loose(fmt.call_close, fmt.markers)),
        next=re.compile(_loose(fmt.separator + fmt.call_open, fmt.markers)),
        end=re.compile(_loose(fmt.block_close, fmt.markers)) if fmt.block_close else None,
    )


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ToolCallParser:
    """Reads one choice's output, written in `format`, as it grows. `feed` returns what is new: content
    text, or (call index, first-delta-or-fragment) pieces; `finish` flushes. The same object reads a
    whole reply (feed it all, then finish), so streamed and whole calls cannot differ."""

    format: ToolFormat
    buf: str = ""
    mode: str = "start"  # start -> text | calls; calls: open -> head -> args -> tail -> between ... | done
    stage: str = "open"
    pos: int = 0
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """-> (content text to send, tool-call deltas to send)."""
        if self.mode == "text":
            self.content += text
            return text, []
        self.buf += text
        if self.mode == "start":
            leads = self.format.leads
            if any(self.buf.startswith(lead) for lead in leads):
                self.mode = "calls"
            elif any(lead.startswith(self.buf) for lead in leads):
                return "", []  # could still become a call: hold back
            else:
                self.mode, self.content = "text", self.buf
                return self.buf, []
        return "", self._advance()

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        if self.mode == "start":  # a reply shorter than the marker
            self.mode, self.content = "text", self.buf
            return self.buf, []
        return "", []

    def _advance(self) -> list[dict[str, Any]]:
        patterns = _patterns(self.format)
        deltas: list[dict[str, Any]] = []
        while self.pos < len(self.buf):
            rest = self.buf[self.pos :]
            if self.stage in ("open", "between"):
                m = (patterns.open if self.stage == "open" else patterns.next).match(rest)
                if m:
                    self.pos += m.end()
                    self.stage = "head"
                elif self.stage == "between" and patterns.end and (m := patterns.end.match(rest)):
                    self.pos += m.end()
                    self.stage = "done"
                else:
                    break
            elif self.stage == "head":
                m = patterns.head.match(rest)
                if not m or m.end() == len(rest):  # incomplete (whitespace before the value may still come)
                    break
                name = json.loads(f'"{m.group(1)}"')
                call = ToolCall(self.format.new_call_id(), name)
                self.calls.append(call)
                deltas.append(
                    {
                        "index": len(self.calls) - 1,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                )
                self.pos += m.end()
                self.stage, self._depth, self._in_string, self._escape = "args", 0, False, False
            elif self.stage == "args":
                fragment = self._scan_arguments(rest)
                if fragment:
                    self.calls[-1].arguments += fragment
                    deltas.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})
                if self.stage == "args":
                    break
            elif self.stage == "tail":
                m = patterns.tail.match(rest)
                if not m:
                    break
                self.pos += m.end()
                self.stage = "between"
            else:  # done: nothing after the calls (or after a malformed call) is read
                break
        return deltas

    def _scan_arguments(self, rest: str) -> str:
        """Consumes the arguments object's characters from `rest`; moves to "tail" when it closes."""
        for i, ch in enumerate(rest):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.pos += i + 1
                    self.stage = "tail"
                    return rest[: i + 1]
            elif self._depth == 0 and not ch.isspace():
                self.stage = "done"  # not an object: the grammar allows none such
                self.pos += i
                return rest[:i]
        self.pos += len(rest)
        return rest


def parse_whole(text: str, fmt: ToolFormat) -> tuple[str | None, list[ToolCall]]:
    """A whole reply in `fmt` -> (content, calls); content is None when the reply is calls."""
    parser = ToolCallParser(fmt)
    parser.feed(text)
    parser.finish()
    if parser.mode == "calls":
        return None, parser.calls
    return parser.content, []
