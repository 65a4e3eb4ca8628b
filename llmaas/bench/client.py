"""One streaming completion over HTTP, timed token by token.

Speaks the OpenAI protocol that ours, vLLM's and llama.cpp's servers share: POST /v1/completions with
`stream: true` and `stream_options: {"include_usage": true}`, so the server reports the token counts in a
last chunk. `ignore_eos: true` (an extension those servers accept) makes every request produce exactly
`max_tokens` tokens, so runs compare like with like. Sampling is greedy (`temperature: 0`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestRecord:
    """What one request did. Times are time.perf_counter() seconds."""

    index: int
    start: float = 0.0
    first_token: float | None = None
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks carrying text
    text: str = ""
    prompt_tokens: int | None = None  # as the server reported them (usage), None when it did not
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    def output_tokens(self) -> int:
        """Server-reported completion tokens, else the number of text chunks (one token each, usually)."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)

    def itls(self) -> list[float]:
        """Gaps between successive text chunks."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    def tpot(self) -> float | None:
        """Time per output token after the first: (end - first token) / (output tokens - 1)."""
        n = self.output_tokens()
        if self.first_token is None or self.end is None or n < 2:
            return None
        return (self.end - self.first_token) / (n - 1)


def completion_body(
    model: str, prompt: str, max_tokens: int, ignore_eos: bool = True, extra: dict | None = None
) -> dict:
    """The request body; `extra` adds server-specific fields (e.g. transformers' generation_config)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return {**body, **(extra or {})}


def _error_text(status: int, raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error")
        message = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        message = raw[:200].decode("utf-8", "replace").strip()
    return f"HTTP {status}: {message}"


async def stream_completion(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    record: RequestRecord,
    headers: dict[str, str] | None = None,
) -> RequestRecord:
    """Send one streaming completion and fill `record`; errors are recorded, never raised."""
    record.start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                record.error = _error_text(response.status_code, await response.aread())
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:  # an error reported inside the stream
                    err = chunk["error"]
                    record.error = f"stream error: {err.get('message') if isinstance(err, dict) else err}"
                    return record
                text = "".join((c.get("text") or "") for c in chunk.get("choices") or [])
                if text:
                    if record.first_token is None:
                        record.first_token = now
                    record.chunk_times.append(now)
                    record.text += text
                usage = chunk.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens")
                    record.completion_tokens = usage.get("completion_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    record.cached_tokens = details.get("cached_tokens")
        record.end = time.perf_counter()
        if record.first_token is None:
            record.error = "the stream ended without any text"
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except ValueError as exc:
        record.error = f"bad stream chunk: {exc}"
    return record
