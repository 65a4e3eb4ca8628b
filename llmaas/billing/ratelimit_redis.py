"""Rate limits shared by several server processes: the same token buckets, kept in Redis.

One Lua script refills and takes from both buckets atomically, with Redis's own clock (TIME), so
processes on different machines agree on the time. Buckets expire once idle long enough to be full.
"""

from __future__ import annotations

import redis

from llmaas.billing.ratelimit import RateLimitDecision, check_limits, decide, raise_if_refused

# KEYS[1]: the key's bucket hash. ARGV: rpm, tpm, tokens, mode ("take", "adjust": tokens is the delta
# to subtract, or "peek": read only), requests to take (1, or 0 when taken earlier). Returns
# {allowed, request_level, token_level} as strings (Lua numbers are doubles; a number reply would be
# truncated to an integer).
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'r', 't', 'at')
local r = tonumber(state[1]) or rpm
local tk = tonumber(state[2]) or tpm
local at = tonumber(state[3]) or now
local elapsed = math.max(0, now - at)
r = math.min(rpm, r + elapsed * rpm / 60)
tk = math.min(tpm, tk + elapsed * tpm / 60)
local allowed = 1
local requests = tonumber(ARGV[5]) or 1
if ARGV[4] == 'take' then
  if r >= requests and tk >= tokens then
    r = r - requests
    tk = tk - tokens
  else
    allowed = 0
  end
elseif ARGV[4] == 'adjust' then
  tk = math.min(tpm, tk - tokens)
else
  return {tostring(allowed), tostring(r), tostring(tk)}
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(tk), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
return {tostring(allowed), tostring(r), tostring(tk)}
"""


class RedisRateLimiter:
    def __init__(self, client: redis.Redis, prefix: str = "llmaas:ratelimit:"):
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(_SCRIPT)

    @classmethod
    def from_url(cls, url: str, prefix: str = "llmaas:ratelimit:") -> RedisRateLimiter:
        return cls(redis.Redis.from_url(url), prefix)

    def _run(
        self, key_id: str, rpm: int, tpm: int, tokens: int, mode: str, requests: int = 1
    ) -> tuple[bool, float, float]:
        args = [rpm, tpm, tokens, mode, requests]
        allowed, r, tk = self._script(keys=[self._prefix + key_id], args=args)
        return allowed in (b"1", "1"), float(r), float(tk)

    def acquire(
        self, key_id: str, requests_per_minute: int, tokens_per_minute: int, tokens: int, requests: int = 1
    ) -> RateLimitDecision:
        check_limits(requests_per_minute, tokens_per_minute, tokens, requests)
        allowed, r, tk = self._run(key_id, requests_per_minute, tokens_per_minute, tokens, "take", requests)
        return raise_if_refused(
            decide(allowed, r, tk, requests_per_minute, tokens_per_minute, tokens, requests)
        )

    def adjust(self, key_id: str, requests_per_minute: int, tokens_per_minute: int, token_delta: int) -> None:
        self._run(key_id, requests_per_minute, tokens_per_minute, token_delta, "adjust")

    def peek(self, key_id: str, requests_per_minute: int, tokens_per_minute: int) -> RateLimitDecision:
        check_limits(requests_per_minute, tokens_per_minute, 0)
        _, r, tk = self._run(key_id, requests_per_minute, tokens_per_minute, 0, "peek")
        return decide(True, r, tk, requests_per_minute, tokens_per_minute, 0)
