"""The client key registry (app.store.client_keys) on SQLite and on the real Redis at
127.0.0.1:6379 (a unique key prefix per test, deleted afterwards; no Redis is a failure, not a
skip), and the per-worker directory (app.keys.directory) over each: what two workers sharing the
store see of each other's changes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from app.keys.directory import KeyDirectory, KeySessionTokens
from app.store.client_keys import ClientKeyRegistry, SQLiteClientKeys, StoredClientKey
from app.store.redis_store import RedisStore
from tests.store.test_store import REDIS_URL, redis_prefix

BACKENDS = ["sqlite", "redis"]


@asynccontextmanager
async def two_registries(backend: str, tmp_path: Path) -> AsyncIterator[list[ClientKeyRegistry]]:
    """Two registries on one store, as two workers (SQLite: one file) or two replicas (Redis:
    one prefix) hold them."""
    if backend == "sqlite":
        both = [await SQLiteClientKeys.open(tmp_path), await SQLiteClientKeys.open(tmp_path)]
        try:
            yield list(both)
        finally:
            for registry in both:
                await registry.close()
        return
    async with redis_prefix() as prefix:
        stores = [await RedisStore.open(REDIS_URL, prefix=prefix) for _ in range(2)]
        try:
            yield [store.client_key_registry() for store in stores]
        finally:
            for store in stores:
                await store.close()


def stored(key: str, key_id: str = "0a1b2c3d", **fields: object) -> StoredClientKey:
    values: dict[str, object] = {
        "id": key_id,
        "digest": hashlib.sha256(key.encode()).hexdigest(),
        "prefix": key[:8],
        "tenant": "acme",
        "name": None,
        "scopes": ["llm.gateway:invoke"],
        "session_tokens": 3000,
        "created_at": "2026-12-04T10:00:00.000Z",
        **fields,
    }
    return StoredClientKey(**values)  # type: ignore[arg-type]


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_created_key_is_found_by_its_digest_and_never_stored_itself(
    backend: str, tmp_path: Path
) -> None:
    async with two_registries(backend, tmp_path) as (one, other):
        before = await other.version()
        key = stored("cxr_secret-one", name="tool-a")
        assert await one.create(key) is None
        assert await other.version() > before
        assert await other.by_digest(key.digest) == key
        assert await other.get(key.id) == key
        assert await other.all() == [key]
        assert await other.by_digest(hashlib.sha256(b"cxr_other").hexdigest()) is None
    if backend == "sqlite":  # the key's text is nowhere in the file
        assert b"cxr_secret-one" not in (tmp_path / "cx-relay.sqlite3").read_bytes()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_create_refuses_a_taken_id_digest_or_name_and_writes_nothing(
    backend: str, tmp_path: Path
) -> None:
    async with two_registries(backend, tmp_path) as (one, other):
        assert await one.create(stored("cxr_a", "11111111", name="tool")) is None
        version = await one.version()
        assert await other.create(stored("cxr_b", "11111111")) == "id"
        assert await other.create(stored("cxr_a", "22222222")) == "digest"
        assert await other.create(stored("cxr_c", "33333333", name="tool")) == "name"
        assert await one.version() == version
        assert [k.id for k in await one.all()] == ["11111111"]
        # keys without a name do not collide with each other
        assert await other.create(stored("cxr_d", "44444444")) is None
        assert await other.create(stored("cxr_e", "55555555")) is None
        assert [k.id for k in await one.all()] == ["11111111", "44444444", "55555555"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_rotate_replaces_the_digest_and_revoke_removes_the_key(
    backend: str, tmp_path: Path
) -> None:
    async with two_registries(backend, tmp_path) as (one, other):
        old = stored("cxr_old", name="tool")
        await one.create(old)
        new_digest = hashlib.sha256(b"cxr_new").hexdigest()
        version = await one.version()
        rotated = await other.rotate(old.id, new_digest, "cxr_new", "2026-12-04T11:00:00.000Z")
        assert rotated == replace(
            old, digest=new_digest, prefix="cxr_new", rotated_at="2026-12-04T11:00:00.000Z"
        )
        assert await one.version() > version
        assert await one.by_digest(old.digest) is None
        assert await one.by_digest(new_digest) == rotated
        assert await one.rotate("ffffffff", new_digest, "x", "t") is None

        assert await one.revoke(old.id) == rotated
        assert await other.by_digest(new_digest) is None
        assert await other.get(old.id) is None
        assert await other.all() == []
        assert await other.revoke(old.id) is None
        # its name is free again
        assert await other.create(stored("cxr_again", "99999999", name="tool")) is None


@pytest.mark.parametrize("backend", BACKENDS)
async def test_touch_keeps_the_latest_time_and_does_not_count_as_a_change(
    backend: str, tmp_path: Path
) -> None:
    async with two_registries(backend, tmp_path) as (one, other):
        key = stored("cxr_used")
        await one.create(key)
        version = await one.version()
        await one.touch({key.id: "2026-12-04T12:00:00.000Z", "deadbeef": "2026-12-04T12:00Z"})
        await other.touch({key.id: "2026-12-04T11:00:00.000Z"})  # an older mark loses
        assert (await other.get(key.id)).last_used_at == "2026-12-04T12:00:00.000Z"  # type: ignore[union-attr]
        assert (await one.all())[0].last_used_at == "2026-12-04T12:00:00.000Z"
        assert await one.version() == version
        assert await one.get("deadbeef") is None  # a mark never creates a key


async def test_the_redis_registry_keeps_its_keys_under_the_store_prefix() -> None:
    async with redis_prefix() as prefix:
        store = await RedisStore.open(REDIS_URL, prefix=prefix)
        try:
            registry = store.client_key_registry()
            await registry.create(stored("cxr_prefixed", name="n"))
            client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
            try:
                names = [k async for k in client.scan_iter(match=f"{prefix}*")]
                values = [await client.get(n) for n in names if await client.type(n) == "string"]
            finally:
                await client.aclose()
            assert names and all(n.startswith(f"{prefix}{{client_keys}}:") for n in names)
            assert not any("cxr_prefixed" in (v or "") for v in values)
        finally:
            await store.close()


# --- the directory: each worker's copy ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_key_created_elsewhere_works_at_once_and_a_revoked_one_stops_at_refresh(
    backend: str, tmp_path: Path
) -> None:
    async with two_registries(backend, tmp_path) as (writer, reader):
        directory = KeyDirectory(reader, refresh_seconds=0.05)
        await directory.load()
        key = stored("cxr_fresh")
        await writer.create(key)
        assert directory.find(digest_of("cxr_fresh")) is None  # not loaded yet
        principal = await directory.fetch(digest_of("cxr_fresh"))  # the store is asked
        assert principal is not None
        assert (principal.tenant, principal.key_id, principal.role) == ("acme", key.id, "client")
        assert principal.scopes == frozenset({"llm.gateway:invoke"})
        assert directory.find(digest_of("cxr_fresh")) == principal  # now without waiting

        await writer.revoke(key.id)
        task = asyncio.create_task(directory.run())
        try:
            for _ in range(40):
                if directory.find(digest_of("cxr_fresh")) is None:
                    break
                await asyncio.sleep(0.025)
            assert directory.find(digest_of("cxr_fresh")) is None
            assert await directory.fetch(digest_of("cxr_fresh")) is None
        finally:
            task.cancel()


class CountingRegistry(SQLiteClientKeys):
    lookups = 0

    async def by_digest(self, digest: str) -> StoredClientKey | None:
        type(self).lookups += 1
        return await super().by_digest(digest)


async def test_an_unknown_key_is_looked_up_once_until_the_keys_change(tmp_path: Path) -> None:
    registry = await CountingRegistry.open(tmp_path)
    try:
        directory = KeyDirectory(registry)
        await directory.load()
        for _ in range(5):
            assert await directory.fetch(digest_of("cxr_wrong")) is None
        assert CountingRegistry.lookups == 1
        await registry.create(stored("cxr_wrong"))  # (a key cannot be guessed; here it is)
        assert await directory.refresh()
        assert await directory.fetch(digest_of("cxr_wrong")) is not None
        assert not await directory.refresh()  # nothing changed: no reload
    finally:
        await registry.close()


async def test_last_use_is_written_in_batches_at_most_once_per_interval(tmp_path: Path) -> None:
    registry = await SQLiteClientKeys.open(tmp_path)
    try:
        await registry.create(stored("cxr_busy", "aaaaaaaa"))
        await registry.create(stored("cxr_idle", "bbbbbbbb"))
        directory = KeyDirectory(registry, touch_seconds=3600)
        await directory.load()
        for _ in range(100):
            assert directory.find(digest_of("cxr_busy")) is not None
        await directory.flush()
        first = (await registry.get("aaaaaaaa")).last_used_at  # type: ignore[union-attr]
        assert first is not None
        assert (await registry.get("bbbbbbbb")).last_used_at is None  # type: ignore[union-attr]
        directory.find(digest_of("cxr_busy"))
        await directory.flush()  # within the interval: nothing more to write
        assert (await registry.get("aaaaaaaa")).last_used_at == first  # type: ignore[union-attr]
    finally:
        await registry.close()


async def test_session_budgets_come_from_the_environment_then_the_loaded_keys(
    tmp_path: Path,
) -> None:
    registry = await SQLiteClientKeys.open(tmp_path)
    try:
        await registry.create(stored("cxr_budget", "aaaaaaaa", session_tokens=1234))
        await registry.create(stored("cxr_tenants", "bbbbbbbb", session_tokens=None))
        directory = KeyDirectory(registry)
        budgets = KeySessionTokens({"cccccccc": 50}, directory)
        assert dict(budgets) == {"cccccccc": 50}
        await directory.load()
        assert dict(budgets) == {"cccccccc": 50, "aaaaaaaa": 1234}
        assert "bbbbbbbb" not in budgets  # the tenant's budget applies
    finally:
        await registry.close()
