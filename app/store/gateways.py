"""Gateways created through /api/v2/gateways, stored where every worker and replica reads them.

A gateway is created `pending_validation`, and its health check moves it to `active` or
`failed`: a client polls `GET /api/v2/gateways/{id}` on any worker, so the record lives in the
service's store: the SQLite file under DATA_DIR (shared by the workers of one host) or Redis
(shared by every replica: app.store.redis_gateways, imported only by the Redis store). Each
record is one JSON document under its id; a gateway's name is unique, claimed atomically at
creation (a UNIQUE column; SET NX in the same Lua script).
"""

from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from app.store.sqlite_table import SQLiteTable

GatewayStatus = Literal["pending_validation", "active", "failed"]


@dataclass(frozen=True)
class GatewayRecord:
    id: str
    name: str
    status: GatewayStatus
    created_at: str
    updated_at: str
    actor: str  # who created it, as the audit log names them
    payload: dict[str, Any]  # the create request as received (key directives, never keys)
    payload_sha256: str
    reasons: list[dict[str, str]] = field(default_factory=list)  # [{path, message}] if failed
    routes: list[str] = field(default_factory=list)  # the models it serves, once active

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> GatewayRecord:
        return cls(**json.loads(text))


class GatewayRegistry(ABC):
    @abstractmethod
    async def create(self, record: GatewayRecord) -> bool:
        """False, writing nothing, when a gateway of that name exists."""

    @abstractmethod
    async def get(self, gateway_id: str) -> GatewayRecord | None: ...

    @abstractmethod
    async def update(self, record: GatewayRecord) -> None:
        """Replace the record of an existing id (its name never changes)."""

    async def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateways (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL
);
"""


class SQLiteGateways(SQLiteTable, GatewayRegistry):
    """Open with `await SQLiteGateways.open(data_dir)`; statements run in a worker thread."""

    SCHEMA = _SCHEMA
    WHAT = "gateways"

    async def create(self, record: GatewayRecord) -> bool:
        def insert(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT OR IGNORE INTO gateways (id, name, record) VALUES (?, ?, ?)",
                (record.id, record.name, record.to_json()),
            )
            return cursor.rowcount == 1

        return await self._run(insert)

    async def get(self, gateway_id: str) -> GatewayRecord | None:
        def select(db: sqlite3.Connection) -> GatewayRecord | None:
            row = db.execute("SELECT record FROM gateways WHERE id = ?", (gateway_id,)).fetchone()
            return GatewayRecord.from_json(row[0]) if row else None

        return await self._run(select)

    async def update(self, record: GatewayRecord) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE gateways SET record = ? WHERE id = ?", (record.to_json(), record.id)
            )
        )
