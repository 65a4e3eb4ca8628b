"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request, Response

from llmaas.engine.sampling_params import SamplingParams
from llmaas.engine.structured import StructuredOutput
from llmaas.errors import InvalidRequestError
from llmaas.server import responses as R
from llmaas.server.caller import Caller, http_caller
from llmaas.server.protocol import ERROR_RESPONSES, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from llmaas.server.registry import ServedModel
from llmaas.server.reply import (
    Reply,
    Started,
    params_named,
    respond,
    run_usage,
    start_reply,
    usage_so_far,
    wants_continuous_usage,
    wants_usage_chunk,
)
from llmaas.server.request_ids import request_id_of
from llmaas.server.sampling import sampling_params
from llmaas.server.state import PromptSource, ServerState
from llmaas.server.streaming import event
from llmaas.server.structured import structured_output
from llmaas.server.tool_formats import ToolFormat
from llmaas.server.tools import ToolCallParser, ToolPlan, parse_whole, plan_tools, prompt_messages
from llmaas.server.tools import grammar as tool_grammar

router = APIRouter()

_STREAM_DOC = {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema()}}


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletion, "content": _STREAM_DOC}, **ERROR_RESPONSES},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    caller = http_caller(request, body.service_tier, body.request_id, body.rid)
    started = await start_chat(
        request.app.state.llmaas, caller, body, request_id_of(request.scope, "chatcmpl")
    )
    return await respond(started, body.stream)


async def start_chat(
    state: ServerState, caller: Caller, body: ChatCompletionRequest, request_id: str
) -> Started:
    """A chat request admitted and in the engine (an HTTP request's or a batch line's)."""
    model = state.registry.get(body.model)
    names = {
        "prompt": "messages",
        "max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
        "logprobs": "top_logprobs",
    }
    plan, params, render = prepare_chat(body, model, names)
    reply = await start_reply(
        state,
        caller,
        model,
        render,
        params,
        body,
        endpoint="chat.completions",
        request_id=request_id,
        param_names=names,
    )
    tool_format = plan.format if plan else None
    return Started(
        reply,
        lambda: _chat_completion(reply, model, bool(body.logprobs), tool_format),
        lambda: _chat_events(reply, model, body, params.n, tool_format),
    )


def prepare_chat(
    body: ChatCompletionRequest,
    model: ServedModel,
    names: dict[str, str],
    conversation: Callable[[], list[dict[str, Any]]] | None = None,
) -> tuple[ToolPlan | None, SamplingParams, PromptSource]:
    """A chat request -> (its tools, if any; its sampling parameters with the output's grammar; the
    prompt, rendered by the model's own template in a worker thread once the request is admitted).
    /v1/responses goes through here too, with the conversation turned into chat messages;
    `conversation()`: the messages to render instead of body.messages (called in that worker thread:
    earlier turns read from a store)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    plan = plan_tools(body, model.engine.chat_template, model.engine.special_token_id)
    structured = output_constraint(body, plan)

    def render() -> list[str]:
        if conversation is not None:
            messages = conversation()
        else:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
        messages, tools = prompt_messages(messages, plan, model.engine.chat_template)
        return [model.engine.render_chat(messages, tools=tools, variables=body.chat_template_kwargs)]

    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    with params_named(names):
        params = sampling_params(
            body,
            max_tokens=max_tokens,
            n=body.n or 1,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )
    params.structured = structured
    if plan is not None:  # a format's markers may be special tokens: the parser must see them
        params.skip_special_tokens = False
    return plan, params, render


def _chat_completion(
    reply: Reply, model: ServedModel, want_logprobs: bool, tool_format: ToolFormat | None
) -> dict:
    choices = []
    for c in reply.run.latest[0].outputs:
        logprobs = R.chat_logprobs(c.logprobs, model.token_text, model.token_bytes) if want_logprobs else None
        content, calls = parse_whole(c.text, tool_format) if tool_format else (c.text, [])
        choices.append(
            R.chat_choice(c.index, content, c.finish_reason, logprobs, [t.as_dict() for t in calls])
        )
    usage = run_usage(reply.run)
    body = R.chat_completion(reply.id, reply.created, model.name, choices, usage, model.system_fingerprint)
    return {**body, "service_tier": reply.service_tier}


def _chunk(reply: Reply, model: ServedModel, choices: list, include_usage: bool, usage=None) -> dict:
    chunk = {
        "id": reply.id,
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": model.name,
        "service_tier": reply.service_tier,
        "system_fingerprint": model.system_fingerprint,
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = usage
    return chunk


def output_constraint(body: ChatCompletionRequest, plan: ToolPlan | None) -> StructuredOutput | None:
    """The grammar the reply must match: the tools' (with a JSON response_format as the plain reply's
    shape), or the response_format / vLLM field's; None: unconstrained."""
    reply = structured_output(body)
    if plan is None:
        return reply
    if reply is not None and (not plan.allows_text or reply.kind not in ("json_schema", "json_object")):
        why = "only a JSON response_format with tool_choice 'auto'"
        raise InvalidRequestError(f"'{reply.param}' cannot be combined with tools: {why}", param=reply.param)
    return tool_grammar(plan, reply)


async def _chat_events(
    reply: Reply, model: ServedModel, body: ChatCompletionRequest, n: int, tool_format: ToolFormat | None
) -> AsyncIterator[str]:
    """One chunk per choice per step; with stream_options.include_usage every chunk has `usage` (null,
    or the usage so far with continuous_usage_stats) and a final chunk carries the settled usage."""
    run = reply.run
    want_logprobs, include_usage = bool(body.logprobs), wants_usage_chunk(body)
    continuous_usage = wants_continuous_usage(body)
    usage = None
    if continuous_usage:  # before any token: the prompt, no completion yet
        usage = usage_so_far(run, [None])
    first = [
        {
            "index": i,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
        for i in range(n)
    ]
    yield "".join(event(_chunk(reply, model, [c], include_usage, usage)) for c in first)
    finished = [False] * n
    parsers = [ToolCallParser(tool_format) for _ in range(n)] if tool_format else None
    async for _, out in run.outputs():
        parts = []
        if continuous_usage:
            usage = usage_so_far(run, [out])
        for c in out.outputs:
            if finished[c.index]:
                continue
            text, calls, reason = c.delta_text, [], R.finish_reason(c.finish_reason)
            if parsers is not None:  # the same parser a whole reply goes through: identical calls
                parser = parsers[c.index]
                text, calls = parser.feed(c.delta_text)
                if c.finish_reason is not None:
                    rest, _ = parser.finish()
                    text += rest
                    if parser.calls and reason == "stop":
                        reason = "tool_calls"
            has_logprobs = want_logprobs and c.delta_logprobs
            if not (text or calls or has_logprobs or c.finish_reason):
                continue  # text held back (a possible stop string, tool call or unfinished UTF-8 character)
            delta: dict = {"content": text} if text or (has_logprobs and not calls) else {}
            if calls:
                delta["tool_calls"] = calls
            choice = {
                "index": c.index,
                "delta": delta,
                "logprobs": (
                    R.chat_logprobs(c.delta_logprobs, model.token_text, model.token_bytes)
                    if want_logprobs
                    else None
                ),
                "finish_reason": reason,
            }
            finished[c.index] = c.finish_reason is not None
            parts.append(event(_chunk(reply, model, [choice], include_usage, usage)))
        if parts:
            yield "".join(parts)
    if include_usage:
        yield event(_chunk(reply, model, [], True, await reply.settle()))
