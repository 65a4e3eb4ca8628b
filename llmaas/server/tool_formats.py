"""The conventions in which models write tool calls, and which one a chat template speaks.

Three conventions (docs/structured-outputs.md shows each):

- Hermes / Qwen: `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call,
  blocks separated by a newline. Also the generic format for templates without tool support.
- Llama 3.1 / 3.2 / 3.3 JSON tool calling: the bare object `{"name": "f", "parameters": {...}}`.
  Several calls are separated by "; " (the templates render one call per assistant turn; "; " is what
  vLLM's llama3_json parser reads, so clients of both servers see the same text). Llama's
  `<|python_tag|>` may come first (the model writes it before calls out of habit) and is skipped.
  A normal reply cannot start with "{" (what starts with "{" is a call): the shortest rule that the
  matcher's lexer can hold, since it must rule text out within a byte of the call's first lexeme.
- Mistral (the v3-style templates that render `[AVAILABLE_TOOLS]`): `[TOOL_CALLS][{"name": "f",
  "arguments": {...}}, ...]`, one JSON array for all calls. Templates that write `[TOOL_CALLS] [`
  (Mistral 7B v0.3) get that spelling. Call ids are 9 letters and digits, as these templates demand.

A format is plain data: the grammar (tools.grammar), the parser (tools.ToolCallParser) and the
history writer all read the same fields, so what is allowed, what is parsed and what is rendered back
cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass, replace
from typing import Any

_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolFormat:
    """How one family writes a reply of calls: block_open, then calls (call_open, the call object,
    call_close) separated by `separator`, then block_close."""

    name: str
    arguments_key: str  # the call object's key for the arguments: "arguments" | "parameters"
    lead: str  # every reply of calls starts with this text, and no normal reply may
    block_open: str = ""
    call_open: str = ""
    call_close: str = ""
    separator: str = ""
    block_close: str = ""
    optional_open: str = ""  # a marker the model may write first; allowed, skipped, never required
    markers: tuple[str, ...] = ()  # texts that are one special token in the family's tokenizers
    short_ids: bool = False  # call ids of 9 letters/digits (Mistral's templates refuse any other)
    one_call_per_turn: bool = False  # the template renders one call per assistant message (Llama)

    @property
    def leads(self) -> tuple[str, ...]:
        """The texts a reply of calls may start with; a normal reply starts with none of them."""
        return tuple(t for t in (self.lead, self.optional_open) if t)

    def call_object(self, name: str, arguments: Any) -> str:
        return json.dumps({"name": name, self.arguments_key: arguments})

    def write_calls(self, calls: list[tuple[str, Any]]) -> str:
        """(name, arguments object) pairs as the model writes them (for history the template
        cannot render itself)."""
        written = [self.call_open + self.call_object(name, args) + self.call_close for name, args in calls]
        return self.block_open + self.separator.join(written) + self.block_close

    def new_call_id(self) -> str:
        if self.short_ids:
            return "".join(secrets.choice(_ALNUM) for _ in range(9))
        return "call_" + secrets.token_hex(12)

    def template_call_id(self, call_id: Any) -> Any:
        """A history call id as the template accepts it: under short ids, one that is not 9 letters/
        digits (a call made elsewhere) becomes 9 derived from it, the same for the call and its result."""
        if not self.short_ids or not isinstance(call_id, str) or re.fullmatch("[A-Za-z0-9]{9}", call_id):
            return call_id
        digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
        out = []
        for _ in range(9):
            digest, i = divmod(digest, len(_ALNUM))
            out.append(_ALNUM[i])
        return "".join(out)


HERMES = ToolFormat(
    "hermes",
    "arguments",
    lead="<tool_call>",
    call_open="<tool_call>\n",
    call_close="\n</tool_call>",
    separator="\n",
    markers=("<tool_call>", "</tool_call>"),
)
LLAMA3_JSON = ToolFormat(
    "llama3_json",
    "parameters",
    lead="{",
    separator="; ",
    optional_open="<|python_tag|>",
    markers=("<|python_tag|>",),
    one_call_per_turn=True,
)
MISTRAL = ToolFormat(
    "mistral",
    "arguments",
    lead="[TOOL_CALLS]",
    block_open="[TOOL_CALLS][",
    separator=", ",
    block_close="]",
    markers=("[TOOL_CALLS]",),
    short_ids=True,
)


def detect_format(chat_template: str | None) -> ToolFormat | None:
    """The convention a chat template renders tools in, by its markers; None when the template takes
    no tools or speaks a convention not listed here (it then gets the generic format).

    - Hermes / Qwen: mentions `tools` and `<tool_call>`.
    - Mistral: `[AVAILABLE_TOOLS]` and `[TOOL_CALLS]`, but not `[ARGS]` (the later
      `[TOOL_CALLS]name[ARGS]{...}` convention is another one).
    - Llama 3: Llama's `<|start_header_id|>` headers and the literal `"parameters"` of its call format.
    """
    if not chat_template or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return HERMES
    if "[AVAILABLE_TOOLS]" in chat_template and "[TOOL_CALLS]" in chat_template:
        if "[ARGS]" in chat_template:
            return None
        if "[TOOL_CALLS] [" in chat_template:
            return replace(MISTRAL, block_open="[TOOL_CALLS] [")
        return MISTRAL
    if "<|start_header_id|>" in chat_template and '"parameters"' in chat_template:
        return LLAMA3_JSON
    return None
