"""`llmaas serve` as a real process: serves a model directory, and SIGTERM drains in-flight requests
while /health says so."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.model_factory import make_tiny_checkpoint

# cli.py wires `serve` in through add_serve_parser; drive that function directly so this test does
# not depend on the wiring.
LAUNCH = """
import argparse, logging, sys
from llmaas.server.cli_serve import add_serve_parser
parser = argparse.ArgumentParser(prog="llmaas")
sub = parser.add_subparsers(dest="verb", required=True)
add_serve_parser(sub)
args = parser.parse_args(sys.argv[1:])
logging.basicConfig(level=logging.INFO)
sys.exit(args.func(args))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    model_dir = make_tiny_checkpoint("llama", tmp_path, max_position_embeddings=1024)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCH,
            "serve",
            "--model",
            str(model_dir),
            "--served-model-name",
            "tiny",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--kv-cache-memory",
            "1MiB",
            "--block-size",
            "4",
            "--shutdown-grace",
            "300",
            "--log-level",
            "warning",
            "--no-auth",
            "--database-url",
            f"sqlite:///{tmp_path / 'billing.sqlite3'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "server did not become healthy"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_serve_then_sigterm_drains_in_flight_requests(server):
    proc, url = server
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events: list[str] = []
    first = threading.Event()

    def stream():
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(30)
    proc.send_signal(signal.SIGTERM)
    # Draining: still listening, /health is 503 and new requests are turned away, the stream goes on.
    deadline = time.monotonic() + 10
    while (health := httpx.get(url + "/health", timeout=5)).status_code == 200:
        assert time.monotonic() < deadline, "/health never reported the drain"
        time.sleep(0.01)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    refused = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert refused.headers["retry-after"] == "1"
    assert reader.is_alive()
    reader.join(300)
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2].removeprefix("data: "))["usage"]
    assert usage["completion_tokens"] == 400  # the in-flight request ran to the end
    assert proc.wait(30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=1)
