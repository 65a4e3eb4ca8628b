"""The OpenAI-compatible server over real HTTP on loopback, driven by the official openai SDK.

A tiny random llama serves; texts are gibberish, so tests compare the server with itself (greedy
stream == greedy non-stream, same seed == same text) and check shapes, counts and errors.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn

from llmaas.engine.async_engine import AsyncEngine
from llmaas.engine.llm_engine import EngineConfig, LLMEngine
from llmaas.server import RequestUsage, create_app
from tests.model_factory import make_tiny_checkpoint

MODEL = "tiny-llama"
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


@contextmanager
def serve(app):
    """Run `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    # proto=IPPROTO_TCP, or asyncio skips TCP_NODELAY on accepted sockets and every response waits
    # ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def make_engine(model_dir, max_waiting: int = 256, **config) -> AsyncEngine:
    config = {"dtype": "float32", "kv_cache_memory": 2**20, "block_size": 4, **config}
    return AsyncEngine(LLMEngine(EngineConfig(model=str(model_dir), **config)), max_waiting=max_waiting)


class Recorder:
    """A billing hook that keeps what it is told."""

    def __init__(self) -> None:
        self.records: list[RequestUsage] = []

    async def __call__(self, usage: RequestUsage) -> None:
        self.records.append(usage)

    def wait_for(self, request_id: str, timeout: float = 10.0) -> RequestUsage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.records:
                if r.request_id == request_id:
                    return r
            time.sleep(0.01)
        raise AssertionError(f"no usage reported for {request_id}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("server"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def engine(model_dir):
    aeng = make_engine(model_dir)
    yield aeng
    aeng.shutdown()


@pytest.fixture(scope="module")
def hook():
    return Recorder()


@pytest.fixture(scope="module")
def base_url(engine, hook):
    with serve(create_app({MODEL: engine}, billing_hook=hook)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def raw(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def engine_idle(engine: AsyncEngine) -> bool:
    return not engine.call(lambda e: e.has_unfinished_requests()).result(5)


# ----------------------------------------------------------------------------------- chat
def test_chat_shape_and_usage(client, raw, hook):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert isinstance(r.created, int)
    (choice,) = r.choices
    assert (
        choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    )
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    u = r.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 6
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0 and u.completion_tokens_details.reasoning_tokens == 0
    record = hook.wait_for(r.id)
    assert (record.model, record.endpoint, record.status) == (MODEL, "chat.completions", "finished")
    assert (record.prompt_tokens, record.completion_tokens) == (u.prompt_tokens, u.completion_tokens)
    assert record.api_key == "sk-test"
    body = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2}).json()
    assert set(body) == {
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
        "service_tier",
    }
    assert set(body["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}


def test_prefix_cache_shows_as_cached_tokens(client):
    messages = [{"role": "system", "content": "You are a careful assistant. " * 6}, *HELLO]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    assert second.choices[0].message.content == first.choices[0].message.content


def test_stream_matches_non_stream_and_reports_usage(client):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=10, temperature=0, ignore_eos=True)
    plain = client.chat.completions.create(
        **{k: v for k, v in kw.items() if k != "ignore_eos"}, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.chat.completions.create(
            **{k: v for k, v in kw.items() if k != "ignore_eos"},
            extra_body={"ignore_eos": True},
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    *body, last = chunks
    assert last.choices == [] and all(c.usage is None for c in body)
    assert last.usage.completion_tokens == 10 and last.usage.prompt_tokens == plain.usage.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + 10


def test_stream_without_usage_has_no_usage_chunk(raw):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    with raw.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in e and len(e["choices"]) == 1 for e in events)


def test_n_samples(client):
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, n=3, max_tokens=5, seed=1, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, n=2, max_tokens=4, stream=True)
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_string_cuts_the_text(client):
    kw = dict(model=MODEL, messages=HELLO, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(max_tokens=24, **kw).choices[0].message.content
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip())
    cut = client.chat.completions.create(max_tokens=24, stop=[stop, "zzzz-never"], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(stop)]
    streamed = client.chat.completions.create(max_tokens=24, stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.index(stop)]


def test_seed_reproducibility(client):
    def sample(seed):
        return (
            client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                max_tokens=12,
                temperature=1.0,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        # The token's own bytes: its text when they are whole UTF-8, else the text reads U+FFFD.
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    tokens = [
        e.token
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert tokens == [e.token for e in content]


def test_logprob_bytes_are_the_tokens_own_bytes(engine):
    tokenizer = engine.engine.tokenizer
    text = "naïve 日本 🙂"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(b"\xef\xbf\xbd" in tokenizer.decode([i]).encode() for i in ids)  # some split a character
    special = next(iter(tokenizer.eos_token_ids))
    assert tokenizer.token_bytes(special) == tokenizer.decode([special], skip_special_tokens=False).encode()


def test_content_parts_and_roles(client):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, user="alice")
    assert r.choices[0].message.role == "assistant"


# ---------------------------------------------------------------------------- completions
def test_completions_prompt_forms(client):
    one = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=4, temperature=0)
    assert one.object == "text_completion" and one.id.startswith("cmpl-") and len(one.choices) == 1
    assert one.usage.total_tokens == one.usage.prompt_tokens + one.usage.completion_tokens
    many = client.completions.create(
        model=MODEL, prompt=["The quick brown", "Hello"], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == one.choices[0].text
    assert (
        many.usage.prompt_tokens
        == one.usage.prompt_tokens
        + client.completions.create(model=MODEL, prompt="Hello", max_tokens=1).usage.prompt_tokens
    )
    ids = client.completions.create(model=MODEL, prompt=[5, 17, 33], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3
    lists = client.completions.create(model=MODEL, prompt=[[5, 17, 33], [9, 8]], max_tokens=3, temperature=0)
    assert lists.choices[0].text == ids.choices[0].text and lists.usage.prompt_tokens == 5


def test_completions_echo_logprobs_and_best_of(client):
    r = client.completions.create(
        model=MODEL,
        prompt="Hello world",
        max_tokens=4,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    choice = r.choices[0]
    assert choice.text.startswith("Hello world")
    lp = choice.logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4 and lp.token_logprobs[0] is None  # the first token has no context
    assert all(v <= 0 for v in lp.token_logprobs[1:n_prompt])  # echoed prompt tokens are scored
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:n_prompt])
    assert all(v <= 0 for v in lp.token_logprobs[n_prompt:])
    assert all(len(top) in (2, 3) for top in lp.top_logprobs[n_prompt:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    best = client.completions.create(
        model=MODEL,
        prompt="Hello world",
        max_tokens=4,
        best_of=3,
        n=1,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 12  # every candidate is generated (and billed)


def test_completions_max_tokens_0_with_echo_scores_the_prompt(client, hook):
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=0, echo=True, logprobs=1)
    (choice,) = r.choices
    assert choice.text == "Hello world" and choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens and lp.token_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert r.usage.completion_tokens == 0 and r.usage.total_tokens == r.usage.prompt_tokens
    assert hook.wait_for(r.id).completion_tokens == 0  # nothing generated is billed
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Hello world",
            max_tokens=0,
            echo=True,
            logprobs=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hello world", max_tokens=0)
    assert info.value.param == "max_tokens" and "echo" in info.value.message


def test_completions_stream(client):
    kw = dict(
        model=MODEL,
        prompt=["Once upon", "Hello"],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    plain = client.completions.create(**kw)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, echo=False, **kw)
    )
    for i in range(2):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert text == plain.choices[i].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    echoed = list(
        client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, echo=True, stream=True)
    )
    assert echoed[0].choices[0].text.startswith("Once upon")


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": []}, "messages"),
        ({"stream": "yes"}, "stream"),
        ({"seed": 2**70}, "seed"),
        ({"top_k": -5}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_chat_bad_params_are_400_naming_the_param(client, kw, param):
    body = {"model": MODEL, "messages": HELLO, **kw}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{k: body.pop(k) for k in ("model", "messages")}, extra_body=body)
    assert info.value.status_code == 400 and info.value.param == param
    assert info.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"verbosity": "low"}, "verbosity"),
        ({"web_search_options": {}}, "web_search_options"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(client, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, extra_body=kw)
    assert info.value.param == param and info.value.code == "unsupported_parameter"
    assert param in info.value.message and "not" in info.value.message


def test_harmless_openai_fields_are_accepted_and_unknown_ones_refused(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=2,
        metadata={"team": "a"},
        store=False,
        parallel_tool_calls=True,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        modalities=["text"],
        service_tier="auto",
        user="alice",
        stream_options=None,
        extra_body={"prompt_cache_key": "k", "safety_identifier": "u1", "prediction": None},
    )
    assert r.usage.completion_tokens <= 2
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"temprature": 0})
    assert info.value.param == "temprature" and "Unrecognized request argument" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:  # completions take output constraints, not tools
        client.completions.create(model=MODEL, prompt="hi", extra_body={"tools": []})
    assert info.value.param == "tools"


def test_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100_000)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    assert "1024" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[5] * 2000)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"


def test_completions_errors(client):
    cases = [
        ({"prompt": []}, "prompt"),
        ({"prompt": [5, -1]}, "prompt"),
        ({"prompt": [5, 100000]}, "prompt"),
        ({"prompt": "hi", "best_of": 1, "n": 2}, "best_of"),
        ({"prompt": "hi", "best_of": 3, "stream": True}, "best_of"),
        ({"prompt": "hi", "logprobs": 99}, "logprobs"),
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": 12}, "prompt"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, **{"prompt": body.pop("prompt")}, extra_body=body)
        assert info.value.param == param, body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


@pytest.mark.parametrize(
    "content, ctype",
    [
        (b"{not json", "application/json"),
        (b"", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'"a string"', "application/json"),
        (
            b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
            "application/json",
        ),
        (
            b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": Infinity}',
            "application/json",
        ),
        (b'{"model": "tiny-llama", "messages": "hello"}', "application/json"),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}]}', "text/plain"),
        (b"\xff\xfe garbage", "application/json"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "application/json"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "application/json"),
    ],
)
def test_malformed_bodies_are_400_in_openai_shape(raw, content, ctype):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = raw.post(path, content=content, headers={"content-type": ctype})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_in_openai_shape(raw):
    r = raw.post("/v1/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = raw.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


# ------------------------------------------------------------------- models, health, metrics
def test_models_health_metrics_openapi(client, raw):
    assert [m.id for m in client.models.list()] == [MODEL]
    m = client.models.retrieve(MODEL)
    assert m.object == "model" and m.owned_by == "llmaas"
    assert raw.get("/health").status_code == 200
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    text = raw.get("/metrics").text
    for name in (
        "llmaas_requests_total",
        "llmaas_prompt_tokens_total",
        "llmaas_cached_prompt_tokens_total",
        "llmaas_completion_tokens_total",
        "llmaas_time_to_first_token_seconds_bucket",
        "llmaas_time_per_output_token_seconds_bucket",
        "llmaas_running_sequences",
        "llmaas_waiting_sequences",
        "llmaas_kv_blocks_used",
        "llmaas_prefix_cache_hit_rate",
    ):
        assert name in text, name
    assert 'llmaas_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    schema = raw.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(
        schema["paths"]
    )
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in chat["responses"] and "400" in chat["responses"]


def test_health_is_503_until_loaded(model_dir):
    release = threading.Event()

    def load(name):
        release.wait(10)
        return make_engine(model_dir)

    with serve(create_app(load=load, model_names=["m"])) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and "Retry-After" in r.headers
        r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": HELLO})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "m"
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": HELLO, "max_tokens": 2})
        assert r.status_code == 200


# ------------------------------------------------------------- disconnects and backpressure
def test_stream_disconnect_aborts_the_engine_request(base_url, engine, hook):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 800, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=base_url, timeout=30) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line).removeprefix("data: "))
        for _ in range(6):
            next(lines)
    # The connection is closed now: the engine must drop the request within a step or so.
    deadline = time.monotonic() + 5
    while not engine_idle(engine):
        assert time.monotonic() < deadline, "engine kept generating after the client left"
        time.sleep(0.01)
    steps = engine.call(lambda e: e.num_steps).result(5)
    time.sleep(0.2)
    assert engine.call(lambda e: e.num_steps).result(5) == steps
    record = hook.wait_for(first["id"])
    assert record.status == "aborted" and 0 < record.completion_tokens < 800
    assert record.prompt_tokens > 0


def test_non_stream_disconnect_aborts_the_engine_request(base_url, engine, hook):
    seen = {r.request_id for r in hook.records}
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 800, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 5
    while True:
        new = [r for r in hook.records if r.request_id not in seen]
        if new:
            break
        assert time.monotonic() < deadline, "no usage reported for the abandoned request"
        time.sleep(0.01)
    assert new[0].status == "aborted" and 0 < new[0].completion_tokens < 800
    assert engine_idle(engine)


def test_full_waiting_queue_is_503_with_retry_after(model_dir):
    aeng = make_engine(model_dir, max_waiting=0)  # every request finds the queue full
    try:
        with serve(create_app({MODEL: aeng})) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.InternalServerError) as info:
                c.chat.completions.create(model=MODEL, messages=HELLO)
            assert info.value.status_code == 503 and info.value.code == "engine_overloaded"
            assert info.value.response.headers["retry-after"] == "1"
    finally:
        aeng.shutdown()


def test_concurrent_clients(base_url):
    async def main():
        c = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(
            *[
                c.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"n{i}"}],
                    max_tokens=4,
                    extra_body={"ignore_eos": True},
                )
                for i in range(12)
            ]
        )
        await c.close()
        return rs

    results = asyncio.run(main())
    assert all(r.usage.completion_tokens == 4 for r in results)


# ------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_model_chat_over_http():
    aeng = AsyncEngine(LLMEngine(EngineConfig(model="smollm2-135m", kv_cache_memory=64 * 2**20)))
    try:
        with serve(create_app({"smollm2-135m": aeng})) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            messages = [
                {"role": "system", "content": "You are a helpful assistant. " * 4},
                {"role": "user", "content": "What is the capital of France?"},
            ]
            first = c.chat.completions.create(
                model="smollm2-135m", messages=messages, max_tokens=20, temperature=0
            )
            assert "Paris" in first.choices[0].message.content
            again = c.chat.completions.create(
                model="smollm2-135m",
                messages=messages,
                max_tokens=20,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(again)
            assert (
                "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                == first.choices[0].message.content
            )
            assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16
    finally:
        aeng.shutdown()
