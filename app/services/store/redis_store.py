"""The Store for several replicas: Redis (redis.asyncio), every budget step one Lua script.

A Lua script runs atomically on the Redis server, so "check every scope, then reserve on all of
them" cannot interleave with another replica's: two replicas cannot both spend a session's last
tokens. Reservation expiry uses the server's clock (`TIME`), so replicas with skewed clocks agree.

Key layout (P = the configured prefix, T = the tenant, percent-encoded; `{T}` is a hash tag so a
tenant's keys share one Redis Cluster slot and a script may touch several of them):

* `P{T}:b:<kind>:<scope id>`       hash  used_tokens, used_cost, reserved_tokens, reserved_cost
                                          (cost in micro-units); expires after `budget_key_ttl`
                                          without activity (default 40 days)
* `P{T}:b:<kind>:<scope id>:held`  zset  `<reservation id>|<tokens>|<cost>` scored by its expiry
                                          (server µs); the expired ones are given back lazily
* `P{T}:r:<reservation id>`        hash  state (reserved | settled | released); lives a day past
                                          the reservation's expiry so a retried settle counts once
* `P{T}:u:rec`                     hash  record id -> record JSON (HSETNX: idempotent append)
* `P{T}:u:idx`                     zset  `<time µs, 17 digits>|<record id>`, all scores 0: ordered
                                          by member, newest first with ZREVRANGEBYLEX; the member
                                          is the page cursor
* `P{T}:u:s:<session>:idx`         zset  the same, one session's records
* `P{T}:u:s:<session>`             hash  the session's totals, first_us, last_us
* `P{T}:u:sessions`                zset  session id scored by its last use (µs)
* `P{T}:u:totals`                  hash  the tenant's totals

Ledger keys do not expire: retention is an operator's decision (export, then delete the tenant's
`u:` keys).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.services.store.base import (
    DEFAULT_ACTIVE_WINDOW_SECONDS,
    DEFAULT_RESERVATION_TTL_SECONDS,
    StoreUnavailable,
    check_page_args,
    check_reserve_args,
    refusal,
    remaining_of,
)
from app.services.store.models import (
    BudgetScope,
    Refusal,
    Reservation,
    ScopeUsage,
    SessionSummary,
    TenantStatus,
    UsagePage,
    UsageRecord,
    UsageTotals,
    from_epoch_us,
    from_micros,
    parse_cursor,
    reservation_id,
    to_micros,
)

DEFAULT_PREFIX = "cxrelay:"
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

# KEYS as for reserve. ARGV: member, actual_tokens, actual_cost, key_ttl, state_ttl,
# reserved_tokens, reserved_cost. Returns 1 if the usage was recorded, 0 if already settled.
_SETTLE = """
local state = KEYS[#KEYS]
if redis.call('HGET', state, 'state') == 'settled' then return 0 end
local n = (#KEYS - 1) / 2
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('ZREM', z, ARGV[1]) == 1 then
    redis.call('HINCRBY', h, 'reserved_tokens', 0 - tonumber(ARGV[6]))
    redis.call('HINCRBY', h, 'reserved_cost', 0 - tonumber(ARGV[7]))
  end
  redis.call('HINCRBY', h, 'used_tokens', ARGV[2])
  redis.call('HINCRBY', h, 'used_cost', ARGV[3])
  redis.call('EXPIRE', h, ARGV[4])
end
redis.call('HSET', state, 'state', 'settled')
redis.call('EXPIRE', state, ARGV[5])
return 1
"""

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

# KEYS: records, idx, session idx, session totals, sessions, tenant totals.
# ARGV: id, json, sort key, time_us, session, prompt, completion, cost, cached, estimated.
_APPEND = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], 0, ARGV[3])
redis.call('ZADD', KEYS[3], 0, ARGV[3])
local t = tonumber(ARGV[4])
for _, key in ipairs({KEYS[4], KEYS[6]}) do
  redis.call('HINCRBY', key, 'calls', 1)
  redis.call('HINCRBY', key, 'prompt_tokens', ARGV[6])
  redis.call('HINCRBY', key, 'completion_tokens', ARGV[7])
  redis.call('HINCRBY', key, 'cost_micros', ARGV[8])
  redis.call('HINCRBY', key, 'cached_calls', ARGV[9])
  redis.call('HINCRBY', key, 'estimated_calls', ARGV[10])
end
local first = tonumber(redis.call('HGET', KEYS[4], 'first_us'))
if first == nil or t < first then redis.call('HSET', KEYS[4], 'first_us', ARGV[4]) end
local last = tonumber(redis.call('HGET', KEYS[4], 'last_us'))
if last == nil or t > last then redis.call('HSET', KEYS[4], 'last_us', ARGV[4]) end
redis.call('ZADD', KEYS[5], 'GT', ARGV[4], ARGV[5])
return 1
"""

_TOTAL_FIELDS = (
    "calls",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "cached_calls",
    "estimated_calls",
)


def _q(part: str) -> str:
    """Percent-encode a key part: no `:`, `{`, `}` or `|` from a tenant or session id survives."""
    return quote(part, safe="")


def _totals(fields: dict[str, str]) -> UsageTotals:
    return UsageTotals(*(int(fields.get(name, 0)) for name in _TOTAL_FIELDS))


def _opt_int(text: str) -> int | None:
    return None if text == "" else int(text)


class RedisStore:
    """Open with `await RedisStore.open(url, prefix=...)`; `await close()` on shutdown."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS,
        budget_key_ttl_seconds: int = DEFAULT_BUDGET_KEY_TTL_SECONDS,
        owns_client: bool = True,
    ) -> None:
        self.prefix = prefix
        self._client = client
        self._owns_client = owns_client
        self._ttl_us = int(reservation_ttl_seconds * 1_000_000)
        self._key_ttl = max(int(budget_key_ttl_seconds), int(reservation_ttl_seconds) + 1)
        self._state_ttl = int(reservation_ttl_seconds) + KEEP_FINISHED_SECONDS
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._release = client.register_script(_RELEASE)
        self._usage = client.register_script(_USAGE)
        self._append = client.register_script(_APPEND)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS,
        budget_key_ttl_seconds: int = DEFAULT_BUDGET_KEY_TTL_SECONDS,
        timeout_seconds: float = 2.0,
        max_connections: int = 50,
    ) -> RedisStore:
        """Connects (and pings) now, so a wrong REDIS_URL stops start-up with a clear message."""
        # A blocking pool: a burst beyond max_connections waits (up to the timeout) for a free
        # connection instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            health_check_interval=30,
            max_connections=max_connections,
            timeout=timeout_seconds,
        )
        client = aioredis.Redis.from_pool(pool)
        store = cls(
            client,
            prefix=prefix,
            reservation_ttl_seconds=reservation_ttl_seconds,
            budget_key_ttl_seconds=budget_key_ttl_seconds,
        )
        try:
            await store.ping()
        except StoreUnavailable:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis store unreachable: {exc}") from exc

    async def _call(self, script: Any, keys: list[str], args: list[str | int]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis store error: {exc}") from exc

    # --- keys ------------------------------------------------------------------------------------

    def _tenant(self, tenant: str) -> str:
        return f"{self.prefix}{{{_q(tenant)}}}"

    def _scope_keys(self, scope: BudgetScope) -> list[str]:
        base = f"{self._tenant(scope.tenant)}:b:{scope.kind}:{_q(scope.id)}"
        return [base, f"{base}:held"]

    def _reservation_keys(self, reservation: Reservation) -> list[str]:
        keys = [key for scope in reservation.scopes for key in self._scope_keys(scope)]
        keys.append(f"{self._tenant(reservation.tenant)}:r:{reservation.id}")
        return keys

    @staticmethod
    def _member(reservation: Reservation) -> str:
        return f"{reservation.id}|{reservation.tokens}|{reservation.cost_micros}"

    # --- budgets ---------------------------------------------------------------------------------

    async def reserve(
        self, scopes: Sequence[BudgetScope], tokens: int, cost: float = 0.0
    ) -> Reservation | Refusal:
        check_reserve_args(scopes, tokens, cost)
        scopes = tuple(scopes)
        cost_micros = to_micros(cost)
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
        out = cast(list[Any], await self._call(self._reserve, keys, args))
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

    async def settle(
        self, reservation: Reservation, actual_tokens: int, actual_cost: float = 0.0
    ) -> bool:
        if actual_tokens < 0 or actual_cost < 0:
            raise ValueError("actual usage cannot be negative")
        args: list[str | int] = [
            self._member(reservation),
            actual_tokens,
            to_micros(actual_cost),
            self._key_ttl,
            self._state_ttl,
            reservation.tokens,
            reservation.cost_micros,
        ]
        out = await self._call(self._settle, self._reservation_keys(reservation), args)
        return int(out) == 1

    async def release(self, reservation: Reservation) -> bool:
        args: list[str | int] = [
            self._member(reservation),
            reservation.tokens,
            reservation.cost_micros,
            self._state_ttl,
        ]
        out = await self._call(self._release, self._reservation_keys(reservation), args)
        return int(out) == 1

    async def usage(self, scope: BudgetScope) -> ScopeUsage:
        out = cast(list[Any], await self._call(self._usage, self._scope_keys(scope), []))
        used_tokens, used_cost, reserved_tokens, reserved_cost = (int(v) for v in out)
        return ScopeUsage(scope, used_tokens, used_cost, reserved_tokens, reserved_cost)

    async def remaining(self, scope: BudgetScope) -> tuple[int | None, float | None]:
        return remaining_of(await self.usage(scope))

    # --- the ledger ------------------------------------------------------------------------------

    def _ledger_keys(self, record: UsageRecord) -> list[str]:
        base = f"{self._tenant(record.tenant)}:u"
        session = f"{base}:s:{_q(record.session)}"
        return [
            f"{base}:rec",
            f"{base}:idx",
            f"{session}:idx",
            session,
            f"{base}:sessions",
            f"{base}:totals",
        ]

    async def append_usage(self, record: UsageRecord) -> bool:
        return await self.append_usages([record]) == 1

    async def append_usages(self, records: Sequence[UsageRecord]) -> int:
        if not records:
            return 0
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for r in records:
                    args: list[str | int] = [
                        r.id,
                        r.to_json(),
                        r.sort_key,
                        r.time_us,
                        r.session,
                        r.prompt_tokens,
                        r.completion_tokens,
                        r.cost_micros,
                        int(r.cached),
                        int(r.estimated),
                    ]
                    await self._append(keys=self._ledger_keys(r), args=args, client=pipe)
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis store error: {exc}") from exc
        return sum(int(result) for result in results)

    async def list_usage(
        self,
        tenant: str,
        session: str | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> UsagePage:
        check_page_args(limit)
        if cursor is not None:
            parse_cursor(cursor)
        base = f"{self._tenant(tenant)}:u"
        index = f"{base}:idx" if session is None else f"{base}:s:{_q(session)}:idx"
        upper = "+" if cursor is None else f"({cursor}"
        try:
            members = await self._client.zrevrangebylex(index, upper, "-", 0, limit + 1)
            ids = [str(member).partition("|")[2] for member in members]
            texts = await self._client.hmget(f"{base}:rec", ids) if ids else []
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis store error: {exc}") from exc
        # decode_responses=True: replies are str
        records = [UsageRecord.from_json(cast(str, t)) for t in texts if t is not None]
        more = len(records) > limit
        records = records[:limit]
        return UsagePage(records, records[-1].sort_key if more and records else None)

    async def session_summary(self, tenant: str, session_id: str) -> SessionSummary | None:
        key = f"{self._tenant(tenant)}:u:s:{_q(session_id)}"
        try:
            fields = cast(dict[str, str], await self._client.hgetall(key))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis store error: {exc}") from exc
        return _summary(tenant, session_id, fields) if fields else None

    async def tenant_status(
        self,
        tenant: str,
        *,
        active_window_seconds: float = DEFAULT_ACTIVE_WINDOW_SECONDS,
        session_limit: int = 100,
    ) -> TenantStatus:
        base = f"{self._tenant(tenant)}:u"
        since_us = int((time.time() - active_window_seconds) * 1_000_000)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(f"{base}:totals")
                pipe.zrevrange(f"{base}:sessions", 0, session_limit - 1)
                pipe.zcard(f"{base}:sessions")
                pipe.zcount(f"{base}:sessions", since_us, "+inf")
                totals, session_ids, sessions_total, active = await pipe.execute()
            async with self._client.pipeline(transaction=False) as pipe:
                for sid in session_ids:
                    pipe.hgetall(f"{base}:s:{_q(str(sid))}")
                session_fields = await pipe.execute() if session_ids else []
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis store error: {exc}") from exc
        summaries = [
            _summary(tenant, str(sid), fields)
            for sid, fields in zip(session_ids, session_fields, strict=True)
            if fields
        ]
        return TenantStatus(
            tenant=tenant,
            totals=_totals(totals),
            sessions=summaries,
            sessions_total=int(sessions_total),
            active_sessions=int(active),
            active_window_seconds=active_window_seconds,
        )


def _summary(tenant: str, session_id: str, fields: dict[str, str]) -> SessionSummary:
    return SessionSummary(
        tenant=tenant,
        session_id=session_id,
        totals=_totals(fields),
        first_at=from_epoch_us(int(fields["first_us"])),
        last_at=from_epoch_us(int(fields["last_us"])),
    )
