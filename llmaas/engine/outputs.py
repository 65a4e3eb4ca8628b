"""What the engine hands back: per request, per sample, both cumulative and as a streaming delta."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmaas.engine.sequence import TokenLogprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
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

    @property
    def text(self) -> str:
        return self.outputs[0].text
