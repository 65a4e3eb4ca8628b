"""Function calling: tools -> the prompt and a grammar; the model's output -> tool calls (whole or streamed).

One call format, the Hermes/Qwen convention, on every model (docs/structured-outputs.md):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A template that renders `tools` itself and speaks this convention (it mentions `<tool_call>`) gets the
tools through its own `tools=`; any other template (SmolLM2's has no tool support) gets the generic
format: a system message describing the tools and the format. Either way the output is constrained by a
grammar: `auto` allows a normal reply (one that does not start with `<tool_call>`) or calls; `required`
and a named function allow only calls, each call's arguments constrained to its function's schema.

Streamed and whole replies go through the same incremental parser (`ToolCallParser`), so the calls a
stream re-assembles to are exactly the calls of the whole reply; `arguments` is the JSON text the model
wrote for the arguments object.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from llmaas.engine.structured import StructuredOutput
from llmaas.errors import InvalidRequestError
from llmaas.server.protocol import ChatCompletionRequest

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
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
    native: bool  # the chat template renders the tools itself

    @property
    def allows_text(self) -> bool:
        return self.choice == "auto"


def template_takes_tools(chat_template: str | None) -> bool:
    """A template that renders `tools` and the <tool_call> convention this server parses."""
    return bool(chat_template) and "tools" in chat_template and OPEN in chat_template


def plan_tools(body: ChatCompletionRequest, chat_template: str | None) -> ToolPlan | None:
    """None when the request has no tools or tool_choice is "none" (a plain reply, tools unrendered)."""
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
    return ToolPlan(tuple(functions), choice, parallel, native=template_takes_tools(chat_template))


# ------------------------------------------------------------------------------------------ the grammar
def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        **_COMPACT,
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def grammar(plan: ToolPlan, reply: StructuredOutput | None = None) -> StructuredOutput:
    """A Lark grammar (llguidance's dialect, with %json): the calls, or (auto) a normal reply instead.
    `reply`: a JSON constraint on the normal reply (response_format alongside tools)."""
    wanted = [f for f in plan.functions if plan.choice in ("auto", "required") or f[0] == plan.choice]
    lines = [
        f"call_{i}: %json {json.dumps(_call_schema(name, params))}"
        for i, (name, _, params) in enumerate(wanted)
    ]
    body = " | ".join(f"call_{i}" for i in range(len(wanted)))
    calls = 'calls: call ("\\n" call)*' if plan.parallel else "calls: call"
    rules = [calls, f'call: "{OPEN}\\n" call_body "\\n{CLOSE}"', f"call_body: {body}", *lines]
    if not plan.allows_text:
        start = "start: calls"
    elif reply is None:
        start = "start: calls | TEXT"
        rules.append(f"TEXT: /(?s:.*)/ & ~/{re.escape(OPEN)}(?s:.*)/")
    else:
        schema = json.loads(reply.spec) if reply.kind == "json_schema" else {"type": "object"}
        start = "start: calls | reply"
        rules.append(f"reply: %json {json.dumps({**schema, **_COMPACT})}")
    return StructuredOutput("grammar", "\n".join([start, *rules]) + "\n", param="tools")


# ------------------------------------------------------------------------------------------ the prompt
def _call_text(name: str, arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return f'{OPEN}\n{{"name": {json.dumps(name)}, "arguments": {json.dumps(arguments)}}}\n{CLOSE}'


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
    call = '{"name": <function name>, "arguments": <JSON object>}'
    how = f"To call a function, reply with {OPEN}\n{call}\n{CLOSE}"
    if plan.parallel:
        how += " (one block per call)."
    return f"# Tools\n\n{when}\n\nFunctions:\n{described}\n\n{how}"


def generic_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """The conversation for a template without tool support: the tools in a system message, earlier
    assistant calls written out in the call format, tool results as user turns naming their call."""
    out = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                _call_text(c.get("function", {}).get("name", ""), c.get("function", {}).get("arguments", {}))
                for c in m["tool_calls"]
                if isinstance(c, dict)
            ]
            text = m.get("content") or ""
            if isinstance(text, list):
                text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
            out.append({"role": "assistant", "content": "\n".join([text, *calls] if text else calls)})
        elif role == "tool":
            content = m.get("content") or ""
            if isinstance(content, list):
                content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
            call_id = m.get("tool_call_id") or ""
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


def template_tools(plan: ToolPlan) -> list[dict[str, Any]]:
    """OpenAI's tools list, for a template that renders them itself (forced: only the named one)."""
    return [
        {"type": "function", "function": {"name": n, "description": d, "parameters": p}}
        for n, d, p in plan.functions
        if plan.choice in ("auto", "required") or n == plan.choice
    ]


# ------------------------------------------------------------------------------------------ the parser
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_TAIL = re.compile(r"\s*\}\s*" + re.escape(CLOSE))
_NEXT = re.compile(r"\s*" + re.escape(OPEN))


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


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
    """Reads one choice's output as it grows. `feed` returns what is new: content text, or
    (call index, first-delta-or-fragment) pieces; `finish` flushes. The same object reads a whole
    reply (feed it all, then finish), so streamed and whole calls cannot differ."""

    buf: str = ""
    mode: str = "start"  # start -> text | calls; calls: head -> args -> tail -> head ... | done
    stage: str = "head"
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
            if self.buf.startswith(OPEN):
                self.mode, self.pos = "calls", len(OPEN)
            elif OPEN.startswith(self.buf):
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
        deltas: list[dict[str, Any]] = []
        while self.pos < len(self.buf):
            rest = self.buf[self.pos :]
            if self.stage == "head":
                m = _HEAD.match(rest)
                if not m or m.end() == len(rest):  # incomplete (whitespace before the value may still come)
                    break
                name = json.loads(f'"{m.group(1)}"')
                call = ToolCall(new_call_id(), name)
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
                m = _TAIL.match(rest)
                if not m:
                    break
                self.pos += m.end()
                self.stage = "between"
            elif self.stage == "between":
                m = _NEXT.match(rest)
                if not m:
                    break
                self.pos += m.end()
                self.stage = "head"
            else:  # done: nothing after a malformed call is read
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


def parse_whole(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply -> (content, calls); content is None when the reply is calls."""
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    if parser.mode == "calls":
        return None, parser.calls
    return parser.content, []
