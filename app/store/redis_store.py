"""The Store for several replicas: Redis (redis.asyncio), every budget step one Lua script.

`RedisStore` is the two halves of the Store over one client:

* `redis_connection`: the pool, error mapping and the per-tenant key prefix `P{T}`
* `redis_budget`: budget counters and reservations (`P{T}:b:…`, `P{T}:r:…`), the Lua scripts
* `redis_ledger`: the usage ledger and its totals (`P{T}:u:…`)

and `settle_and_record`, which needs both: a finished call's settle and its ledger record run as
one Lua script (the two halves' own functions, one after the other), so they are applied together
or not at all, in one round trip. Every key of both is under the tenant's `{T}` hash tag, so the
script stays in one Redis Cluster slot.
"""

from __future__ import annotations

from app.store.base import DEFAULT_RESERVATION_TTL_SECONDS, StoreUnavailable
from app.store.client_keys import ClientKeyRegistry
from app.store.counters import LimitCounters
from app.store.gateways import GatewayRegistry
from app.store.models import Reservation, UsageRecord
from app.store.redis_budget import (
    DEFAULT_BUDGET_KEY_TTL_SECONDS,
    SETTLE_FUNCTION,
    RedisBudget,
)
from app.store.redis_client_keys import RedisClientKeys
from app.store.redis_connection import DEFAULT_PREFIX, connect
from app.store.redis_counters import RedisCounters
from app.store.redis_gateways import RedisGateways
from app.store.redis_ledger import APPEND_FUNCTION, RedisLedger, append_args

__all__ = ["DEFAULT_BUDGET_KEY_TTL_SECONDS", "DEFAULT_PREFIX", "RedisStore"]

# KEYS: the reservation's (2n scope keys, state hash), then the record's 6 ledger keys.
# ARGV: settle's 7, then append's 10. Returns 1 if counted, 0 if already settled (nothing written).
_SETTLE_AND_RECORD = (
    SETTLE_FUNCTION
    + APPEND_FUNCTION
    + """
local n = (#KEYS - 7) / 2
if settle(n, 0) == 0 then return 0 end
append(2 * n + 1, 7)
return 1
"""
)


class RedisStore(RedisBudget, RedisLedger):
    """Open with `await RedisStore.open(url, prefix=...)`; `await close()` on shutdown."""

    async def _settle_and_record(self, reservation: Reservation, record: UsageRecord) -> bool:
        keys = self._reservation_keys(reservation) + self._ledger_keys(record)
        args = self._settle_args(reservation, record.total_tokens, record.cost_micros)
        out = await self._call(_SETTLE_AND_RECORD, keys, args + append_args(record))
        return int(out) == 1

    def limit_counters(self) -> LimitCounters:
        """In Redis, beside the budgets: every replica sees the same counts."""
        return RedisCounters(self.client, prefix=self.prefix)

    def gateway_registry(self) -> GatewayRegistry:
        """In Redis, on this client: every replica reads the same gateways."""
        return RedisGateways(self.client, prefix=self.prefix)

    def client_key_registry(self) -> ClientKeyRegistry:
        """In Redis, on this client: every replica reads the same client keys."""
        return RedisClientKeys(self.client, prefix=self.prefix)

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
