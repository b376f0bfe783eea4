"""The Store: what budgets and the ledger need from persistence, whatever the backend.

`Store` is an abstract base class: its public methods check their arguments and do the steps
every backend shares (micro-units, paging, the tenant status), then call the backend's hooks
(`_reserve`, `_settle`, `_records_before`, …) for what only the backend can do.

Every method is scoped by tenant: a scope carries its tenant, and every ledger read takes one and
only ever returns that tenant's rows. Session ids are only unique within a tenant.

Budget arithmetic, the same in every store:

* `reserve` checks every scope and holds `tokens`/`cost` on all of them, or on none (a Refusal
  naming the first scope that cannot take it). A scope refuses when
  `used + reserved + requested > limit`. Reserving is atomic across concurrent callers (and across
  replicas for Redis; across processes on one file for SQLite), so reservations alone never take
  a scope past its limit.
* `settle` replaces the reservation by the real usage: the held amount is released and the actual
  amount is added to `used`, *even past the limit*. The provider has already spent it; refusing to
  record it would hide real spend. The overshoot is bounded by what calls used beyond their own
  reservations (zero when the caller reserves prompt + max_tokens and the provider honours
  max_tokens). Settling twice counts once.
* `release` gives the held amount back (the call failed); releasing twice, or after a settle, does
  nothing.
* `settle_and_record` is what a finished call does: the settle (with the record's tokens and cost)
  and the ledger record in ONE atomic write, both or neither, so a crash at any moment leaves the
  budgets equal to the sum of the ledger. It is idempotent on the reservation (a retried write
  after an ambiguous failure writes nothing twice) and completes before the answer goes out.
* A reservation neither settled nor released within the store's reservation TTL is released by the
  store (lazily, on the next operation on that scope), so a replica that dies mid-call cannot hold
  budget forever. A late settle of such a reservation still adds its actual usage.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from app.core.errors import CxRelayError
from app.store.counters import LimitCounters, MemoryCounters
from app.store.models import (
    BudgetScope,
    Refusal,
    Reservation,
    ScopeUsage,
    SessionSummary,
    TenantStatus,
    UsagePage,
    UsageRecord,
    UsageTotals,
    from_micros,
    parse_cursor,
    to_micros,
)

if TYPE_CHECKING:  # gateways.py imports the SQLite connection, which imports this module
    from app.store.client_keys import ClientKeyRegistry
    from app.store.gateways import GatewayRegistry

DEFAULT_RESERVATION_TTL_SECONDS = 300.0
DEFAULT_ACTIVE_WINDOW_SECONDS = 1800.0
MAX_PAGE_SIZE = 500

# what a backend reads for a tenant's status: (all-time totals, its most recently used sessions,
# how many sessions it has, how many of them were used since the active window began)
TenantUsage = tuple[UsageTotals, list[SessionSummary], int, int]


class StoreUnavailable(CxRelayError):
    """The store could not be reached or refused the operation (disk, database, network)."""


class Store(ABC):
    """Async persistence for budgets and the ledger. Open with the class's `open`, then `close`."""

    # --- budgets ---------------------------------------------------------------------------------

    async def reserve(
        self, scopes: Sequence[BudgetScope], tokens: int, cost: float = 0.0
    ) -> Reservation | Refusal:
        if not scopes:
            raise ValueError("reserve needs at least one scope")
        if tokens < 0 or cost < 0:
            raise ValueError("cannot reserve a negative amount")
        if len({scope.tenant for scope in scopes}) != 1:
            raise ValueError("all scopes of one reservation belong to one tenant")
        keys = [(scope.kind, scope.id) for scope in scopes]
        if len(set(keys)) != len(keys):
            raise ValueError("a scope appears twice in one reservation")
        return await self._reserve(tuple(scopes), tokens, to_micros(cost))

    async def settle(
        self, reservation: Reservation, actual_tokens: int, actual_cost: float = 0.0
    ) -> bool:
        """True if this call recorded the usage, False if the reservation was already settled."""
        if actual_tokens < 0 or actual_cost < 0:
            raise ValueError("actual usage cannot be negative")
        return await self._settle(reservation, actual_tokens, to_micros(actual_cost))

    async def settle_and_record(self, reservation: Reservation, record: UsageRecord) -> bool:
        """settle(reservation, record.total_tokens, record.cost) and append_usage(record) as one
        atomic write. True if this call counted them; False if the reservation was already
        settled, and then nothing is written (a retry of a write that had committed)."""
        if record.tenant != reservation.tenant:
            raise ValueError("a usage record is settled against a reservation of its own tenant")
        return await self._settle_and_record(reservation, record)

    @abstractmethod
    async def release(self, reservation: Reservation) -> bool:
        """True if budget was given back by this call."""

    async def usage(self, scope: BudgetScope) -> ScopeUsage:
        return (await self.usages([scope]))[0]

    @abstractmethod
    async def usages(self, scopes: Sequence[BudgetScope]) -> list[ScopeUsage]:
        """usage() of several scopes in one round trip (one transaction where the store has
        them): a call's headroom reads the session and the tenant's day and month at once."""

    async def remaining(self, scope: BudgetScope) -> tuple[int | None, float | None]:
        """(tokens_left, cost_left) under the scope's limits; None where it has no limit."""
        usage = await self.usage(scope)
        return usage.remaining_tokens, usage.remaining_cost

    # --- the ledger ------------------------------------------------------------------------------

    async def append_usage(self, record: UsageRecord) -> bool:
        """True if written, False if a record with this id already exists (idempotent)."""
        return await self.append_usages([record]) == 1

    async def append_usages(self, records: Sequence[UsageRecord]) -> int:
        """Idempotent batch write; the number of records that were new."""
        return await self._append_usages(list(records)) if records else 0

    async def list_usage(
        self,
        tenant: str,
        session: str | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> UsagePage:
        """Newest first (by record time, then id). ValueError on a cursor not given out here."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        if cursor is not None:
            parse_cursor(cursor)
        # one more than the page: whether it comes back says whether another page follows
        records = await self._records_before(tenant, session or None, cursor, limit + 1)
        return UsagePage.from_overfetch(records, limit)

    @abstractmethod
    async def session_summary(self, tenant: str, session_id: str) -> SessionSummary | None: ...

    async def tenant_status(
        self,
        tenant: str,
        *,
        active_window_seconds: float = DEFAULT_ACTIVE_WINDOW_SECONDS,
        session_limit: int = 100,
    ) -> TenantStatus:
        active_since_us = self._now_us() - int(active_window_seconds * 1_000_000)
        totals, sessions, sessions_total, active = await self._tenant_usage(
            tenant, active_since_us, session_limit
        )
        return TenantStatus(
            tenant=tenant,
            totals=totals,
            sessions=sessions,
            sessions_total=sessions_total,
            active_sessions=active,
            active_window_seconds=active_window_seconds,
        )

    # --- lifecycle -------------------------------------------------------------------------------

    @abstractmethod
    async def ping(self) -> None:
        """Raises StoreUnavailable when the store cannot serve (readiness)."""

    @abstractmethod
    async def close(self) -> None: ...

    def limit_counters(self) -> LimitCounters:
        """Where the inbound limits count: in this process, unless the store is shared."""
        return MemoryCounters()

    def gateway_registry(self) -> GatewayRegistry | None:
        """Where /api/v2/gateways keeps its records when the store is shared by replicas; None:
        in the SQLite file under DATA_DIR (app.store.gateways.SQLiteGateways)."""
        return None

    def client_key_registry(self) -> ClientKeyRegistry | None:
        """Where the client keys created at run time are kept when the store is shared by
        replicas; None: in the SQLite file under DATA_DIR (app.store.client_keys)."""
        return None

    # --- what each backend does its own way (arguments already checked) ---------------------------

    @abstractmethod
    async def _reserve(
        self, scopes: tuple[BudgetScope, ...], tokens: int, cost_micros: int
    ) -> Reservation | Refusal:
        """Atomically: `decide` on every scope's usage, then hold the amount on all of them."""

    @abstractmethod
    async def _settle(self, reservation: Reservation, actual_tokens: int, cost_micros: int) -> bool:
        """Release the held amount and add the actual one; False if already settled."""

    @abstractmethod
    async def _settle_and_record(self, reservation: Reservation, record: UsageRecord) -> bool:
        """`_settle` with the record's usage and `_append_usages([record])` in one atomic write."""

    @abstractmethod
    async def _append_usages(self, records: list[UsageRecord]) -> int:
        """Write the new ones of `records` (never empty) and add them to their totals."""

    @abstractmethod
    async def _records_before(
        self, tenant: str, session: str | None, cursor: str | None, count: int
    ) -> list[UsageRecord]:
        """Up to `count` of the tenant's records (of `session` only, unless None), newest
        first, older than `cursor` (a valid sort key) when there is one."""

    @abstractmethod
    async def _tenant_usage(
        self, tenant: str, active_since_us: int, session_limit: int
    ) -> TenantUsage:
        """The tenant's TenantUsage, read as one snapshot where the backend can."""

    def _now_us(self) -> int:
        """Epoch microseconds now (the memory and SQLite stores take a clock, for tests)."""
        return int(time.time() * 1_000_000)


# --- shared by the implementations ---------------------------------------------------------------


def decide(
    usages: Sequence[ScopeUsage], tokens: int, cost_micros: int
) -> Refusal | tuple[tuple[int | None, float | None], ...]:
    """The first scope that cannot take the request, or every scope's remaining before it."""
    remaining: list[tuple[int | None, float | None]] = []
    for usage in usages:
        tokens_left = usage.remaining_tokens
        cost_left = usage.remaining_cost_micros
        if tokens_left is not None and tokens > tokens_left:
            return refusal(usage.scope, "tokens", tokens_left, cost_left, tokens, cost_micros)
        if cost_left is not None and cost_micros > cost_left:
            return refusal(usage.scope, "cost", tokens_left, cost_left, tokens, cost_micros)
        remaining.append((tokens_left, None if cost_left is None else from_micros(cost_left)))
    return tuple(remaining)


def refusal(
    scope: BudgetScope,
    dimension: str,
    tokens_left: int | None,
    cost_left_micros: int | None,
    tokens: int,
    cost_micros: int,
) -> Refusal:
    return Refusal(
        scope=scope,
        dimension="tokens" if dimension == "tokens" else "cost",
        remaining_tokens=tokens_left,
        remaining_cost=None if cost_left_micros is None else from_micros(cost_left_micros),
        requested_tokens=tokens,
        requested_cost=from_micros(cost_micros),
    )
