"""The embedded default Store: SQLite (WAL) in DATA_DIR/cx-relay.sqlite3, beside the audit log.

One connection guarded by a lock, every statement in a worker thread (asyncio.to_thread), so the
event loop never waits on the disk; the same approach as `app.services.audit`. Each operation is
one `BEGIN IMMEDIATE` transaction: it takes SQLite's write lock before reading the counters, so
the check and the reservation are atomic even between processes sharing the file (several uvicorn
workers, or a new instance started before the old one is gone). `synchronous=FULL` by default:
a committed ledger row or settled budget survives a power cut, not only a crash.

Tables (created on open, never dropped):

* `budget_counters`  (tenant, kind, scope_id) -> used / reserved tokens and cost (micro-units)
* `budget_reservations`  id -> tenant, scopes (JSON), tokens, cost, expires_us, state
  (reserved | settled | released | expired); finished rows are pruned a day after they expire
* `usage_records`  (tenant, id) -> one ledger record; the primary key makes appends idempotent
* `usage_sessions`  (tenant, session) -> totals, first/last use: kept in the same transaction as
  the record so summaries cost one row read instead of a scan
* `usage_tenants`  tenant -> totals

Budget counter rows are kept (a finished session's row is small); nothing here deletes ledger
rows: retention is an operator's decision.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from app.services.audit import DB_FILENAME
from app.services.store.base import (
    DEFAULT_ACTIVE_WINDOW_SECONDS,
    DEFAULT_RESERVATION_TTL_SECONDS,
    StoreUnavailable,
    check_page_args,
    check_reserve_args,
    decide,
    remaining_of,
)
from app.services.store.models import (
    BudgetScope,
    Refusal,
    Reservation,
    ScopeUsage,
    SessionSummary,
    TenantStatus,
    UsagePage,
    UsageRecord,
    UsageTotals,
    from_epoch_us,
    parse_cursor,
    reservation_id,
    to_micros,
)

_T = TypeVar("_T")

KEEP_FINISHED_US = 86_400 * 1_000_000  # a settled reservation is remembered a day (double settle)
PRUNE_EVERY_SECONDS = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_counters (
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    used_tokens INTEGER NOT NULL DEFAULT 0,
    used_cost_micros INTEGER NOT NULL DEFAULT 0,
    reserved_tokens INTEGER NOT NULL DEFAULT 0,
    reserved_cost_micros INTEGER NOT NULL DEFAULT 0,
    updated_us INTEGER NOT NULL,
    PRIMARY KEY (tenant, kind, scope_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_reservations (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    scopes TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    expires_us INTEGER NOT NULL,
    state TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS budget_reservations_due ON budget_reservations (state, expires_us);
CREATE TABLE IF NOT EXISTS usage_records (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    time TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    session TEXT NOT NULL,
    surface TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    cost_micros INTEGER NOT NULL,
    cached INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    estimated INTEGER NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX IF NOT EXISTS usage_records_by_time ON usage_records (tenant, time_us, id);
CREATE INDEX IF NOT EXISTS usage_records_by_session
    ON usage_records (tenant, session, time_us, id);
CREATE TABLE IF NOT EXISTS usage_sessions (
    tenant TEXT NOT NULL,
    session TEXT NOT NULL,
    calls INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    cached_calls INTEGER NOT NULL,
    estimated_calls INTEGER NOT NULL,
    first_us INTEGER NOT NULL,
    last_us INTEGER NOT NULL,
    PRIMARY KEY (tenant, session)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_sessions_by_last ON usage_sessions (tenant, last_us);
CREATE TABLE IF NOT EXISTS usage_tenants (
    tenant TEXT PRIMARY KEY,
    calls INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    cached_calls INTEGER NOT NULL,
    estimated_calls INTEGER NOT NULL
) WITHOUT ROWID;
"""

_RECORD_COLUMNS = (
    "id, time, tenant, session, surface, provider, model, prompt_tokens, completion_tokens, "
    "cost, cached, latency_ms, estimated"
)
_TOTALS_COLUMNS = (
    "calls, prompt_tokens, completion_tokens, cost_micros, cached_calls, estimated_calls"
)


class SQLiteStore:
    """Open with `await SQLiteStore.open(data_dir)`; `await close()` on shutdown."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        *,
        reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.Lock()
        self._ttl_us = int(reservation_ttl_seconds * 1_000_000)
        self._clock = clock
        self._last_prune = 0.0
        self._closed = False

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        filename: str = DB_FILENAME,
        reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> SQLiteStore:
        path = Path(data_dir) / filename
        try:
            connection = await asyncio.to_thread(_connect, path, synchronous)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the SQLite store at {path}: {exc}") from exc
        return cls(connection, path, reservation_ttl_seconds=reservation_ttl_seconds)

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
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store error: {exc}") from exc

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    # --- budgets ---------------------------------------------------------------------------------

    def _expire_due(self, db: sqlite3.Connection, now_us: int) -> None:
        """Release reservations whose TTL passed (their replica died or forgot them)."""
        due = db.execute(
            "SELECT id, tenant, scopes, tokens, cost_micros FROM budget_reservations "
            "WHERE state = 'reserved' AND expires_us <= ?",
            (now_us,),
        ).fetchall()
        for rid, tenant, scopes_json, tokens, cost_micros in due:
            for kind, scope_id in json.loads(scopes_json):
                _bump(db, tenant, kind, scope_id, now_us, reserved=(-tokens, -cost_micros))
            db.execute("UPDATE budget_reservations SET state = 'expired' WHERE id = ?", (rid,))
        if self._clock() - self._last_prune >= PRUNE_EVERY_SECONDS:
            self._last_prune = self._clock()
            db.execute(
                "DELETE FROM budget_reservations WHERE state != 'reserved' AND expires_us < ?",
                (now_us - KEEP_FINISHED_US,),
            )

    async def reserve(
        self, scopes: Sequence[BudgetScope], tokens: int, cost: float = 0.0
    ) -> Reservation | Refusal:
        check_reserve_args(scopes, tokens, cost)
        cost_micros = to_micros(cost)
        scopes = tuple(scopes)
        tenant = scopes[0].tenant

        def work(db: sqlite3.Connection) -> Reservation | Refusal:
            now_us = self._now_us()
            self._expire_due(db, now_us)
            decision = decide([_read(db, s) for s in scopes], tokens, cost_micros)
            if isinstance(decision, Refusal):
                return decision
            for s in scopes:
                _bump(db, tenant, s.kind, s.id, now_us, reserved=(tokens, cost_micros))
            rid = reservation_id()
            db.execute(
                "INSERT INTO budget_reservations "
                "(id, tenant, scopes, tokens, cost_micros, expires_us, state) "
                "VALUES (?, ?, ?, ?, ?, ?, 'reserved')",
                (
                    rid,
                    tenant,
                    json.dumps([[s.kind, s.id] for s in scopes]),
                    tokens,
                    cost_micros,
                    now_us + self._ttl_us,
                ),
            )
            return Reservation(rid, tenant, scopes, tokens, cost_micros, decision)

        return await self._run(work)

    async def settle(
        self, reservation: Reservation, actual_tokens: int, actual_cost: float = 0.0
    ) -> bool:
        if actual_tokens < 0 or actual_cost < 0:
            raise ValueError("actual usage cannot be negative")
        cost_micros = to_micros(actual_cost)

        def work(db: sqlite3.Connection) -> bool:
            now_us = self._now_us()
            row = db.execute(
                "SELECT tenant, scopes, tokens, cost_micros, state FROM budget_reservations "
                "WHERE id = ?",
                (reservation.id,),
            ).fetchone()
            if row is not None and row[4] == "settled":
                return False
            if row is not None and row[4] == "reserved":
                for kind, scope_id in json.loads(row[1]):
                    _bump(db, row[0], kind, scope_id, now_us, reserved=(-row[2], -row[3]))
            for s in reservation.scopes:
                _bump(db, s.tenant, s.kind, s.id, now_us, used=(actual_tokens, cost_micros))
            if row is None:  # forgotten (pruned): record it was settled, so a retry is a no-op
                db.execute(
                    "INSERT INTO budget_reservations "
                    "(id, tenant, scopes, tokens, cost_micros, expires_us, state) "
                    "VALUES (?, ?, '[]', 0, 0, ?, 'settled')",
                    (reservation.id, reservation.tenant, now_us + self._ttl_us),
                )
            else:
                db.execute(
                    "UPDATE budget_reservations SET state = 'settled' WHERE id = ?",
                    (reservation.id,),
                )
            return True

        return await self._run(work)

    async def release(self, reservation: Reservation) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            now_us = self._now_us()
            row = db.execute(
                "SELECT tenant, scopes, tokens, cost_micros FROM budget_reservations "
                "WHERE id = ? AND state = 'reserved'",
                (reservation.id,),
            ).fetchone()
            if row is None:
                return False
            for kind, scope_id in json.loads(row[1]):
                _bump(db, row[0], kind, scope_id, now_us, reserved=(-row[2], -row[3]))
            db.execute(
                "UPDATE budget_reservations SET state = 'released' WHERE id = ?",
                (reservation.id,),
            )
            return True

        return await self._run(work)

    async def usage(self, scope: BudgetScope) -> ScopeUsage:
        def work(db: sqlite3.Connection) -> ScopeUsage:
            self._expire_due(db, self._now_us())
            return _read(db, scope)

        return await self._run(work)

    async def remaining(self, scope: BudgetScope) -> tuple[int | None, float | None]:
        return remaining_of(await self.usage(scope))

    # --- the ledger ------------------------------------------------------------------------------

    async def append_usage(self, record: UsageRecord) -> bool:
        return await self.append_usages([record]) == 1

    async def append_usages(self, records: Sequence[UsageRecord]) -> int:
        records = list(records)
        if not records:
            return 0

        def work(db: sqlite3.Connection) -> int:
            written = 0
            for r in records:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO usage_records (tenant, id, time, time_us, session, "
                    "surface, provider, model, prompt_tokens, completion_tokens, cost, "
                    "cost_micros, cached, latency_ms, estimated) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r.tenant,
                        r.id,
                        r.time_iso,
                        r.time_us,
                        r.session,
                        r.surface,
                        r.provider,
                        r.model,
                        r.prompt_tokens,
                        r.completion_tokens,
                        r.cost,
                        r.cost_micros,
                        int(r.cached),
                        r.latency_ms,
                        int(r.estimated),
                    ),
                )
                if cursor.rowcount != 1:
                    continue  # already written: a retried batch
                written += 1
                totals = (
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cost_micros,
                    int(r.cached),
                    int(r.estimated),
                )
                db.execute(
                    f"INSERT INTO usage_sessions (tenant, session, {_TOTALS_COLUMNS}, first_us, "
                    "last_us) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (tenant, session) DO UPDATE SET "
                    "calls = calls + 1, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "completion_tokens = completion_tokens + excluded.completion_tokens, "
                    "cost_micros = cost_micros + excluded.cost_micros, "
                    "cached_calls = cached_calls + excluded.cached_calls, "
                    "estimated_calls = estimated_calls + excluded.estimated_calls, "
                    "first_us = min(first_us, excluded.first_us), "
                    "last_us = max(last_us, excluded.last_us)",
                    (r.tenant, r.session, *totals, r.time_us, r.time_us),
                )
                db.execute(
                    f"INSERT INTO usage_tenants (tenant, {_TOTALS_COLUMNS}) "
                    "VALUES (?, 1, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (tenant) DO UPDATE SET "
                    "calls = calls + 1, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "completion_tokens = completion_tokens + excluded.completion_tokens, "
                    "cost_micros = cost_micros + excluded.cost_micros, "
                    "cached_calls = cached_calls + excluded.cached_calls, "
                    "estimated_calls = estimated_calls + excluded.estimated_calls",
                    (r.tenant, *totals),
                )
            return written

        return await self._run(work)

    async def list_usage(
        self,
        tenant: str,
        session: str | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> UsagePage:
        check_page_args(limit)
        where = ["tenant = ?"]
        params: list[object] = [tenant]
        if session is not None:
            where.append("session = ?")
            params.append(session)
        if cursor is not None:
            time_us, record_id = parse_cursor(cursor)
            where.append("(time_us < ? OR (time_us = ? AND id < ?))")
            params.extend([time_us, time_us, record_id])
        sql = (
            f"SELECT {_RECORD_COLUMNS} FROM usage_records WHERE {' AND '.join(where)} "
            "ORDER BY time_us DESC, id DESC LIMIT ?"
        )
        params.append(limit + 1)

        def work(db: sqlite3.Connection) -> list[UsageRecord]:
            return [_record(row) for row in db.execute(sql, params).fetchall()]

        rows = await self._run(work, transaction=False)
        more = len(rows) > limit
        rows = rows[:limit]
        return UsagePage(rows, rows[-1].sort_key if more and rows else None)

    async def session_summary(self, tenant: str, session_id: str) -> SessionSummary | None:
        def work(db: sqlite3.Connection) -> SessionSummary | None:
            row = db.execute(
                f"SELECT session, {_TOTALS_COLUMNS}, first_us, last_us FROM usage_sessions "
                "WHERE tenant = ? AND session = ?",
                (tenant, session_id),
            ).fetchone()
            return None if row is None else _summary(tenant, row)

        return await self._run(work, transaction=False)

    async def tenant_status(
        self,
        tenant: str,
        *,
        active_window_seconds: float = DEFAULT_ACTIVE_WINDOW_SECONDS,
        session_limit: int = 100,
    ) -> TenantStatus:
        since_us = self._now_us() - int(active_window_seconds * 1_000_000)

        def work(db: sqlite3.Connection) -> TenantStatus:
            # one read transaction, so the totals and the session list agree
            db.execute("BEGIN")
            try:
                row = db.execute(
                    f"SELECT {_TOTALS_COLUMNS} FROM usage_tenants WHERE tenant = ?", (tenant,)
                ).fetchone()
                rows = db.execute(
                    f"SELECT session, {_TOTALS_COLUMNS}, first_us, last_us FROM usage_sessions "
                    "WHERE tenant = ? ORDER BY last_us DESC, session DESC LIMIT ?",
                    (tenant, session_limit),
                ).fetchall()
                total = db.execute(
                    "SELECT COUNT(*) FROM usage_sessions WHERE tenant = ?", (tenant,)
                ).fetchone()[0]
                active = db.execute(
                    "SELECT COUNT(*) FROM usage_sessions WHERE tenant = ? AND last_us >= ?",
                    (tenant, since_us),
                ).fetchone()[0]
            finally:
                db.execute("COMMIT")
            return TenantStatus(
                tenant=tenant,
                totals=UsageTotals(*row) if row is not None else UsageTotals(),
                sessions=[_summary(tenant, r) for r in rows],
                sessions_total=int(total),
                active_sessions=int(active),
                active_window_seconds=active_window_seconds,
            )

        return await self._run(work, transaction=False)


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never implicit
    db = sqlite3.connect(path, check_same_thread=False, timeout=10.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
    db.executescript(_SCHEMA)
    return db


def _read(db: sqlite3.Connection, scope: BudgetScope) -> ScopeUsage:
    row = db.execute(
        "SELECT used_tokens, used_cost_micros, reserved_tokens, reserved_cost_micros "
        "FROM budget_counters WHERE tenant = ? AND kind = ? AND scope_id = ?",
        (scope.tenant, scope.kind, scope.id),
    ).fetchone()
    return ScopeUsage(scope, *(row or (0, 0, 0, 0)))


def _bump(
    db: sqlite3.Connection,
    tenant: str,
    kind: str,
    scope_id: str,
    now_us: int,
    *,
    used: tuple[int, int] = (0, 0),
    reserved: tuple[int, int] = (0, 0),
) -> None:
    db.execute(
        "INSERT INTO budget_counters (tenant, kind, scope_id, used_tokens, used_cost_micros, "
        "reserved_tokens, reserved_cost_micros, updated_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (tenant, kind, scope_id) DO UPDATE SET "
        "used_tokens = used_tokens + excluded.used_tokens, "
        "used_cost_micros = used_cost_micros + excluded.used_cost_micros, "
        "reserved_tokens = reserved_tokens + excluded.reserved_tokens, "
        "reserved_cost_micros = reserved_cost_micros + excluded.reserved_cost_micros, "
        "updated_us = excluded.updated_us",
        (tenant, kind, scope_id, *used, *reserved, now_us),
    )


_RECORD_NAMES = [name.strip() for name in _RECORD_COLUMNS.split(",")]


def _record(row: Any) -> UsageRecord:
    return UsageRecord.from_dict(dict(zip(_RECORD_NAMES, row, strict=True)))


def _summary(tenant: str, row: Any) -> SessionSummary:
    session, *counts = row
    return SessionSummary(
        tenant=tenant,
        session_id=str(session),
        totals=UsageTotals(*(int(value) for value in counts[:6])),
        first_at=from_epoch_us(int(counts[6])),
        last_at=from_epoch_us(int(counts[7])),
    )
