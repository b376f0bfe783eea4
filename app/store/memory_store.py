"""An in-memory Store, for tests only: nothing survives the process, nothing is shared.

Each method runs without awaiting in between its reads and writes, so on one event loop every
operation is atomic, which is all the budget arithmetic needs.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from app.store.base import DEFAULT_RESERVATION_TTL_SECONDS, Store, TenantUsage, decide
from app.store.models import (
    NO_SESSION,
    BudgetScope,
    Refusal,
    Reservation,
    ScopeUsage,
    SessionSummary,
    UsageRecord,
    UsageTotals,
    reservation_id,
)

_ScopeKey = tuple[str, str, str]  # tenant, kind, id
_KEEP_FINISHED_SECONDS = 86400.0  # how long a settled reservation is remembered (double settle)


@dataclass
class _Counters:
    used_tokens: int = 0
    used_cost: int = 0
    reserved_tokens: int = 0
    reserved_cost: int = 0


@dataclass
class _Held:
    scopes: tuple[_ScopeKey, ...]
    tokens: int
    cost: int
    expires: float
    state: str = "reserved"  # reserved | settled | released | expired
    counted: set[_ScopeKey] | None = None  # scopes still holding it


@dataclass
class _Session:
    totals: UsageTotals
    first_us: int
    last_us: int


def _key(scope: BudgetScope) -> _ScopeKey:
    return (scope.tenant, scope.kind, scope.id)


def _add(totals: UsageTotals, record: UsageRecord) -> UsageTotals:
    return UsageTotals(
        calls=totals.calls + 1,
        prompt_tokens=totals.prompt_tokens + record.prompt_tokens,
        completion_tokens=totals.completion_tokens + record.completion_tokens,
        cost_micros=totals.cost_micros + record.cost_micros,
        cached_calls=totals.cached_calls + int(record.cached),
        estimated_calls=totals.estimated_calls + int(record.estimated),
    )


class MemoryStore(Store):
    def __init__(
        self,
        *,
        reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ttl = reservation_ttl_seconds
        self._clock = clock
        self._counters: dict[_ScopeKey, _Counters] = {}
        self._held: dict[str, _Held] = {}
        self._records: dict[tuple[str, str], UsageRecord] = {}  # (tenant, id)
        self._order: dict[str, list[tuple[str, UsageRecord]]] = {}  # tenant -> sorted by key
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._tenant_totals: dict[str, UsageTotals] = {}
        self.closed = False

    @classmethod
    async def open(
        cls, *, reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS
    ) -> MemoryStore:
        return cls(reservation_ttl_seconds=reservation_ttl_seconds)

    # --- budgets ---------------------------------------------------------------------------------

    def _expire(self) -> None:
        now = self._clock()
        finished: list[str] = []
        for rid, held in self._held.items():
            if held.state == "reserved" and held.expires <= now:
                self._unhold(held)
                held.state = "expired"
            elif held.state != "reserved" and held.expires + _KEEP_FINISHED_SECONDS < now:
                finished.append(rid)
        for rid in finished:
            del self._held[rid]

    def _unhold(self, held: _Held) -> None:
        for key in held.counted or ():
            counters = self._counters[key]
            counters.reserved_tokens -= held.tokens
            counters.reserved_cost -= held.cost
        held.counted = set()

    def _usage(self, scope: BudgetScope) -> ScopeUsage:
        c = self._counters.get(_key(scope), _Counters())
        return ScopeUsage(scope, c.used_tokens, c.used_cost, c.reserved_tokens, c.reserved_cost)

    async def _reserve(
        self, scopes: tuple[BudgetScope, ...], tokens: int, cost_micros: int
    ) -> Reservation | Refusal:
        self._expire()
        decision = decide([self._usage(s) for s in scopes], tokens, cost_micros)
        if isinstance(decision, Refusal):
            return decision
        keys = tuple(_key(s) for s in scopes)
        for key in keys:
            counters = self._counters.setdefault(key, _Counters())
            counters.reserved_tokens += tokens
            counters.reserved_cost += cost_micros
        rid = reservation_id()
        self._held[rid] = _Held(
            keys, tokens, cost_micros, self._clock() + self._ttl, counted=set(keys)
        )
        return Reservation(rid, scopes[0].tenant, scopes, tokens, cost_micros, decision)

    async def _settle(self, reservation: Reservation, actual_tokens: int, cost_micros: int) -> bool:
        held = self._held.get(reservation.id)
        if held is not None and held.state == "settled":
            return False
        if held is not None:
            self._unhold(held)
            held.state = "settled"
        else:  # forgotten: record the usage anyway, and remember it was settled
            expires = self._clock() + self._ttl
            self._held[reservation.id] = _Held((), 0, 0, expires, state="settled", counted=set())
        for scope in reservation.scopes:
            counters = self._counters.setdefault(_key(scope), _Counters())
            counters.used_tokens += actual_tokens
            counters.used_cost += cost_micros
        return True

    async def _settle_and_record(self, reservation: Reservation, record: UsageRecord) -> bool:
        # neither awaits anything, so nothing runs in between: one atomic step on the loop
        if not await self._settle(reservation, record.total_tokens, record.cost_micros):
            return False
        await self._append_usages([record])
        return True

    async def release(self, reservation: Reservation) -> bool:
        held = self._held.get(reservation.id)
        if held is None or held.state != "reserved":
            return False
        self._unhold(held)
        held.state = "released"
        return True

    async def usages(self, scopes: Sequence[BudgetScope]) -> list[ScopeUsage]:
        self._expire()
        return [self._usage(scope) for scope in scopes]

    # --- the ledger ------------------------------------------------------------------------------

    async def _append_usages(self, records: list[UsageRecord]) -> int:
        written = 0
        for record in records:
            if (record.tenant, record.id) in self._records:
                continue
            self._records[(record.tenant, record.id)] = record
            bisect.insort(self._order.setdefault(record.tenant, []), (record.sort_key, record))
            if record.session != NO_SESSION:
                self._add_to_session(record)
            self._tenant_totals[record.tenant] = _add(
                self._tenant_totals.get(record.tenant, UsageTotals()), record
            )
            written += 1
        return written

    def _add_to_session(self, record: UsageRecord) -> None:
        key = (record.tenant, record.session)
        time_us = record.time_us
        session = self._sessions.get(key)
        if session is None:
            self._sessions[key] = _Session(_add(UsageTotals(), record), time_us, time_us)
        else:
            session.totals = _add(session.totals, record)
            session.first_us = min(session.first_us, time_us)
            session.last_us = max(session.last_us, time_us)

    async def _records_before(
        self, tenant: str, session: str | None, cursor: str | None, count: int
    ) -> list[UsageRecord]:
        found: list[UsageRecord] = []
        for sort_key, record in reversed(self._order.get(tenant, [])):
            if cursor is not None and sort_key >= cursor:
                continue
            if session is not None and record.session != session:
                continue
            found.append(record)
            if len(found) == count:
                break
        return found

    async def session_summary(self, tenant: str, session_id: str) -> SessionSummary | None:
        session = self._sessions.get((tenant, session_id))
        if session is None:
            return None
        return SessionSummary.from_epoch_micros(
            tenant, session_id, replace(session.totals), session.first_us, session.last_us
        )

    async def _tenant_usage(
        self, tenant: str, active_since_us: int, session_limit: int
    ) -> TenantUsage:
        mine = [(sid, s) for (t, sid), s in self._sessions.items() if t == tenant]
        mine.sort(key=lambda item: (item[1].last_us, item[0]), reverse=True)
        summaries = [
            SessionSummary.from_epoch_micros(tenant, sid, s.totals, s.first_us, s.last_us)
            for sid, s in mine[:session_limit]
        ]
        active = sum(1 for _, s in mine if s.last_us >= active_since_us)
        return self._tenant_totals.get(tenant, UsageTotals()), summaries, len(mine), active

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    # --- lifecycle -------------------------------------------------------------------------------

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True
