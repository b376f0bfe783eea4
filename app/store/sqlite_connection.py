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

Inline, the transactions asked for in one turn of the event loop are committed together (group
commit): each runs in a savepoint of one `BEGIN IMMEDIATE` … `COMMIT`, in the order asked, and
each caller is answered after that COMMIT, so a write is as durable as alone and the commit, a
large share of a call's store time (profiled), is paid once per turn instead of once per write.
A write whose caller was cancelled before its turn came is not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
        self._group: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []

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

        if self.inline and transaction:
            return await self._in_group(work)
        try:
            return locked() if self.inline else await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store error: {exc}") from exc

    async def _in_group(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Join this turn's group commit (the first to join schedules it) and await its result."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[_T] = loop.create_future()
        if not self._group:
            loop.call_soon(self._commit_group)
        self._group.append((work, done))
        return await done

    def _commit_group(self) -> None:
        group, self._group = self._group, []
        group = [(work, done) for work, done in group if not done.cancelled()]
        if not group:
            return
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            with self._lock:
                if self._closed:
                    raise StoreUnavailable("the SQLite store is closed")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    if len(group) == 1:  # alone, its own transaction is its savepoint
                        work, done = group[0]
                        results.append((done, work(self._db), None))
                    else:
                        for work, done in group:
                            results.append((done, *_in_savepoint(self._db, work)))
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):  # an I/O error may have ended it
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except Exception as exc:  # the whole group failed; each caller gets the error
            failure = _unavailable(exc) if isinstance(exc, sqlite3.Error) else exc
            for _, done in group:
                if not done.done():
                    done.set_exception(failure)
            return
        for done, result, error in results:
            if done.done():  # cancelled meanwhile: its write stands, like a finished thread's
                continue
            if error is None:
                done.set_result(result)
            else:
                done.set_exception(
                    _unavailable(error) if isinstance(error, sqlite3.Error) else error
                )

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)


def _in_savepoint(
    db: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]
) -> tuple[_T | None, Exception | None]:
    """Run one write of a group; an error rolls back that write alone and is its caller's."""
    db.execute("SAVEPOINT one_write")
    try:
        result = work(db)
    except Exception as error:
        db.execute("ROLLBACK TO one_write")
        db.execute("RELEASE one_write")
        return None, error
    db.execute("RELEASE one_write")
    return result, None


def _unavailable(error: sqlite3.Error) -> StoreUnavailable:
    failure = StoreUnavailable(f"SQLite store error: {error}")
    failure.__cause__ = error
    return failure


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
