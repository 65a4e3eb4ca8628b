"""SamplingParams: how one request wants its tokens chosen. Validated before any work starts.

Every field has a bound, checked by `validate` (the engine calls it on add_request; the server asks the
same constants), so nothing a client sends can reach the sampler's tensors out of range:

| field               | bound                                                                     |
|---------------------|---------------------------------------------------------------------------|
| max_tokens          | integer in [1, MAX_TOKENS_LIMIT] (0 only with prompt_logprobs); then the   |
|                     | context window (the engine's resolve_max_tokens)                          |
| temperature         | finite, in [0, MAX_TEMPERATURE]; below GREEDY_TEMPERATURE counts as 0      |
| top_p               | finite, in (0, 1]                                                         |
| top_k               | integer in [-1, MAX_TOP_K]; -1 and 0 are off; k >= vocab is off too       |
| min_p               | finite, in [0, 1]                                                         |
| n                   | integer in [1, MAX_N]                                                     |
| seed                | integer in [-2**63, 2**63 - 1] (int64, as OpenAI)                         |
| stop                | up to MAX_STOP non-empty strings of at most MAX_STOP_LENGTH characters    |
| stop_token_ids      | up to MAX_STOP_TOKEN_IDS token ids in the vocabulary                       |
| presence/frequency  | finite, in [-2, 2]                                                        |
| repetition_penalty  | finite, in [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY]               |
| logit_bias          | up to MAX_LOGIT_BIAS entries (OpenAI's 300); ids in the vocabulary; values |
|                     | finite, in [-100, 100]                                                    |
| logprobs            | integer in [0, MAX_LOGPROBS]                                              |
| prompt_logprobs     | integer in [0, MAX_LOGPROBS]                                              |
| ignore_eos, include_stop_str_in_output, skip_special_tokens | booleans                      |
| structured          | None or a StructuredOutput (its content is checked when it is compiled:   |
|                     | structured.py)                                                            |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmaas.engine.structured import StructuredOutput, check_structured
from llmaas.errors import InvalidRequestError

MAX_STOP = 4  # as OpenAI; the one stop limit (the server's protocol asks this constant)
MAX_STOP_LENGTH = 512  # characters per stop string: the stream holds back up to this much text
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_LOGPROBS = 20
MAX_N = 128
MAX_TOP_K = 2**20  # above any vocabulary; k >= the vocabulary means "off"
MAX_TOKENS_LIMIT = 2**24  # a sane integer; the context window is the real limit
MAX_TEMPERATURE = 100.0
GREEDY_TEMPERATURE = 1e-5  # below this, dividing the logits overflows float32: treated as greedy
MIN_REPETITION_PENALTY = 0.01  # dividing by less overflows the logits to inf (NaN probabilities)
MAX_REPETITION_PENALTY = 100.0
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequestError(f"'{name}' must be a finite number, got {value!r}", param=name)


def _int_in(name: str, value: object, low: int, high: int, what: str = "") -> None:
    if not _is_int(value) or not low <= value <= high:
        raise InvalidRequestError(
            f"'{name}' must be an integer between {low} and {high}{what}, got {_short(value)}", param=name
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_stop(stop: list[str]) -> None:
    """The stop-string rule, shared by the engine (validate) and the server (before tokenizing)."""
    if (
        len(stop) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stop)
        or any(len(s) > MAX_STOP_LENGTH for s in stop)
    ):
        raise InvalidRequestError(
            f"'stop' must be up to {MAX_STOP} non-empty strings of at most {MAX_STOP_LENGTH} characters",
            param="stop",
        )


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
    structured: StructuredOutput | None = None  # the output must match this (constrained decoding)

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
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the parameter; called by the engine on add_request.

        With `vocab_size`, a top_k that keeps the whole vocabulary is normalised to 0 (off): the
        same distribution, without a top-k over the full vocabulary each step.
        """
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            _finite(name, getattr(self, name))
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequestError(
                f"'temperature' must be in [0, {MAX_TEMPERATURE:g}]", param="temperature"
            )
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError("'top_p' must be in (0, 1]", param="top_p")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError("'min_p' must be in [0, 1]", param="min_p")
        _int_in("top_k", self.top_k, -1, MAX_TOP_K, " (-1 or 0 = off)")
        if self.top_k == -1:
            self.top_k = 0
        if vocab_size is not None and self.top_k >= vocab_size:
            self.top_k = 0
        _int_in("n", self.n, 1, MAX_N)
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            # A prompt-only request (scoring) exists for its prompt logprobs; without them it does nothing.
            raise InvalidRequestError(
                "'max_tokens' must be a positive integer; 0 is allowed only with 'prompt_logprobs'",
                param="max_tokens",
            )
        if self.max_tokens is not None:
            low = 0 if self.prompt_logprobs is not None else 1
            _int_in("max_tokens", self.max_tokens, low, MAX_TOKENS_LIMIT)
        if not -2 <= self.presence_penalty <= 2:
            raise InvalidRequestError("'presence_penalty' must be in [-2, 2]", param="presence_penalty")
        if not -2 <= self.frequency_penalty <= 2:
            raise InvalidRequestError("'frequency_penalty' must be in [-2, 2]", param="frequency_penalty")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequestError(
                f"'repetition_penalty' must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]",
                param="repetition_penalty",
            )
        if self.seed is not None:
            _int_in("seed", self.seed, INT64_MIN, INT64_MAX)
        check_stop(self.stop)
        if self.logprobs is not None:
            _int_in("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _int_in("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        if self.structured is not None:
            check_structured(self.structured)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"'{name}' must be a boolean", param=name)
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"'logit_bias' takes at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}",
                param="logit_bias",
            )
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or (vocab_size is not None and not 0 <= token < vocab_size):
                raise InvalidRequestError(
                    f"'logit_bias' has an invalid token id {_short(token)}", param="logit_bias"
                )
            _finite("logit_bias", bias)
            if not -100 <= bias <= 100:
                raise InvalidRequestError("'logit_bias' values must be in [-100, 100]", param="logit_bias")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}",
                param="stop_token_ids",
            )
        for token in self.stop_token_ids:
            if not _is_int(token) or (vocab_size is not None and not 0 <= token < vocab_size):
                raise InvalidRequestError(
                    f"'stop_token_ids' has an invalid id {_short(token)}", param="stop_token_ids"
                )
