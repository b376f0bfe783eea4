"""The one SQLite connection that the budget and ledger halves of `SQLiteStore` share.

It exists so that opening, locking, threading and transactions are written once: both halves
(`sqlite_budget`, `sqlite_ledger`, each the Store's hooks for its part) subclass
`SQLiteConnection` and only ever touch the database through `_run`.

One connection guarded by a lock. By default every statement runs in a worker thread
(asyncio.to_thread), so the event loop never waits on the disk. With `inline=True` statements run
on the event loop itself: measured (docs/PERFORMANCE.md), a thread hop and the GIL hand-off cost
more than the statement when commits do not fsync (synchronous=NORMAL in WAL mode writes the WAL
to the page cache) and no other process contends for the write lock (one worker). The lifespan
chooses inline only then. Each write is one
`BEGIN IMMEDIATE` transaction: it takes SQLite's write lock before reading, so a check and the
write that follows are atomic even between processes sharing the file (several uvicorn workers,
or a new instance started before the old one is gone).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from app.store.base import Store, StoreUnavailable
from app.store.sqlite_init import preparing

_T = TypeVar("_T")


class SQLiteConnection(Store):
    """The connection, its lock and the clock; `close`, `ping` and `_run` for the subclasses."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.Lock()
        self._clock = clock
        self._closed = False
        self.inline = False  # see the module docstring

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            with self._lock:
                self._db.close()

        await asyncio.to_thread(shut)

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone(), transaction=False)

    async def _run(
        self, work: Callable[[sqlite3.Connection], _T], *, transaction: bool = True
    ) -> _T:
        """Run `work` in a worker thread, holding the lock, inside BEGIN IMMEDIATE … COMMIT."""

        def locked() -> _T:
            with self._lock:
                if self._closed:
                    raise StoreUnavailable("the SQLite store is closed")
                if not transaction:
                    return work(self._db)
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result

        try:
            return locked() if self.inline else await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store error: {exc}") from exc

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)


def connect(path: Path, synchronous: str, schema: str) -> sqlite3.Connection:
    """Open (creating the file and its directory if need be) in WAL mode and apply `schema`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with preparing(path):  # several workers starting at once on a new file: one at a time
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never implicit
        db = sqlite3.connect(path, check_same_thread=False, timeout=10.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        db.executescript(schema)
    return db
