"""A table of the service's SQLite file (DATA_DIR, beside the ledger and the audit log) kept by a
registry of its own: the gateways of /api/v2 and the client keys created at run time. Each holds
one connection, used from a worker thread one statement at a time, so the event loop never waits
on the file; a change that must land whole (a record with its version bump) runs in one BEGIN
IMMEDIATE transaction."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Self, TypeVar

from app.store.audit import DB_FILENAME
from app.store.base import StoreUnavailable
from app.store.sqlite_connection import connect

_T = TypeVar("_T")


class SQLiteTable:
    """Open with `await <subclass>.open(data_dir)`."""

    SCHEMA: ClassVar[str]  # CREATE TABLE IF NOT EXISTS ...: run when the file is opened
    WHAT: ClassVar[str]  # what the table holds, for the error when the file cannot be opened

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, data_dir: Path) -> Self:
        path = Path(data_dir) / DB_FILENAME
        try:
            connection = await asyncio.to_thread(connect, path, "FULL", cls.SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the {cls.WHAT} table at {path}: {exc}") from exc
        return cls(connection)

    async def _run(self, work: Callable[[sqlite3.Connection], _T], *, write: bool = False) -> _T:
        def locked() -> _T:
            with self._lock:
                if not write:
                    return work(self._db)
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(self._db)
                except BaseException:
                    self._db.rollback()
                    raise
                self._db.commit()
                return result

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store error: {exc}") from exc

    async def close(self) -> None:
        await self._run(lambda db: db.close())
