"""The ledger half of `SQLiteStore`: usage records, per-session and per-tenant totals.

It exists to keep the usage ledger (idempotent appends, paged reads, summaries) apart from the
budget counters; both share one connection through `SQLiteConnection`.

Tables (created on open, never dropped):

* `usage_records`  (tenant, id) -> one ledger record; the primary key makes appends idempotent
* `usage_sessions`  (tenant, session) -> totals, first/last use: kept in the same transaction as
  the record so summaries cost one row read instead of a scan (a call without a session,
  NO_SESSION, has its record and its tenant's totals, no row here)
* `usage_tenants`  tenant -> totals

Nothing here deletes ledger rows: retention is an operator's decision.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from app.store.base import TenantUsage
from app.store.models import NO_SESSION, SessionSummary, UsageRecord, UsageTotals, parse_cursor
from app.store.sqlite_connection import SQLiteConnection

LEDGER_SCHEMA = """
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
# an upsert's SET clause adding one record (the `excluded` row) to _TOTALS_COLUMNS
_ADD_TOTALS = (
    "calls = calls + 1, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens, "
    "cost_micros = cost_micros + excluded.cost_micros, "
    "cached_calls = cached_calls + excluded.cached_calls, "
    "estimated_calls = estimated_calls + excluded.estimated_calls"
)


class SQLiteLedger(SQLiteConnection):
    """The usage ledger over the shared connection (the Store's ledger hooks)."""

    async def _append_usages(self, records: list[UsageRecord]) -> int:
        return await self._run(lambda db: insert_records(db, records))

    async def _records_before(
        self, tenant: str, session: str | None, cursor: str | None, count: int
    ) -> list[UsageRecord]:
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
        params.append(count)

        def work(db: sqlite3.Connection) -> list[UsageRecord]:
            return [_record(row) for row in db.execute(sql, params).fetchall()]

        return await self._run(work, transaction=False)

    async def session_summary(self, tenant: str, session_id: str) -> SessionSummary | None:
        def work(db: sqlite3.Connection) -> SessionSummary | None:
            row = db.execute(
                f"SELECT session, {_TOTALS_COLUMNS}, first_us, last_us FROM usage_sessions "
                "WHERE tenant = ? AND session = ?",
                (tenant, session_id),
            ).fetchone()
            return None if row is None else _summary(tenant, row)

        return await self._run(work, transaction=False)

    async def _tenant_usage(
        self, tenant: str, active_since_us: int, session_limit: int
    ) -> TenantUsage:
        def work(db: sqlite3.Connection) -> TenantUsage:
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
                    (tenant, active_since_us),
                ).fetchone()[0]
            finally:
                db.execute("COMMIT")
            totals = UsageTotals(*row) if row is not None else UsageTotals()
            return totals, [_summary(tenant, r) for r in rows], int(total), int(active)

        return await self._run(work, transaction=False)


def insert_records(db: sqlite3.Connection, records: Sequence[UsageRecord]) -> int:
    """Idempotent inserts and their totals, inside the caller's transaction; how many were new."""
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
        if r.session != NO_SESSION:
            _add_to_session(db, r, totals)
        db.execute(
            f"INSERT INTO usage_tenants (tenant, {_TOTALS_COLUMNS}) "
            "VALUES (?, 1, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (tenant) DO UPDATE SET {_ADD_TOTALS}",
            (r.tenant, *totals),
        )
    return written


def _add_to_session(db: sqlite3.Connection, r: UsageRecord, totals: tuple[int, ...]) -> None:
    db.execute(
        f"INSERT INTO usage_sessions (tenant, session, {_TOTALS_COLUMNS}, first_us, "
        "last_us) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?) "
        f"ON CONFLICT (tenant, session) DO UPDATE SET {_ADD_TOTALS}, "
        "first_us = min(first_us, excluded.first_us), "
        "last_us = max(last_us, excluded.last_us)",
        (r.tenant, r.session, *totals, r.time_us, r.time_us),
    )


_RECORD_NAMES = [name.strip() for name in _RECORD_COLUMNS.split(",")]


def _record(row: Any) -> UsageRecord:
    return UsageRecord.from_dict(dict(zip(_RECORD_NAMES, row, strict=True)))


def _summary(tenant: str, row: Any) -> SessionSummary:
    session, *counts = row
    return SessionSummary.from_epoch_micros(
        tenant,
        str(session),
        UsageTotals(*(int(value) for value in counts[:6])),
        int(counts[6]),
        int(counts[7]),
    )
