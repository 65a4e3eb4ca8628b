"""The hostile values of the input-bounds tests, and how to place one at every field of a request.

Fields come from the app's own /openapi.json (request bodies, nested objects, query and path
parameters), so a field added to protocol.py or server/admin.py is fuzzed without editing a test.
Each hostile value is raw JSON text (so NaN and Infinity travel as the bare tokens a careless client
sends, and 2**64 as an integer no float can hold) plus the text used where the field is a query or
path parameter or a CLI argument.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

MB_STRING = "x" * 2**20
URL_STRING = "x" * 60_000  # the longest a client (httpx: 64 KiB) puts in a URL
LIST_100K = 100_000
DEEP = 5_000  # nesting deeper than Python's recursion limit


@dataclass(frozen=True)
class Hostile:
    name: str
    json_text: str  # the value as raw JSON
    text: str | None  # as a query/path parameter or CLI argument; None: no such form
    unparsable: bool = False  # the body is refused as a whole (no parameter to name)


def _s(text: str) -> str:
    return json.dumps(text)  # ensure_ascii: a lone surrogate travels as the escape "\ud800"


HOSTILE: list[Hostile] = [
    Hostile("2**64", str(2**64), str(2**64)),
    Hostile("-2**64", str(-(2**64)), str(-(2**64))),
    Hostile("2**63", str(2**63), str(2**63)),
    Hostile("1e308", "1e308", "1e308"),
    Hostile("-1e308", "-1e308", "-1e308"),
    Hostile("NaN-token", "NaN", "NaN"),
    Hostile("Infinity-token", "Infinity", "Infinity"),
    Hostile("-Infinity-token", "-Infinity", "-Infinity"),
    Hostile("NaN-string", _s("NaN"), None),
    Hostile("Infinity-string", _s("Infinity"), None),
    Hostile("2**64-string", _s(str(2**64)), None),
    Hostile("1_000-string", _s("1_000"), "1_000"),
    Hostile("1e30-string", _s("1e30"), "1e30"),
    Hostile("5e12-usd-string", _s("5000000000000"), "5000000000000"),
    Hostile("negative-string", _s("-1"), "-1"),
    Hostile("empty-string", _s(""), ""),
    Hostile("1MB-string", _s(MB_STRING), MB_STRING),
    Hostile("60KB-string", _s(URL_STRING), URL_STRING),
    Hostile("100k-list", "[" + ",".join(['"x"'] * LIST_100K) + "]", None),
    Hostile("100k-int-list", "[" + ",".join(["1"] * LIST_100K) + "]", None),
    Hostile("nested-object", '{"a": {"b": {"c": [1, {"d": null}]}}}', None),
    Hostile("deep-nesting", "[" * DEEP + "]" * DEEP, None, unparsable=True),
    Hostile("true", "true", None),
    Hostile("empty-object", "{}", None),
    Hostile("empty-list", "[]", None),
    Hostile("null", "null", None),
    Hostile("zero", "0", "0"),
    Hostile("minus-one", "-1", "-1"),
    Hostile("lone-surrogates", _s("\ud800 hi \udfff"), "\ud800"),
    Hostile("naive-date-min", _s("0001-01-01T00:00:00"), "0001-01-01T00:00:00"),
    Hostile("date-max", _s("9999-12-31T23:59:59"), "9999-12-31T23:59:59"),
]

# ------------------------------------------------------------------ walking the openapi schema


def _deref(schema: Any, defs: dict) -> Any:
    while isinstance(schema, dict) and "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _branches(schema: Any, defs: dict) -> list[dict]:
    schema = _deref(schema, defs)
    if not isinstance(schema, dict):
        return []
    if "anyOf" in schema or "oneOf" in schema:
        return [b for s in schema.get("anyOf", schema.get("oneOf")) for b in _branches(s, defs)]
    return [schema]


def _object_branch(schema: Any, defs: dict) -> dict | None:
    return next((b for b in _branches(schema, defs) if b.get("properties")), None)


def _array_branch(schema: Any, defs: dict) -> dict | None:
    for b in _branches(schema, defs):
        if b.get("type") == "array" and _object_branch(b.get("items"), defs) is not None:
            return b
    return None


def field_paths(schema: Any, defs: dict, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    """Every property of a request body, nested objects and the first item of object lists included."""
    obj = _object_branch(schema, defs)
    if obj is None or depth > 3:
        return []
    paths = []
    for name, sub in obj["properties"].items():
        paths.append((*prefix, name))
        if _object_branch(sub, defs) is not None:
            paths += field_paths(sub, defs, (*prefix, name), depth + 1)
        array = _array_branch(sub, defs)
        if array is not None:
            paths += field_paths(array["items"], defs, (*prefix, name, 0), depth + 1)
    return paths


def schema_at(schema: Any, defs: dict, path: tuple) -> Any:
    for step in path:
        if isinstance(step, int):
            schema = _array_branch(schema, defs)["items"]
        else:
            schema = _object_branch(schema, defs)["properties"][step]
    return schema


# Valid stand-ins for nested objects the base body lacks (a content part needs its type "text").
MINIMAL = {
    "ChatMessage": {"role": "user", "content": "x"},
    "ContentPart": {"type": "text", "text": "x"},
    "StreamOptions": {"include_usage": True},
    "Tool": {"type": "function", "function": {"name": "f"}},
    "FunctionDef": {"name": "f"},
    "FunctionName": {"name": "f"},
    "NamedToolChoice": {"type": "function", "function": {"name": "f"}},
    # /v1/responses
    "MessageItem": {"role": "user", "content": "x"},
    "InputText": {"type": "input_text", "text": "x"},
    "FunctionCallItem": {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
    "FunctionCallOutputItem": {"type": "function_call_output", "call_id": "c", "output": "x"},
    "FunctionTool": {"type": "function", "name": "f"},
    "NamedFunctionChoice": {"type": "function", "name": "f"},
    "TextFormat": {"type": "json_schema", "name": "x", "schema": {"type": "object"}},
}


def _minimal(schema: Any, defs: dict) -> Any:
    ref = schema.get("$ref", "").rsplit("/", 1)[-1] if isinstance(schema, dict) else ""
    if ref in MINIMAL:
        return copy.deepcopy(MINIMAL[ref])
    obj = _object_branch(schema, defs)
    if obj is not None:
        title = obj.get("title", "")
        return copy.deepcopy(MINIMAL.get(title, {}))
    return None


def place(body: dict, path: tuple, value: Any, root_schema: Any, defs: dict) -> dict:
    """A copy of `body` with `value` at `path`, intermediate objects/lists made valid where missing."""
    body = copy.deepcopy(body)
    node: Any = body
    for i, step in enumerate(path[:-1]):
        nxt = path[i + 1]
        want = list if isinstance(nxt, int) else dict
        child = node[step] if (isinstance(node, list) or step in node) else None
        if isinstance(nxt, int):
            if not isinstance(child, list) or not child:
                item = _minimal(
                    _array_branch(schema_at(root_schema, defs, path[: i + 1]), defs)["items"], defs
                )
                child = [item]
        elif not isinstance(child, want):
            child = _minimal(schema_at(root_schema, defs, path[: i + 1]), defs) or {}
        node[step] = child
        node = child
    node[path[-1]] = value
    return body


PLACEHOLDER = "__HOSTILE_VALUE__"


def body_text(body: dict, path: tuple, hostile: Hostile, root_schema: Any, defs: dict) -> str:
    """The body as JSON text with the hostile value spliced in raw."""
    placed = place(body, path, PLACEHOLDER, root_schema, defs)
    text = json.dumps(placed)
    assert text.count(json.dumps(PLACEHOLDER)) == 1
    return text.replace(json.dumps(PLACEHOLDER), hostile.json_text)


def param_name(path: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role": the server's name for it (errors.param_path)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def names_the_field(param: str | None, path: tuple, related: set[str] = frozenset()) -> bool:
    """The field itself, a part of it ('logit_bias.a'), an enclosing field (a bad content part may be
    named 'messages[0].content', a map value 'logit_bias': its key is data), or a field it is checked
    against (`related`: 'end_time must be after start_time' is about both)."""
    if param is None:
        return False
    name = param_name(path)
    enclosing = {param_name(path[:i]) for i in range(1, len(path) + 1)}
    return param in enclosing | set(related) or param.startswith((name + ".", name + "["))
