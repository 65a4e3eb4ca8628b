"""One request cannot hurt another over real HTTP: the issue's top_k 2**64 is a 400, and a fault in one
request's sampling under 8 concurrent streams fails that stream alone (an OpenAI-shaped error event,
no [DONE], usage "failed" with its tokens) while the other 7 finish normally. A forward-pass fault
ends every request with its tokens so far in the usage record, never 0."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from llmaas.engine import model_runner, sampler
from llmaas.server import create_app
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import MODEL, Recorder, make_engine, serve

FAULT_SEED = 666  # the request whose rows raise
FAULT_AFTER = 3  # ... once it has this many tokens
STREAMS = 8


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("isolation"), max_position_embeddings=1024)
    aeng = make_engine(d)
    yield aeng
    aeng.shutdown()


@pytest.fixture(scope="module")
def hook():
    return Recorder()


@pytest.fixture(scope="module")
def base_url(engine, hook):
    with serve(create_app({MODEL: engine}, billing_hook=hook)) as url:
        yield url


def chat_body(i: int, **kw) -> dict:
    messages = [{"role": "user", "content": f"Request number {i}: tell me a story about {i * 7} foxes."}]
    return {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": True,
        **kw,
    }


def record_for(hook: Recorder, user: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in hook.records if r.user == user]
        if found:
            return found[-1]
        time.sleep(0.01)
    raise AssertionError(f"no usage reported for user {user}")


async def read_stream(client: httpx.AsyncClient, body: dict) -> list:
    """Every `data:` payload of the SSE response, parsed (the literal [DONE] kept as a string)."""
    events = []
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def text_of(events: list) -> str:
    return "".join(
        c["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and "choices" in e
        for c in e["choices"]
    )


@pytest.mark.parametrize("top_k", [2**64, 2**63])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_the_issue_top_k_is_a_400_naming_it(base_url, engine, top_k, endpoint):
    body = {"model": MODEL, "max_tokens": 5, "top_k": top_k}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "x"}]
    else:
        body["prompt"] = "x"
    r = httpx.post(f"{base_url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "top_k" and error["type"] == "invalid_request_error"


def test_a_stop_list_beyond_the_limit_names_the_one_limit(base_url):
    body = chat_body(0, stop=["a", "b", "c", "d", "e"])
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert "up to 4 " in r.json()["error"]["message"]


def test_a_sampling_fault_in_one_of_8_streams_fails_it_alone(base_url, engine, hook, monkeypatch):
    """The issue's required test."""
    good = [chat_body(i, user=f"good-{i}") for i in range(STREAMS - 1)]
    bad = chat_body(STREAMS, seed=FAULT_SEED, max_tokens=200, user="bad-stream")
    with httpx.Client(base_url=base_url, timeout=60) as c:  # what each good request says on its own
        expected = [
            c.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in good
        ]
    real = sampler.sample
    faults = []

    def faulty(logits, seqs, generator=None, masks=None):
        in_flight = len(engine.engine.requests)  # on the engine thread, like this call
        if in_flight < STREAMS:
            time.sleep(0.02)  # slow steps until all 8 have arrived, so the fault hits a full batch
        for s in seqs:
            if (
                s.params.seed == FAULT_SEED
                and len(s.output_token_ids) >= FAULT_AFTER
                and in_flight == STREAMS
            ):
                faults.append(len(seqs))
                raise RuntimeError("injected fault in one request's sampling")
        return real(logits, seqs, generator, masks)

    monkeypatch.setattr(sampler, "sample", faulty)

    async def main():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            return await asyncio.gather(*(read_stream(client, b) for b in [*good, bad]))

    *good_events, bad_events = asyncio.run(main())
    monkeypatch.undo()
    assert faults[0] == STREAMS and faults[1:] == [1]  # the whole batch raised, then that one row alone
    for events, want, body in zip(good_events, expected, good):
        assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
        assert text_of(events) == want
        record = record_for(hook, body["user"])
        assert record.status == "finished" and record.completion_tokens == 40
    assert "[DONE]" not in bad_events
    assert bad_events[-1]["error"]["type"] == "server_error"
    assert bad_events[-1]["error"]["code"] == "engine_error" and bad_events[-1]["error"]["param"] is None
    assert set(bad_events[-1]["error"]) == {"message", "type", "param", "code"}
    record = record_for(hook, "bad-stream")
    # FAULT_AFTER tokens, or a few more if the last of the 8 arrived late (the fault waits for all 8)
    assert record.status == "failed" and FAULT_AFTER <= record.completion_tokens < 200
    assert record.prompt_tokens > 0
    assert record.finish_reasons == ("error",)
    assert not engine.call(lambda e: e.has_unfinished_requests()).result(5)


def test_the_sdk_sees_the_failed_stream_as_an_api_error(base_url, engine, hook, monkeypatch):
    real = sampler.sample

    def faulty(logits, seqs, generator=None, masks=None):
        if any(s.params.seed == FAULT_SEED and len(s.output_token_ids) >= FAULT_AFTER for s in seqs):
            raise RuntimeError("injected fault")
        return real(logits, seqs, generator, masks)

    monkeypatch.setattr(sampler, "sample", faulty)
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0, timeout=60)
    body = chat_body(1, seed=FAULT_SEED)
    stream = client.chat.completions.create(
        model=MODEL, messages=body["messages"], max_tokens=20, seed=FAULT_SEED, stream=True, user="sdk-bad"
    )
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert err.value.code == "engine_error"
    with pytest.raises(openai.InternalServerError) as err:  # not streamed: a 500 engine_error
        client.chat.completions.create(
            model=MODEL, messages=body["messages"], max_tokens=20, seed=FAULT_SEED, user="sdk-bad-whole"
        )
    assert err.value.status_code == 500 and err.value.code == "engine_error"
    for user in ("sdk-bad", "sdk-bad-whole"):
        record = record_for(hook, user)
        assert record.status == "failed" and record.completion_tokens == FAULT_AFTER


def test_a_forward_fault_bills_each_request_its_tokens(base_url, engine, hook, monkeypatch):
    """Not streamed: the engine hands back only the first and the last output of each request, so the
    counts of the last (failed) output must be real; they used to be lost with the request."""
    real = model_runner.build_forward_batch
    min_tokens = 6

    def broken(*args, **kwargs):
        seqs = [s for r in engine.engine.requests.values() for s in r.seqs]
        if len(seqs) == 4 and all(len(s.output_token_ids) >= min_tokens for s in seqs):
            raise RuntimeError("injected fault in the forward pass")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_runner, "build_forward_batch", broken)

    async def main():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            bodies = [chat_body(i, max_tokens=500, user=f"forward-{i}") for i in range(4)]
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))

    responses = asyncio.run(main())
    monkeypatch.undo()
    for i, r in enumerate(responses):
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        record = record_for(hook, f"forward-{i}")
        assert record.status == "failed" and record.completion_tokens >= min_tokens
    ok = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(9, max_tokens=3))  # still serving
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
