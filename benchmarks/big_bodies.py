"""Big request bodies against a real `llmaas serve`: does one client's huge body hurt everyone else?

Issue 13's targets, while three 20 MB chat bodies arrive in parallel from a free-plan key (20 rounds):
  - /health p99 under 50 ms (polled every 5 ms over keep-alive, from another thread);
  - each big body answered 413 within 100 ms of its first byte;
  - the server's RSS grows by under 100 MB.
Before the fix (issue 13): 413 did not exist; a 20 MB body got 429 after 17.5 s, /health took 15.6 s
and RSS grew ~1.9 GB per such body.

Also measured, same server, same run (no targets; what the bodies under the cap cost):
  - /health alone (the baseline of this run);
  - three 20 MB bodies sent chunked (no Content-Length: counted as they arrive);
  - three 7 MB chat bodies, under the 8 MiB cap: parsed, then refused as provably longer than the
    context window without being tokenized (400 context_length_exceeded);
  - three 600 KB prompts, short enough that they must be tokenized (in a worker thread) to be refused.

The server: `llmaas serve --model smollm2-135m` (this checkout's code), a throw-away SQLite ledger, a
free-plan account and key made with the billing library. Run:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/big_bodies.py            # about a minute
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from llmaas.bench.server_process import wait_until_ready

HOST = "127.0.0.1"
MODEL = "smollm2-135m"
MB = 1024 * 1024
TARGETS = {"health_p99_ms": 50.0, "time_to_413_ms": 100.0, "rss_growth_mb": 100.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(port: int, workdir: Path) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", "import sys; from llmaas.cli import main; sys.exit(main())", "serve"]
    cmd += ["--model", MODEL, "--host", HOST, "--port", str(port), "--log-level", "warning"]
    cmd += ["--database-url", f"sqlite:///{workdir / 'billing.db'}"]
    env = {**os.environ, "PYTHONPATH": str(repo), "LLMAAS_HOME": os.environ.get("LLMAAS_HOME", "")}
    if not env["LLMAAS_HOME"]:
        del env["LLMAAS_HOME"]
    log = open(workdir / "server.log", "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def wait_healthy(url: str, proc: subprocess.Popen, workdir: Path) -> None:
    wait_until_ready(proc, url, workdir / "server.log", poll_s=0.2)


def free_plan_key(workdir: Path) -> str:
    from llmaas.billing import create_account, create_key, open_database

    db = open_database(f"sqlite:///{workdir / 'billing.db'}")
    try:
        create_account(db, "bench-free", plan="free")
        return create_key(db, "bench-free").secret
    finally:
        db.close()


class HealthPoller:
    """GET /health every `period_s` over one keep-alive connection; (start time, latency) of each."""

    def __init__(self, url: str, period_s: float = 0.005):
        self.url, self.period_s = url, period_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                client.get(self.url + "/health").raise_for_status()
                self.samples.append((t0, time.perf_counter() - t0))
                time.sleep(self.period_s)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def latencies_ms(self, since: float, until: float) -> list[float]:
        return [lat * 1000 for t0, lat in self.samples if since <= t0 <= until]


def send_body(port: int, secret: str, path: str, body: bytes, chunked: bool) -> tuple[int, float]:
    """Send a request body of `body_size` bytes as fast as the server takes it, stopping as soon as a
    response arrives. Returns (status, seconds from the first byte to the status line)."""
    head = f"POST {path} HTTP/1.1\r\nhost: {HOST}\r\nauthorization: Bearer {secret}\r\n"
    head += "content-type: application/json\r\n"
    head += "transfer-encoding: chunked\r\n\r\n" if chunked else f"content-length: {len(body)}\r\n\r\n"
    sock = socket.create_connection((HOST, port))
    t0 = time.perf_counter()
    pending = memoryview(head.encode() + (b"" if chunked else body))
    offset, sent_chunks, received = 0, 0, b""
    sock.setblocking(False)
    try:
        while True:
            want_write = (offset < len(pending)) or (chunked and sent_chunks * 65536 < len(body))
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 30)
            if not readable and not writable:
                raise TimeoutError("no response in 30 s")
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                received += data
                if b"\r\n" in received:
                    return int(received.split(b" ", 2)[1]), time.perf_counter() - t0
                if not data:
                    raise ConnectionError("closed without a response")
            if writable:
                if offset >= len(pending) and chunked:
                    piece = body[sent_chunks * 65536 : (sent_chunks + 1) * 65536]
                    pending, offset = memoryview(b"%x\r\n%s\r\n" % (len(piece), piece)), 0
                    sent_chunks += 1
                try:
                    offset += sock.send(pending[offset:])
                except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                    pass  # the server stopped taking the body: its answer is on the way
    finally:
        sock.close()


def chat_body(size: int) -> bytes:
    """A chat request of `size` bytes: one user message of filler text."""
    skeleton = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": ""}]}
    overhead = len(json.dumps(skeleton))
    skeleton["messages"][0]["content"] = ("lorem ipsum " * (size // 12 + 1))[: size - overhead]
    return json.dumps(skeleton).encode()


def completion_body(chars: int) -> bytes:
    text = ("hello world, this is text. " * (chars // 27 + 1))[:chars]
    return json.dumps({"model": MODEL, "max_tokens": 1, "prompt": text}).encode()


def scenario(url, port, secret, proc, name, path, body: bytes, chunked=False, parallel=3, rounds=1) -> dict:
    """`rounds` times, `parallel` clients send `body` at once (built beforehand: the poller must not
    wait on this process's GIL). /health latencies are those of polls started while bodies were in
    flight; RSS growth is the server's, from before the first round to the peak and to the end."""
    rss = psutil.Process(proc.pid)
    before = peak = rss.memory_info().rss
    answers: list[tuple[int, float]] = []
    errors: list[BaseException] = []
    lat: list[float] = []

    def one() -> None:
        try:
            answers.append(send_body(port, secret, path, body, chunked))
        except BaseException as exc:  # reported below
            errors.append(exc)

    with HealthPoller(url) as poller:
        for _ in range(rounds):
            time.sleep(0.2)
            start = time.perf_counter()
            threads = [threading.Thread(target=one) for _ in range(parallel)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak = max(peak, rss.memory_info().rss)
                time.sleep(0.002)
            lat += poller.latencies_ms(start, time.perf_counter())
        time.sleep(0.3)
    after = rss.memory_info().rss
    return {
        "scenario": name,
        "rounds": rounds,
        "statuses": sorted({s for s, _ in answers}),
        "answer_ms": [round(t * 1000, 1) for _, t in answers],
        "errors": [repr(e) for e in errors],
        "health_n": len(lat),
        "health_p50_ms": round(statistics.median(lat), 2) if lat else None,
        "health_p99_ms": round(percentile(lat, 99), 2) if lat else None,
        "health_max_ms": round(max(lat), 2) if lat else None,
        "rss_before_mb": round(before / MB, 1),
        "rss_peak_growth_mb": round((peak - before) / MB, 1),
        "rss_after_growth_mb": round((after - before) / MB, 1),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def idle(url: str, seconds: float = 2.0) -> dict:
    with HealthPoller(url) as poller:
        start = time.perf_counter()
        time.sleep(seconds)
        end = time.perf_counter()
    lat = poller.latencies_ms(start, end)
    return {
        "scenario": "idle /health (baseline)",
        "health_n": len(lat),
        "health_p50_ms": round(statistics.median(lat), 2),
        "health_p99_ms": round(percentile(lat, 99), 2),
        "health_max_ms": round(max(lat), 2),
    }


def verdict(value: float, target: float) -> str:
    return "PASS" if value < target else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the 20 MB scenarios (default 20)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmaas-big-bodies-"))
    port = free_port()
    url = f"http://{HOST}:{port}"
    proc = start_server(port, workdir)
    try:
        wait_healthy(url, proc, workdir)
        secret = free_plan_key(workdir)
        big, under_cap, tokenized = chat_body(20 * MB), chat_body(7 * MB), completion_body(600_000)
        chat = "/v1/chat/completions"
        runs = [idle(url)]
        name = "3 x 20 MB chat, Content-Length"
        runs.append(scenario(url, port, secret, proc, name, chat, big, rounds=args.rounds))
        name = "3 x 20 MB chat, chunked"
        runs.append(scenario(url, port, secret, proc, name, chat, big, chunked=True, rounds=args.rounds))
        name = "3 x 7 MB chat (under the cap; refused untokenized)"
        runs.append(scenario(url, port, secret, proc, name, chat, under_cap))
        name = "3 x 600 KB prompts (tokenized in a thread, then refused as too long)"
        runs.append(scenario(url, port, secret, proc, name, "/v1/completions", tokenized))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    print(f"# big_bodies.py — {when}, {platform.node()}, {cpu}, {os.cpu_count()} cores, model {MODEL}")
    for r in runs:
        times = sorted(r.pop("answer_ms", []))
        if times:
            r["answer_ms_p50_p99_max"] = [
                round(statistics.median(times), 1),
                percentile(times, 99),
                times[-1],
            ]
        print(json.dumps(r))
    result = runs[1]
    print("\nIssue 13 targets (3 x 20 MB bodies with Content-Length, in parallel):")
    p99, idle_p99 = result["health_p99_ms"], runs[0]["health_p99_ms"]
    slowest = result["answer_ms_p50_p99_max"][2] if "answer_ms_p50_p99_max" in result else float("inf")
    growth = max(result["rss_peak_growth_mb"], result["rss_after_growth_mb"])
    all_413 = result["statuses"] == [413] and not result["errors"]
    target = TARGETS["health_p99_ms"]
    print(
        f"  /health p99 {p99} ms (idle p99 {idle_p99} ms), target < {target:.0f} ms: {verdict(p99, target)}"
    )
    target = TARGETS["time_to_413_ms"]
    passed = verdict(slowest, target) if all_413 else "FAIL"
    times = result["answer_ms_p50_p99_max"]
    shown = f"p50 {times[0]} ms, p99 {times[1]} ms, max {times[2]} ms over {3 * result['rounds']} bodies"
    print(f"  time to 413: {shown} (statuses {result['statuses']}), target < {target:.0f} ms each: {passed}")
    target = TARGETS["rss_growth_mb"]
    print(f"  RSS growth {growth} MB, target < {target:.0f} MB: {verdict(growth, target)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"when": when, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
