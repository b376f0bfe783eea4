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

from typing import cast

from app.store.base import Store, TenantUsage
from app.store.models import SessionSummary, UsageRecord, UsageTotals
from app.store.redis_connection import RedisConnection, q

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


class RedisLedger(RedisConnection, Store):
    """The usage ledger over the shared client (the Store's ledger hooks)."""

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

    async def _append_usages(self, records: list[UsageRecord]) -> int:
        append = self._script(_APPEND)
        with self._errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for r in records:
                    await append(keys=self._ledger_keys(r), args=append_args(r), client=pipe)
                results = await pipe.execute()
        return sum(int(result) for result in results)

    async def _records_before(
        self, tenant: str, session: str | None, cursor: str | None, count: int
    ) -> list[UsageRecord]:
        base = f"{self._tenant(tenant)}:u"
        index = f"{base}:idx" if session is None else f"{base}:s:{q(session)}:idx"
        upper = "+" if cursor is None else f"({cursor}"
        with self._errors():
            members = await self._client.zrevrangebylex(index, upper, "-", 0, count)
            ids = [str(member).partition("|")[2] for member in members]
            texts = await self._client.hmget(f"{base}:rec", ids) if ids else []
        # decode_responses=True: replies are str
        return [UsageRecord.from_json(cast(str, t)) for t in texts if t is not None]

    async def session_summary(self, tenant: str, session_id: str) -> SessionSummary | None:
        key = f"{self._tenant(tenant)}:u:s:{q(session_id)}"
        with self._errors():
            fields = cast(dict[str, str], await self._client.hgetall(key))
        return _summary(tenant, session_id, fields) if fields else None

    async def _tenant_usage(
        self, tenant: str, active_since_us: int, session_limit: int
    ) -> TenantUsage:
        base = f"{self._tenant(tenant)}:u"
        with self._errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(f"{base}:totals")
                pipe.zrevrange(f"{base}:sessions", 0, session_limit - 1)
                pipe.zcard(f"{base}:sessions")
                pipe.zcount(f"{base}:sessions", active_since_us, "+inf")
                totals, session_ids, sessions_total, active = await pipe.execute()
            async with self._client.pipeline(transaction=False) as pipe:
                for sid in session_ids:
                    pipe.hgetall(f"{base}:s:{q(str(sid))}")
                session_fields = await pipe.execute() if session_ids else []
        summaries = [
            _summary(tenant, str(sid), fields)
            for sid, fields in zip(session_ids, session_fields, strict=True)
            if fields
        ]
        return _totals(totals), summaries, int(sessions_total), int(active)


def _summary(tenant: str, session_id: str, fields: dict[str, str]) -> SessionSummary:
    return SessionSummary.from_epoch_micros(
        tenant, session_id, _totals(fields), int(fields["first_us"]), int(fields["last_us"])
    )
