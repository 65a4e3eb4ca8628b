"""Request fields -> the one StructuredOutput the engine enforces (or None: unconstrained).

Sources, all optional, at most one per request (two are a 400 naming the second, never a silent pick):
OpenAI's `response_format` (text / json_object / json_schema), vLLM's `structured_outputs` object
(json / regex / choice / grammar / json_object) and vLLM's older top-level `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`. Options that change what the grammar allows and that
this server does not implement (vLLM's whitespace_pattern, structural_tag, ...) are refused by name:
an output is never less constrained than asked. The engine compiles the result and refuses, naming
`param`, a schema keyword or grammar it cannot enforce.
"""

from __future__ import annotations

import json
from typing import Any

from llmaas.engine.structured import StructuredOutput
from llmaas.errors import InvalidRequestError
from llmaas.server.protocol import _StructuredFields

MAX_SCHEMA_CHARS = 1_000_000


def _schema_text(schema: Any, param: str) -> str:
    """A JSON Schema (an object, or a string holding one, as vLLM's guided_json takes) -> its JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidRequestError(f"'{param}' is not valid JSON: {exc}", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(f"'{param}' must be a JSON Schema (an object)", param=param)
    text = json.dumps(schema, sort_keys=True)
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequestError(
            f"'{param}' is {len(text)} characters; at most {MAX_SCHEMA_CHARS} are accepted", param=param
        )
    return text


def from_response_format(response_format: dict[str, Any]) -> StructuredOutput | None:
    kind = response_format.get("type")
    extra = set(response_format) - {"type", "json_schema"}
    if extra:
        raise InvalidRequestError(
            f"'response_format' has unknown field(s) {sorted(extra)}", param="response_format"
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object", "", param="response_format")
    if kind != "json_schema":
        raise InvalidRequestError(
            f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
            param="response_format.type",
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError(
            "'response_format.json_schema' must be an object with 'name' and 'schema'",
            param="response_format.json_schema",
        )
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise InvalidRequestError(
            f"'response_format.json_schema' has unknown field(s) {sorted(unknown)}",
            param="response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise InvalidRequestError(
            "'response_format.json_schema.name' must be a string of 1 to 64 characters",
            param="response_format.json_schema.name",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(
            "'response_format.json_schema.strict' must be a boolean",
            param="response_format.json_schema.strict",
        )
    # strict or not, the schema is enforced: this server never returns output the schema refuses.
    schema = spec.get("schema", {"type": "object"})
    param = "response_format.json_schema.schema"
    return StructuredOutput("json_schema", _schema_text(schema, param), param=param)


def _from_structured_outputs(body: _StructuredFields) -> StructuredOutput | None:
    options = body.structured_outputs
    assert options is not None
    for name in ("disable_any_whitespace", "disable_additional_properties"):
        if getattr(options, name):
            raise InvalidRequestError(
                f"'structured_outputs.{name}' is not supported", param=f"structured_outputs.{name}"
            )
    for name in ("whitespace_pattern", "structural_tag"):
        if getattr(options, name) is not None:
            raise InvalidRequestError(
                f"'structured_outputs.{name}' is not supported", param=f"structured_outputs.{name}"
            )
    found = []
    if options.json_ is not None:
        p = "structured_outputs.json"
        found.append((p, StructuredOutput("json_schema", _schema_text(options.json_, p), param=p)))
    if options.regex is not None:
        p = "structured_outputs.regex"
        found.append((p, StructuredOutput("regex", options.regex, param=p)))
    if options.choice is not None:
        p = "structured_outputs.choice"
        found.append((p, StructuredOutput("choice", json.dumps(options.choice), param=p)))
    if options.grammar is not None:
        p = "structured_outputs.grammar"
        found.append((p, StructuredOutput("grammar", options.grammar, param=p)))
    if options.json_object:
        p = "structured_outputs.json_object"
        found.append((p, StructuredOutput("json_object", "", param=p)))
    if len(found) > 1:
        raise InvalidRequestError(
            f"'structured_outputs' takes one of json, regex, choice, grammar, json_object; got "
            f"{', '.join(p.split('.')[1] for p, _ in found)}",
            param=found[1][0],
        )
    return found[0][1] if found else None


def structured_output(body: _StructuredFields) -> StructuredOutput | None:
    """The request's constraint, from whichever single field asks for one."""
    if body.guided_whitespace_pattern is not None:
        raise InvalidRequestError(
            "'guided_whitespace_pattern' is not supported", param="guided_whitespace_pattern"
        )
    found: list[tuple[str, StructuredOutput | None]] = []
    if body.response_format is not None:
        found.append(("response_format", from_response_format(body.response_format)))
    if body.structured_outputs is not None:
        found.append(("structured_outputs", _from_structured_outputs(body)))
    if body.guided_json is not None:
        found.append(
            (
                "guided_json",
                StructuredOutput("json_schema", _schema_text(body.guided_json, "guided_json"), "guided_json"),
            )
        )
    if body.guided_regex is not None:
        found.append(("guided_regex", StructuredOutput("regex", body.guided_regex, param="guided_regex")))
    if body.guided_choice is not None:
        found.append(
            (
                "guided_choice",
                StructuredOutput("choice", json.dumps(body.guided_choice), param="guided_choice"),
            )
        )
    if body.guided_grammar is not None:
        found.append(
            ("guided_grammar", StructuredOutput("grammar", body.guided_grammar, param="guided_grammar"))
        )
    asking = [(name, so) for name, so in found if so is not None]
    if len(asking) > 1:
        raise InvalidRequestError(
            f"'{asking[1][0]}' cannot be combined with '{asking[0][0]}': send one output constraint",
            param=asking[1][0],
        )
    return asking[0][1] if asking else None
