"""What a request's output must match: a JSON schema, any JSON object, a regex, a list of choices or a
grammar. A plain value, light to import (the server and SamplingParams use it); compiling and matching
live in grammar.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmaas.errors import InvalidRequestError

StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20  # a schema / grammar / pattern of more characters is refused before parsing


@dataclass(frozen=True)
class StructuredOutput:
    """What one request's output must match. Hashable: compiled grammars are cached by it."""

    kind: StructuredKind
    spec: str = ""  # json_schema: the schema as JSON text; json_object: ""; regex: the pattern;
    # choice: a JSON list of strings; grammar: a Lark (or GBNF) grammar as llguidance reads it
    param: str = "response_format"  # the request field a 400 names (e.g. "tools[0].function.parameters")


def check_structured(value: object) -> None:
    """The shape of a StructuredOutput (SamplingParams.validate asks this); the content is checked by
    compiling it."""
    if not isinstance(value, StructuredOutput):
        raise InvalidRequestError(
            f"'structured' must be a StructuredOutput, got {type(value).__name__}", param="structured"
        )
    param = value.param if isinstance(value.param, str) and value.param else "structured"
    if value.kind not in KINDS:
        raise InvalidRequestError(f"structured output kind must be one of {list(KINDS)}", param=param)
    if not isinstance(value.spec, str):
        raise InvalidRequestError("the structured output specification must be a string", param=param)
    if len(value.spec) > MAX_SPEC_CHARS:
        raise InvalidRequestError(
            f"the {value.kind} specification is {len(value.spec)} characters; at most {MAX_SPEC_CHARS}",
            param=param,
        )
