"""The embedded default Store: SQLite (WAL) in DATA_DIR/cx-relay.sqlite3, beside the audit log.

`SQLiteStore` is the two halves of the Store over one connection:

* `sqlite_connection`: the connection, its lock, the worker thread and the transactions
* `sqlite_budget`: budget counters and reservations (`budget_*` tables)
* `sqlite_ledger`: the usage ledger and its totals (`usage_*` tables)

and `settle_and_record`, which needs both: a finished call's settle and its ledger record are one
`BEGIN IMMEDIATE` transaction (one commit, so no more costly than the settle alone was).

`synchronous=FULL` by default here: a committed ledger row or settled budget survives a power cut,
not only a crash. The service opens it with SQLITE_SYNCHRONOUS (`normal` by default: a crash of
the process loses nothing committed, a power cut may lose the last moments), and runs statements
on the event loop when that is faster (`inline`, see sqlite_connection).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Literal

from app.store.audit import DB_FILENAME
from app.store.base import DEFAULT_RESERVATION_TTL_SECONDS, StoreUnavailable
from app.store.models import Reservation, UsageRecord
from app.store.sqlite_budget import BUDGET_SCHEMA, SQLiteBudget, settle_rows
from app.store.sqlite_connection import connect
from app.store.sqlite_ledger import LEDGER_SCHEMA, SQLiteLedger, insert_records

_SCHEMA = BUDGET_SCHEMA + LEDGER_SCHEMA


class SQLiteStore(SQLiteBudget, SQLiteLedger):
    """Open with `await SQLiteStore.open(data_dir)`; `await close()` on shutdown."""

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        filename: str = DB_FILENAME,
        reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        inline: bool = False,
    ) -> SQLiteStore:
        path = Path(data_dir) / filename
        try:
            connection = await asyncio.to_thread(connect, path, synchronous, _SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the SQLite store at {path}: {exc}") from exc
        store = cls(connection, path, reservation_ttl_seconds=reservation_ttl_seconds)
        store.inline = inline
        return store

    async def _settle_and_record(self, reservation: Reservation, record: UsageRecord) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            now_us = self._now_us()
            tokens, cost = record.total_tokens, record.cost_micros
            if not settle_rows(db, reservation, tokens, cost, now_us, self._ttl_us):
                return False
            insert_records(db, [record])
            return True

        return await self._run(work)
