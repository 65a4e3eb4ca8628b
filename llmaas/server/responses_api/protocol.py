"""The request body of POST /v1/responses (OpenAI's Responses API), validated as strictly as chat's:
every wrong type or range is a 400 naming the parameter; built-in tools this server cannot run (web
search, file search, computer use, code interpreter, ...) are refused by their type."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmaas.engine.sampling_params import MAX_LOGPROBS, MAX_TOKENS_LIMIT
from llmaas.server.protocol import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_TOOLS,
    Float,
    FunctionDef,
    Seed,
    StreamOptions,
    Text,
    _Body,
    unsupported,
)
from llmaas.server.request_ids import ClientRequestId

MAX_METADATA_PAIRS = 16  # OpenAI's limits on metadata: 16 pairs, keys of 64 and values of 512 characters
MAX_CALL_ID = 128
MAX_TOOL_OUTPUT_CHARS = 10_000_000  # a function's output, as text; the body cap bounds it first anyway


class InputText(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: Text
    annotations: list[Any] | None = Field(None, description="output_text only; ignored")
    logprobs: list[Any] | None = Field(None, description="output_text only; ignored")


class MessageItem(_Body):
    """A turn of the conversation; `content` a string or text parts (no images here)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | Annotated[list[InputText], Field(max_length=MAX_CONTENT_PARTS)]
    id: Text | None = None
    status: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind in ("input_image", "input_file", "input_audio"):
                    raise unsupported(
                        f"content[{i}] of type {kind!r} is not supported: the models read text only"
                    )
        return value


class FunctionCallItem(_Body):
    """A call the model made earlier (as the Responses API returned it), sent back as history."""

    type: Literal["function_call"]
    call_id: Annotated[Text, Field(min_length=1, max_length=MAX_CALL_ID)]
    name: Annotated[Text, Field(min_length=1, max_length=64)]
    arguments: Text
    id: Text | None = None
    status: Text | None = None


class FunctionCallOutputItem(_Body):
    """What the caller's function returned for `call_id`."""

    type: Literal["function_call_output"]
    call_id: Annotated[Text, Field(min_length=1, max_length=MAX_CALL_ID)]
    output: Annotated[Text, Field(max_length=MAX_TOOL_OUTPUT_CHARS)]
    id: Text | None = None
    status: Text | None = None


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(union_mode="left_to_right")
]


class FunctionTool(FunctionDef):
    """The Responses API's flat function tool: {"type": "function", "name", "parameters", ...}."""

    type: Literal["function"]


class TextFormat(_Body):
    """text.format: {"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "name",
    "schema", "strict", "description"} (flat, unlike chat's response_format)."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[Text, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")] | None = None
    schema_: dict[Text, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: Text | None = None

    model_config = _Body.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _schema_for_json_schema(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise PydanticCustomError("missing", "'schema' is required when the format is 'json_schema'")
        return self


class TextOptions(_Body):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = Field(None, description="only 'medium' (the models have one)")


class NamedFunctionChoice(_Body):
    type: Literal["function"]
    name: Text


_BUILT_IN_TOOLS = {
    "web_search",
    "web_search_preview",
    "file_search",
    "computer_use_preview",
    "computer_use",
    "code_interpreter",
    "image_generation",
    "mcp",
    "local_shell",
    "shell",
    "custom",
    "apply_patch",
}


class ResponseCreateRequest(_Body):
    model: Text
    input: Text | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: Text | None = None
    max_output_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, ge=0, le=1)
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)] | None = Field(
        None, description="accepted; no effect (logprobs are not returned on this endpoint yet)"
    )
    text: TextOptions | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = Field(None, strict=True)
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamOptions | None = Field(None, description="accepted; usage always comes at the end")
    store: bool | None = Field(True, strict=True)
    metadata: (
        Annotated[
            dict[Annotated[Text, Field(max_length=64)], Annotated[Text, Field(max_length=512)]],
            Field(max_length=MAX_METADATA_PAIRS),
        ]
        | None
    ) = None
    previous_response_id: Annotated[Text, Field(min_length=1, max_length=128)] | None = None
    user: Text | None = None
    safety_identifier: Text | None = Field(None, description="accepted; no effect")
    prompt_cache_key: Text | None = Field(
        None, description="accepted; no effect (prefix caching is automatic)"
    )
    seed: Seed | None = Field(None, description="extension: as chat's seed")
    truncation: Literal["disabled"] | None = Field(None, description="only 'disabled': too long is a 400")
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    reasoning: Any = Field(None, description="not supported: null (the models do not reason)")
    include: list[Text] | None = Field(None, description="only an empty list")
    background: bool | None = Field(None, description="false only")
    conversation: Any = Field(None, description="not supported: null (use previous_response_id)")
    prompt: Any = Field(None, description="not supported: null (no stored prompts)")
    max_tool_calls: Any = Field(None, description="not supported: null")
    request_id: ClientRequestId | None = Field(None, description="extension (vLLM's): as on chat")

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, tool in enumerate(value):
                kind = tool.get("type") if isinstance(tool, dict) else None
                if isinstance(kind, str) and kind in _BUILT_IN_TOOLS:
                    raise unsupported(
                        f"tools[{i}] of type {kind!r} is not supported: this server runs no built-in tools; "
                        "send function tools"
                    )
        return value

    @field_validator("reasoning", "conversation", "prompt", "max_tool_calls")
    @classmethod
    def _absent(cls, value: Any, info) -> Any:
        if value is not None:
            raise unsupported(f"'{info.field_name}' is not supported on this server")
        return value

    @field_validator("include")
    @classmethod
    def _nothing_included(cls, value: list[str] | None) -> list[str] | None:
        if value:
            raise unsupported(f"'include' {value[0]!r} is not supported: nothing extra can be included")
        return value

    @field_validator("background")
    @classmethod
    def _foreground(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported("'background' is not supported: responses run while the request is open")
        return value

    # Compatibility with the shared walk (server/reply.py reads these off any generation body).
    @property
    def rid(self) -> None:
        return None
