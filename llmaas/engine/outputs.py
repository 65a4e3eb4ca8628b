"""What the engine hands back: per request, per sample, both cumulative and as a streaming delta.

A request the engine could not complete (a fault while sampling, stop matching or detokenizing one of
its sequences, or in a forward pass it took part in) ends like any other: with a finished
RequestOutput. That output has `error` set (what went wrong), every choice's finish_reason is
"error", and its token counts are those produced until the fault, so the caller can bill what was
delivered. Its deltas are empty: text of the failing step is not handed out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmaas.engine.sequence import TokenLogprob
from llmaas.errors import LlmaasError


class RequestFailedError(LlmaasError):
    """A request that failed in the engine (its final output had `error`), as a caller raises it."""

    status_code = 500
    error_type = "server_error"
    code = "engine_error"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served by the prefix cache (billed at the cached-input price)
    completion_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when SamplingParams.prompt_logprobs is set
    error: str | None = None  # set on the final output of a request that failed in the engine

    @property
    def text(self) -> str:
        return self.outputs[0].text
