"""Request bodies of the OpenAI API as pydantic models, and response models for /openapi.json.

Requests are validated strictly (a string is not a number, NaN is not a number) so that every wrong
type becomes a 400 naming the parameter. Ranges are OpenAI's documented ones; the engine re-checks
what it relies on. OpenAI parameters this server cannot honour (audio, reasoning effort, ...) are
refused by name when set to anything but their do-nothing value; harmless ones (metadata, store, ...)
are accepted and have no effect; structured output and tools (`_StructuredFields`, `ChatCompletionRequest`)
are checked here for shape and turned into a grammar by structured.py / tools.py; the extension fields
that vLLM's and SGLang's clients send are accepted (honoured, or accepted with no effect where that is
harmless); a name that neither OpenAI nor those servers define is refused as OpenAI refuses it
("Unrecognized request argument").
Responses are built as plain dicts (see responses.py) for speed; the models below only document them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from llmaas.engine.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS_LIMIT,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
)
from llmaas.server.request_ids import ClientRequestId


def _lone_surrogate_at(value: str) -> int | None:
    """Where `value` holds a lone surrogate (JSON may spell one: \\ud800), or None: valid Unicode."""
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _valid_unicode(value: str) -> str:
    """No tokenizer, template or database can take a lone surrogate."""
    position = _lone_surrogate_at(value)
    if position is not None:
        raise PydanticCustomError(
            "invalid_unicode",
            "not valid Unicode: a lone surrogate (U+{code}) at character {position}",
            {"code": f"{ord(value[position]):04X}", "position": position},
        )
    return value


def _find_lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or key) holding a lone surrogate inside free-form JSON, or None.
    Iterative: JSON nests ~1,000 deep, about the interpreter's recursion limit."""
    pending = [(value, path)]
    while pending:
        item, where = pending.pop()
        if isinstance(item, str):
            if _lone_surrogate_at(item) is not None:
                return where
        elif isinstance(item, dict):
            for key, inner in reversed(item.items()):
                pending.append((inner, f"{where}.{key}"))
                pending.append((key, f"{where} (a key)"))
        elif isinstance(item, list):
            pending.extend((inner, f"{where}[{i}]") for i, inner in reversed(list(enumerate(item))))
    return None


def free_form_unicode(value: dict[str, Any]) -> None:
    """Free-form JSON that reaches a chat template: every string and key valid Unicode, or a 400 naming
    the first that is not."""
    if where := _find_lone_surrogate(value, ""):
        raise PydanticCustomError(
            "invalid_unicode",
            "'{field}' is not valid Unicode: it holds a lone surrogate",
            {"field": where[1:]},
        )


# Every string a client sends may reach a tokenizer, a chat template, a stop matcher or the ledger.
Text = Annotated[str, Strict(), AfterValidator(_valid_unicode)]
Float = Annotated[float, Strict()]  # accepts JSON integers, rejects strings, booleans and NaN
Seed = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]
TokenIds = list[Annotated[int, Strict(), Field(ge=0)]]

# How many of each list one request may carry: each item is work (a template turn, a tokenizer call, an
# engine request) done before the context window can refuse the request.
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256
MAX_PROMPTS = 128  # completions' prompt list; prompts x n is also capped by the caller's plan


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool | None = False
    include_obfuscation: StrictBool | None = Field(None, description="accepted; no effect")
    continuous_usage_stats: StrictBool | None = Field(
        None,
        description="extension (vLLM's): with include_usage, every chunk carries the usage so far "
        "(prompt, completion so far, total); the last chunk's usage is the final one, with its cost",
    )


def unsupported(message: str) -> PydanticCustomError:
    """A 400 naming the parameter, with OpenAI's code for a parameter this server cannot honour."""
    return PydanticCustomError("unsupported_parameter", message)


class _FreeForm(BaseModel):
    """A body part whose unknown fields pass through (to the chat template): they must be valid Unicode."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _extras_are_unicode(self):
        if self.model_extra:
            free_form_unicode(self.model_extra)
        return self


class ContentPart(_FreeForm):
    type: Text
    text: Text | None = None


class ChatMessage(_FreeForm):  # extras (tool_calls, tool_call_id, ...) reach the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: Text | None = None


_NO_EFFECT_EXT = "extension: accepted; no effect here"


class _SamplingFields(_Body):
    """Fields shared by chat and completions; the last four are extensions (vLLM's names)."""

    model: Text
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, ge=0, le=1)
    n: StrictInt | None = Field(None, ge=1, le=MAX_N)
    stop: Text | list[Text] | None = None
    seed: Seed | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[Text, Float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    top_k: StrictInt | None = Field(
        None, ge=-1, le=MAX_TOP_K, description="extension: sample from the k most likely"
    )
    min_p: Float | None = Field(None, ge=0, le=1, description="extension: drop tokens below min_p * p(top)")
    repetition_penalty: Float | None = Field(
        None,
        ge=MIN_REPETITION_PENALTY,
        le=MAX_REPETITION_PENALTY,
        description="extension: divide repeated logits",
    )
    ignore_eos: StrictBool | None = Field(None, description="extension: keep going past end-of-sequence")
    # Extensions of vLLM's and SGLang's OpenAI servers that the tools of their ecosystems send
    # (SGLang's router sends no_stop_trim, skip_special_tokens, return_hidden_states, lora_path and
    # session_params on every request). Honoured unless the description says "no effect".
    min_tokens: StrictInt | None = Field(
        None, ge=0, le=MAX_TOKENS_LIMIT, description="extension: no end-of-sequence or stop before this many"
    )
    stop_token_ids: list[Annotated[int, Strict(), Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="extension: token ids that end a choice"
    )
    include_stop_str_in_output: StrictBool | None = Field(
        None, description="extension (vLLM's): keep the stop string at the end of the text"
    )
    no_stop_trim: StrictBool | None = Field(
        None, description="extension (SGLang's): include_stop_str_in_output under SGLang's name"
    )
    skip_special_tokens: StrictBool | None = Field(
        None, description="extension: leave special tokens out of the text (default true)"
    )
    spaces_between_special_tokens: StrictBool | None = Field(None, description=_NO_EFFECT_EXT)
    sampling_seed: Seed | None = Field(None, description="extension (SGLang's): 'seed' under SGLang's name")
    request_id: ClientRequestId | None = Field(
        None,
        description="extension (vLLM's): the client's id for this request, as the X-Client-Request-Id "
        "header (which wins when both are sent): echoed in that header and recorded in the ledger",
    )
    rid: ClientRequestId | None = Field(
        None, description="extension (SGLang's): 'request_id' under SGLang's name"
    )
    service_tier: Literal["auto", "default", "flex", "priority"] | None = Field(
        None,
        description='"auto"/"default", "flex" (cheaper, runs below default work) or "priority" (dearer, runs '
        "above everything); the response echoes the tier that served it",
    )
    priority: StrictInt | None = Field(
        None, ge=-(2**31), le=2**31 - 1, description=_NO_EFFECT_EXT + " (the plan sets the priority)"
    )
    return_hidden_states: StrictBool | None = Field(None, description="extension (SGLang's): false only")
    lora_path: None = Field(None, description="extension (SGLang's): null only (no LoRA adapters)")
    session_params: None = Field(None, description="extension (SGLang's): null only (no sessions)")

    @field_validator("return_hidden_states")
    @classmethod
    def _no_hidden_states(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported("'return_hidden_states' is not supported: this server returns text, not states")
        return value


# ---------------------------------------------------------------- structured output (server/structured.py)
MAX_TOOLS = 128
MAX_CHOICES = 1024
MAX_SPEC_CHARS = 1_000_000  # a schema, regex or grammar; the engine's compile has its own time limit


class StructuredOutputsOptions(_Body):
    """vLLM's `structured_outputs` object (vLLM >= 0.11). Exactly one of json / regex / choice /
    grammar / json_object; the fields below them are refused unless they ask for nothing."""

    json_: dict[Text, Any] | Text | None = Field(None, alias="json")
    regex: Annotated[Text, Field(max_length=MAX_SPEC_CHARS)] | None = None
    choice: Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    grammar: Annotated[Text, Field(max_length=MAX_SPEC_CHARS)] | None = None
    json_object: StrictBool | None = None
    disable_fallback: StrictBool | None = Field(None, description="accepted; there is no fallback here")
    disable_any_whitespace: StrictBool | None = Field(None, description="not supported: null or false")
    disable_additional_properties: StrictBool | None = Field(None, description="not supported: null or false")
    whitespace_pattern: Text | None = Field(None, description="not supported: null")
    structural_tag: Text | None = Field(None, description="not supported: null")

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class _StructuredFields(_Body):
    """Output constraints both endpoints take: OpenAI's response_format and vLLM's extension fields."""

    response_format: dict[Text, Any] | None = Field(
        None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}'
    )
    structured_outputs: StructuredOutputsOptions | None = Field(
        None, description="extension (vLLM's name): json / regex / choice / grammar / json_object"
    )
    guided_json: dict[Text, Any] | Text | None = Field(None, description="extension (vLLM's older name)")
    guided_regex: Annotated[Text, Field(max_length=MAX_SPEC_CHARS)] | None = Field(
        None, description="extension (vLLM's older name)"
    )
    guided_choice: Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)] | None = Field(
        None, description="extension (vLLM's older name)"
    )
    guided_grammar: Annotated[Text, Field(max_length=MAX_SPEC_CHARS)] | None = Field(
        None, description="extension (vLLM's older name)"
    )
    guided_decoding_backend: Text | None = Field(None, description="accepted; no effect (one backend here)")
    guided_whitespace_pattern: Text | None = Field(None, description="not supported: null")


_NO_EFFECT = "accepted; no effect here"


MAX_TEMPLATE_KWARGS = 32
TemplateName = Annotated[
    str, Strict(), Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
]
# What the server itself passes to a chat template (Tokenizer.apply_chat_template and the special tokens).
RESERVED_TEMPLATE_NAMES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "raise_exception", "strftime_now"}
    | {"bos_token", "eos_token", "unk_token", "pad_token"}
)

TemplateVariables = Annotated[dict[TemplateName, Any], Field(max_length=MAX_TEMPLATE_KWARGS)]


class _ChatExtensionFields(_SamplingFields):
    """Chat-only extensions of vLLM's and SGLang's servers (SGLang's router sends the last four always)."""

    add_generation_prompt: StrictBool | None = Field(None, description="extension (vLLM's): true only")
    continue_final_message: StrictBool | None = Field(None, description="extension: false only")
    separate_reasoning: StrictBool | None = Field(None, description=_NO_EFFECT_EXT + " (no reasoning models)")
    stream_reasoning: StrictBool | None = Field(None, description=_NO_EFFECT_EXT + " (no reasoning models)")
    chat_template_kwargs: TemplateVariables | None = Field(
        None,
        description="extension (vLLM's): more variables for the model's chat template (e.g. "
        "enable_thinking: false); the server's own (messages, tools, ...) cannot be set",
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            if reserved := sorted(set(value) & RESERVED_TEMPLATE_NAMES):
                raise PydanticCustomError(
                    "reserved_name", "'{name}' is set by the server, not by a request", {"name": reserved[0]}
                )
            free_form_unicode(value)
        return value

    @field_validator("add_generation_prompt")
    @classmethod
    def _generation_prompt(cls, value: bool | None) -> bool | None:
        if value is False:
            raise unsupported(
                "'add_generation_prompt' false is not supported: the assistant turn is always opened"
            )
        return value

    @field_validator("continue_final_message")
    @classmethod
    def _no_continuation(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported(
                "'continue_final_message' is not supported: use /v1/completions to continue a text"
            )
        return value


class FunctionDef(_Body):
    name: Annotated[Text, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: Text | None = None
    parameters: dict[Text, Any] | None = Field(None, description="a JSON Schema; none: no arguments")
    strict: StrictBool | None = Field(None, description="always enforced here: arguments always validate")


class Tool(_Body):
    function: FunctionDef  # first: a broken function is the error to name, before a missing type
    type: Literal["function"]


class NamedToolChoice(_Body):
    function: FunctionName
    type: Literal["function"]


class FunctionName(_Body):
    name: Text


class ChatCompletionRequest(_ChatExtensionFields, _StructuredFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Harmless: accepted, no effect (this server keeps no stored completions; prefix caching is automatic).
    metadata: dict[Text, Text] | None = Field(None, description=_NO_EFFECT)
    store: StrictBool | None = Field(None, description=_NO_EFFECT)
    safety_identifier: Text | None = Field(None, description=_NO_EFFECT)
    prompt_cache_key: Text | None = Field(None, description=_NO_EFFECT + " (prefix caching: automatic)")
    prediction: dict[Text, Any] | None = Field(None, description=_NO_EFFECT + " (no speculation)")
    # Function calling (server/tools.py).
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = Field(None, description="default true")
    functions: Annotated[list[FunctionDef], Field(max_length=MAX_TOOLS)] | None = Field(
        None, description="deprecated OpenAI form of tools"
    )
    function_call: Literal["none", "auto"] | FunctionName | None = Field(
        None, description="deprecated OpenAI form of tool_choice"
    )
    # Not supported: refused unless absent or set to the value that asks for nothing.
    audio: Any = Field(None, description="not supported: null")
    modalities: list[Text] | None = Field(None, description='only ["text"]')
    reasoning_effort: Any = Field(None, description="not supported: null (the models do not reason)")
    verbosity: Any = Field(None, description="not supported: null")
    web_search_options: Any = Field(None, description="not supported: null")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and set(value) - {"text"}:
            raise unsupported("'modalities' other than ['text'] are not supported: this server has no audio")
        return value

    @field_validator("audio", "reasoning_effort", "verbosity", "web_search_options")
    @classmethod
    def _absent(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            why = {
                "audio": "this server has no audio output",
                "reasoning_effort": "the models served here are not reasoning models",
                "verbosity": "the models served here take no verbosity setting",
                "web_search_options": "this server does not search the web",
            }[info.field_name]
            raise unsupported(f"'{info.field_name}' is not supported: {why}")
        return value


class CompletionRequest(_SamplingFields, _StructuredFields):
    prompt: (
        Text
        | Annotated[list[Text], Field(max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
    )
    max_tokens: StrictInt | None = Field(
        16, ge=0, le=MAX_TOKENS_LIMIT, description="0 only with echo: score the prompt"
    )
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool | None = False
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N)
    suffix: Text | None = None


# ------------------------------------------------------------------ responses (documentation only)
class PromptTokensDetails(BaseModel):
    cached_tokens: int
    audio_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0
    audio_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null when the turn is only tool calls
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None  # present only when the model called tools


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """The first delta of a call carries id, type and name; later ones argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (text/event-stream)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmaas"
    metadata: dict[str, int | str] | None = None  # family, parameters, KV bytes per token (when loaded)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request (names the param)"},
    404: {"model": ErrorResponse, "description": "model not found"},
    503: {"model": ErrorResponse, "description": "overloaded or loading; see Retry-After"},
}
