"""Client keys in Redis (app.store.client_keys): every replica reads the same ones.

Keys under `P{client_keys}`: `:id:<id>` the record, `:digest:<sha256>` and `:name:<name>` the id
they belong to, `:ids` the ids in creation order, `:used` when each was last used, `:version`
the counter every change raises. Each change is one Lua script; rotate and revoke are a
compare-and-swap on the record read just before (retried when another change came in between).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import redis.asyncio as aioredis

from app.store.base import StoreUnavailable
from app.store.client_keys import ClientKeyRegistry, Conflict, StoredClientKey
from app.store.redis_connection import RedisConnection, q

# KEYS: id, digest, name, ids, version. ARGV: id, record, has a name ('1'/'0').
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'id' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'digest' end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 'name' end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
if ARGV[3] == '1' then redis.call('SET', KEYS[3], ARGV[1]) end
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), ARGV[1])
return ''
"""

# KEYS: id, old digest, new digest, version. ARGV: the record read, the new record, id.
# 1 if rotated, 0 if the record changed meanwhile, -1 if the new digest is taken.
_ROTATE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('INCR', KEYS[4])
return 1
"""

# KEYS: id, digest, name, ids, version, used. ARGV: the record read, id, has a name.
# 1 if revoked, 0 if the record changed meanwhile.
_REVOKE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
if ARGV[3] == '1' then redis.call('DEL', KEYS[3]) end
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[6], ARGV[2])
redis.call('INCR', KEYS[5])
return 1
"""

# KEYS: used, then one id key per id. ARGV: id, time pairs in the same order.
_TOUCH = """
for i = 2, #KEYS do
  local id, when = ARGV[2 * i - 3], ARGV[2 * i - 2]
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local seen = redis.call('HGET', KEYS[1], id)
    if not seen or seen < when then redis.call('HSET', KEYS[1], id, when) end
  end
end
return 0
"""

_ATTEMPTS = 5  # compare-and-swap retries: only another change to the same key gets in between


class RedisClientKeys(RedisConnection, ClientKeyRegistry):
    """On the store's client (not closed here)."""

    def __init__(self, client: aioredis.Redis, *, prefix: str) -> None:
        super().__init__(client, prefix=prefix, owns_client=False)

    def _key(self, *parts: str) -> str:
        return ":".join([self._tenant("client_keys"), *(q(p) for p in parts)])

    def _record_keys(self, key: StoredClientKey) -> list[str]:
        """id, digest, name, ids, version, used."""
        return [
            self._key("id", key.id),
            self._key("digest", key.digest),
            self._key("name", key.name or ""),
            self._key("ids"),
            self._key("version"),
            self._key("used"),
        ]

    async def create(self, key: StoredClientKey) -> Conflict | None:
        args: list[str | int] = [key.id, key.to_json(), "1" if key.name else "0"]
        taken = str(await self._call(_CREATE, self._record_keys(key)[:5], args))
        return taken or None  # type: ignore[return-value]

    async def _read(self, key_id: str) -> tuple[str, StoredClientKey] | None:
        with self._errors():
            text = await self.client.get(self._key("id", key_id))
            used = await self.client.hget(self._key("used"), key_id) if text else None
        if not text:
            return None
        return str(text), StoredClientKey.from_json(str(text), str(used) if used else None)

    async def get(self, key_id: str) -> StoredClientKey | None:
        read = await self._read(key_id)
        return read[1] if read else None

    async def by_digest(self, digest: str) -> StoredClientKey | None:
        with self._errors():
            key_id = await self.client.get(self._key("digest", digest))
        return await self.get(str(key_id)) if key_id else None

    async def all(self) -> list[StoredClientKey]:
        with self._errors():
            ids = [str(i) for i in await self.client.zrange(self._key("ids"), 0, -1)]
            if not ids:
                return []
            records = await self.client.mget([self._key("id", i) for i in ids])
            used = await self.client.hmget(self._key("used"), ids)
        return [
            StoredClientKey.from_json(str(text), str(when) if when else None)
            for text, when in zip(records, used, strict=True)
            if text
        ]

    async def rotate(
        self, key_id: str, digest: str, prefix: str, rotated_at: str
    ) -> StoredClientKey | None:
        for _ in range(_ATTEMPTS):
            read = await self._read(key_id)
            if read is None:
                return None
            text, old = read
            new = replace(old, digest=digest, prefix=prefix, rotated_at=rotated_at)
            keys = [
                self._key("id", key_id),
                self._key("digest", old.digest),
                self._key("digest", digest),
                self._key("version"),
            ]
            done = int(await self._call(_ROTATE, keys, [text, new.to_json(), key_id]))
            if done == 1:
                return new
            if done == -1:
                raise StoreUnavailable("the new key's digest is taken; rotate again")
        raise StoreUnavailable(f"key {key_id} kept changing during its rotation; try again")

    async def revoke(self, key_id: str) -> StoredClientKey | None:
        for _ in range(_ATTEMPTS):
            read = await self._read(key_id)
            if read is None:
                return None
            text, key = read
            args: list[str | int] = [text, key_id, "1" if key.name else "0"]
            if int(await self._call(_REVOKE, self._record_keys(key), args)) == 1:
                return key
        raise StoreUnavailable(f"key {key_id} kept changing during its revocation; try again")

    async def version(self) -> int:
        with self._errors():
            value = await self.client.get(self._key("version"))
        return int(value or 0)

    async def touch(self, used: Mapping[str, str]) -> None:
        if not used:
            return
        keys = [self._key("used"), *(self._key("id", key_id) for key_id in used)]
        args: list[str | int] = [part for pair in used.items() for part in pair]
        await self._call(_TOUCH, keys, args)
