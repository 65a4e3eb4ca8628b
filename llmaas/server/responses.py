"""OpenAI response bodies as plain dicts: usage, choices, logprobs, chunks.

Plain dicts and one json.dumps per body/event keep the HTTP layer cheap next to the model.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from llmaas.engine.sequence import TokenLogprob

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop"}  # OpenAI has no "abort"
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a probability that underflowed (and JSON has no -inf)

TokenText = Callable[[int], str]
TokenBytes = Callable[[int], list[int]]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else FINISH_REASONS.get(reason, reason)


def usage(
    prompt_tokens: int, cached_tokens: int, completion_tokens: int, cost_micros: int | None = None
) -> dict[str, Any]:
    """OpenAI's usage object; with billing, `cost` in USD (OpenRouter's field) as a JSON number."""
    body = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    if cost_micros is not None:
        body["cost"] = cost_usd(cost_micros)
    return body


def cost_usd(cost_micros: int) -> float:
    """A usage's `cost` in USD. The 6-decimal string parses to the float whose shortest repr is that
    string: exact on the wire."""
    return float(Decimal(cost_micros) / 1_000_000)


def _lp(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


# -------------------------------------------------------------------- chat
def chat_logprobs(
    entries: Sequence[TokenLogprob], token_text: TokenText, token_bytes: TokenBytes
) -> dict[str, Any]:
    """`bytes` are the token's own bytes: exact even for a token that holds part of a UTF-8 character
    (whose `token` text then reads U+FFFD)."""
    content = []
    for entry in entries:
        content.append(
            {
                "token": token_text(entry.token_id),
                "logprob": _lp(entry.logprob),
                "bytes": token_bytes(entry.token_id),
                "top_logprobs": [
                    {"token": token_text(tid), "logprob": _lp(lp), "bytes": token_bytes(tid)}
                    for tid, lp in entry.top
                ],
            }
        )
    return {"content": content, "refusal": None}


def chat_completion(
    id_: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, Any],
    fingerprint: str | None = None,
) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage_,
    }


def chat_choice(
    index: int,
    text: str | None,
    reason: str | None,
    logprobs: dict[str, Any] | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """With tool calls: `content` is None when the turn is only calls, and a finished turn's
    finish_reason is "tool_calls" (a cut one stays "length")."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    reason = finish_reason(reason)
    if tool_calls:
        message["tool_calls"] = tool_calls
        if reason == "stop":
            reason = "tool_calls"
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}


# ------------------------------------------------------------- completions
class CompletionLogprobs:
    """Legacy completions logprobs ({tokens, token_logprobs, top_logprobs, text_offset}), built
    incrementally so streamed chunks carry running text offsets."""

    def __init__(self, token_text: TokenText, offset: int = 0):
        self.token_text = token_text
        self.offset = offset

    def build(
        self,
        entries: Sequence[TokenLogprob],
        prompt_ids: Sequence[int] = (),
        prompt_entries: Sequence[TokenLogprob | None] | None = None,
    ) -> dict[str, Any]:
        """prompt_ids: the echoed prompt; prompt_entries: the engine's prompt logprobs for it
        (the first token has none, like OpenAI's)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for i, tid in enumerate(prompt_ids):
            entry = prompt_entries[i] if prompt_entries and i < len(prompt_entries) else None
            text = self.token_text(tid)
            tokens.append(text)
            token_logprobs.append(_lp(entry.logprob) if entry else None)
            top = None
            if entry:
                top = {self.token_text(t): _lp(lp) for t, lp in entry.top}
                top.setdefault(text, _lp(entry.logprob))  # the prompt token itself, as for sampled ones
            top_logprobs.append(top)
            text_offset.append(self.offset)
            self.offset += len(text)
        for entry in entries:
            text = self.token_text(entry.token_id)
            tokens.append(text)
            token_logprobs.append(_lp(entry.logprob))
            top = {self.token_text(tid): _lp(lp) for tid, lp in entry.top}
            top.setdefault(text, _lp(entry.logprob))  # the sampled token is always included, like OpenAI
            top_logprobs.append(top)
            text_offset.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }


def completion(
    id_: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, Any] | None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    body = {
        "id": id_,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def completion_choice(
    index: int, text: str, reason: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(reason)}
