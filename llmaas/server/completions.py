"""POST /v1/completions (the legacy text API): several prompts, echo, best_of, integer logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response

from llmaas.engine.outputs import CompletionOutput, RequestOutput
from llmaas.errors import InvalidRequestError
from llmaas.server import responses as R
from llmaas.server.caller import Caller, http_caller
from llmaas.server.protocol import ERROR_RESPONSES, Completion, CompletionRequest
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
from llmaas.server.state import ServerState
from llmaas.server.streaming import event
from llmaas.server.structured import structured_output

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
    caller = http_caller(request, body.service_tier, body.request_id, body.rid)
    started = await start_completion(
        request.app.state.llmaas, caller, body, request_id_of(request.scope, "cmpl")
    )
    return await respond(started, body.stream)


async def start_completion(
    state: ServerState, caller: Caller, body: CompletionRequest, request_id: str
) -> Started:
    """A completion request admitted and in the engine (an HTTP request's or a batch line's)."""
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
    # max_tokens=0 with echo scores the prompt: its logprobs, no completion. The engine runs such a
    # request as prompt-only (max_tokens=0 with prompt_logprobs): prefill, then finish_reason "length".
    scoring = body.max_tokens == 0
    if scoring and not body.echo:
        raise InvalidRequestError(
            "'max_tokens' must be at least 1; 0 is accepted only with 'echo' (to score the prompt)",
            param="max_tokens",
        )
    if scoring and best_of > n:
        raise InvalidRequestError("'best_of' has nothing to rank when 'max_tokens' is 0", param="best_of")
    # Ranking best_of candidates needs their log-probabilities even when the caller wants none.
    engine_logprobs = body.logprobs if body.logprobs is not None else (0 if best_of > n else None)
    names = {"n": "best_of"} if best_of != n else {}
    with params_named(names):
        params = sampling_params(body, max_tokens=body.max_tokens, n=best_of, logprobs=engine_logprobs)
    params.structured = structured_output(body)  # response_format or vLLM's fields, as chat takes them
    if body.echo and (body.logprobs is not None or scoring):
        # The echoed prompt gets real logprobs too; a prompt-only request needs them to be accepted.
        params.prompt_logprobs = body.logprobs or 0
    reply = await start_reply(
        state,
        caller,
        model,
        prompts,
        params,
        body,
        endpoint="completions",
        request_id=request_id,
        param_names=names,
    )
    return Started(
        reply,
        lambda: _completion(reply, model, prompts, n, body),
        lambda: _completion_events(reply, model, prompts, n, body),
    )


def _completion(
    reply: Reply, model: ServedModel, prompts: list[str | list[int]], n: int, body: CompletionRequest
) -> dict:
    choices = []
    for p, out in enumerate(reply.run.latest):
        prompt_text = _prompt_text(model, prompts[p]) if body.echo else ""
        for c in _best(out.outputs, n):
            logprobs = None
            if body.logprobs is not None:
                echoed = out.prompt_token_ids if body.echo else ()
                logprobs = R.CompletionLogprobs(model.token_text).build(
                    c.logprobs or [], echoed, out.prompt_logprobs
                )
            choices.append(R.completion_choice(len(choices), prompt_text + c.text, c.finish_reason, logprobs))
    usage = run_usage(reply.run)
    body_ = R.completion(reply.id, reply.created, model.name, choices, usage, model.system_fingerprint)
    return {**body_, "service_tier": reply.service_tier}


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
    return model.engine.decode(prompt)


async def _completion_events(
    reply: Reply, model: ServedModel, prompts: list[str | list[int]], n: int, body: CompletionRequest
) -> AsyncIterator[str]:
    """Choice index = prompt index * n + sample index, as OpenAI numbers them. With
    stream_options.include_usage every chunk has `usage` (null, or with continuous_usage_stats the usage
    so far over every prompt's latest output sent) and a final chunk carries the settled usage."""
    run, id_, created = reply.run, reply.id, reply.created
    include_usage, continuous_usage = wants_usage_chunk(body), wants_continuous_usage(body)
    num_prompts = len(run.latest)
    finished = [False] * (num_prompts * n)
    echoed = [not body.echo] * (num_prompts * n)
    logprob_builders = [R.CompletionLogprobs(model.token_text) for _ in range(num_prompts * n)]
    usage = {"usage": None} if include_usage else {}
    sent: list[RequestOutput | None] = [None] * num_prompts  # the latest output of each prompt, for usage

    def chunk(index: int, text: str, reason: str | None, logprobs) -> str:
        choices = [R.completion_choice(index, text, reason, logprobs)]
        body_ = R.completion(id_, created, model.name, choices, None, model.system_fingerprint)
        return event({**body_, **usage})

    async for p, out in run.outputs():
        parts = []
        if continuous_usage:
            sent[p] = out
            usage = {"usage": usage_so_far(run, sent)}
        for c in out.outputs:
            index = p * n + c.index
            if finished[index]:
                continue
            prefix, prompt_ids = "", ()
            if not echoed[index]:
                echoed[index] = True
                prefix = _prompt_text(model, prompts[p])
                prompt_ids = out.prompt_token_ids
            text, delta_logprobs, reason = c.delta_text, c.delta_logprobs, c.finish_reason
            has_logprobs = body.logprobs is not None and (delta_logprobs or prompt_ids)
            if not (prefix or text or has_logprobs or reason):
                continue
            logprobs = None
            if body.logprobs is not None:
                logprobs = logprob_builders[index].build(delta_logprobs, prompt_ids, out.prompt_logprobs)
            finished[index] = reason is not None
            parts.append(chunk(index, prefix + text, reason, logprobs))
        if parts:
            yield "".join(parts)
    if include_usage:
        yield event(
            R.completion(id_, created, model.name, [], await reply.settle(), model.system_fingerprint)
        )
