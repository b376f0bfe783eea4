"""The ledger half of `RedisStore`: usage records, per-session and per-tenant totals.

It exists to keep the usage ledger (idempotent appends, paged reads, summaries) apart from the
budget scripts; both share one client through `RedisConnection`.

Keys (P{T} as in `redis_connection`):

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
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.store.base import (
    DEFAULT_ACTIVE_WINDOW_SECONDS,
    StoreUnavailable,
    check_page_args,
)
from app.store.models import (
    SessionSummary,
    TenantStatus,
    UsagePage,
    UsageRecord,
    UsageTotals,
)
from app.store.redis_connection import DEFAULT_PREFIX, RedisConnection, q

# append(k, a): KEYS[k+1..k+6] records, idx, session idx, session totals, sessions, tenant totals;
# ARGV[a+1..a+10] id, json, sort key, time_us, session, prompt, completion, cost, cached,
# estimated. Returns 1 if written, 0 if the id was there. A record without a session (an empty
# one, NO_SESSION) touches none of the three session keys. A function, so that settle_and_record
# (redis_store) runs the same lines after the budget's.
APPEND_FUNCTION = """
local function append(k, a)
  if redis.call('HSETNX', KEYS[k + 1], ARGV[a + 1], ARGV[a + 2]) == 0 then return 0 end
  redis.call('ZADD', KEYS[k + 2], 0, ARGV[a + 3])
  local session = ARGV[a + 5] ~= ''
  local totals = {KEYS[k + 6]}
  if session then
    redis.call('ZADD', KEYS[k + 3], 0, ARGV[a + 3])
    totals = {KEYS[k + 4], KEYS[k + 6]}
  end
  for _, key in ipairs(totals) do
    redis.call('HINCRBY', key, 'calls', 1)
    redis.call('HINCRBY', key, 'prompt_tokens', ARGV[a + 6])
    redis.call('HINCRBY', key, 'completion_tokens', ARGV[a + 7])
    redis.call('HINCRBY', key, 'cost_micros', ARGV[a + 8])
    redis.call('HINCRBY', key, 'cached_calls', ARGV[a + 9])
    redis.call('HINCRBY', key, 'estimated_calls', ARGV[a + 10])
  end
  if not session then return 1 end
  local t = tonumber(ARGV[a + 4])
  local first = tonumber(redis.call('HGET', KEYS[k + 4], 'first_us'))
  if first == nil or t < first then redis.call('HSET', KEYS[k + 4], 'first_us', ARGV[a + 4]) end
  local last = tonumber(redis.call('HGET', KEYS[k + 4], 'last_us'))
  if last == nil or t > last then redis.call('HSET', KEYS[k + 4], 'last_us', ARGV[a + 4]) end
  redis.call('ZADD', KEYS[k + 5], 'GT', ARGV[a + 4], ARGV[a + 5])
  return 1
end
"""
_APPEND = APPEND_FUNCTION + "return append(0, 0)\n"


def append_args(r: UsageRecord) -> list[str | int]:
    """ARGV of APPEND_FUNCTION."""
    return [
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


_TOTAL_FIELDS = (
    "calls",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "cached_calls",
    "estimated_calls",
)


def _totals(fields: dict[str, str]) -> UsageTotals:
    return UsageTotals(*(int(fields.get(name, 0)) for name in _TOTAL_FIELDS))


class RedisLedger(RedisConnection):
    """The usage ledger over the shared client."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        owns_client: bool = True,
    ) -> None:
        super().__init__(client, prefix=prefix, owns_client=owns_client)
        self._append = client.register_script(_APPEND)

    def _ledger_keys(self, record: UsageRecord) -> list[str]:
        base = f"{self._tenant(record.tenant)}:u"
        session = f"{base}:s:{q(record.session)}"
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
                    await self._append(keys=self._ledger_keys(r), args=append_args(r), client=pipe)
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
        check_page_args(limit, cursor)
        base = f"{self._tenant(tenant)}:u"
        index = f"{base}:s:{q(session)}:idx" if session else f"{base}:idx"
        upper = "+" if cursor is None else f"({cursor}"
        try:
            members = await self._client.zrevrangebylex(index, upper, "-", 0, limit + 1)
            ids = [str(member).partition("|")[2] for member in members]
            texts = await self._client.hmget(f"{base}:rec", ids) if ids else []
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis store error: {exc}") from exc
        # decode_responses=True: replies are str
        records = [UsageRecord.from_json(cast(str, t)) for t in texts if t is not None]
        return UsagePage.from_overfetch(records, limit)

    async def session_summary(self, tenant: str, session_id: str) -> SessionSummary | None:
        key = f"{self._tenant(tenant)}:u:s:{q(session_id)}"
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
                    pipe.hgetall(f"{base}:s:{q(str(sid))}")
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
    return SessionSummary.from_epoch_micros(
        tenant, session_id, _totals(fields), int(fields["first_us"]), int(fields["last_us"])
    )
