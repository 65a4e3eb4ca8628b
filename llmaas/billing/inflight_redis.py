"""In-flight counts shared by several server processes, kept in Redis.

Per account: a sorted set of request ids scored by their deadline (Redis's own clock, TIME) and a hash
request id -> "sequences:tokens". One Lua script drops expired entries, sums the rest and takes or
releases atomically, so replicas never both squeeze past a cap. A crashed replica's entries lapse at
their deadlines; both keys expire after the latest deadline so an idle account leaves nothing behind.
"""

from __future__ import annotations

import redis

from llmaas.billing.inflight import DEFAULT_TTL_S, InFlight, refuse

# KEYS[1]: deadlines (sorted set), KEYS[2]: sizes (hash). ARGV: mode ('acquire', 'release', 'usage'),
# request id, sequences, tokens, max sequences, max tokens, ttl seconds.
# Returns {taken_or_released (0/1), sequences in flight, tokens in flight} (before a refused acquire).
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('HDEL', KEYS[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] == 'release' then
  local removed = redis.call('ZREM', KEYS[1], ARGV[2])
  redis.call('HDEL', KEYS[2], ARGV[2])
  return {removed, 0, 0}
end
local seqs = 0
local toks = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  local s, k = string.match(v, '(%d+):(%d+)')
  seqs = seqs + tonumber(s)
  toks = toks + tonumber(k)
end
if ARGV[1] ~= 'acquire' or redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
  return {1, seqs, toks}
end
local want_s = tonumber(ARGV[3])
local want_t = tonumber(ARGV[4])
if seqs + want_s > tonumber(ARGV[5]) or toks + want_t > tonumber(ARGV[6]) then
  return {0, seqs, toks}
end
local ttl = tonumber(ARGV[7])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. ':' .. ARGV[4])
-- every entry shares one ttl, so the newest deadline is the latest: the keys outlive all entries
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
redis.call('EXPIRE', KEYS[2], math.ceil(ttl) + 1)
return {1, seqs + want_s, toks + want_t}
"""


class RedisInFlight:
    def __init__(self, client: redis.Redis, prefix: str = "llmaas:inflight:", ttl_s: float = DEFAULT_TTL_S):
        self._client = client
        self._prefix = prefix
        self.ttl_s = ttl_s
        self._script = client.register_script(_SCRIPT)

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "llmaas:inflight:", ttl_s: float = DEFAULT_TTL_S
    ) -> RedisInFlight:
        return cls(redis.Redis.from_url(url), prefix, ttl_s)

    def _run(self, mode: str, account: str, request_id: str = "", *args: int) -> tuple[int, int, int]:
        keys = [f"{self._prefix}{account}:deadlines", f"{self._prefix}{account}:sizes"]
        argv = [mode, request_id, *(args or (0, 0, 0, 0)), self.ttl_s]
        done, seqs, toks = self._script(keys=keys, args=argv)
        return int(done), int(seqs), int(toks)

    def acquire(
        self, account: str, request_id: str, sequences: int, tokens: int, max_sequences: int, max_tokens: int
    ) -> InFlight:
        taken, seqs, toks = self._run(
            "acquire", account, request_id, sequences, tokens, max_sequences, max_tokens
        )
        if not taken:
            refuse(InFlight(seqs, toks), sequences, tokens, max_sequences, max_tokens)
            raise AssertionError("the script refused what refuse() allows")  # one condition, two places
        return InFlight(seqs, toks)

    def release(self, account: str, request_id: str) -> bool:
        return self._run("release", account, request_id)[0] == 1

    def usage(self, account: str) -> InFlight:
        _, seqs, toks = self._run("usage", account)
        return InFlight(seqs, toks)
