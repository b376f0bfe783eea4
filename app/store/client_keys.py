"""Client keys created at run time (/admin/keys, `python -m app keys`), stored where every worker
and replica reads them: the SQLite file under DATA_DIR (the workers of one host) or Redis (every
replica: app.store.redis_client_keys, imported only by the Redis store).

Only a key's SHA-256 digest is stored, never the key. Every change (create, rotate, revoke)
raises one version counter in the same transaction, so a worker learns that anything changed
with one cheap read and reloads only then (app.keys.directory). When a key was last used is
kept apart from the record and written in batches: it never raises the version.
"""

from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from app.store.sqlite_table import SQLiteTable

# what create refuses: the id or the digest is taken (a generated value: try another), or the name
Conflict = Literal["id", "digest", "name"]


@dataclass(frozen=True)
class StoredClientKey:
    id: str  # 8 hex digits: the key_id of logs, budgets and limits; kept through a rotation
    digest: str  # SHA-256 of the key, hex
    prefix: str  # the key's first characters, to tell keys apart in a list
    tenant: str
    name: str | None
    scopes: list[str] | None  # None: no scope list, allowed everywhere a client key is
    session_tokens: int | None  # the key's own per-session token budget, or the tenant's
    created_at: str
    rotated_at: str | None = None
    last_used_at: str | None = None  # not part of the record's JSON (touch writes it apart)

    def to_json(self) -> str:
        fields = asdict(self)
        fields.pop("last_used_at")
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, last_used_at: str | None = None) -> StoredClientKey:
        fields: dict[str, Any] = json.loads(text)
        return cls(**fields, last_used_at=last_used_at)


class ClientKeyRegistry(ABC):
    """Every method is one atomic step; the changes raise `version`."""

    @abstractmethod
    async def create(self, key: StoredClientKey) -> Conflict | None:
        """None when stored; else what is taken, and nothing is written."""

    @abstractmethod
    async def get(self, key_id: str) -> StoredClientKey | None: ...

    @abstractmethod
    async def by_digest(self, digest: str) -> StoredClientKey | None:
        """The key whose digest this is (the look-up of a key a worker has not loaded yet)."""

    @abstractmethod
    async def all(self) -> list[StoredClientKey]:
        """Every key, oldest first, with when it was last used."""

    @abstractmethod
    async def rotate(
        self, key_id: str, digest: str, prefix: str, rotated_at: str
    ) -> StoredClientKey | None:
        """The key with its new digest (the old one no longer matches), or None if unknown.
        StoreUnavailable if the new digest were taken (a generated value: never in practice)."""

    @abstractmethod
    async def revoke(self, key_id: str) -> StoredClientKey | None:
        """Delete the key; what it was, or None if unknown."""

    @abstractmethod
    async def version(self) -> int:
        """Raised by every create, rotate and revoke: unchanged, nothing to reload."""

    @abstractmethod
    async def touch(self, used: Mapping[str, str]) -> None:
        """Record when keys were last used ({id: ISO time}); a later time only, never a record
        of a key revoked meanwhile."""

    async def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS client_keys (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    name TEXT UNIQUE,
    record TEXT NOT NULL,
    last_used_at TEXT
);
CREATE TABLE IF NOT EXISTS client_keys_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO client_keys_version (id, version) VALUES (1, 0);
"""

_BUMP = "UPDATE client_keys_version SET version = version + 1 WHERE id = 1"


class SQLiteClientKeys(SQLiteTable, ClientKeyRegistry):
    """Open with `await SQLiteClientKeys.open(data_dir)`; statements run in a worker thread, a
    change in one BEGIN IMMEDIATE transaction with its version bump."""

    SCHEMA = _SCHEMA
    WHAT = "client keys"

    async def create(self, key: StoredClientKey) -> Conflict | None:
        def insert(db: sqlite3.Connection) -> Conflict | None:
            for column, value in (("id", key.id), ("digest", key.digest), ("name", key.name)):
                if value is None:
                    continue
                query = f"SELECT 1 FROM client_keys WHERE {column} = ?"  # fixed column names
                if db.execute(query, (value,)).fetchone():
                    return column  # type: ignore[return-value]
            db.execute(
                "INSERT INTO client_keys (id, digest, name, record) VALUES (?, ?, ?, ?)",
                (key.id, key.digest, key.name, key.to_json()),
            )
            db.execute(_BUMP)
            return None

        return await self._run(insert, write=True)

    async def _one(self, column: str, value: str) -> StoredClientKey | None:
        def select(db: sqlite3.Connection) -> StoredClientKey | None:
            row = db.execute(
                f"SELECT record, last_used_at FROM client_keys WHERE {column} = ?",
                (value,),
            ).fetchone()
            return StoredClientKey.from_json(row[0], row[1]) if row else None

        return await self._run(select)

    async def get(self, key_id: str) -> StoredClientKey | None:
        return await self._one("id", key_id)

    async def by_digest(self, digest: str) -> StoredClientKey | None:
        return await self._one("digest", digest)

    async def all(self) -> list[StoredClientKey]:
        def select(db: sqlite3.Connection) -> list[StoredClientKey]:
            rows = db.execute(
                "SELECT record, last_used_at FROM client_keys ORDER BY rowid"
            ).fetchall()
            return [StoredClientKey.from_json(record, used) for record, used in rows]

        return await self._run(select)

    async def rotate(
        self, key_id: str, digest: str, prefix: str, rotated_at: str
    ) -> StoredClientKey | None:
        def update(db: sqlite3.Connection) -> StoredClientKey | None:
            row = db.execute(
                "SELECT record, last_used_at FROM client_keys WHERE id = ?", (key_id,)
            ).fetchone()
            if row is None:
                return None
            key = StoredClientKey.from_json(row[0], row[1])
            key = replace(key, digest=digest, prefix=prefix, rotated_at=rotated_at)
            db.execute(
                "UPDATE client_keys SET digest = ?, record = ? WHERE id = ?",
                (digest, key.to_json(), key_id),
            )
            db.execute(_BUMP)
            return key

        return await self._run(update, write=True)

    async def revoke(self, key_id: str) -> StoredClientKey | None:
        def delete(db: sqlite3.Connection) -> StoredClientKey | None:
            row = db.execute(
                "SELECT record, last_used_at FROM client_keys WHERE id = ?", (key_id,)
            ).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM client_keys WHERE id = ?", (key_id,))
            db.execute(_BUMP)
            return StoredClientKey.from_json(row[0], row[1])

        return await self._run(delete, write=True)

    async def version(self) -> int:
        return await self._run(
            lambda db: int(
                db.execute("SELECT version FROM client_keys_version WHERE id = 1").fetchone()[0]
            )
        )

    async def touch(self, used: Mapping[str, str]) -> None:
        if not used:
            return
        rows = [(when, key_id, when) for key_id, when in used.items()]

        def update(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE client_keys SET last_used_at = ? WHERE id = ? "
                "AND (last_used_at IS NULL OR last_used_at < ?)",
                rows,
            )

        await self._run(update, write=True)
