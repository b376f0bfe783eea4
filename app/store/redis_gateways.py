"""Gateway records in Redis (app.store.gateways): every replica reads the same ones."""

from __future__ import annotations

import redis.asyncio as aioredis

from app.store.gateways import GatewayRecord, GatewayRegistry
from app.store.redis_connection import RedisConnection, q

# KEYS: the name's key, the record's key. ARGV: the id, the record. 1 if created.
_CREATE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


class RedisGateways(RedisConnection, GatewayRegistry):
    """On the store's client (not closed here); keys `P{gateways}:name:<name>`, `…:id:<id>`."""

    def __init__(self, client: aioredis.Redis, *, prefix: str) -> None:
        super().__init__(client, prefix=prefix, owns_client=False)

    def _key(self, kind: str, value: str) -> str:
        return f"{self._tenant('gateways')}:{kind}:{q(value)}"

    async def create(self, record: GatewayRecord) -> bool:
        keys = [self._key("name", record.name), self._key("id", record.id)]
        return int(await self._call(_CREATE, keys, [record.id, record.to_json()])) == 1

    async def get(self, gateway_id: str) -> GatewayRecord | None:
        with self._errors():
            text = await self.client.get(self._key("id", gateway_id))
        return GatewayRecord.from_json(str(text)) if text else None

    async def update(self, record: GatewayRecord) -> None:
        with self._errors():
            await self.client.set(self._key("id", record.id), record.to_json(), xx=True)
