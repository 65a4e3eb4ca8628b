"""POST /v1/completions (the legacy text API): several prompts, echo, best_of, integer logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from llmaas.engine.outputs import CompletionOutput
from llmaas.errors import InvalidRequestError, LlmaasError
from llmaas.server import responses as R
from llmaas.server.errors import rename_param
from llmaas.server.generation import ClientDisconnected, EngineRun
from llmaas.server.protocol import ERROR_RESPONSES, Completion, CompletionRequest
from llmaas.server.registry import ServedModel
from llmaas.server.sampling import sampling_params
from llmaas.server.state import ServerState
from llmaas.server.streaming import event, guarded, sse_response

router = APIRouter()

_STREAM_DOC = {"text/event-stream": {"schema": Completion.model_json_schema()}}


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids or a list of token-id lists -> prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("'prompt' must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


@router.post(
    "/v1/completions",
    response_model=None,
    responses={200: {"model": Completion, "content": _STREAM_DOC}, **ERROR_RESPONSES},
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.llmaas
    model = state.registry.get(body.model)
    prompts = prompt_list(body.prompt)
    n = body.n or 1
    best_of = body.best_of if body.best_of is not None else n
    if body.suffix:
        raise InvalidRequestError("'suffix' (insertion) is not supported", param="suffix")
    if best_of < n:
        raise InvalidRequestError(f"'best_of' ({best_of}) must be >= 'n' ({n})", param="best_of")
    if body.stream and best_of > n:
        raise InvalidRequestError("'best_of' cannot be used with 'stream'", param="best_of")
    # Ranking best_of candidates needs their log-probabilities even when the caller wants none.
    engine_logprobs = body.logprobs if body.logprobs is not None else (0 if best_of > n else None)
    names = {"n": "best_of"} if best_of != n else {}
    try:
        params = sampling_params(body, max_tokens=body.max_tokens, n=best_of, logprobs=engine_logprobs)
        if body.echo and body.logprobs is not None:
            params.prompt_logprobs = body.logprobs  # the echoed prompt gets real logprobs too
        request_id = R.new_id("cmpl")
        run, watcher = await state.start_run(
            request, model, prompts, params, request_id, "completions", body.user
        )
    except LlmaasError as exc:
        raise rename_param(exc, names) from None
    except ClientDisconnected:
        return Response(status_code=499)
    created = R.now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _completion_events(run, request_id, created, model, prompts, n, body, include_usage)

        def final() -> str | None:
            if not include_usage:
                return None
            usage = R.usage(run.prompt_tokens, run.cached_tokens, run.completion_tokens, run.cost_micros)
            return event(R.completion(request_id, created, model.name, [], usage))

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
    choices = []
    for p, out in enumerate(run.latest):
        prompt_text = _prompt_text(model, prompts[p]) if body.echo else ""
        for c in _best(out.outputs, n):
            logprobs = None
            if body.logprobs is not None:
                echoed = out.prompt_token_ids if body.echo else ()
                logprobs = R.CompletionLogprobs(model.token_text).build(
                    c.logprobs or [], echoed, out.prompt_logprobs
                )
            choices.append(R.completion_choice(len(choices), prompt_text + c.text, c.finish_reason, logprobs))
    usage = R.usage(run.prompt_tokens, run.cached_tokens, run.completion_tokens, run.cost_micros)
    return JSONResponse(R.completion(request_id, created, model.name, choices, usage))


def _best(outputs: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The n candidates with the highest mean token log-probability (all of them when best_of == n)."""
    if len(outputs) == n:
        return outputs

    def mean_logprob(c: CompletionOutput) -> float:
        return (c.cumulative_logprob or 0.0) / max(1, len(c.token_ids))

    return sorted(outputs, key=mean_logprob, reverse=True)[:n]


def _prompt_text(model: ServedModel, prompt: str | list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    return model.engine.engine.tokenizer.decode(prompt, skip_special_tokens=False)


async def _completion_events(
    run: EngineRun,
    id_: str,
    created: int,
    model: ServedModel,
    prompts: list[str | list[int]],
    n: int,
    body: CompletionRequest,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Choice index = prompt index * n + sample index, as OpenAI numbers them."""
    num_prompts = len(run.latest)
    finished = [False] * (num_prompts * n)
    echoed = [not body.echo] * (num_prompts * n)
    logprob_builders = [R.CompletionLogprobs(model.token_text) for _ in range(num_prompts * n)]
    usage = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, reason: str | None, logprobs) -> str:
        body_ = R.completion(
            id_, created, model.name, [R.completion_choice(index, text, reason, logprobs)], None
        )
        return event({**body_, **usage})

    async for p, out in run.outputs():
        parts = []
        for c in out.outputs:
            index = p * n + c.index
            if finished[index]:
                continue
            prefix, prompt_ids = "", ()
            if not echoed[index]:
                echoed[index] = True
                prefix = _prompt_text(model, prompts[p])
                prompt_ids = out.prompt_token_ids
            has_logprobs = body.logprobs is not None and c.delta_logprobs
            if not (prefix or c.delta_text or has_logprobs or c.finish_reason):
                continue
            logprobs = None
            if body.logprobs is not None:
                logprobs = logprob_builders[index].build(c.delta_logprobs, prompt_ids, out.prompt_logprobs)
            finished[index] = c.finish_reason is not None
            parts.append(chunk(index, prefix + c.delta_text, c.finish_reason, logprobs))
        if parts:
            yield "".join(parts)
