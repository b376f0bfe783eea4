"""The one Redis client that the budget and ledger halves of `RedisStore` share, and its keys.

It exists so that the connection pool, error mapping (RedisError -> StoreUnavailable), the Lua
scripts' registration and the tenant key prefix are written once: both halves (`redis_budget`,
`redis_ledger`) and the inbound limits' counters subclass `RedisConnection`.

Every key starts with `P{T}` (P = the configured prefix, T = the tenant, percent-encoded); `{T}`
is a hash tag, so a tenant's keys share one Redis Cluster slot and a script may touch several.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from app.store.base import StoreUnavailable

DEFAULT_PREFIX = "cxrelay:"


def q(part: str) -> str:
    """Percent-encode a key part: no `:`, `{`, `}` or `|` from a tenant or session id survives."""
    return quote(part, safe="")


class RedisConnection:
    """The client and the key prefix; `close`, `ping`, `_call` and `_errors` for the subclasses."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        owns_client: bool = True,
    ) -> None:
        self.prefix = prefix
        self._client = client
        self._owns_client = owns_client
        self._scripts: dict[str, AsyncScript] = {}  # Lua source -> its registered script

    @property
    def client(self) -> aioredis.Redis:
        """The shared client (the inbound limits' counters use the store's connections)."""
        return self._client

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def ping(self) -> None:
        with self._errors("Redis store unreachable"):
            await self._client.ping()

    def _script(self, source: str) -> AsyncScript:
        """The script of `source`, registered with the client on first use: each module keeps
        only its Lua source, and nothing is registered that is never run."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._client.register_script(source)
        return script

    async def _call(self, source: str, keys: list[str], args: list[str | int]) -> Any:
        """Run the Lua script `source` on `keys` and `args`."""
        with self._errors():
            return await self._script(source)(keys=keys, args=args)

    @staticmethod
    @contextlib.contextmanager
    def _errors(message: str = "Redis store error") -> Iterator[None]:
        """Raise a Redis or network error inside as StoreUnavailable."""
        try:
            yield
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"{message}: {exc}") from exc

    def _tenant(self, tenant: str) -> str:
        return f"{self.prefix}{{{q(tenant)}}}"


def connect(url: str, *, timeout_seconds: float, max_connections: int) -> aioredis.Redis:
    """A client over a blocking pool (not connected yet: the first command connects)."""
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
        **_without_maintenance_notifications(),
    )
    return aioredis.Redis.from_pool(pool)


def _without_maintenance_notifications() -> dict[str, Any]:
    """redis-py (8.x) skips its check of a pooled connection on checkout while maintenance
    notifications are on, and they are on ("auto") by default: after a Redis restart every
    connection pooled before it then failed its next command, one budget_unavailable turn each.
    Off (they need RESP3 and Redis Enterprise/Cloud; this client speaks RESP2), a connection the
    server closed is reopened on checkout (tests/reliability: Redis restarted mid-load)."""
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # an older redis-py: no such feature, the check always runs
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}
