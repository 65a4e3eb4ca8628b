"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from llmaas.errors import InvalidRequestError, LlmaasError
from llmaas.server import responses as R
from llmaas.server.errors import rename_param
from llmaas.server.generation import ClientDisconnected, EngineRun
from llmaas.server.protocol import ERROR_RESPONSES, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from llmaas.server.sampling import sampling_params
from llmaas.server.state import ServerState
from llmaas.server.streaming import event, guarded, sse_response

router = APIRouter()

_STREAM_DOC = {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema()}}


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletion, "content": _STREAM_DOC}, **ERROR_RESPONSES},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.llmaas
    model = state.registry.get(body.model)
    engine = model.engine
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    names = {
        "prompt": "messages",
        "max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
        "logprobs": "top_logprobs",
    }
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    try:
        prompt = engine.engine.tokenizer.apply_chat_template(
            [m.model_dump(exclude_none=True) for m in body.messages]
        )
        params = sampling_params(
            body,
            max_tokens=max_tokens,
            n=body.n or 1,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )
        request_id = R.new_id("chatcmpl")
        run, watcher = await state.start_run(
            request, model, [prompt], params, request_id, "chat.completions", body.user
        )
    except LlmaasError as exc:
        raise rename_param(exc, names) from None
    except ClientDisconnected:
        return Response(status_code=499)
    created = R.now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _chat_events(run, request_id, created, model, params.n, body.logprobs, include_usage)

        def final() -> str | None:
            if not include_usage:
                return None
            return event(
                _chunk(
                    request_id,
                    created,
                    model.name,
                    [],
                    True,
                    R.usage(run.prompt_tokens, run.cached_tokens, run.completion_tokens, run.cost_micros),
                )
            )

        return sse_response(guarded(run, watcher, events, final))
    try:
        async for _ in run.outputs():
            pass
        await run.finish()
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        watcher.cancel()
        run.abort()
    out = run.latest[0]
    choices = [
        R.chat_choice(
            c.index,
            c.text,
            c.finish_reason,
            R.chat_logprobs(c.logprobs, model.token_text) if body.logprobs else None,
        )
        for c in out.outputs
    ]
    usage = R.usage(out.prompt_tokens, out.cached_tokens, out.completion_tokens, run.cost_micros)
    return JSONResponse(R.chat_completion(request_id, created, model.name, choices, usage))


def _chunk(id_: str, created: int, model: str, choices: list, include_usage: bool, usage=None) -> dict:
    chunk = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = usage
    return chunk


async def _chat_events(
    run: EngineRun, id_: str, created: int, model, n: int, want_logprobs: bool, include_usage: bool
) -> AsyncIterator[str]:
    first = [
        {
            "index": i,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
        for i in range(n)
    ]
    yield "".join(event(_chunk(id_, created, model.name, [c], include_usage)) for c in first)
    finished = [False] * n
    async for _, out in run.outputs():
        parts = []
        for c in out.outputs:
            if finished[c.index]:
                continue
            has_logprobs = want_logprobs and c.delta_logprobs
            if not (c.delta_text or has_logprobs or c.finish_reason):
                continue  # text held back (a possible stop string or an unfinished UTF-8 character)
            choice = {
                "index": c.index,
                "delta": {"content": c.delta_text} if c.delta_text or has_logprobs else {},
                "logprobs": R.chat_logprobs(c.delta_logprobs, model.token_text) if want_logprobs else None,
                "finish_reason": R.finish_reason(c.finish_reason),
            }
            finished[c.index] = c.finish_reason is not None
            parts.append(event(_chunk(id_, created, model.name, [choice], include_usage)))
        if parts:
            yield "".join(parts)
