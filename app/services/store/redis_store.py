"""The Store for several replicas: Redis (redis.asyncio), every budget step one Lua script.

`RedisStore` is the two halves of the Store over one client:

* `redis_connection`: the pool, error mapping and the per-tenant key prefix `P{T}`
* `redis_budget`: budget counters and reservations (`P{T}:b:…`, `P{T}:r:…`), the Lua scripts
* `redis_ledger`: the usage ledger and its totals (`P{T}:u:…`)
"""

from __future__ import annotations

from app.services.store.base import DEFAULT_RESERVATION_TTL_SECONDS, StoreUnavailable
from app.services.store.redis_budget import DEFAULT_BUDGET_KEY_TTL_SECONDS, RedisBudget
from app.services.store.redis_connection import DEFAULT_PREFIX, connect
from app.services.store.redis_ledger import RedisLedger

__all__ = ["DEFAULT_BUDGET_KEY_TTL_SECONDS", "DEFAULT_PREFIX", "RedisStore"]


class RedisStore(RedisBudget, RedisLedger):
    """Open with `await RedisStore.open(url, prefix=...)`; `await close()` on shutdown."""

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
        client = connect(url, timeout_seconds=timeout_seconds, max_connections=max_connections)
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
