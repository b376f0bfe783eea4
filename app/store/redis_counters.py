"""The inbound limits' counters in Redis (app.store.counters says how they count): the same
GCRA buckets and stream leases as MemoryCounters, as Lua scripts every replica runs against one
count. Apart from counters.py so that a service on SQLite never imports the Redis client."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from app.store.counters import Bucket, Slot, unit_ms
from app.store.redis_connection import DEFAULT_PREFIX, RedisConnection, q

if TYPE_CHECKING:
    import redis.asyncio as aioredis

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: one per bucket. ARGV[1]: the amount; ARGV[1 + i]: bucket i's milliseconds per unit.
# Returns {wait in ms (a string: Lua numbers would be truncated), index (1-based; 0: taken)}.
_TAKE = (
    _NOW
    + """
local amount = tonumber(ARGV[1])
local wait, binding, tats = 0, 0, {}
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  tats[i] = tat + amount * tonumber(ARGV[i + 1])
  if tats[i] - now - 60000 > math.max(wait, 0.001) then wait, binding = tats[i] - now - 60000, i end
end
if binding > 0 then return {tostring(wait), binding} end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, tostring(tats[i]), 'PX', math.ceil(tats[i] - now) + 1000)
end
return {'0', 0}
"""
)

# KEYS: one per bucket. ARGV[1]: the signed amount; ARGV[1 + i]: bucket i's milliseconds per unit.
_ADJUST = (
    _NOW
    + """
local delta = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or '0')
  if delta > 0 and tat < now then tat = now end
  tat = tat + delta * tonumber(ARGV[i + 1])
  if tat > now then
    redis.call('SET', key, tostring(tat), 'PX', math.ceil(tat - now) + 1000)
  else
    redis.call('DEL', key)
  end
end
return 0
"""
)

# KEYS: one sorted set per slot. ARGV[1]: the lease id; ARGV[2]: its time to live (ms);
# ARGV[2 + i]: slot i's limit. Returns 0 when held, else the (1-based) index of a full slot.
_LEASE = (
    _NOW
    + """
local ttl = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if not redis.call('ZSCORE', key, ARGV[1])
      and redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then
    return i
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[1])
  redis.call('PEXPIRE', key, ttl)
end
return 0
"""
)

_UNLEASE = "for _, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[1]) end return 0"


class RedisCounters(RedisConnection):
    """The counters every replica shares; a Redis failure is StoreUnavailable (the caller
    decides what a limit that cannot be counted means)."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(client, prefix=prefix, owns_client=False)  # the store's client

    def _key(self, tenant: str, name: str) -> str:
        return f"{self._tenant(tenant)}:lim:{q(name)}"

    async def take(self, tenant: str, buckets: Sequence[Bucket], amount: int) -> tuple[float, int]:
        keys = [self._key(tenant, name) for name, _ in buckets]
        args: list[str | int] = [amount, *(repr(unit_ms(n)) for _, n in buckets)]
        wait, binding = await self._call(_TAKE, keys, args)
        return (float(wait) / 1000, int(binding) - 1) if int(binding) else (0.0, -1)

    async def adjust(self, tenant: str, buckets: Sequence[Bucket], delta: int) -> None:
        keys = [self._key(tenant, name) for name, _ in buckets]
        await self._call(_ADJUST, keys, [delta, *(repr(unit_ms(n)) for _, n in buckets)])

    async def lease(self, tenant: str, slots: Sequence[Slot], lease_id: str, ttl: float) -> int:
        keys = [self._key(tenant, name) for name, _ in slots]
        ttl_ms = max(1, math.ceil(ttl * 1000))
        full = await self._call(_LEASE, keys, [lease_id, ttl_ms, *(n for _, n in slots)])
        return int(full) - 1

    async def unlease(self, tenant: str, names: Sequence[str], lease_id: str) -> None:
        keys = [self._key(tenant, name) for name in names]
        await self._call(_UNLEASE, keys, [lease_id])
