"""The values the Store speaks in: budget scopes and reservations, usage records and their totals.

Money crosses the API as a float (the provider file's prices are floats) but is kept and compared
as whole micro-units (1e-6 of the currency) in every store, so that a limit of 5.00 is reached
exactly and Redis's Lua numbers, SQLite's integers and Python agree on it to the last digit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from app.core.ids import new_id

ScopeKind = Literal["session", "tenant_day", "tenant_month"]
SCOPE_KINDS: tuple[ScopeKind, ...] = ("session", "tenant_day", "tenant_month")

# The session of a call made without one (/v1 without X-Session-Id or `user`): it reserves on
# its tenant's scopes only, and its ledger record (`"session": null` on the wire) counts in the
# tenant's totals but in no session's, so it never appears as a session of its own.
NO_SESSION = ""

MICROS = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(amount: float) -> int:
    return round(amount * MICROS)


def from_micros(micros: int) -> float:
    return micros / MICROS


def to_epoch_us(moment: datetime) -> int:
    """Whole microseconds since the epoch, exact (no float round trip)."""
    if moment.tzinfo is None:
        raise ValueError("usage times must be timezone-aware")
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_epoch_us(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- budgets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetScope:
    """One budget counter and the limits to hold it to for this call.

    `id` is the session id for a session scope and the period key (`2026-11-25`, `2026-11`) for a
    tenant scope. Limits travel with every call rather than living in the store, so a policy change
    applies to the next request; a limit of None is no limit (the scope is still counted).
    """

    kind: ScopeKind
    tenant: str
    id: str
    limit_tokens: int | None = None
    limit_cost: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCOPE_KINDS:
            raise ValueError(f"unknown budget scope kind {self.kind!r}")
        if not self.tenant or not self.id:
            raise ValueError("a budget scope needs a tenant and an id")
        if self.limit_tokens is not None and self.limit_tokens < 0:
            raise ValueError("limit_tokens cannot be negative")
        if self.limit_cost is not None and self.limit_cost < 0:
            raise ValueError("limit_cost cannot be negative")

    @property
    def limit_cost_micros(self) -> int | None:
        return None if self.limit_cost is None else to_micros(self.limit_cost)

    @property
    def label(self) -> str:
        """Safe to show the tenant that owns it: `session abc`, `tenant_day 2026-11-25`."""
        return f"{self.kind} {self.id}"


@dataclass(frozen=True)
class ScopeUsage:
    """A scope's counters: settled usage, in-flight reservations, and what is left under its limits.

    `remaining_*` is None when there is no limit, and never below 0 (a settle may have gone over by
    what the provider used beyond the reservation; `used_*` shows it).
    """

    scope: BudgetScope
    used_tokens: int
    used_cost_micros: int
    reserved_tokens: int
    reserved_cost_micros: int

    @property
    def used_cost(self) -> float:
        return from_micros(self.used_cost_micros)

    @property
    def reserved_cost(self) -> float:
        return from_micros(self.reserved_cost_micros)

    @property
    def remaining_tokens(self) -> int | None:
        if self.scope.limit_tokens is None:
            return None
        return max(0, self.scope.limit_tokens - self.used_tokens - self.reserved_tokens)

    @property
    def remaining_cost_micros(self) -> int | None:
        limit = self.scope.limit_cost_micros
        if limit is None:
            return None
        return max(0, limit - self.used_cost_micros - self.reserved_cost_micros)

    @property
    def remaining_cost(self) -> float | None:
        micros = self.remaining_cost_micros
        return None if micros is None else from_micros(micros)


@dataclass(frozen=True)
class Reservation:
    """Tokens and money held on every scope of one call until it is settled or released.

    `remaining_before` is each scope's (tokens, cost) left just before this reservation, in the
    order of `scopes` (None where that scope has no such limit). A reservation not settled or
    released within the store's reservation TTL is released by the store itself, so a replica that
    dies mid-call cannot hold budget forever.
    """

    id: str
    tenant: str
    scopes: tuple[BudgetScope, ...]
    tokens: int
    cost_micros: int
    remaining_before: tuple[tuple[int | None, float | None], ...] = ()

    @property
    def cost(self) -> float:
        return from_micros(self.cost_micros)


@dataclass(frozen=True)
class Refusal:
    """Nothing was reserved: `scope` cannot take `requested_*` (it has `remaining_*` left).

    `dimension` says which limit refused: "tokens" or "cost".
    """

    scope: BudgetScope
    dimension: Literal["tokens", "cost"]
    remaining_tokens: int | None
    remaining_cost: float | None
    requested_tokens: int
    requested_cost: float

    @property
    def message(self) -> str:
        what = {
            "session": "session token budget",
            "tenant_day": "tenant daily budget",
            "tenant_month": "tenant monthly budget",
        }[self.scope.kind]
        if self.dimension == "tokens":
            return (
                f"{what} exhausted for {self.scope.id}: {self.remaining_tokens} tokens left, "
                f"{self.requested_tokens} needed"
            )
        return (
            f"{what} exhausted for {self.scope.id}: {self.remaining_cost:.6f} left, "
            f"{self.requested_cost:.6f} needed"
        )

    def as_dict(self) -> dict[str, Any]:
        """A body for the 429: names the scope and what is left, never another tenant's data."""
        return {
            "error": "budget_exhausted",
            "message": self.message,
            "scope": self.scope.kind,
            "scope_id": self.scope.id,
            "limit": self.dimension,
            "remaining_tokens": self.remaining_tokens,
            "remaining_cost": self.remaining_cost,
            "requested_tokens": self.requested_tokens,
            "requested_cost": self.requested_cost,
        }


def reservation_id() -> str:
    return new_id()


# --- the ledger ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageRecord:
    """One completed call. `id` makes the write idempotent: a retried write cannot duplicate it.

    `session` is NO_SESSION for a call made without one. `estimated` marks token counts that are
    our estimate because the provider gave no `usage`; `cost` is at the provider file's prices.
    """

    tenant: str
    session: str
    surface: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    cached: bool = False
    latency_ms: float = 0.0
    estimated: bool = False
    id: str = field(default_factory=new_id)
    time: datetime = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        if not self.tenant or not self.id:
            raise ValueError("a usage record needs a tenant and an id")
        if self.time.tzinfo is None:
            raise ValueError("a usage record's time must be timezone-aware")
        if self.prompt_tokens < 0 or self.completion_tokens < 0 or self.cost < 0:
            raise ValueError("tokens and cost cannot be negative")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_micros(self) -> int:
        return to_micros(self.cost)

    @property
    def time_us(self) -> int:
        return to_epoch_us(self.time)

    @property
    def sort_key(self) -> str:
        """Orders records by time then id; also the pagination cursor (same in every store)."""
        return usage_sort_key(self.time_us, self.id)

    @property
    def time_iso(self) -> str:
        return self.time.astimezone(UTC).isoformat(timespec="microseconds")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time_iso,
            "tenant": self.tenant,
            "session": self.session or None,
            "surface": self.surface,
            "provider": self.provider,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": self.cost,
            "cached": self.cached,
            "latency_ms": self.latency_ms,
            "estimated": self.estimated,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRecord:
        return cls(
            id=str(data["id"]),
            time=datetime.fromisoformat(str(data["time"])),
            tenant=str(data["tenant"]),
            session=str(data["session"] or NO_SESSION),
            surface=str(data["surface"]),
            provider=str(data["provider"]),
            model=str(data["model"]),
            prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]),
            cost=float(data["cost"]),
            cached=bool(data["cached"]),
            latency_ms=float(data["latency_ms"]),
            estimated=bool(data["estimated"]),
        )

    @classmethod
    def from_json(cls, text: str) -> UsageRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a usage record is a JSON object")
        return cls.from_dict(data)


def usage_sort_key(time_us: int, record_id: str) -> str:
    return f"{time_us:017d}|{record_id}"


def parse_cursor(cursor: str) -> tuple[int, str]:
    """(time_us, id) from a cursor given out by `list_usage`; ValueError if it is not one."""
    time_part, sep, record_id = cursor.partition("|")
    if not sep or not time_part.isdigit() or not record_id:
        raise ValueError("invalid usage cursor")
    return int(time_part), record_id


@dataclass(frozen=True)
class UsagePage:
    """Newest first; pass `next_cursor` back to get the next (older) page, None at the end."""

    records: list[UsageRecord]
    next_cursor: str | None

    @classmethod
    def from_overfetch(cls, records: list[UsageRecord], limit: int) -> UsagePage:
        """`records` were read with `limit + 1`: the extra one only says another page follows."""
        more = len(records) > limit
        records = records[:limit]
        return cls(records, records[-1].sort_key if more and records else None)


@dataclass(frozen=True)
class UsageTotals:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0
    cached_calls: int = 0
    estimated_calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> float:
        return from_micros(self.cost_micros)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": self.cost,
            "cached_calls": self.cached_calls,
            "estimated_calls": self.estimated_calls,
        }


@dataclass(frozen=True)
class SessionSummary:
    tenant: str
    session_id: str
    totals: UsageTotals
    first_at: datetime
    last_at: datetime

    @classmethod
    def from_epoch_micros(
        cls, tenant: str, session_id: str, totals: UsageTotals, first_us: int, last_us: int
    ) -> SessionSummary:
        """The backends keep a session's first and last use as epoch microseconds."""
        return cls(tenant, session_id, totals, from_epoch_us(first_us), from_epoch_us(last_us))

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            **self.totals.as_dict(),
            "first_at": self.first_at.isoformat(timespec="milliseconds"),
            "last_at": self.last_at.isoformat(timespec="milliseconds"),
        }


@dataclass(frozen=True)
class TenantStatus:
    """A tenant's all-time totals, its most recently used sessions (newest first, at most the
    limit asked for) and how many sessions had usage within the active window."""

    tenant: str
    totals: UsageTotals
    sessions: list[SessionSummary]
    sessions_total: int
    active_sessions: int
    active_window_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "totals": self.totals.as_dict(),
            "sessions": [s.as_dict() for s in self.sessions],
            "sessions_total": self.sessions_total,
            "active_sessions": self.active_sessions,
            "active_window_seconds": self.active_window_seconds,
        }
