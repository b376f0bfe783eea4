"""The budget half of `RedisStore`: counters and reservations, every step one Lua script.

It exists to keep the budget scripts and their arithmetic apart from the usage ledger; both share
one client through `RedisConnection`.

A Lua script runs atomically on the Redis server, so "check every scope, then reserve on all of
them" cannot interleave with another replica's: two replicas cannot both spend a session's last
tokens. Reservation expiry uses the server's clock (`TIME`), so replicas with skewed clocks agree.

Keys (P{T} as in `redis_connection`):

* `P{T}:b:<kind>:<scope id>`       hash  used_tokens, used_cost, reserved_tokens, reserved_cost
                                          (cost in micro-units); expires after `budget_key_ttl`
                                          without activity (default 40 days)
* `P{T}:b:<kind>:<scope id>:held`  zset  `<reservation id>|<tokens>|<cost>` scored by its expiry
                                          (server µs); the expired ones are given back lazily
* `P{T}:r:<reservation id>`        hash  state (reserved | settled | released); lives a day past
                                          the reservation's expiry so a retried settle counts once
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as aioredis

from app.store.base import DEFAULT_RESERVATION_TTL_SECONDS, Store, refusal
from app.store.models import (
    BudgetScope,
    Refusal,
    Reservation,
    ScopeUsage,
    from_micros,
    reservation_id,
)
from app.store.redis_connection import DEFAULT_PREFIX, RedisConnection, q

DEFAULT_BUDGET_KEY_TTL_SECONDS = 40 * 86_400
KEEP_FINISHED_SECONDS = 86_400

_PURGE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function purge(h, z, now)
  local due = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, m in ipairs(due) do
    local _, _, tk, cs = string.find(m, '|(%d+)|(%d+)$')
    redis.call('ZREM', z, m)
    if tk then
      redis.call('HINCRBY', h, 'reserved_tokens', 0 - tonumber(tk))
      redis.call('HINCRBY', h, 'reserved_cost', 0 - tonumber(cs))
    end
  end
end
local function counters(h)
  local v = redis.call('HMGET', h, 'used_tokens', 'used_cost', 'reserved_tokens', 'reserved_cost')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0
end
local function str(x)
  if x == false then return '' end
  return string.format('%.0f', x)
end
"""

# KEYS: (counters hash, held zset) per scope, then the reservation's state hash.
# ARGV: tokens, cost, ttl_us, rid, key_ttl, state_ttl, then (limit_tokens, limit_cost) per scope,
# '' for no limit. Returns {0, scope index, dimension, tokens_left, cost_left} or
# {1, expires_us, tokens_left_1, cost_left_1, ...}.
_RESERVE = (
    _PURGE
    + """
local tokens = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local n = (#KEYS - 1) / 2
local now = now_us()
local left = {}
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  purge(h, z, now)
  local ut, uc, rt, rc = counters(h)
  local lt, lc = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  local tl, cl = false, false
  if lt ~= '' then tl = math.max(0, tonumber(lt) - ut - rt) end
  if lc ~= '' then cl = math.max(0, tonumber(lc) - uc - rc) end
  if tl ~= false and tokens > tl then return {0, i, 'tokens', str(tl), str(cl)} end
  if cl ~= false and cost > cl then return {0, i, 'cost', str(tl), str(cl)} end
  left[2 * i - 1] = str(tl)
  left[2 * i] = str(cl)
end
local expires = now + tonumber(ARGV[3])
local member = ARGV[4] .. '|' .. ARGV[1] .. '|' .. ARGV[2]
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  redis.call('HINCRBY', h, 'reserved_tokens', tokens)
  redis.call('HINCRBY', h, 'reserved_cost', cost)
  redis.call('ZADD', z, expires, member)
  redis.call('EXPIRE', h, ARGV[5])
  redis.call('EXPIRE', z, ARGV[5])
end
local state = KEYS[#KEYS]
redis.call('HSET', state, 'state', 'reserved')
redis.call('EXPIRE', state, ARGV[6])
local out = {1, str(expires)}
for i = 1, 2 * n do out[#out + 1] = left[i] end
return out
"""
)

# settle(n, a): n scopes at KEYS[1..2n] (counters hash, held zset), the reservation's state hash at
# KEYS[2n+1]; ARGV[a+1..a+7]: member, actual_tokens, actual_cost, key_ttl, state_ttl,
# reserved_tokens, reserved_cost. Returns 1 if the usage was recorded, 0 if already settled.
# A function, so that settle_and_record (redis_store) runs the same lines before the ledger's.
SETTLE_FUNCTION = """
local function settle(n, a)
  local state = KEYS[2 * n + 1]
  if redis.call('HGET', state, 'state') == 'settled' then return 0 end
  for i = 1, n do
    local h, z = KEYS[2 * i - 1], KEYS[2 * i]
    if redis.call('ZREM', z, ARGV[a + 1]) == 1 then
      redis.call('HINCRBY', h, 'reserved_tokens', 0 - tonumber(ARGV[a + 6]))
      redis.call('HINCRBY', h, 'reserved_cost', 0 - tonumber(ARGV[a + 7]))
    end
    redis.call('HINCRBY', h, 'used_tokens', ARGV[a + 2])
    redis.call('HINCRBY', h, 'used_cost', ARGV[a + 3])
    redis.call('EXPIRE', h, ARGV[a + 4])
  end
  redis.call('HSET', state, 'state', 'settled')
  redis.call('EXPIRE', state, ARGV[a + 5])
  return 1
end
"""
_SETTLE = SETTLE_FUNCTION + "return settle((#KEYS - 1) / 2, 0)\n"

# KEYS as for reserve. ARGV: member, reserved_tokens, reserved_cost, state_ttl.
_RELEASE = """
local state = KEYS[#KEYS]
if redis.call('HGET', state, 'state') ~= 'reserved' then return 0 end
local n = (#KEYS - 1) / 2
local released = 0
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('ZREM', z, ARGV[1]) == 1 then
    redis.call('HINCRBY', h, 'reserved_tokens', 0 - tonumber(ARGV[2]))
    redis.call('HINCRBY', h, 'reserved_cost', 0 - tonumber(ARGV[3]))
    released = 1
  end
end
redis.call('HSET', state, 'state', 'released')
redis.call('EXPIRE', state, ARGV[4])
return released
"""

# KEYS: counters hash, held zset. Returns the four counters after giving back expired holds.
_USAGE = (
    _PURGE
    + """
purge(KEYS[1], KEYS[2], now_us())
local ut, uc, rt, rc = counters(KEYS[1])
return {str(ut), str(uc), str(rt), str(rc)}
"""
)


def _opt_int(text: str) -> int | None:
    return None if text == "" else int(text)


class RedisBudget(RedisConnection, Store):
    """Budget counters and reservations over the shared client (the Store's budget hooks)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS,
        budget_key_ttl_seconds: int = DEFAULT_BUDGET_KEY_TTL_SECONDS,
        owns_client: bool = True,
    ) -> None:
        super().__init__(client, prefix=prefix, owns_client=owns_client)
        self._ttl_us = int(reservation_ttl_seconds * 1_000_000)
        self._key_ttl = max(int(budget_key_ttl_seconds), int(reservation_ttl_seconds) + 1)
        self._state_ttl = int(reservation_ttl_seconds) + KEEP_FINISHED_SECONDS

    # --- keys ------------------------------------------------------------------------------------

    def _scope_keys(self, scope: BudgetScope) -> list[str]:
        base = f"{self._tenant(scope.tenant)}:b:{scope.kind}:{q(scope.id)}"
        return [base, f"{base}:held"]

    def _reservation_keys(self, reservation: Reservation) -> list[str]:
        keys = [key for scope in reservation.scopes for key in self._scope_keys(scope)]
        keys.append(f"{self._tenant(reservation.tenant)}:r:{reservation.id}")
        return keys

    @staticmethod
    def _member(reservation: Reservation) -> str:
        return f"{reservation.id}|{reservation.tokens}|{reservation.cost_micros}"

    # --- budgets ---------------------------------------------------------------------------------

    async def _reserve(
        self, scopes: tuple[BudgetScope, ...], tokens: int, cost_micros: int
    ) -> Reservation | Refusal:
        rid = reservation_id()
        tenant = scopes[0].tenant
        keys = [key for scope in scopes for key in self._scope_keys(scope)]
        keys.append(f"{self._tenant(tenant)}:r:{rid}")
        args: list[str | int] = [
            tokens,
            cost_micros,
            self._ttl_us,
            rid,
            self._key_ttl,
            self._state_ttl,
        ]
        for scope in scopes:
            limit_cost = scope.limit_cost_micros
            args.append("" if scope.limit_tokens is None else scope.limit_tokens)
            args.append("" if limit_cost is None else limit_cost)
        out = cast(list[Any], await self._call(_RESERVE, keys, args))
        if int(out[0]) == 0:
            scope = scopes[int(out[1]) - 1]
            return refusal(
                scope, str(out[2]), _opt_int(out[3]), _opt_int(out[4]), tokens, cost_micros
            )
        left = [str(value) for value in out[2:]]
        remaining: list[tuple[int | None, float | None]] = []
        for i in range(len(scopes)):
            cost_left = _opt_int(left[2 * i + 1])
            remaining.append(
                (_opt_int(left[2 * i]), None if cost_left is None else from_micros(cost_left))
            )
        return Reservation(rid, tenant, scopes, tokens, cost_micros, tuple(remaining))

    async def _settle(self, reservation: Reservation, actual_tokens: int, cost_micros: int) -> bool:
        args = self._settle_args(reservation, actual_tokens, cost_micros)
        out = await self._call(_SETTLE, self._reservation_keys(reservation), args)
        return int(out) == 1

    def _settle_args(
        self, reservation: Reservation, actual_tokens: int, cost_micros: int
    ) -> list[str | int]:
        """ARGV of SETTLE_FUNCTION."""
        return [
            self._member(reservation),
            actual_tokens,
            cost_micros,
            self._key_ttl,
            self._state_ttl,
            reservation.tokens,
            reservation.cost_micros,
        ]

    async def release(self, reservation: Reservation) -> bool:
        args: list[str | int] = [
            self._member(reservation),
            reservation.tokens,
            reservation.cost_micros,
            self._state_ttl,
        ]
        out = await self._call(_RELEASE, self._reservation_keys(reservation), args)
        return int(out) == 1

    async def usages(self, scopes: Sequence[BudgetScope]) -> list[ScopeUsage]:
        # a tenant's scopes share one hash slot, but each read is its own short script: the
        # three are not one snapshot, which a headroom (a planning estimate) does not need
        return [await self._scope_usage(scope) for scope in scopes]

    async def _scope_usage(self, scope: BudgetScope) -> ScopeUsage:
        out = cast(list[Any], await self._call(_USAGE, self._scope_keys(scope), []))
        used_tokens, used_cost, reserved_tokens, reserved_cost = (int(v) for v in out)
        return ScopeUsage(scope, used_tokens, used_cost, reserved_tokens, reserved_cost)
