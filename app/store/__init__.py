"""Persistence for budgets and the ledger behind one Store base class (base.py).

* `SQLiteStore`: the embedded default (one instance, or several workers on one host).
* `RedisStore` (app.store.redis_store): several replicas sharing budgets and the ledger;
  imported only when asked for, so a service on SQLite never loads the Redis client.
* `MemoryStore`: tests only.

`open_store` builds the one the settings ask for; the lifespan owns it and closes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from app.store.base import (
    DEFAULT_ACTIVE_WINDOW_SECONDS,
    DEFAULT_RESERVATION_TTL_SECONDS,
    MAX_PAGE_SIZE,
    Store,
    StoreUnavailable,
)
from app.store.memory_store import MemoryStore
from app.store.models import (
    NO_SESSION,
    BudgetScope,
    Refusal,
    Reservation,
    ScopeKind,
    ScopeUsage,
    SessionSummary,
    TenantStatus,
    UsagePage,
    UsageRecord,
    UsageTotals,
)
from app.store.sqlite_store import SQLiteStore

StoreBackend = Literal["sqlite", "redis", "memory"]

__all__ = [
    "DEFAULT_ACTIVE_WINDOW_SECONDS",
    "DEFAULT_RESERVATION_TTL_SECONDS",
    "MAX_PAGE_SIZE",
    "NO_SESSION",
    "BudgetScope",
    "MemoryStore",
    "Refusal",
    "Reservation",
    "SQLiteStore",
    "ScopeKind",
    "ScopeUsage",
    "SessionSummary",
    "Store",
    "StoreBackend",
    "StoreUnavailable",
    "TenantStatus",
    "UsagePage",
    "UsageRecord",
    "UsageTotals",
    "open_store",
]


async def open_store(
    backend: StoreBackend,
    *,
    data_dir: Path,
    redis_url: str | None = None,
    redis_prefix: str | None = None,
    reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS,
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL",
    sqlite_inline: bool = False,
) -> Store:
    """The configured store, opened and reachable (raises StoreUnavailable otherwise)."""
    if backend == "sqlite":
        return await SQLiteStore.open(
            data_dir,
            reservation_ttl_seconds=reservation_ttl_seconds,
            synchronous=sqlite_synchronous,
            inline=sqlite_inline,
        )
    if backend == "redis":
        if not redis_url:
            raise ValueError("the redis store needs REDIS_URL")
        from app.store.redis_store import DEFAULT_PREFIX, RedisStore

        return await RedisStore.open(
            redis_url,
            prefix=redis_prefix or DEFAULT_PREFIX,
            reservation_ttl_seconds=reservation_ttl_seconds,
        )
    if backend == "memory":
        return await MemoryStore.open(reservation_ttl_seconds=reservation_ttl_seconds)
    raise ValueError(f"unknown store backend {backend!r}")
