"""What the HTTP layer costs next to the model: the engine in-process against the same over loopback HTTP.

Issue 3's targets, for SmolLM2-135M in the engine's default dtype on this machine, measured in one run:

1. max_tokens=1 latency, p50 over sequential requests of short distinct prompts: the HTTP p50 minus the
   engine's p50 must be under 2 ms.
2. Streaming inter-token latency, p50 of the gaps between successive outputs of one request (128 new
   tokens, greedy, ignore_eos): HTTP (gaps between SSE events) within 10% of the engine's.
3. Aggregate output tok/s of 32 concurrent requests (distinct 128-token prompts, 128 new tokens each,
   submitted together): HTTP within 10% of the engine's (AsyncEngine's, and the offline step loop's).

Engine side: `AsyncEngine(LLMEngine(...)).generate(...)` in this process, plus for reference the bare
`LLMEngine.step()` loop. This process's main thread never runs torch (see `in_thread`: an OpenMP pool
left on another live thread slows the engine thread down, which would be charged to the engine).

HTTP side, once the in-process engine is gone (2 cores: never both at once), one phase per server:
- `app`: the HTTP layer alone, `create_app` as `llmaas serve` builds it but without billing (this
  script re-run with a hidden `--serve-app`): what issue 3's targets are about;
- `serve`: the real `llmaas serve --model smollm2-135m --host 127.0.0.1 --port <free>`, with billing on
  where the command has it (`--no-auth`, a throw-away SQLite ledger in a scratch directory).
Each is driven with httpx (HTTP/1.1 keep-alive; `/v1/completions` with prompt token ids,
`temperature: 0`, `ignore_eos: true`; SSE for streaming) and, for max_tokens=1, also the openai SDK.
Phases alternate (engine, app, serve, engine, ...) to spread machine noise; each starts cold (new
engine or server, empty prefix cache), warms up on other prompts, then measures. Tables show the median
over rounds, each round's value and the best rounds'. The client shares the 2 cores with the server, so
HTTP figures include the client. The script stops the servers it starts (also on Ctrl-C, SIGTERM, error).

Run it on a quiet machine (`uptime`: 1-minute load well under 1 before starting):

    .venv/bin/python benchmarks/http_overhead.py --quick        # smoke run, about 1.5 minutes
    .venv/bin/python benchmarks/http_overhead.py                # full run (3 rounds), about 9 minutes
    .venv/bin/python benchmarks/http_overhead.py --servers app --rounds 5 --out /tmp/http_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import torch

from llmaas.cpu_info import cpu_model
from llmaas.engine.async_engine import AsyncEngine
from llmaas.engine.dtype_choice import resolve_dtype_name
from llmaas.engine.llm_engine import EngineConfig, LLMEngine
from llmaas.engine.sampling_params import SamplingParams
from llmaas.models.catalog import resolve_model_dir
from llmaas.models.tokenizer import Tokenizer

MODEL = "smollm2-135m"
DTYPE = resolve_dtype_name("auto")  # bf16 where the CPU computes in it, else fp32
HOST = "127.0.0.1"
SERVER_START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0

# Original prose for prompts (no download); prompts are token slices of it behind a unique tag.
TEXT = """\
The river ferry crossed twice an hour, and the ferryman knew every passenger by the way they stood on
the deck. Farmers leaned on the rail and watched the current; clerks from the city checked their
watches as if that would hurry the engine; children ran to the bow to feel the spray. In spring the
water rose brown and fast with snowmelt from the hills, and the ferry had to aim well upstream of the
landing and let the river carry it down. In late summer the water was slow and clear enough to see the
stones on the bottom, and the crossing took half the time. The ferryman kept a notebook of the river's
height every morning, a habit from his teacher, who had kept one for thirty years before him. When the
town council proposed a bridge, the notebooks were the first thing the engineers asked to see, and they
spent a week copying numbers into their own ledgers before they would say anything at all about where
the bridge should stand or how high its arches would have to be to survive the worst floods recorded.
"""

T = TypeVar("T")
_loads: list[float] = []  # 1-minute load average, sampled at every progress line


# ----------------------------------------------------------------------------------------- machine
def llmaas_source() -> str:
    """Where llmaas is imported from, with its git commit (and '+dirty') when that is a checkout."""
    import llmaas

    root = Path(llmaas.__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "llmaas"], capture_output=True, text=True
        )
        return f"{root} @ {commit.stdout.strip()}{'+dirty' if dirty.stdout.strip() else ''}"
    except (OSError, subprocess.CalledProcessError):
        return str(root)


def machine_info(argv: list[str]) -> dict:
    import fastapi
    import openai
    import uvicorn

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "versions": {
            "fastapi": fastapi.__version__,
            "uvicorn": uvicorn.__version__,
            "httpx": httpx.__version__,
            "openai": openai.__version__,
        },
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *argv]),
        "llmaas": llmaas_source(),
        "load_avg_start": list(os.getloadavg()),
    }


def progress(message: str) -> None:
    """To stderr, with the 1-minute load average: ours is ~2 on 2 cores; more means someone else runs."""
    load = os.getloadavg()[0]
    _loads.append(load)
    print(f"[{time.strftime('%H:%M:%S')} load {load:.2f}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- prompts
@dataclass
class Prompts:
    """Token-id prompts, the same in every phase; warm-up prompts never share a block with measured ones."""

    one_token: list[list[int]]
    stream: list[list[int]]
    batch: list[list[int]]
    batch2: list[list[int]]  # engine: the offline step loop; HTTP: the streaming clients
    warm_one_token: list[list[int]]
    warm_stream: list[int]
    warm_batch: list[list[int]]


def make_prompts(args: argparse.Namespace) -> Prompts:
    tokenizer = Tokenizer.from_dir(resolve_model_dir(MODEL))
    text = tokenizer.encode(TEXT, add_special_tokens=False)
    tags = iter(range(1_000_000))

    def fresh(length: int, offset: int) -> list[int]:
        tag = tokenizer.encode(f"Note {next(tags)}.\n", add_special_tokens=False)
        body = [text[(offset + i) % len(text)] for i in range(length)]
        return (tag + body)[:length]

    c, p = args.concurrency, args.prompt_tokens
    return Prompts(
        one_token=[fresh(args.short_prompt_tokens, 7 * i) for i in range(args.one_token_requests)],
        stream=[fresh(16, 31 * i) for i in range(args.streams)],
        batch=[fresh(p, 53 * i) for i in range(c)],
        batch2=[fresh(p, 61 * i) for i in range(c)],
        warm_one_token=[fresh(args.short_prompt_tokens, 11 * i) for i in range(3)],
        warm_stream=fresh(16, 5),
        warm_batch=[fresh(p, 59 * i) for i in range(c)],
    )


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# ------------------------------------------------------------------------------------ engine side
async def engine_one_token(aeng: AsyncEngine, prompts: list[list[int]]) -> list[float]:
    """Seconds per request, from generate() to its finished output; one request at a time."""
    seconds = []
    for prompt in prompts:
        t0 = time.perf_counter()
        out = [o async for o in aeng.generate(prompt, greedy(1))][-1]
        seconds.append(time.perf_counter() - t0)
        assert out.finished and out.completion_tokens == 1
    return seconds


def sync_one_token(engine: LLMEngine, prompts: list[list[int]]) -> list[float]:
    """The same through the bare `add_request` + `step()` loop: the engine's own time, no thread hop."""
    seconds = []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        engine.add_request(f"sync-{i}-{t0}", prompt, greedy(1))
        while engine.has_unfinished_requests():
            engine.step()
        seconds.append(time.perf_counter() - t0)
    return seconds


async def engine_stream(aeng: AsyncEngine, prompt: list[int], n: int) -> dict:
    """Arrival time of every output of one request: time to first token and the gaps after it."""
    t0 = time.perf_counter()
    times = []
    async for out in aeng.generate(prompt, greedy(n)):
        if out.outputs[0].delta_token_ids:
            times.append(time.perf_counter())
    assert out.completion_tokens == n
    return {"ttft_s": times[0] - t0, "gaps_s": gaps(times), "tokens": n, "span_s": times[-1] - times[0]}


async def engine_concurrent(aeng: AsyncEngine, batch: list[list[int]], n: int) -> dict:
    async def one(prompt: list[int]):
        return [o async for o in aeng.generate(prompt, greedy(n))][-1]

    t0 = time.perf_counter()
    outs = await asyncio.gather(*(one(p) for p in batch))
    seconds = time.perf_counter() - t0
    return concurrent_result(seconds, [(o.completion_tokens, o.cached_tokens) for o in outs])


def sync_concurrent(engine: LLMEngine, batch: list[list[int]], n: int) -> dict:
    """Offline: all requests added, then `step()` until done, in this thread."""
    t0 = time.perf_counter()
    for i, prompt in enumerate(batch):
        engine.add_request(f"offline-{i}-{t0}", prompt, greedy(n))
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    seconds = time.perf_counter() - t0
    return concurrent_result(seconds, [(o.completion_tokens, o.cached_tokens) for o in finished])


def concurrent_result(seconds: float, counts: list[tuple[int, int]]) -> dict:
    tokens = sum(c for c, _ in counts)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tok_per_s": tokens / seconds,
        "cached": sum(k for _, k in counts),
    }


async def engine_measure(aeng: AsyncEngine, prompts: Prompts, args: argparse.Namespace) -> dict:
    progress("  engine: warm-up")
    await engine_one_token(aeng, prompts.warm_one_token)
    await engine_stream(aeng, prompts.warm_stream, 8)
    await engine_concurrent(aeng, prompts.warm_batch, 8)
    progress(f"  engine: {len(prompts.one_token)} x max_tokens=1")
    result = {"one_token_s": await engine_one_token(aeng, prompts.one_token)}
    progress(f"  engine: {len(prompts.stream)} stream(s) of {args.new_tokens} tokens")
    result["streams"] = [await engine_stream(aeng, p, args.new_tokens) for p in prompts.stream]
    progress(f"  engine: {args.concurrency} concurrent requests")
    result["concurrent"] = await engine_concurrent(aeng, prompts.batch, args.new_tokens)
    return result


def in_thread(fn: Callable[..., T], *args) -> T:
    """Run fn in a thread that ends with it, so this thread never runs torch.

    torch's OpenMP (libgomp) gives each thread that runs parallel ops its own worker pool, kept while
    that thread lives. With more OpenMP threads alive than cores, idle workers stop spinning and every
    op pays a futex wake-up: had this thread loaded the model, the AsyncEngine loop thread would decode
    ~25% slower at batch 1. The engine's own time is measured without that handicap.
    """
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="bench-torch", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_engine_phase(prompts: Prompts, args: argparse.Namespace) -> dict:
    progress("engine phase: loading the model in-process")
    aeng = AsyncEngine.from_config(EngineConfig(model=MODEL, dtype=DTYPE))  # built on its loop thread
    try:
        result = asyncio.run(engine_measure(aeng, prompts, args))
    finally:
        aeng.shutdown()
    engine = aeng.engine
    # The loop thread is gone: the bare engine is ours now. Reference figures without the thread hop.
    progress(f"  engine (sync step loop): {len(prompts.one_token)} x max_tokens=1")
    result["sync_one_token_s"] = in_thread(sync_one_token, engine, prompts.one_token)
    if args.offline:
        progress(f"  engine (sync step loop): {args.concurrency} concurrent requests, offline")
        result["sync_concurrent"] = in_thread(sync_concurrent, engine, prompts.batch2, args.new_tokens)
    del aeng, engine
    gc.collect()
    return result


# -------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


SERVER_KINDS = {
    "app": "HTTP layer (the app `llmaas serve` builds, without billing)",
    "serve": "`llmaas serve` (billing on: --no-auth, a throw-away SQLite ledger)",
}


def server_command(kind: str, port: int, workdir: Path) -> list[str]:
    """`app`: this script re-run as a server of `create_app` alone, i.e. issue 3's HTTP layer.
    `serve`: the real `llmaas serve`; where it bills (it has --no-auth), every request is billed to the
    `default` account of a SQLite ledger in the scratch directory, never the operator's."""
    if kind == "app":
        return [sys.executable, str(Path(__file__).resolve()), "--serve-app", "--port", str(port)]
    llmaas = str(Path(sys.executable).with_name("llmaas"))
    cmd = [llmaas, "serve", "--model", MODEL, "--dtype", DTYPE, "--host", HOST, "--port", str(port)]
    cmd += ["--log-level", "warning"]
    if "--no-auth" in subprocess.run([llmaas, "serve", "--help"], capture_output=True, text=True).stdout:
        cmd += ["--no-auth", "--database-url", f"sqlite:///{workdir / f'billing-{port}.db'}"]
    return cmd


def serve_app(port: int) -> None:
    """The server of `--server app`: `create_app` as `llmaas serve` calls it, minus billing."""
    import uvicorn

    from llmaas.server.app import create_app

    def load(name: str) -> AsyncEngine:
        return AsyncEngine.from_config(EngineConfig(model=MODEL, dtype=DTYPE))

    app = create_app(load=load, model_names=[MODEL])
    # As `llmaas serve` does: uvicorn drains on SIGTERM, then re-raises it to these no-ops (exit 0).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


def start_server(kind: str, port: int, workdir: Path, log_path: Path) -> subprocess.Popen:
    cmd = server_command(kind, port, workdir)
    progress(f"HTTP phase, {kind}: starting `{shlex.join(cmd)}`")
    with open(log_path, "wb") as log:
        # Its own session: a Ctrl-C here reaches only us, and we stop the server ourselves.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < SERVER_START_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    waited = f"{SERVER_START_TIMEOUT_S:.0f}s"
    raise RuntimeError(f"the server was not healthy after {waited}:\n{log_tail(log_path)}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (graceful), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------ HTTP side
def completion_body(prompt: list[int], max_tokens: int, stream: bool = False) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def http_one_token(client: httpx.AsyncClient, prompts: list[list[int]]) -> list[float]:
    seconds = []
    for prompt in prompts:
        t0 = time.perf_counter()
        r = await client.post("/v1/completions", json=completion_body(prompt, 1))
        r.raise_for_status()
        usage = r.json()["usage"]
        seconds.append(time.perf_counter() - t0)
        assert usage["completion_tokens"] == 1
    return seconds


async def http_floor(client: httpx.AsyncClient, n: int) -> list[float]:
    """GET /v1/models round trips: what any request pays before the model is involved."""
    seconds = []
    for _ in range(n):
        t0 = time.perf_counter()
        (await client.get("/v1/models")).raise_for_status()
        seconds.append(time.perf_counter() - t0)
    return seconds


async def openai_one_token(url: str, prompts: list[list[int]]) -> list[float]:
    """The same through the official SDK (its pydantic parsing is part of what a client pays)."""
    import openai

    seconds = []
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0) as client:
        for prompt in prompts:
            t0 = time.perf_counter()
            out = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=1, temperature=0, extra_body={"ignore_eos": True}
            )
            seconds.append(time.perf_counter() - t0)
            assert out.usage.completion_tokens == 1
    return seconds


async def sse_events(client: httpx.AsyncClient, body: dict):
    """Yield (arrival time, parsed chunk) for each SSE data event before [DONE]."""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            data = line[len("data: ") :]
            if data == "[DONE]":
                return
            yield now, json.loads(data)


async def http_stream(client: httpx.AsyncClient, prompt: list[int], n: int) -> dict:
    """Arrival time of every SSE event that carries a choice; the usage chunk gives the token count."""
    t0 = time.perf_counter()
    times, usage = [], None
    async for now, chunk in sse_events(client, completion_body(prompt, n, stream=True)):
        if chunk["choices"]:
            times.append(now)
        if chunk.get("usage"):
            usage = chunk["usage"]
    assert usage and usage["completion_tokens"] == n
    return {"ttft_s": times[0] - t0, "gaps_s": gaps(times), "tokens": n, "span_s": times[-1] - times[0]}


async def http_concurrent(client: httpx.AsyncClient, batch: list[list[int]], n: int, stream: bool) -> dict:
    async def plain(prompt: list[int]) -> dict:
        r = await client.post("/v1/completions", json=completion_body(prompt, n))
        r.raise_for_status()
        return r.json()["usage"]

    async def streamed(prompt: list[int]) -> dict:
        usage = None
        async for _, chunk in sse_events(client, completion_body(prompt, n, stream=True)):
            usage = chunk.get("usage") or usage
        return usage

    one = streamed if stream else plain
    t0 = time.perf_counter()
    usages = await asyncio.gather(*(one(p) for p in batch))
    seconds = time.perf_counter() - t0
    counts = [(u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"]) for u in usages]
    return concurrent_result(seconds, counts)


def http_client(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits, http1=True, http2=False)


async def http_measure(url: str, prompts: Prompts, args: argparse.Namespace) -> dict:
    async with http_client(url, args.concurrency) as client:
        progress("  HTTP: warm-up")
        await http_one_token(client, prompts.warm_one_token)
        await openai_one_token(url, prompts.warm_one_token[:1])
        await http_stream(client, prompts.warm_stream, 8)
        await http_concurrent(client, prompts.warm_batch, 8, stream=False)
        await http_floor(client, 5)
        progress(f"  HTTP: {len(prompts.one_token)} x max_tokens=1 (httpx, then openai SDK)")
        result = {"floor_s": await http_floor(client, len(prompts.one_token))}
        result["one_token_s"] = await http_one_token(client, prompts.one_token)
        result["openai_one_token_s"] = await openai_one_token(url, prompts.one_token)
        progress(f"  HTTP: {len(prompts.stream)} SSE stream(s) of {args.new_tokens} tokens")
        result["streams"] = [await http_stream(client, p, args.new_tokens) for p in prompts.stream]
        progress(f"  HTTP: {args.concurrency} concurrent clients, non-streaming")
        result["concurrent"] = await http_concurrent(client, prompts.batch, args.new_tokens, stream=False)
        if args.concurrent_streaming:
            progress(f"  HTTP: {args.concurrency} concurrent clients, streaming")
            batch = prompts.batch2
            result["concurrent_stream"] = await http_concurrent(client, batch, args.new_tokens, stream=True)
    return result


def run_http_phase(kind: str, prompts: Prompts, args: argparse.Namespace, workdir: Path) -> dict:
    port = free_port()
    url = f"http://{HOST}:{port}"
    log_path = workdir / f"server-{kind}-{port}.log"
    proc = start_server(kind, port, workdir, log_path)
    try:
        startup = wait_healthy(url, proc, log_path)
        progress(f"  server healthy after {startup:.1f}s")
        result = asyncio.run(http_measure(url, prompts, args))
        result["startup_s"] = startup
        return result
    finally:
        stop_server(proc)
        progress(f"  server stopped (exit {proc.returncode})")


# ----------------------------------------------------------------------------------------- summary
def ms(seconds: float) -> float:
    return 1000.0 * seconds


def stream_figures(streams: list[dict]) -> dict:
    """Gaps of all streams pooled for the p50; the mean is span / (tokens - 1), immune to merged events."""
    pooled = [g for s in streams for g in s["gaps_s"]]
    span = sum(s["span_s"] for s in streams)
    return {
        "itl_p50_ms": ms(statistics.median(pooled)),
        "itl_mean_ms": ms(span / sum(s["tokens"] - 1 for s in streams)),
        "ttft_ms": ms(statistics.median(s["ttft_s"] for s in streams)),
    }


def phase_figures(result: dict) -> dict:
    """One phase's raw timings -> the figures the tables compare (keys shared by both sides)."""
    figures = {"one_token_ms": ms(statistics.median(result["one_token_s"]))}
    figures |= stream_figures(result["streams"])
    figures["tok_s"] = result["concurrent"]["tok_per_s"]
    optional = {
        "floor_ms": ("floor_s", lambda r: ms(statistics.median(r))),
        "sync_one_token_ms": ("sync_one_token_s", lambda r: ms(statistics.median(r))),
        "openai_one_token_ms": ("openai_one_token_s", lambda r: ms(statistics.median(r))),
        "offline_tok_s": ("sync_concurrent", lambda r: r["tok_per_s"]),
        "stream_tok_s": ("concurrent_stream", lambda r: r["tok_per_s"]),
    }
    for name, (key, fn) in optional.items():
        if key in result:
            figures[name] = fn(result[key])
    return figures


@dataclass
class Row:
    label: str
    left_key: str  # the reference: an engine figure
    right_key: str  # what is compared with it
    kind: str  # "diff": right - left (ms); "slower": right / left (time); "faster": right / left (rate)
    target: float | None = None  # None: for information


def http_rows(args: argparse.Namespace) -> list[Row]:
    c, p, n = args.concurrency, args.prompt_tokens, args.new_tokens
    both = f"{c} concurrent, {p}+{n} tokens each: output tok/s"
    return [
        Row("max_tokens=1 latency p50 (ms), httpx", "one_token_ms", "one_token_ms", "diff", 2.0),
        Row("max_tokens=1 latency p50 (ms), openai SDK", "one_token_ms", "openai_one_token_ms", "diff"),
        Row(f"Streaming inter-token latency p50 (ms), {n} tokens", "itl_p50_ms", "itl_p50_ms", "slower", 1.1),
        Row("Streaming inter-token latency mean (ms)", "itl_mean_ms", "itl_mean_ms", "slower"),
        Row("Streaming time to first token (ms)", "ttft_ms", "ttft_ms", "diff"),
        Row(f"{both}, non-streaming clients", "tok_s", "tok_s", "faster", 0.90),
        Row(f"{both}, streaming clients", "tok_s", "stream_tok_s", "faster", 0.90),
        Row(f"{both}, non-streaming vs offline step loop", "offline_tok_s", "tok_s", "faster", 0.90),
    ]


def engine_rows(args: argparse.Namespace) -> list[Row]:
    """The engine against itself: what the AsyncEngine thread hand-off costs (left: bare step loop)."""
    c, p, n = args.concurrency, args.prompt_tokens, args.new_tokens
    return [
        Row("max_tokens=1 latency p50 (ms)", "sync_one_token_ms", "one_token_ms", "diff"),
        Row(f"{c} concurrent, {p}+{n} tokens each: output tok/s", "offline_tok_s", "tok_s", "faster"),
    ]


def compare(row: Row, left: float, right: float) -> float:
    return right - left if row.kind == "diff" else right / left


def holds(row: Row, value: float) -> str:
    if row.target is None:
        return "(info)"
    ok = {"diff": value < row.target, "slower": value <= row.target, "faster": value >= row.target}[row.kind]
    return "met" if ok else "**NOT met**"


def target_text(row: Row) -> str:
    if row.target is None:
        return ""
    sign = {"diff": "<", "slower": "<=", "faster": ">="}[row.kind]
    return f"{sign} {row.target:g} ms" if row.kind == "diff" else f"{sign} {row.target:.2f}x"


def summarise(rows: list[Row], pairs_of: Callable[[Row], list[tuple[float, float]]]) -> list[dict]:
    """Per row: the median over rounds of each side, their difference or ratio, per-round values, and
    the same from each side's best round (robust to a neighbour's burst of load in some rounds)."""
    out = []
    for row in rows:
        pairs = pairs_of(row)
        if not pairs:
            continue
        left = statistics.median(a for a, _ in pairs)
        right = statistics.median(b for _, b in pairs)
        value = compare(row, left, right)
        best = max if row.kind == "faster" else min  # ms: lower is better; tok/s: higher
        value_best = compare(row, best(a for a, _ in pairs), best(b for _, b in pairs))
        out.append(
            {
                "measure": row.label,
                "kind": row.kind,
                "left": left,
                "right": right,
                "value": value,
                "per_round": [compare(row, a, b) for a, b in pairs],
                "best_rounds": value_best,
                "target": target_text(row),
                "holds": holds(row, value),
                "holds_best_rounds": holds(row, value_best),
            }
        )
    return out


def pairs_from(rounds: list[dict], right: Callable[[dict], dict]) -> Callable[[Row], list]:
    """(engine figure, right-side figure) per round, for rounds that have both."""

    def pairs_of(row: Row) -> list[tuple[float, float]]:
        return [
            (r["engine_figures"][row.left_key], right(r)[row.right_key])
            for r in rounds
            if row.left_key in r["engine_figures"] and row.right_key in right(r)
        ]

    return pairs_of


def summaries(rounds: list[dict], args: argparse.Namespace) -> dict:
    out = {
        kind: summarise(http_rows(args), pairs_from(rounds, lambda r, kind=kind: r["http_figures"][kind]))
        for kind in args.servers
    }
    out["engine"] = summarise(engine_rows(args), pairs_from(rounds, lambda r: r["engine_figures"]))
    return out


def fmt_value(kind: str, value: float) -> str:
    return f"{value:+.2f} ms" if kind == "diff" else f"{value:.3f}x"


def markdown(summary: list[dict], left: str, right: str) -> str:
    header = ("Measure", left, right, f"{right} - {left} or {right} / {left}", "Per round", "Best rounds")
    header += ("Target", "Holds")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for s in summary:
        verdict = s["holds"]
        if s["holds_best_rounds"] != verdict:
            verdict += f" (best rounds: {s['holds_best_rounds']})"
        per_round = ", ".join(fmt_value(s["kind"], v) for v in s["per_round"])
        cells = (s["measure"], f"{s['left']:.2f}", f"{s['right']:.2f}", fmt_value(s["kind"], s["value"]))
        cells += (per_round, fmt_value(s["kind"], s["best_rounds"]), s["target"], verdict)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floor_line(rounds: list[dict], servers: list[str]) -> str:
    parts = []
    for kind in servers:
        floors = [
            r["http_figures"][kind]["floor_ms"] for r in rounds if "floor_ms" in r["http_figures"][kind]
        ]
        if floors:
            parts.append(f"{kind} {statistics.median(floors):.2f} ms")
    return "- HTTP round-trip floor, GET /v1/models p50 (httpx, keep-alive): " + ", ".join(parts)


def report(results: dict, args: argparse.Namespace) -> str:
    m = results["machine"]
    load = m["load_avg_during"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        f"## HTTP overhead — {MODEL}, {DTYPE}: the engine in-process vs the same over loopback HTTP",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}; "
        f"torch {m['torch']}, {versions}, Python {m['python']}",
        f"- date: {m['date']}; 1-min load average at start {m['load_avg_start'][0]:.2f}, "
        f"during the run min {load['min']:.2f} / median {load['median']:.2f} / max {load['max']:.2f} "
        f"(this benchmark alone keeps ~2 cores busy), at end {m['load_avg_end'][0]:.2f}",
        f"- command: `{m['command']}`; llmaas from {m['llmaas']}",
        f"- {args.rounds} round(s) of: engine phase, then an HTTP phase per server "
        f"({', '.join(args.servers)}); each phase cold and warmed up on other prompts; median over "
        "rounds. max_tokens=1: "
        f"{args.one_token_requests} sequential requests of {args.short_prompt_tokens}-token prompts; "
        f"streaming: {args.streams} request(s) of 16-token prompts, {args.new_tokens} new tokens, gaps "
        "pooled; greedy, ignore_eos, prompts as token ids",
        floor_line(results["rounds"], args.servers),
    ]
    for kind in args.servers:
        lines += ["", f"### Engine (`AsyncEngine`) vs {SERVER_KINDS[kind]}", ""]
        lines.append(markdown(results["summary"][kind], "Engine", "HTTP"))
    lines += ["", "### Engine reference: bare `step()` loop vs `AsyncEngine` (in-process, no HTTP)", ""]
    lines.append(markdown(results["summary"]["engine"], "Step loop", "AsyncEngine"))
    lines += ["", "### Targets", ""]
    for kind in args.servers:
        for s in results["summary"][kind]:
            if s["target"]:
                value = fmt_value(s["kind"], s["value"])
                lines.append(
                    f"- {kind}: {s['measure']}: {value} (target {s['target']}): {s['holds'].strip('*')}"
                    f" (best rounds {fmt_value(s['kind'], s['best_rounds'])}: "
                    f"{s['holds_best_rounds'].strip('*')})"
                )
    lines.append(
        f"- load average (1 min) at start {m['load_avg_start'][0]:.2f}, during median {load['median']:.2f}"
        f" / max {load['max']:.2f}, at end {m['load_avg_end'][0]:.2f}: figures from a machine busier than"
        " this benchmark alone (~2) are not the layer's"
    )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main
QUICK = dict(rounds=1, one_token_requests=10, streams=1, new_tokens=32, concurrency=8, prompt_tokens=64)
FULL = dict(rounds=3, one_token_requests=50, streams=3, new_tokens=128, concurrency=32, prompt_tokens=128)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, small counts")
    p.add_argument("--rounds", type=int, help="rounds of engine + HTTP phases (default 3; quick 1)")
    p.add_argument(
        "--servers",
        type=lambda text: text.split(","),
        default=list(SERVER_KINDS),
        help="HTTP servers to measure, comma-separated: app (the HTTP layer alone), serve (`llmaas serve`, "
        "billing on) (default: app,serve)",
    )
    p.add_argument("--one-token-requests", type=int, help="sequential max_tokens=1 requests (default 50)")
    p.add_argument(
        "--short-prompt-tokens",
        type=int,
        default=8,
        help="prompt length for max_tokens=1 (8; keep it under the 16-token KV block: no prefix-cache hits)",
    )
    p.add_argument("--streams", type=int, help="streaming requests per phase for the inter-token latency (3)")
    p.add_argument("--new-tokens", type=int, help="tokens per streaming / concurrent request (128)")
    p.add_argument("--concurrency", type=int, help="concurrent requests / HTTP clients (32)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length of the concurrent requests (128)")
    p.add_argument("--no-offline", dest="offline", action="store_false", help="skip the offline step loop")
    p.add_argument(
        "--no-concurrent-streaming",
        dest="concurrent_streaming",
        action="store_false",
        help="skip the concurrent run with streaming HTTP clients",
    )
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--serve-app", action="store_true", help=argparse.SUPPRESS)  # the `app` server itself
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.servers) - set(SERVER_KINDS)
    if unknown:
        p.error(f"--servers: unknown {sorted(unknown)}; choose from {list(SERVER_KINDS)}")
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # unwind through the `finally` that stops the server


def run_rounds(prompts: Prompts, args: argparse.Namespace, workdir: Path) -> list[dict]:
    rounds = []
    for i in range(args.rounds):
        progress(f"round {i + 1}/{args.rounds}")
        engine = run_engine_phase(prompts, args)
        check_uncached(engine)
        progress(f"  figures: engine {fmt_figures(phase_figures(engine))}")
        http = {}
        for kind in args.servers:
            http[kind] = run_http_phase(kind, prompts, args, workdir)
            check_uncached(http[kind])
            progress(f"  figures: {kind} {fmt_figures(phase_figures(http[kind]))}")
        rounds.append(
            {
                "engine": engine,
                "http": http,
                "engine_figures": phase_figures(engine),
                "http_figures": {kind: phase_figures(result) for kind, result in http.items()},
            }
        )
    return rounds


def check_uncached(phase: dict) -> None:
    """The concurrent runs must prefill every prompt: a prefix-cache hit would flatter one side."""
    for key in ("concurrent", "sync_concurrent", "concurrent_stream"):
        if phase.get(key, {}).get("cached"):
            progress(f"warning: {key} had {phase[key]['cached']} cached prompt tokens")


def fmt_figures(figures: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in figures.items())


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    if args.serve_app:
        serve_app(args.port)
        return 0
    signal.signal(signal.SIGTERM, on_sigterm)
    machine = machine_info(argv)
    if machine["load_avg_start"][0] >= 1.0:
        progress("warning: the machine is busy (1-minute load >= 1); these numbers will be noisy")
    prompts = make_prompts(args)
    try:
        with tempfile.TemporaryDirectory(prefix="llmaas-http-bench-") as workdir:  # server logs, ledgers
            rounds = run_rounds(prompts, args, Path(workdir))
    except KeyboardInterrupt:
        progress("interrupted; the server was stopped")
        return 130
    machine["load_avg_end"] = list(os.getloadavg())
    machine["load_avg_during"] = {"min": min(_loads), "median": statistics.median(_loads), "max": max(_loads)}
    results = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds}
    results["summary"] = summaries(rounds, args)
    text = report(results, args)
    results["markdown"] = text
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
