"""Prometheus text exposition, written by hand (a few counters and histograms need no dependency)."""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import defaultdict
from collections.abc import Mapping

log = logging.getLogger("llmaas.server")

STATS_TIMEOUT_S = 2.0

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


class Counter:
    def __init__(self, name: str, help_: str):
        self.name, self.help = name, help_
        self.values: dict[Labels, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_fmt_labels(k)} {v:g}" for k, v in sorted(self.values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = defaultdict(float)

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[key] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, counts in sorted(self.counts.items()):
            running = 0
            for bound, count in zip(self.buckets, counts):
                running += count
                lines.append(f"{self.name}_bucket{_fmt_labels(key, (('le', f'{bound:g}'),))} {running}")
            running += counts[-1]
            lines.append(f"{self.name}_bucket{_fmt_labels(key, (('le', '+Inf'),))} {running}")
            lines.append(f"{self.name}_sum{_fmt_labels(key)} {self.sums[key]:.6f}")
            lines.append(f"{self.name}_count{_fmt_labels(key)} {running}")
        return lines


ENGINE_GAUGES = {
    "running": ("llmaas_running_sequences", "sequences being generated"),
    "waiting": ("llmaas_waiting_sequences", "sequences queued for admission"),
    "kv_blocks_used": ("llmaas_kv_blocks_used", "KV-cache blocks in use"),
    "kv_blocks_total": ("llmaas_kv_blocks_total", "KV-cache blocks allocated at start"),
    "prefix_cache_hit_rate": (
        "llmaas_prefix_cache_hit_rate",
        "share of prompt blocks found in the prefix cache",
    ),
    "preemptions": ("llmaas_preemptions_total", "sequences preempted for lack of KV blocks"),
    "embedding_forwards": ("llmaas_embedding_forwards_total", "forward passes of an embedding model"),
    "embedding_inputs": ("llmaas_embedding_inputs_total", "inputs embedded"),
}


async def engine_stats(models: Mapping) -> dict[str, dict]:
    """Each loaded model's `LLMEngine.stats()` (name -> ServedModel); a stuck engine is left out, not waited
    on for more than STATS_TIMEOUT_S."""
    stats = {}
    for name, model in models.items():
        if model.engine is not None:
            try:
                future = model.engine.call(lambda e: e.stats())
                stats[name] = await asyncio.wait_for(asyncio.wrap_future(future), STATS_TIMEOUT_S)
            except Exception:  # a stuck engine must not take /metrics (or the console) down with it
                log.warning("no stats from %s", name)
    return stats


class Metrics:
    def __init__(self) -> None:
        self.http_requests = Counter("llmaas_http_requests_total", "HTTP requests by route and status code")
        self.requests = Counter("llmaas_requests_total", "engine requests by model, endpoint and outcome")
        self.prompt_tokens = Counter("llmaas_prompt_tokens_total", "prompt tokens processed")
        self.cached_tokens = Counter(
            "llmaas_cached_prompt_tokens_total", "prompt tokens served by the prefix cache"
        )
        self.completion_tokens = Counter("llmaas_completion_tokens_total", "completion tokens generated")
        self.ttft = Histogram("llmaas_time_to_first_token_seconds", "time to first token", TTFT_BUCKETS)
        self.tpot = Histogram(
            "llmaas_time_per_output_token_seconds", "time per output token after the first", TPOT_BUCKETS
        )
        self.e2e = Histogram(
            "llmaas_request_duration_seconds", "request time from arrival to end", E2E_BUCKETS
        )

    def render(self, engine_stats: Mapping[str, Mapping[str, float]]) -> str:
        lines: list[str] = []
        for metric in (
            self.http_requests,
            self.requests,
            self.prompt_tokens,
            self.cached_tokens,
            self.completion_tokens,
            self.ttft,
            self.tpot,
            self.e2e,
        ):
            lines += metric.render()
        for key, (name, help_) in ENGINE_GAUGES.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            for model, stats in sorted(engine_stats.items()):
                if key in stats:
                    lines.append(f"{name}{_fmt_labels((('model', model),))} {float(stats[key]):g}")
        lines += _expert_token_lines(engine_stats)
        return "\n".join(lines) + "\n"


def _expert_token_lines(engine_stats: Mapping[str, Mapping]) -> list[str]:
    """MoE load balance: tokens routed to each (layer, expert), from the engines' "expert_tokens"."""
    name = "llmaas_moe_expert_tokens_total"
    lines = [f"# HELP {name} tokens routed to each expert of each MoE layer", f"# TYPE {name} counter"]
    for model, stats in sorted(engine_stats.items()):
        for layer, counts in sorted(stats.get("expert_tokens", {}).items()):
            for expert, count in enumerate(counts):
                labels = (("expert", str(expert)), ("layer", str(layer)), ("model", model))
                lines.append(f"{name}{_fmt_labels(labels)} {count}")
    return lines


class HttpMetricsMiddleware:
    """Counts responses by route template and status code (pure ASGI, so streaming is untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.inc(route=path, status=str(status["code"]))
