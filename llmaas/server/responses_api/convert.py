"""The Responses API in chat's terms and back: input items -> chat messages -> a ChatCompletionRequest
(so a response is rendered, constrained and sampled exactly as a chat completion is), and the model's
text -> output items and the response object.

Items are kept in one normal form (what `input_items` lists and what a conversation is rebuilt from):
messages with a list of text parts, function calls and their outputs, each with an id.
"""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import ValidationError

from llmaas.errors import InvalidRequestError, LlmaasError
from llmaas.server.caller import service_tier
from llmaas.server.protocol import MAX_MESSAGES, ChatCompletionRequest
from llmaas.server.responses_api.protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ResponseCreateRequest,
)
from llmaas.server.tools import ToolCall


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


# ------------------------------------------------------------------------------------------ input items
def input_items(body: ResponseCreateRequest) -> list[dict[str, Any]]:
    """The request's input as items in normal form."""
    if isinstance(body.input, str):
        return [_message("user", [{"type": "input_text", "text": body.input}])]
    items = []
    for item in body.input:
        if isinstance(item, MessageItem):
            kind = "output_text" if item.role == "assistant" else "input_text"
            parts = (
                [{"type": kind, "text": item.content}]
                if isinstance(item.content, str)
                else [
                    {"type": part.type if part.type != "text" else kind, "text": part.text}
                    for part in item.content
                ]
            )
            items.append(_message(item.role, parts, item.id))
        elif isinstance(item, FunctionCallItem):
            items.append(
                {
                    "id": item.id or item_id("fc"),
                    "type": "function_call",
                    "status": "completed",
                    "call_id": item.call_id,
                    "name": item.name,
                    "arguments": item.arguments,
                }
            )
        elif isinstance(item, FunctionCallOutputItem):
            items.append(
                {
                    "id": item.id or item_id("fco"),
                    "type": "function_call_output",
                    "status": "completed",
                    "call_id": item.call_id,
                    "output": item.output,
                }
            )
    return items


def _message(role: str, parts: list[dict[str, Any]], id_: str | None = None) -> dict[str, Any]:
    return {
        "id": id_ or item_id("msg"),
        "type": "message",
        "status": "completed",
        "role": role,
        "content": parts,
    }


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items -> chat messages: consecutive function calls become one assistant turn's tool_calls (after
    that turn's text, if any), function outputs become tool messages."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = "".join(part.get("text") or "" for part in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(
            f"the conversation has {len(messages)} turns; at most {MAX_MESSAGES} fit one request",
            param="input",
        )
    return messages


def chat_request(body: ResponseCreateRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat completion this response is generated as."""
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stream": body.stream,
        "user": body.user,
        "request_id": body.request_id,
        "parallel_tool_calls": body.parallel_tool_calls,
    }
    if body.tools:
        chat["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
            for tool in body.tools
        ]
    if isinstance(body.tool_choice, str):
        chat["tool_choice"] = body.tool_choice
    elif body.tool_choice is not None:
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}
        if fmt.description is not None:
            schema["description"] = fmt.description
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as exc:  # the Responses fields were checked already; name the first problem
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequestError(f"invalid request: {where}: {first['msg']}", param="input") from None


# (chat's parameter, the Responses API's, whether what follows the name is kept): message indexes are
# not item indexes, so an error inside messages names `input` as a whole.
_PARAMS = (
    ("messages", "input", False),
    ("prompt", "input", False),
    ("max_completion_tokens", "max_output_tokens", False),
    ("max_tokens", "max_output_tokens", False),
    ("response_format.json_schema.schema", "text.format.schema", True),
    ("response_format", "text.format", False),
)


def responses_param(param: str | None) -> str | None:
    """A chat parameter named in an error -> the Responses API's name for it."""
    if param is None:
        return None
    for chat_name, name, keep_rest in _PARAMS:
        if param == chat_name or param.startswith((chat_name + ".", chat_name + "[")):
            return name + param[len(chat_name) :] if keep_rest else name
    if param.startswith("tools[") and ".function." in param:  # chat's tools nest the function
        return param.replace(".function.", ".", 1)
    return param


def renamed(exc: LlmaasError) -> LlmaasError:
    """An error from the chat walk, in the Responses API's words (its parameter and its message)."""
    name = responses_param(exc.param)
    if exc.param and name != exc.param:
        exc.message = exc.message.replace(exc.param, name)
        exc.param = name
    return exc


# ----------------------------------------------------------------------------------------- output items
def message_item(text: str, status: str, id_: str | None = None) -> dict[str, Any]:
    return {
        "id": id_ or item_id("msg"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [output_text(text)],
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: ToolCall, status: str, id_: str | None = None) -> dict[str, Any]:
    return {
        "id": id_ or item_id("fc"),
        "type": "function_call",
        "status": status,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    }


def output_items(content: str | None, calls: list[ToolCall], status: str) -> list[dict[str, Any]]:
    """A finished reply: its text (if any) as a message, then its calls."""
    items = [message_item(content, status)] if content is not None and (content or not calls) else []
    return items + [call_item(call, "completed") for call in calls]


def status_of(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """(status, incomplete_details) of a finished reply."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """Chat's usage object (server/responses.py `usage`, with its cost) in the Responses API's shape."""
    prompt_tokens, output_tokens = chat_usage["prompt_tokens"], chat_usage["completion_tokens"]
    body: dict[str, Any] = {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }
    if "cost" in chat_usage:
        body["cost"] = chat_usage["cost"]
    return body


def response_object(
    response_id: str,
    created_at: int,
    body: ResponseCreateRequest,
    model: str,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    incomplete_details: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    fmt = body.text.format if body.text is not None else None
    text_format = fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else {"type": "text"}
    if body.tool_choice is None or isinstance(body.tool_choice, str):
        tool_choice: str | dict[str, Any] = body.tool_choice or "auto"
    else:
        tool_choice = body.tool_choice.model_dump()
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": service_tier(body.service_tier),
        "store": body.store is not False,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {"format": text_format, "verbosity": "medium"},
        "tool_choice": tool_choice,
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
        "top_logprobs": body.top_logprobs or 0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": body.user,
        "metadata": body.metadata or {},
    }
