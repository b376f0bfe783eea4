"""The budget half of `SQLiteStore`: counters and reservations (reserve, settle, release, usage).

It exists to keep the budget arithmetic of `base` (the Store's rules) apart from the usage
ledger; both share one connection through `SQLiteConnection`.

Tables (created on open, never dropped):

* `budget_counters`  (tenant, kind, scope_id) -> used / reserved tokens and cost (micro-units)
* `budget_reservations`  id -> tenant, scopes (JSON), tokens, cost, expires_us, state
  (reserved | settled | released | expired); finished rows are pruned a day after they expire

Counter rows are kept (a finished session's row is small). Expired reservations are given back
lazily, in the transaction of the next reserve or usage read.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from app.store.base import DEFAULT_RESERVATION_TTL_SECONDS, decide
from app.store.models import BudgetScope, Refusal, Reservation, ScopeUsage, reservation_id
from app.store.sqlite_connection import SQLiteConnection

KEEP_FINISHED_US = 86_400 * 1_000_000  # a settled reservation is remembered a day (double settle)
PRUNE_EVERY_SECONDS = 60.0

BUDGET_SCHEMA = """
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
"""


class SQLiteBudget(SQLiteConnection):
    """Budget counters and reservations over the shared connection (the Store's budget hooks)."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        *,
        reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(connection, path, clock=clock)
        self._ttl_us = int(reservation_ttl_seconds * 1_000_000)
        self._last_prune = 0.0

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

    async def _reserve(
        self, scopes: tuple[BudgetScope, ...], tokens: int, cost_micros: int
    ) -> Reservation | Refusal:
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

    async def _settle(self, reservation: Reservation, actual_tokens: int, cost_micros: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            return settle_rows(
                db, reservation, actual_tokens, cost_micros, self._now_us(), self._ttl_us
            )

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

    async def usages(self, scopes: Sequence[BudgetScope]) -> list[ScopeUsage]:
        def work(db: sqlite3.Connection) -> list[ScopeUsage]:
            self._expire_due(db, self._now_us())
            return [_read(db, scope) for scope in scopes]

        return await self._run(work)


def settle_rows(
    db: sqlite3.Connection,
    reservation: Reservation,
    actual_tokens: int,
    cost_micros: int,
    now_us: int,
    ttl_us: int,
) -> bool:
    """The settle, inside the caller's transaction (alone, or with the ledger record's insert)."""
    row = db.execute(
        "SELECT tenant, scopes, tokens, cost_micros, state FROM budget_reservations WHERE id = ?",
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
            (reservation.id, reservation.tenant, now_us + ttl_us),
        )
    else:
        db.execute(
            "UPDATE budget_reservations SET state = 'settled' WHERE id = ?", (reservation.id,)
        )
    return True


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
