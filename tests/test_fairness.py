"""Fairness between tenants (issue 13, item 8): a plan caps the sequences of one request (400 naming
the parameter) and the sequences and tokens one account has in flight (429 concurrency_limit_exceeded),
in process and in Redis; the in-flight count is released exactly once however the request ends."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from llmaas.billing import FreeGrant, create_account, create_key, open_database, open_holds, set_price
from llmaas.billing.holds import list_holds
from llmaas.billing.inflight import ConcurrencyLimitExceededError, InFlight, InProcessInFlight
from llmaas.billing.plans import PLANS
from llmaas.engine.sampling_params import SamplingParams
from llmaas.errors import InvalidRequestError
from llmaas.server import create_app
from llmaas.server.billing import ServerBilling
from llmaas.server.caller import Caller
from llmaas.server.registry import ModelRegistry
from llmaas.server.state import ServerState
from llmaas.server.usage import RequestUsage
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import MODEL, make_engine, serve

pytest_plugins = ["tests.billing_services"]

HELLO = [{"role": "user", "content": "Hello, how are you today?"}]
FREE = PLANS["free"]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["in_process", "redis"])
def in_flight(request):
    """(a limiter, a second one sharing its counts: another replica, expire(): lets every entry lapse)."""
    if request.param == "in_process":
        clock = FakeClock()
        one = InProcessInFlight(ttl_s=60, clock=clock)

        def expire() -> None:
            clock.now += 61

        return one, one, expire
    from llmaas.billing.inflight_redis import RedisInFlight
    from tests.billing_services import REDIS_URL

    prefix = request.getfixturevalue("redis_prefix") + request.node.name + ":"
    ttl = 0.5
    return (
        RedisInFlight.from_url(REDIS_URL, prefix=prefix, ttl_s=ttl),
        RedisInFlight.from_url(REDIS_URL, prefix=prefix, ttl_s=ttl),
        lambda: time.sleep(ttl + 0.2),
    )


# ----------------------------------------------------------------- the plan's caps


def test_free_caps_are_much_lower_than_plus():
    free, plus = PLANS["free"], PLANS["plus"]
    assert (free.max_sequences_per_request, free.max_sequences_in_flight) == (8, 16)
    assert (plus.max_sequences_per_request, plus.max_sequences_in_flight) == (128, 256)
    assert free.max_tokens_in_flight * 32 < plus.max_tokens_in_flight
    for plan in PLANS.values():
        assert plan.max_sequences_per_request <= plan.max_sequences_in_flight


def test_per_request_sequence_cap_names_the_parameter():
    FREE.check_request_sequences(1, 8)
    FREE.check_request_sequences(2, 4)
    with pytest.raises(InvalidRequestError) as err:
        FREE.check_request_sequences(1, 9)
    assert (err.value.status_code, err.value.param) == (400, "n")
    with pytest.raises(InvalidRequestError) as err:
        FREE.check_request_sequences(3, 3)
    assert err.value.param == "prompt" and "9 sequences" in str(err.value)
    with pytest.raises(InvalidRequestError) as err:
        FREE.check_request_tokens(FREE.max_tokens_in_flight + 1)
    assert err.value.param == "max_tokens"


# ----------------------------------------------------------------- the in-flight store


def test_in_flight_caps_sequences_and_tokens_per_account(in_flight):
    one, other_replica, _ = in_flight
    assert one.acquire("acct", "r1", 8, 1000, 16, 5000) == InFlight(8, 1000)
    assert other_replica.acquire("acct", "r2", 8, 1000, 16, 5000) == InFlight(16, 2000)
    with pytest.raises(ConcurrencyLimitExceededError) as err:
        one.acquire("acct", "r3", 1, 10, 16, 5000)
    e = err.value
    assert (e.status_code, e.code) == (429, "concurrency_limit_exceeded")
    assert e.headers["retry-after"] == "1" and "16 sequences" in str(e)
    assert one.acquire("other-acct", "r3", 1, 10, 16, 5000) == InFlight(1, 10)  # accounts are apart
    assert other_replica.release("acct", "r1")
    with pytest.raises(ConcurrencyLimitExceededError, match="tokens in flight"):
        one.acquire("acct", "r4", 1, 4001, 16, 5000)
    assert one.usage("acct") == InFlight(8, 1000)  # a refusal counts nothing
    assert one.acquire("acct", "r4", 8, 4000, 16, 5000) == InFlight(16, 5000)


def test_release_is_idempotent_and_acquire_of_a_counted_request_is_a_no_op(in_flight):
    one, other_replica, _ = in_flight
    one.acquire("acct", "r1", 4, 100, 16, 5000)
    assert one.acquire("acct", "r1", 4, 100, 16, 5000) == InFlight(4, 100)
    assert one.release("acct", "r1") is True
    assert other_replica.release("acct", "r1") is False  # released exactly once
    assert one.usage("acct") == InFlight(0, 0)


def test_entries_of_a_crashed_replica_expire(in_flight):
    crashed, survivor, expire = in_flight
    crashed.acquire("acct", "r1", 16, 100, 16, 5000)  # then the replica dies without releasing
    with pytest.raises(ConcurrencyLimitExceededError):
        survivor.acquire("acct", "r2", 1, 1, 16, 5000)
    expire()
    assert survivor.usage("acct") == InFlight(0, 0)
    assert survivor.acquire("acct", "r2", 16, 1, 16, 5000) == InFlight(16, 1)


# ----------------------------------------------------------------- through the server


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("fair"), max_position_embeddings=1024)
    aeng = make_engine(model_dir, kv_cache_memory=4 * 2**20)
    yield aeng
    aeng.shutdown()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    database = open_database(f"sqlite:///{tmp_path_factory.mktemp('fair-ledger') / 'billing.sqlite3'}")
    set_price(database, MODEL, input_usd="0.05", cached_input_usd="0.025", output_usd="0.20")
    yield database
    database.close()


@pytest.fixture(scope="module")
def server(engine, db):
    billing = ServerBilling(db)
    with serve(create_app({MODEL: engine}, billing=billing)) as url:
        yield url, billing


def free_key(db, name: str, micros: int = 10**9) -> tuple[str, str]:
    """(secret, the account's in-flight key)"""
    account = create_account(db, name, plan="free", free_grant=FreeGrant(micros, valid_for=None))
    return create_key(db, name).secret, str(account.id)


def post(url: str, path: str, key: str, body: dict) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(url + path, json={"model": MODEL, **body}, headers=headers, timeout=120)


def wait_until(condition, guard_s: float = 60.0) -> None:
    deadline = time.monotonic() + guard_s
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


def test_a_request_over_the_plans_sequence_cap_is_400_naming_the_parameter(server, db):
    url, _ = server
    key, _ = free_key(db, "fair-cap")
    cases = [
        ("/v1/chat/completions", {"messages": HELLO, "n": 9, "max_tokens": 2}, "n"),
        ("/v1/completions", {"prompt": "hi", "n": 1, "best_of": 9, "max_tokens": 2}, "best_of"),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2}, "prompt"),
    ]
    for path, body, param in cases:
        r = post(url, path, key, body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param
    assert (
        post(url, "/v1/chat/completions", key, {"messages": HELLO, "n": 8, "max_tokens": 2}).status_code
        == 200
    )


def usage_of(request_id: str, status: str) -> RequestUsage:
    return RequestUsage(request_id, MODEL, "chat.completions", 10, 0, 5, status, ("length",), None, None)


def test_in_flight_cap_is_429_and_released_when_requests_end(server, db):
    url, billing = server
    key, account = free_key(db, "fair-flight")
    principal = billing.authenticate(key)
    # Two requests of 8 sequences in flight (admitted as the handlers do; they end when told to here).
    occupants = [
        billing.admit(billing.begin(principal, MODEL, f"fair-occupant-{i}"), MODEL, 10, 100, sequences=8)
        for i in range(2)
    ]
    assert billing.in_flight.usage(account) == InFlight(16, 220)
    r = post(url, "/v1/chat/completions", key, {"messages": HELLO, "max_tokens": 2})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert r.headers["retry-after"] == "1"
    assert billing.in_flight.usage(account) == InFlight(16, 220)  # the refusal counted nothing
    billing.finish(occupants[0], usage_of("fair-occupant-0", "aborted"))  # the client left
    assert billing.in_flight.usage(account) == InFlight(8, 110)
    billing.finish(occupants[1], usage_of("fair-occupant-1", "failed"))  # the engine failed it
    assert billing.in_flight.usage(account) == InFlight(0, 0)
    for _ in range(3):  # finished requests release too: 3 x 8 sequences, one after another
        r = post(url, "/v1/chat/completions", key, {"messages": HELLO, "n": 8, "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert billing.in_flight.usage(account) == InFlight(0, 0)


def test_a_client_that_leaves_a_stream_releases_its_count(server, db):
    url, billing = server
    key, account = free_key(db, "fair-leaver")
    body = {"model": MODEL, "messages": HELLO, "n": 8, "max_tokens": 990, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=120) as c:
        with c.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        ) as s:
            assert s.status_code == 200
            next(s.iter_lines())
    wait_until(lambda: billing.in_flight.usage(account) == InFlight(0, 0))


def test_in_flight_is_released_when_admission_fails_later_in_the_chain(server, db):
    url, billing = server
    key, account = free_key(db, "fair-poor", micros=1)  # cannot cover any hold: 429 insufficient_quota
    r = post(url, "/v1/chat/completions", key, {"messages": HELLO, "max_tokens": 50})
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    assert billing.in_flight.usage(account) == InFlight(0, 0)


def test_in_flight_is_released_when_the_engine_rejects_or_settling_fails(server, db, monkeypatch):
    url, billing = server
    key, account = free_key(db, "fair-reject")
    too_long = {"prompt": [5] * 1100, "max_tokens": 1}  # past the model's 1024-token window
    r = post(url, "/v1/completions", key, too_long)
    assert r.status_code == 400, r.text
    wait_until(lambda: billing.in_flight.usage(account) == InFlight(0, 0))  # released as it settles

    # A settle that raises (the ledger unreachable) still releases the count.
    principal = billing.authenticate(key)
    admission = billing.admit(
        billing.begin(principal, MODEL, "fair-settle-fails"), MODEL, 10, 10, sequences=4
    )
    assert billing.in_flight.usage(account) == InFlight(4, 20)

    def broken_settle(*args, **kwargs):
        raise RuntimeError("database unreachable")

    monkeypatch.setattr("llmaas.server.billing.settle", broken_settle)
    with pytest.raises(RuntimeError):
        billing.finish(admission, usage_of("fair-settle-fails", "finished"))
    assert billing.in_flight.usage(account) == InFlight(0, 0)


def test_in_flight_is_shared_by_replicas_through_redis(db, redis_prefix):
    from llmaas.billing.inflight_redis import RedisInFlight
    from tests.billing_services import REDIS_URL

    replicas = [
        ServerBilling(db, in_flight=RedisInFlight.from_url(REDIS_URL, prefix=redis_prefix + "fair-replicas:"))
        for _ in range(2)
    ]
    key, account = free_key(db, "fair-replicas")
    principal = replicas[0].authenticate(key)
    first = replicas[0].admit(replicas[0].begin(principal, MODEL, "fair-r1"), MODEL, 10, 100, sequences=8)
    replicas[1].admit(replicas[1].begin(principal, MODEL, "fair-r2"), MODEL, 10, 100, sequences=8)
    with pytest.raises(ConcurrencyLimitExceededError):
        replicas[1].admit(replicas[1].begin(principal, MODEL, "fair-r3"), MODEL, 10, 100, sequences=1)
    replicas[0].finish(first, usage_of("fair-r1", "finished"))
    assert replicas[1].in_flight.usage(account) == InFlight(8, 110)
    replicas[1].admit(replicas[1].begin(principal, MODEL, "fair-r3"), MODEL, 10, 100, sequences=8)


def test_an_admission_that_completes_after_its_request_left_is_undone(server, db, monkeypatch):
    """A request cancelled while its admission runs in a worker thread (the client left, the server
    stops) must not leave that admission's hold and in-flight count behind when the thread finishes."""
    _, billing = server
    key, account = free_key(db, "fair-left")
    principal = billing.authenticate(key)
    tokenizing = threading.Event()
    release = threading.Event()

    def slow_tokenize(prompts, params):
        tokenizing.set()
        release.wait(30)
        return [[1, 2, 3]]

    state = ServerState(ModelRegistry([]), billing=billing)
    engine = SimpleNamespace(tokenize=slow_tokenize, resolve_max_tokens=lambda num_prompt_tokens, params: 5)
    model = SimpleNamespace(name=MODEL, engine=engine)
    caller = Caller(principal, None)

    async def scenario() -> None:
        admitting = asyncio.ensure_future(
            state._admit(caller, model, ["hi"], SamplingParams(max_tokens=5), "fair-left-1")
        )
        while not tokenizing.is_set():
            await asyncio.sleep(0.01)
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        release.set()
        for _ in range(600):  # until the thread's hold exists and was closed again
            if [(h.request_id, h.status) for h in list_holds(db, "fair-left", include_closed=True)] == [
                ("fair-left-1", "released")
            ]:
                return
            await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert billing.in_flight.usage(account) == InFlight(0, 0)
    assert open_holds(db, int(account)) == []
