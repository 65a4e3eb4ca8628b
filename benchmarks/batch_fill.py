"""A batch in idle capacity beside interactive traffic, and a priority request under a full flex load.

Starts a real `llmaas serve` (default model SmolLM2-135M-Instruct, --no-auth, SQLite ledger and files in
a temp dir), then, each phase --phase-s seconds:

1. idle: --samples `priority` streaming requests one after another: their TTFT on an idle server;
2. interactive alone: --clients closed-loop clients stream /v1/completions (prompt ~--prompt-words
   words, --max-tokens tokens, ignore_eos): TTFT and TPOT p50 / p99, and their tok/s;
3. interactive + batch: the same clients while a --batch-lines line batch (/v1/completions, --batch-tokens
   tokens each) runs: the interactive TTFT / TPOT again, and the batch's lines and tokens per second
   from what is left of the machine (the batch is cancelled at the end of the phase); then the clients
   alone once more (the machine is shared: the ratios are against the mean of both runs without it);
4. full flex load: --flex-clients back-to-back `flex` requests, and --samples `priority` requests
   measured one after another meanwhile: their TTFT against the idle one.

Prints the ratios against the aims of issue 16 (interactive p99 within 1.2x with the batch running; a
priority request's TTFT under the flex load within 1.2x of idle).

    PYTHONPATH=. .venv/bin/python benchmarks/batch_fill.py [--phase-s 30] [--batch-lines 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

import llmaas
from benchmarks.fairness import cpu_name, free_port, pct
from llmaas.bench.client import RequestRecord, completion_body, stream_completion
from llmaas.bench.server_process import wait_until_ready

MODEL = "smollm2-135m"
AIM = 1.2


class ClosedLoop:
    """`clients` clients, each sending its next request as soon as the last one ended."""

    def __init__(self, client: httpx.AsyncClient, clients: int, body: dict):
        self.client, self.clients, self.body = client, clients, body
        self.records: list[RequestRecord] = []
        self.running = True

    async def _loop(self) -> None:
        while self.running:
            record = await stream_completion(self.client, "/v1/completions", self.body, RequestRecord(0))
            if self.running:
                self.records.append(record)

    def start(self) -> list[asyncio.Task]:
        return [asyncio.create_task(self._loop()) for _ in range(self.clients)]

    async def run_for(self, seconds: float) -> list[RequestRecord]:
        tasks = self.start()
        await asyncio.sleep(seconds)
        self.running = False
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        failed = [r.error for r in self.records if not r.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed, the first: {failed[0]}")
        if not self.records:
            raise RuntimeError(f"no request finished within {seconds} s: make the phase longer")
        return self.records


def latency_line(name: str, records: list[RequestRecord], seconds: float) -> dict:
    ttft = [r.ttft for r in records]
    tpot = [t for r in records if (t := r.tpot()) is not None]
    tokens = sum(r.output_tokens() for r in records)
    row = {
        "requests": len(records),
        "tok_s": tokens / seconds,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "tpot_p50": pct(tpot, 50),
        "tpot_p99": pct(tpot, 99),
    }
    print(
        f"{name:24s} (load {os.getloadavg()[0]:4.1f}) {row['requests']:4d} requests "
        f"{row['tok_s']:6.0f} tok/s   TTFT p50 "
        f"{row['ttft_p50'] * 1000:6.0f} ms p99 {row['ttft_p99'] * 1000:6.0f} ms   TPOT p50 "
        f"{row['tpot_p50'] * 1000:5.1f} ms p99 {row['tpot_p99'] * 1000:5.1f} ms"
    )
    return row


async def priority_ttfts(client: httpx.AsyncClient, body: dict, samples: int) -> list[float]:
    times = []
    for _ in range(samples):
        record = await stream_completion(client, "/v1/completions", body, RequestRecord(0))
        if not record.ok:
            raise RuntimeError(f"a priority request failed: {record.error}")
        times.append(record.ttft)
        await asyncio.sleep(0.2)
    return times


async def start_batch(client: httpx.AsyncClient, lines: int, prompt: str, tokens: int) -> str:
    items = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": f"{i}. {prompt}", "max_tokens": tokens, "ignore_eos": True},
        }
        for i in range(lines)
    ]
    data = "".join(json.dumps(i) + "\n" for i in items).encode()
    r = await client.post("/v1/files", files={"file": ("fill.jsonl", data)}, data={"purpose": "batch"})
    r.raise_for_status()
    body = {"input_file_id": r.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    r = await client.post("/v1/batches", json=body)
    r.raise_for_status()
    return r.json()["id"]


async def batch_done(client: httpx.AsyncClient, batch_id: str) -> int:
    r = await client.get(f"/v1/batches/{batch_id}")
    return r.json()["request_counts"]["completed"]


async def run(args: argparse.Namespace, url: str) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    words = " ".join(f"word{i % 89}" for i in range(args.prompt_words))
    prompt = f"Write a long story about: {words}"
    body = completion_body(MODEL, prompt, args.max_tokens)
    priority = {**completion_body(MODEL, "Name a colour.", 8), "service_tier": "priority"}
    flex = {**body, "service_tier": "flex"}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await priority_ttfts(client, priority, 3)  # warm-up
        idle_priority = await priority_ttfts(client, priority, args.samples)
        print(f"priority TTFT, idle:      p50 {pct(idle_priority, 50) * 1000:6.0f} ms")

        alone = latency_line(
            "interactive alone",
            await ClosedLoop(client, args.clients, body).run_for(args.phase_s),
            args.phase_s,
        )

        batch_id = await start_batch(client, args.batch_lines, prompt, args.batch_tokens)
        await asyncio.sleep(args.ramp_s)
        done_before, t0 = await batch_done(client, batch_id), time.perf_counter()
        loaded = await ClosedLoop(client, args.clients, body).run_for(args.phase_s)
        elapsed = time.perf_counter() - t0
        lines = await batch_done(client, batch_id) - done_before
        await client.post(f"/v1/batches/{batch_id}/cancel")
        with_batch = latency_line("interactive + batch", loaded, args.phase_s)
        print(
            f"batch from idle capacity: {lines / elapsed:.1f} lines/s, "
            f"{lines * args.batch_tokens / elapsed:.0f} completion tok/s ({lines} lines in {elapsed:.0f} s)"
        )
        while (await client.get(f"/v1/batches/{batch_id}")).json()["status"] != "cancelled":
            await asyncio.sleep(0.5)
        # Alone again: the machine is shared, so the batch phase is bracketed by two runs without it.
        again = latency_line(
            "interactive alone again",
            await ClosedLoop(client, args.clients, body).run_for(args.phase_s),
            args.phase_s,
        )

        flood = ClosedLoop(client, args.flex_clients, flex)
        tasks = flood.start()
        await asyncio.sleep(args.ramp_s)
        t0 = time.perf_counter()
        loaded_priority = await priority_ttfts(client, priority, args.samples)
        flex_seconds = time.perf_counter() - t0
        flood.running = False
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        flex_tokens = sum(r.output_tokens() for r in flood.records if r.ok)
        print(
            f"priority TTFT, flex load: p50 {pct(loaded_priority, 50) * 1000:6.0f} ms "
            f"({flex_tokens / flex_seconds:.0f} flex tok/s)"
        )

    for name, a, b in (
        ("interactive TTFT p99", (alone["ttft_p99"] + again["ttft_p99"]) / 2, with_batch["ttft_p99"]),
        ("interactive TPOT p99", (alone["tpot_p99"] + again["tpot_p99"]) / 2, with_batch["tpot_p99"]),
        ("priority TTFT p50 (flex load / idle)", pct(idle_priority, 50), pct(loaded_priority, 50)),
    ):
        ratio = b / a
        print(f"{name}: {ratio:.2f}x (aim <= {AIM}x: {'met' if ratio <= AIM else 'NOT met'})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="interactive closed-loop clients")
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-lines", type=int, default=1000)
    p.add_argument("--batch-tokens", type=int, default=32)
    p.add_argument("--flex-clients", type=int, default=32)
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--phase-s", type=float, default=30.0)
    p.add_argument("--ramp-s", type=float, default=5.0)
    p.add_argument("--serve-arg", action="append", default=[], help="extra `llmaas serve` argument")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="llmaas-batch-fill-"))
    port = free_port()
    cmd = [sys.executable, "-m", "llmaas.cli", "serve", "--port", str(port), "--no-auth"]
    cmd += ["--database-url", f"sqlite:///{tmp / 'billing.sqlite3'}", "--files-dir", str(tmp / "files")]
    cmd += args.serve_arg
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {os.cpu_count()} CPUs")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("server:", " ".join(cmd[1:]), "- code from", Path(llmaas.__file__).parent)
    code_root = Path(llmaas.__file__).parent.parent
    server = subprocess.Popen(
        cmd, cwd=code_root, stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "w")
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(server, url, tmp / "serve.log")
        asyncio.run(run(args, url))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
