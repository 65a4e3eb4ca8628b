"""`llmaas bench` against a real `llmaas serve` on loopback, and its bad inputs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from llmaas.bench.prompts import synthetic_prompts
from llmaas.cli import main
from llmaas.models.tokenizer import Tokenizer
from tests.model_factory import make_tiny_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    """`llmaas serve` on a tiny random llama model, served as 'tiny'."""
    port = free_port()
    db = tmp_path_factory.mktemp("db") / "billing.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmaas.cli", "serve", "--model", str(tiny_dir), "--served-model-name", "tiny",
         "--port", str(port), "--dtype", "float32", "--kv-cache-memory", "4MiB", "--no-auth",
         "--database-url", f"sqlite:///{db}", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "server did not become healthy"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    yield url
    proc.kill()
    proc.wait(10)


def bench(url: str, out, *extra: str, model: str = "tiny") -> int:
    args = ["--num-prompts", "3", "--input-len", "12", "--output-len", "4", "--warmup", "1", "--no-progress"]
    return main(["bench", "--url", url, "--model", model, *args, "--out", str(out), *extra])


def test_bench_against_llmaas_serve(served, tiny_dir, tmp_path, capsys):
    assert bench(served, tmp_path, "--concurrency", "1,2", "--tokenizer", str(tiny_dir)) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["error"] is None
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    for lv in result["levels"]:
        assert lv["completed"] == 3 and lv["errors"] == 0
        assert lv["token_counts"] == "server usage"
        assert lv["output_tokens"] == 3 * 4  # ignore_eos: exactly --output-len each
        assert lv["input_tokens"] == 3 * 12  # the server counted exactly the lengths we built
        assert lv["output_tok_per_s"] > 0 and lv["requests_per_s"] > 0
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            d = lv[metric]
            assert d["p50"] <= d["p90"] <= d["p99"]
        assert len(lv["load_avg"]) == 3
    assert result["prompts"]["lengths_exact"] is True
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "| 2 | all at once | 3 / 3 |" in (tmp_path / "bench.md").read_text()
    assert "TTFT ms p50 / p90 / p99" in capsys.readouterr().out


def test_bench_poisson_and_shared_prefix(served, tiny_dir, tmp_path):
    code = bench(served, tmp_path, "--concurrency", "2", "--request-rate", "20", "--shared-prefix-len", "16",
                 "--tokenizer", str(tiny_dir))  # fmt: skip
    assert code == 0
    [lv] = json.loads((tmp_path / "bench.json").read_text())["levels"]
    assert lv["request_rate"] == 20 and lv["completed"] == 3
    assert lv["input_tokens"] == 3 * (16 + 12)


def test_unknown_model_is_refused(served, tiny_dir, tmp_path, capsys):
    assert bench(served, tmp_path, "--concurrency", "1", "--tokenizer", str(tiny_dir), model="nope") == 2
    err = capsys.readouterr().err
    assert "does not serve model 'nope'" in err and "tiny" in err
    assert "nope" in json.loads((tmp_path / "bench.json").read_text())["error"]


def test_unreachable_url_exits_non_zero_with_partial_json(tiny_dir, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert bench(url, tmp_path, "--tokenizer", str(tiny_dir)) != 0
    assert "cannot reach" in capsys.readouterr().err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert "cannot reach" in result["error"] and result["levels"] == []


@pytest.mark.parametrize("levels", ["0", "4,-1"])
def test_zero_or_negative_concurrency(levels, tiny_dir, tmp_path, capsys):
    assert bench("http://127.0.0.1:9", tmp_path, "--concurrency", levels, "--tokenizer", str(tiny_dir)) == 2
    assert "--concurrency levels must be positive" in capsys.readouterr().err
    assert "positive" in json.loads((tmp_path / "bench.json").read_text())["error"]


def test_concurrency_not_a_number(tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench("http://127.0.0.1:9", tmp_path, "--concurrency", "1,x")
    assert exc.value.code == 2


class FlakyServer(BaseHTTPRequestHandler):
    """Serves 'fake'; streams 3 text chunks without usage for the first 4 completions, then HTTP 500."""

    calls = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        with FlakyServer.lock:
            FlakyServer.calls += 1
            n = FlakyServer.calls
        if n > 4:
            return self._json(500, {"error": {"message": "engine exploded", "type": "server_error"}})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for word in ("a", " b", " c"):
            chunk = {"choices": [{"index": 0, "text": word}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, status, body):
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def test_server_erroring_mid_run_keeps_partial_results(tiny_dir, tmp_path, capsys):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FlakyServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        code = bench(url, tmp_path, "--concurrency", "1,1", "--tokenizer", str(tiny_dir), model="fake")
    finally:
        httpd.shutdown()
    assert code == 1
    assert "request(s) failed" in capsys.readouterr().err
    first, second = json.loads((tmp_path / "bench.json").read_text())["levels"]
    assert (first["completed"], first["errors"]) == (3, 0)  # warm-up took call 1
    assert first["token_counts"].startswith("counted as streamed text chunks")
    assert first["output_tokens"] == 9
    assert (second["completed"], second["errors"]) == (0, 3)
    assert second["error_samples"] == {"HTTP 500: engine exploded": 3}


def test_synthetic_prompts_have_exact_lengths(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    prompts, lengths = synthetic_prompts(tok, 6, 40, shared_prefix_len=25)
    assert lengths == [65] * 6
    assert [len(tok.encode(p)) for p in prompts] == [65] * 6
    prefix = prompts[0][:20]
    assert all(p.startswith(prefix) for p in prompts) and len(set(prompts)) == 6


def test_bench_prompts_file(served, tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello there, how are you?"}\n\nThe quick brown fox\n"A JSON string"\n')
    code = bench(served, tmp_path / "out", "--concurrency", "2", "--prompts-file", str(prompts),
                 "--tokenizer", str(tiny_dir), "--num-prompts", "4")  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert result["prompts"]["source"] == str(prompts)
    [lv] = result["levels"]
    assert lv["completed"] == 4 and lv["output_tokens"] == 16
    (tmp_path / "empty.txt").write_text("\n")
    assert (
        bench(
            served,
            tmp_path / "o2",
            "--prompts-file",
            str(tmp_path / "empty.txt"),
            "--tokenizer",
            str(tiny_dir),
        )
        == 2
    )
