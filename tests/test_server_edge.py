"""The HTTP edge under hostile input, over real HTTP on loopback with a real SQLite ledger.

Body-size cap (413 before reading), lone surrogates (400 naming the field), the rate-limit slot taken
before any CPU work on the prompt, a stalled stream reader aborted and billed, and /openapi.json
documenting the statuses the server really answers.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from llmaas.billing import (
    FreeGrant,
    create_account,
    create_key,
    get_usage,
    open_database,
    open_holds,
    set_price,
)
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.bootstrap import bootstrap
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import MODEL, make_engine, serve

HELLO = [{"role": "user", "content": "Hello, how are you today?"}]
CAP = 256 * 1024  # the test server's body cap (the default is 8 MiB)
STALL_S = 1.0  # the test server's stream stall timeout (the default is 30 s)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("edge"), max_position_embeddings=1024)
    aeng = make_engine(model_dir, kv_cache_memory=2**23)
    yield aeng
    aeng.shutdown()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    database = open_database(f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'billing.sqlite3'}")
    bootstrap(database, [MODEL], admin_key="sk-admin-test", say=lambda _line: None)
    set_price(database, MODEL, input_usd="1.00", cached_input_usd="0.50", output_usd="2.00")
    yield database
    database.close()


@pytest.fixture(scope="module")
def billing(db):
    return ServerBilling(db)


@pytest.fixture(scope="module")
def base_url(engine, billing):
    app = create_app({MODEL: engine}, billing=billing, max_body_bytes=CAP, stream_stall_timeout_s=STALL_S)
    with serve(app) as url:
        yield url


def new_key(db, name: str, **limits) -> str:
    create_account(db, name, plan="plus", free_grant=FreeGrant(amount_micros=10_000_000, valid_for=None))
    return create_key(db, name, **limits).secret


def headers(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}", "content-type": "application/json"}


def bucket(billing: ServerBilling, secret: str) -> tuple[int, int]:
    """(requests, tokens) left in the key's rate-limit buckets, read without taking any."""
    p = billing.authenticate(secret)
    d = billing.limiter.peek(p.key_id, p.requests_per_minute, p.tokens_per_minute)
    return d.remaining_requests, d.remaining_tokens


def connect(base_url: str, rcvbuf: int | None = None) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    sock.settimeout(30)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(fields.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return status, fields, body


# ------------------------------------------------------------------------------ body size
def test_body_over_the_cap_is_413_before_it_is_read_and_takes_no_quota(base_url, billing, db):
    """Regression: a 20 MB chat body was parsed and tokenized (17.5 s, ~1.9 GB) before a 429."""
    secret = new_key(db, "big-body", requests_per_minute=20)
    size = 20 * 1024 * 1024
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\n"
        f"content-type: application/json\r\ncontent-length: {size}\r\n\r\n"
    )
    with connect(base_url) as sock:
        sock.sendall(head.encode() + b'{"model": "' + MODEL.encode() + b'", "messages": [')
        status, fields, body = read_response(sock)  # answered without the other ~20 MB being sent
    assert status == 413 and fields["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and str(CAP) in error["message"]
    assert bucket(billing, secret)[0] == 20  # no request taken from the rate limit


def test_chunked_body_over_the_cap_is_413_while_it_arrives(base_url, db):
    secret = new_key(db, "chunked-body")
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\n"
        "content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    piece = b"a" * 16384
    with connect(base_url) as sock:
        sock.sendall(head.encode())
        sent = 0
        while sent <= CAP + len(piece):  # a little over the cap; the body never ends
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        status, _, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_body_under_the_cap_still_works(base_url, db):
    secret = new_key(db, "normal-body")
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "user": "x" * (CAP // 2)}
    r = httpx.post(base_url + "/v1/chat/completions", headers=headers(secret), json=body, timeout=60)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------ lone surrogates
SURROGATE_CASES = [
    (
        "/v1/chat/completions",
        '"messages": [{"role": "user", "content": "\\ud800 hi \\udfff"}]',
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        '"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]',
        "messages[0].content[0].text",
    ),
    (
        "/v1/chat/completions",
        '"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]',
        "messages[0].name",
    ),
    (
        "/v1/chat/completions",
        '"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "\\ud800"}]}]',
        "messages[0]",
    ),
    ("/v1/chat/completions", '"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"', "stop"),
    (
        "/v1/chat/completions",
        '"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "\\udfff"]',
        "stop[1]",
    ),
    ("/v1/chat/completions", '"messages": [{"role": "user", "content": "hi"}], "user": "\\ud800"', "user"),
    ("/v1/completions", '"prompt": "\\ud800"', "prompt"),
    ("/v1/completions", '"prompt": ["ok", "\\ud800"]', "prompt[1]"),
    ("/v1/completions", '"prompt": "hi", "stop": "\\udbff"', "stop"),
]


@pytest.fixture(scope="module")
def surrogate_key(db):
    return new_key(db, "surrogates")


@pytest.mark.parametrize("path, fields, param", SURROGATE_CASES)
def test_lone_surrogates_are_400_naming_the_field(base_url, surrogate_key, path, fields, param):
    """Regression: "\\ud800" reached the tokenizer and answered 500 (TextInputSequence must be str)."""
    secret = surrogate_key
    raw = f'{{"model": "{MODEL}", "max_tokens": 2, {fields}}}'
    r = httpx.post(base_url + path, headers=headers(secret), content=raw.encode(), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_unicode"
    assert "surrogate" in error["message"] and "{" not in error["message"]


def test_valid_surrogate_pairs_are_text(base_url, db):
    secret = new_key(db, "emoji")
    emoji = '[{"role": "user", "content": "\\ud83d\\ude00"}]'  # a valid pair, escaped
    raw = f'{{"model": "{MODEL}", "max_tokens": 2, "messages": {emoji}}}'
    r = httpx.post(
        base_url + "/v1/chat/completions", headers=headers(secret), content=raw.encode(), timeout=60
    )
    assert r.status_code == 200, r.text


# ------------------------------------------------------------- rate limit before CPU work
def test_the_request_slot_is_taken_before_the_prompt_is_worked_on(base_url, billing, db):
    """Regression: 25 x 1.5 MB bodies from a 20-rpm key were all templated and tokenized without
    taking any rate-limit quota.

    The chat template refuses these messages (a text part without text): that is found only by the
    CPU work on the prompt, which now comes after the key's request was taken from its limit. So its
    third attempt within the minute is refused 429 before any such work; no tokens are taken."""
    secret = new_key(db, "rpm-two", requests_per_minute=2, tokens_per_minute=1_000_000)
    messages = [{"role": "user", "content": [{"type": "text", "text": "x" * 100_000}, {"type": "text"}]}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 1}
    answers = []
    for _ in range(3):
        r = httpx.post(base_url + "/v1/chat/completions", headers=headers(secret), json=body, timeout=60)
        answers.append((r.status_code, r.json()["error"]["param"] or r.json()["error"]["code"]))
    assert answers[:2] == [(400, "messages[0].content[1].text")] * 2
    assert answers[2] == (429, "rate_limit_exceeded")
    requests_left, tokens_left = bucket(billing, secret)
    assert requests_left == 0 and tokens_left == 1_000_000  # attempts counted; no tokens taken


def test_a_provably_too_long_prompt_is_refused_without_tokenizing(base_url, db, engine):
    secret = new_key(db, "too-long")
    # More characters than the context window times the longest token: no tokenizing can make it fit.
    room = engine.engine.max_model_len
    longest = engine.engine.tokenizer._longest_token_bytes
    body = {"model": MODEL, "messages": [{"role": "user", "content": "z" * (room * longest + 1)}]}
    r = httpx.post(base_url + "/v1/chat/completions", headers=headers(secret), json=body, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "at least" in error["message"]
    assert error["param"] == "messages"


# ------------------------------------------------------------------------------- backpressure
def test_a_stream_whose_client_stops_reading_is_aborted_and_billed(base_url, db, engine):
    """Regression: clients that never read their streams kept their sequences generating (and their
    KV blocks held) until their sockets closed."""
    secret = new_key(db, "stalled-reader")
    body = json.dumps(
        {
            "model": MODEL,
            "messages": HELLO,
            "max_tokens": 900,
            "ignore_eos": True,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,  # ~2 KB per event and choice
            "n": 16,  # ~30 MB in all: more than the kernel's socket buffers (up to 4 MB here) can take
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    with connect(base_url, rcvbuf=4096) as sock:
        sock.sendall(head.encode() + body)
        first = b""
        while b'"id":"' not in first:
            first += sock.recv(4096)
        request_id = first.split(b'"id":"')[1].split(b'"')[0].decode()
        # Now read nothing: the server must give up on this stream, not generate all 16 x 900 tokens.
        deadline = time.monotonic() + 60
        while (record := get_usage(db, request_id)) is None:
            assert time.monotonic() < deadline, "the stalled stream was never aborted"
            time.sleep(0.1)
        assert record.status == "cancelled"
        assert 0 < record.completion_tokens < 16 * 900 and record.cost_micros > 0
        assert open_holds(db, "stalled-reader") == []
        assert not engine.call(lambda e: e.has_unfinished_requests()).result(5)
        # The server closed the connection: what it had sent drains, then end of stream.
        sock.settimeout(10)
        while sock.recv(65536):
            pass


def test_a_stream_buffers_at_most_max_buffered_outputs(engine, monkeypatch):
    """Before the stall timeout: a stream whose client reads nothing holds at most
    MAX_BUFFERED_OUTPUTS engine outputs; past that it is aborted like a disconnect."""
    from llmaas.server import generation
    from tests.test_server_api import Recorder

    monkeypatch.setattr(generation, "MAX_BUFFERED_OUTPUTS", 32)
    hook = Recorder()
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": "hi",
            "max_tokens": 900,
            "ignore_eos": True,
            "stream": True,
            "n": 16,
            "logprobs": 20,  # ~20 MB of events in all: the socket buffers (4 MB) fill, the client reads none
        }
    ).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    with serve(create_app({MODEL: engine}, billing_hook=hook, stream_stall_timeout_s=600)) as url:
        with connect(url, rcvbuf=4096) as sock:
            sock.sendall(head.encode() + body)
            first = b""
            while b'"id":"' not in first:
                first += sock.recv(4096)
            request_id = first.split(b'"id":"')[1].split(b'"')[0].decode()
            record = hook.wait_for(request_id, timeout=60)  # long before the 600 s stall timeout
            assert record.status == "aborted" and 0 < record.completion_tokens < 16 * 900
            assert not engine.call(lambda e: e.has_unfinished_requests()).result(5)


# ------------------------------------------------------------------------------------ openapi
def test_openapi_documents_the_statuses_really_answered(base_url):
    spec = httpx.get(base_url + "/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "413", "429", "499", "500", "503"} <= set(chat)
    assert "422" not in chat
    for path, item in spec["paths"].items():
        for operation in item.values():
            assert "413" in operation["responses"] and "422" not in operation["responses"]
            if path.startswith("/admin/"):
                assert {"401", "404"} <= set(operation["responses"]), path
    # What the document says is what the server does.
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 401


# ----------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max-body-bytes", "0"),
        ("--max-body-bytes", str(2**64)),
        ("--max-body-bytes", "1e6"),
        ("--stream-stall-timeout", "0"),
        ("--stream-stall-timeout", "nan"),
        ("--stream-stall-timeout", "1e308"),
        ("--instance-id", "x" * 129),
        ("--instance-id", "replica one"),
    ],
)
def test_serve_limits_out_of_range_are_one_line_and_exit_2(flag, value, capsys):
    from llmaas.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_serve_limits_parse():
    from llmaas.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--max-body-bytes", "1048576", "--stream-stall-timeout", "2.5"]
    )
    assert args.max_body_bytes == 1048576 and args.stream_stall_timeout == 2.5
