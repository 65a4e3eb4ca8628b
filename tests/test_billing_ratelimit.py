"""Rate limits: token buckets in process and in Redis, the 429 they raise and the headers they give."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmaas.billing import InProcessRateLimiter, RateLimitExceededError
from llmaas.billing.ratelimit import format_reset
from llmaas.errors import InvalidRequestError

pytest_plugins = ["tests.billing_services"]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["in_process", "redis"])
def limiter(request):
    """(limiter, advance(seconds)): Redis uses its own clock, so advancing means sleeping there."""
    if request.param == "in_process":
        clock = FakeClock()

        def advance(seconds: float) -> None:
            clock.now += seconds

        return InProcessRateLimiter(clock=clock), advance
    import time

    from llmaas.billing.ratelimit_redis import RedisRateLimiter
    from tests.billing_services import REDIS_URL

    prefix = request.getfixturevalue("redis_prefix") + request.node.name + ":"
    return RedisRateLimiter.from_url(REDIS_URL, prefix=prefix), time.sleep


def test_format_reset():
    assert [format_reset(s) for s in (0, 0.02, 1, 1.2, 61, 360)] == ["0s", "20ms", "1s", "2s", "1m1s", "6m0s"]


def test_requests_per_minute(limiter):
    lim, advance = limiter
    for i in range(3):
        d = lim.acquire("k", 3, 1000, 10)
        assert d.allowed and d.remaining_requests == 2 - i
    with pytest.raises(RateLimitExceededError) as info:
        lim.acquire("k", 3, 1000, 10)
    err = info.value
    assert (err.status_code, err.code) == (429, "rate_limit_exceeded")
    assert 19 < err.retry_after_s <= 20  # one request refills every 60/3 = 20 s
    assert err.headers["retry-after"] == "20"
    assert err.headers["x-ratelimit-limit-requests"] == "3"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert lim.acquire("other-key", 3, 1000, 10).allowed  # keys are independent


def test_tokens_per_minute_and_headers(limiter):
    lim, _ = limiter
    d = lim.acquire("k", 100, 600, 500)
    h = d.headers
    assert h["x-ratelimit-limit-tokens"] == "600"
    assert h["x-ratelimit-remaining-tokens"] in ("100", "99", "101")
    assert h["x-ratelimit-reset-tokens"] in ("50s", "49s")  # 500 tokens at 10 tokens/s
    assert "retry-after" not in h
    with pytest.raises(RateLimitExceededError, match="tokens per minute") as info:
        lim.acquire("k", 100, 600, 200)
    assert 9 < info.value.retry_after_s <= 10  # 100 tokens short at 10 tokens/s
    # More than a minute's allowance can never pass: no Retry-After, the message says why.
    with pytest.raises(RateLimitExceededError, match="too large") as info:
        lim.acquire("big", 100, 600, 601)
    assert info.value.retry_after_s is None and "retry-after" not in info.value.headers


def test_refill_and_adjust(limiter):
    lim, advance = limiter
    lim.acquire("k", 60, 60, 60)
    with pytest.raises(RateLimitExceededError):
        lim.acquire("k", 60, 60, 1)
    advance(1.05)  # 1 token per second
    assert lim.acquire("k", 60, 60, 1).allowed
    # The request used 30 tokens fewer than estimated: they come back at settle.
    lim.adjust("k", 60, 60, -30)
    assert lim.acquire("k", 60, 60, 30).allowed
    # More than estimated: the bucket goes below zero and later requests wait for it.
    lim.adjust("k", 60, 60, 10)
    with pytest.raises(RateLimitExceededError):
        lim.acquire("k", 60, 60, 1)


def test_bad_limits(limiter):
    lim, _ = limiter
    with pytest.raises(InvalidRequestError):
        lim.acquire("k", 0, 10, 1)
    with pytest.raises(InvalidRequestError):
        lim.acquire("k", 10, 10, -1)


def test_concurrent_acquires_never_exceed_the_limit(limiter):
    lim, _ = limiter
    start = threading.Barrier(40)

    def attempt(_):
        start.wait()
        try:
            lim.acquire("shared", 10, 100_000, 1)
            return True
        except RateLimitExceededError:
            return False

    with ThreadPoolExecutor(40) as pool:
        assert sum(pool.map(attempt, range(40))) == 10


def test_two_redis_limiters_share_buckets(redis_prefix):
    from llmaas.billing.ratelimit_redis import RedisRateLimiter
    from tests.billing_services import REDIS_URL

    one = RedisRateLimiter.from_url(REDIS_URL, prefix=redis_prefix + "shared:")
    two = RedisRateLimiter.from_url(REDIS_URL, prefix=redis_prefix + "shared:")
    one.acquire("k", 2, 100, 1)
    two.acquire("k", 2, 100, 1)
    with pytest.raises(RateLimitExceededError):
        one.acquire("k", 2, 100, 1)


def test_peek_reads_the_buckets_and_takes_nothing(limiter):
    lim, _ = limiter
    full = lim.peek("k-peek", 5, 1000)
    assert full.allowed and full.remaining_requests == 5 and full.remaining_tokens == 1000
    lim.acquire("k-peek", 5, 1000, 300)
    for _ in range(3):
        seen = lim.peek("k-peek", 5, 1000)
    assert seen.remaining_requests == 4 and seen.remaining_tokens in (700, 701)
    assert seen.headers["x-ratelimit-limit-requests"] == "5" and "retry-after" not in seen.headers


def test_the_request_then_its_tokens_in_two_steps(limiter):
    """The server takes the request before any work on the prompt (tokens=0), then its tokens once
    counted (requests=0); the second step never takes a request, and is refused for tokens only."""
    lim, _ = limiter
    first = lim.acquire("two-step", 2, 1000, 0)
    assert first.remaining_requests == 1 and first.remaining_tokens == 1000
    second = lim.acquire("two-step", 2, 1000, 600, requests=0)
    assert second.remaining_requests == 1 and second.remaining_tokens == 400
    lim.acquire("two-step", 2, 1000, 0)  # the last request of the minute
    with pytest.raises(RateLimitExceededError) as info:
        lim.acquire("two-step", 2, 1000, 500, requests=0)  # no request needed; too few tokens
    assert "tokens per minute" in info.value.message
    assert 5 < info.value.retry_after_s <= 7  # 100 tokens at 1000/60 per second
    assert lim.acquire("two-step", 2, 1000, 300, requests=0).remaining_requests == 0
    with pytest.raises(RateLimitExceededError) as info:
        lim.acquire("two-step", 2, 1000, 0)
    assert "requests per minute" in info.value.message
