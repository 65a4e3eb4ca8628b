"""Load levels: each sends every prompt once, at a fixed concurrency or with Poisson arrivals, and sums up.

A level's clock runs from its first request sent to its last response finished; throughput is tokens
over that span. Token counts come from the server's usage chunk (`stream_options.include_usage`); when a
server reports none, output tokens are counted as streamed text chunks and the level says so.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from llmaas.bench.client import RequestRecord, completion_body, stream_completion
from llmaas.bench.stats import distribution
from llmaas.errors import LlmaasError

MAX_ERROR_SAMPLES = 5


class BenchError(LlmaasError):
    """The run cannot go on: unreachable server, unknown model, bad arguments."""

    status_code = 400
    error_type = "bench_error"


@dataclass
class LevelSpec:
    concurrency: int
    request_rate: float | None = None  # requests/s, Poisson arrivals; None = all at once (capped)


@dataclass
class Target:
    url: str  # base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    model: str
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True
    extra_body: dict | None = None  # server-specific request fields
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/").removesuffix("/v1")
        self.headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def check_levels(concurrency: list[int], request_rate: float | None) -> None:
    if not concurrency:
        raise BenchError("--concurrency needs at least one level, e.g. 1,4,16,32", "concurrency")
    bad = [c for c in concurrency if c <= 0]
    if bad:
        raise BenchError(f"--concurrency levels must be positive whole numbers, got {bad[0]}", "concurrency")
    if request_rate is not None and not request_rate > 0:
        raise BenchError(f"--request-rate must be positive, got {request_rate}", "request_rate")


async def preflight(target: Target) -> list[str]:
    """The server's model ids; raises BenchError when it is unreachable or does not serve the model."""
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(f"{target.url}/v1/models", headers=target.headers)
    except httpx.HTTPError as exc:
        raise BenchError(
            f"cannot reach {target.url} ({type(exc).__name__}: {exc or 'no answer'}); is the server running?",
            "url",
        ) from None
    if response.status_code in (401, 403):
        raise BenchError(
            f"{target.url} refused the API key (HTTP {response.status_code}); pass --api-key", "api_key"
        )
    if response.status_code != 200:
        raise BenchError(f"{target.url}/v1/models answered HTTP {response.status_code}", "url")
    try:
        models = [m["id"] for m in response.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BenchError(f"{target.url}/v1/models did not return an OpenAI model list", "url") from None
    if models and target.model not in models:
        raise BenchError(
            f"{target.url} does not serve model {target.model!r}; it serves: {', '.join(models)}", "model"
        )
    return models


def arrival_offsets(n: int, request_rate: float | None, seed: int = 0) -> list[float]:
    """Seconds after the level starts at which each request arrives: 0 for all, or a Poisson process."""
    if request_rate is None:
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out


async def run_requests(
    target: Target,
    prompts: list[str],
    output_len: int,
    level: LevelSpec,
    on_done: Callable[[RequestRecord], None] | None = None,
    seed: int = 0,
) -> tuple[list[RequestRecord], float, float]:
    """Send every prompt once under `level`; returns the records and the level's start and end times."""
    url = f"{target.url}/v1/completions"
    gate = asyncio.Semaphore(level.concurrency)
    offsets = arrival_offsets(len(prompts), level.request_rate, seed)
    limits = httpx.Limits(max_connections=level.concurrency + 4, max_keepalive_connections=level.concurrency)
    timeout = httpx.Timeout(target.timeout_s, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(i: int, prompt: str) -> RequestRecord:
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                body = completion_body(target.model, prompt, output_len, target.ignore_eos, target.extra_body)
                record = await stream_completion(client, url, body, RequestRecord(i), target.headers)
            if on_done is not None:
                on_done(record)
            return record

        records = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    starts = [r.start for r in records if r.start]
    ends = [r.end for r in records if r.end is not None] or [time.perf_counter()]
    return list(records), min(starts, default=t0), max(ends)


def summarize_level(
    level: LevelSpec, records: list[RequestRecord], start: float, end: float, prompt_lengths: list[int]
) -> dict:
    """The level's numbers: throughput, latency distributions (seconds), errors, token-count source."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    duration = max(end - start, 1e-9)
    reported = [r for r in ok if r.completion_tokens is not None]
    if ok and len(reported) == len(ok):
        token_source = "server usage"
    elif reported:
        token_source = (
            f"server usage for {len(reported)} of {len(ok)} requests, the rest counted as text chunks"
        )
    else:
        token_source = "counted as streamed text chunks (the server reported no usage)"
    output_tokens = sum(r.output_tokens() for r in ok)
    input_tokens = sum(
        r.prompt_tokens if r.prompt_tokens is not None else prompt_lengths[r.index] for r in ok
    )
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    itls = [gap for r in ok for gap in r.itls()]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error or "unfinished"] = errors.get(r.error or "unfinished", 0) + 1
    return {
        "concurrency": level.concurrency,
        "request_rate": level.request_rate,
        "num_requests": len(records),
        "completed": len(ok),
        "errors": len(failed),
        "error_samples": dict(list(errors.items())[:MAX_ERROR_SAMPLES]),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_tokens": sum(cached) if cached else None,
        "output_tok_per_s": output_tokens / duration,
        "total_tok_per_s": (input_tokens + output_tokens) / duration,
        "token_counts": token_source,
        "ttft_s": distribution([r.ttft for r in ok]),
        "tpot_s": distribution([t for r in ok if (t := r.tpot()) is not None]),
        "itl_s": distribution(itls),
        "e2e_s": distribution([r.e2e for r in ok]),
        # For the cost model: request-seconds before the first token (prefill and queueing) and in all.
        "ttft_sum_s": sum(r.ttft for r in ok),
        "e2e_sum_s": sum(r.e2e for r in ok),
        "load_avg": list(os.getloadavg()),
    }


def _level_failed_to_connect(records: list[RequestRecord]) -> bool:
    """Every request of the level failed before the server answered (it is down, not merely erring)."""
    return bool(records) and all(
        r.error is not None
        and ("Connect" in r.error or "RemoteProtocol" in r.error or "ReadError" in r.error)
        for r in records
    )


async def run_levels(
    target: Target,
    prompts_per_level: list[list[str]],
    prompt_lengths: list[list[int]],
    levels: list[LevelSpec],
    output_len: int,
    on_level: Callable[[dict], None],
    warmup_prompts: list[str] = (),
    progress: bool = True,
    seed: int = 0,
) -> str | None:
    """Preflight, warm-up, then each level in turn; `on_level` gets each level's summary as it ends.

    Returns None, or why the run stopped early (the server went away). Raises BenchError before any
    level when the server is unreachable or does not serve the model.
    """
    from tqdm import tqdm

    await preflight(target)
    if warmup_prompts:
        await run_requests(target, list(warmup_prompts), min(output_len, 8), LevelSpec(1))
    for level, prompts, lengths in zip(levels, prompts_per_level, prompt_lengths):
        rate = "" if level.request_rate is None else f" @{level.request_rate:g} req/s"
        bar = tqdm(
            total=len(prompts),
            desc=f"concurrency {level.concurrency}{rate}",
            unit="req",
            disable=not progress,
            leave=True,
        )

        def done(record: RequestRecord, bar=bar) -> None:
            bar.update(1)
            if not record.ok:
                bar.set_postfix_str("errors!", refresh=False)

        try:
            records, start, end = await run_requests(target, prompts, output_len, level, done, seed)
        finally:
            bar.close()
        on_level(summarize_level(level, records, start, end, lengths))
        if _level_failed_to_connect(records):
            return f"every request at concurrency {level.concurrency} failed to reach the server; stopped"
    return None
