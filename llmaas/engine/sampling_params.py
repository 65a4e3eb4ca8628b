"""SamplingParams: how one request wants its tokens chosen. Validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmaas.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_N = 128


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequestError(f"'{name}' must be a finite number, got {value!r}", param=name)


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the context window; 0: prompt only (needs prompt_logprobs)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: no logprobs; k: chosen token + k alternatives
    prompt_logprobs: int | None = None  # k: logprob of every prompt token (after the first) + k alternatives
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the parameter; called by the engine on add_request."""
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            _finite(name, getattr(self, name))
        if self.temperature < 0:
            raise InvalidRequestError("'temperature' must be >= 0", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError("'top_p' must be in (0, 1]", param="top_p")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError("'min_p' must be in [0, 1]", param="min_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError("'top_k' must be a non-negative integer (0 or -1 = off)", param="top_k")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"'n' must be an integer between 1 and {MAX_N}", param="n")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0
        ):
            raise InvalidRequestError("'max_tokens' must be a positive integer", param="max_tokens")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            # A prompt-only request (scoring) exists for its prompt logprobs; without them it does nothing.
            raise InvalidRequestError(
                "'max_tokens' must be a positive integer; 0 is allowed only with 'prompt_logprobs'",
                param="max_tokens",
            )
        if not -2 <= self.presence_penalty <= 2:
            raise InvalidRequestError("'presence_penalty' must be in [-2, 2]", param="presence_penalty")
        if not -2 <= self.frequency_penalty <= 2:
            raise InvalidRequestError("'frequency_penalty' must be in [-2, 2]", param="frequency_penalty")
        if self.repetition_penalty <= 0:
            raise InvalidRequestError("'repetition_penalty' must be > 0", param="repetition_penalty")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequestError("'seed' must be an integer", param="seed")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError(
                f"'stop' must be up to {MAX_STOP_STRINGS} non-empty strings", param="stop"
            )
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequestError(f"'logprobs' must be between 0 and {MAX_LOGPROBS}", param="logprobs")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequestError(
                f"'prompt_logprobs' must be between 0 and {MAX_LOGPROBS}", param="prompt_logprobs"
            )
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or (vocab_size is not None and not 0 <= token < vocab_size):
                raise InvalidRequestError(
                    f"'logit_bias' has an invalid token id {token!r}", param="logit_bias"
                )
            _finite("logit_bias", bias)
            if not -100 <= bias <= 100:
                raise InvalidRequestError("'logit_bias' values must be in [-100, 100]", param="logit_bias")
        for token in self.stop_token_ids:
            if not isinstance(token, int) or (vocab_size is not None and not 0 <= token < vocab_size):
                raise InvalidRequestError(
                    f"'stop_token_ids' has an invalid id {token!r}", param="stop_token_ids"
                )
