"""The audit log of configuration changes, in the embedded SQLite store (DATA_DIR/cx-relay.sqlite3).

An operator must be able to answer "who changed the providers, when, to what, and did it work"
after the fact and after a restart, so every attempt is written durably (WAL, synchronous=FULL)
before the API answers. Rows are append-only: triggers refuse UPDATE and DELETE, so a record
cannot be rewritten through this store. The configuration last applied through the admin API is
kept beside the log (one row) so a restart comes back with it instead of silently reverting.

sqlite3 blocks, so every statement runs in a worker thread (asyncio.to_thread) on one connection
guarded by a lock; the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from app.store.sqlite_init import preparing

DB_FILENAME = "cx-relay.sqlite3"
MAX_DETAIL_CHARS = 2000

# apply/revert/validate: /admin; gateway_create/gateway_health_check: /api/v2/gateways (whose
# health check also writes the `apply` it makes); key_*: client keys (/admin/keys, `python -m app
# keys`), the detail naming the key id and tenant, never the key
AuditAction = Literal[
    "apply",
    "revert",
    "validate",
    "gateway_create",
    "gateway_health_check",
    "key_create",
    "key_rotate",
    "key_revoke",
]
AuditResult = Literal["ok", "invalid", "health_check_failed", "error"]

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    result TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TABLE IF NOT EXISTS applied_provider_config (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    config_json TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    actor TEXT NOT NULL
);
"""


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds and a `Z`, sortable as text."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AuditRecord:
    id: int
    time: str
    actor: str
    action: str
    payload_sha256: str
    result: str
    latency_ms: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = "id, time, actor, action, payload_sha256, result, latency_ms, detail"


class AuditLog:
    """Open with `await AuditLog.open(data_dir)`; `await close()` on shutdown."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, data_dir: Path) -> AuditLog:
        path = Path(data_dir) / DB_FILENAME
        connection = await asyncio.to_thread(_connect, path)
        return cls(connection, path)

    async def close(self) -> None:
        await self._run(lambda db: db.close())

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        def locked() -> _T:
            with self._lock:
                return work(self._db)

        return await asyncio.to_thread(locked)

    # --- the log ---------------------------------------------------------------------------------

    async def append(
        self,
        *,
        actor: str,
        action: AuditAction,
        payload_sha256: str,
        result: AuditResult,
        latency_ms: float,
        detail: str = "",
    ) -> AuditRecord:
        row = (utc_now(), actor, action, payload_sha256, result, round(latency_ms, 1))
        short = detail if len(detail) <= MAX_DETAIL_CHARS else detail[: MAX_DETAIL_CHARS - 1] + "…"

        def insert(db: sqlite3.Connection) -> AuditRecord:
            with db:
                cursor = db.execute(
                    "INSERT INTO audit_log (time, actor, action, payload_sha256, result, "
                    "latency_ms, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*row, short),
                )
            return AuditRecord(int(cursor.lastrowid or 0), *row, short)

        return await self._run(insert)

    async def list(self, limit: int = 50, offset: int = 0) -> list[AuditRecord]:
        """Newest first."""

        def select(db: sqlite3.Connection) -> list[AuditRecord]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM audit_log ORDER BY id DESC LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
            return [AuditRecord(*row) for row in rows]

        return await self._run(select)

    async def count(self) -> int:
        return await self._run(
            lambda db: int(db.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0])
        )

    # --- the configuration applied through the API ----------------------------------------------

    @asynccontextmanager
    async def change_lock(self) -> AsyncIterator[None]:
        """Held while a configuration change is made, so the processes sharing this database
        (WORKERS > 1) make theirs one at a time: an advisory lock on a file beside it, polled
        rather than waited for in a thread, so a waiter that is cancelled leaves nothing held."""
        fd = os.open(self.path.with_suffix(".config-lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    async def save_applied(
        self, config_json: str, sha256: str, actor: str, *, expected: str | None
    ) -> bool:
        """Store the applied configuration only while the one stored is still `expected` (its
        sha256; None: none is): a compare-and-swap under SQLite's write lock, so a worker that
        has not seen another worker's change (they share this file) never overwrites it. False,
        and nothing written, when the stored one has changed."""
        values = (config_json, sha256, utc_now(), actor)

        def swap(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")  # the write lock first: no other writer in between
            try:
                row = db.execute("SELECT sha256 FROM applied_provider_config").fetchone()
                if (row[0] if row is not None else None) != expected:
                    db.rollback()
                    return False
                db.execute(
                    "INSERT OR REPLACE INTO applied_provider_config "
                    "(id, config_json, sha256, applied_at, actor) VALUES (1, ?, ?, ?, ?)",
                    values,
                )
            except BaseException:
                db.rollback()
                raise
            db.commit()
            return True

        return await self._run(swap)

    async def load_applied(self) -> dict[str, str] | None:
        """`{"config_json", "sha256", "applied_at", "actor"}`, or None if none is applied."""

        def select(db: sqlite3.Connection) -> dict[str, str] | None:
            row = db.execute(
                "SELECT config_json, sha256, applied_at, actor FROM applied_provider_config"
            ).fetchone()
            if row is None:
                return None
            return dict(zip(("config_json", "sha256", "applied_at", "actor"), row, strict=True))

        return await self._run(select)

    async def clear_applied(self) -> None:
        def delete(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM applied_provider_config")

        await self._run(delete)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    with preparing(path):
        db = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an audit record must survive a power cut
        db.executescript(_SCHEMA)
    return db
