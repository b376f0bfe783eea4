"""SQLite inline (one worker's default): the writes asked for in one turn of the event loop share
one transaction, each answered after its COMMIT; one write's error is its own; a write whose
caller was cancelled before its turn is not run."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.store import Reservation, SQLiteStore, StoreUnavailable
from tests.store.test_store import make_record, session_scope


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore.open(tmp_path, synchronous="NORMAL", inline=True)
    yield opened
    await opened.close()


def committed_reservations(store: SQLiteStore) -> int:
    """Read by another connection: only what was committed is seen."""
    with sqlite3.connect(store.path) as other:
        (count,) = other.execute(
            "SELECT COUNT(*) FROM budget_reservations WHERE state = 'reserved'"
        ).fetchone()
    return int(count)


async def test_writes_of_one_turn_share_a_commit_and_are_durable_when_answered(
    store: SQLiteStore,
) -> None:
    commits = 0

    def count_commits(statement: str) -> None:
        nonlocal commits
        commits += statement.strip().upper() == "COMMIT"

    store._db.set_trace_callback(count_commits)
    grants = await asyncio.gather(
        *(store.reserve([session_scope(10_000, sid=f"s{i}")], 100) for i in range(20))
    )
    assert commits == 1
    assert all(isinstance(g, Reservation) for g in grants)
    assert committed_reservations(store) == 20
    settled = await asyncio.gather(
        *(
            store.settle_and_record(g, make_record(session=f"s{i}", prompt=30, completion=10))
            for i, g in enumerate(grants)
            if isinstance(g, Reservation)
        )
    )
    assert settled == [True] * 20 and commits == 2
    assert committed_reservations(store) == 0
    assert (await store.usage(session_scope(sid="s7"))).used_tokens == 40


async def test_a_write_that_fails_fails_alone(store: SQLiteStore) -> None:
    def broken(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO budget_reservations (id) VALUES ('half a row')")  # NOT NULLs

    results = await asyncio.gather(
        store.reserve([session_scope(sid="before")], 100),
        store._run(broken),
        store.reserve([session_scope(sid="after")], 100),
        return_exceptions=True,
    )
    assert isinstance(results[0], Reservation) and isinstance(results[2], Reservation)
    assert isinstance(results[1], StoreUnavailable)
    assert "NOT NULL" in str(results[1])
    assert committed_reservations(store) == 2


async def test_a_write_cancelled_before_its_turn_is_not_run(store: SQLiteStore) -> None:
    kept = asyncio.ensure_future(store.reserve([session_scope(sid="kept")], 100))
    dropped = asyncio.ensure_future(store.reserve([session_scope(sid="dropped")], 100))
    await asyncio.sleep(0)  # both have joined the group
    dropped.cancel()
    assert isinstance(await kept, Reservation)
    with pytest.raises(asyncio.CancelledError):
        await dropped
    assert committed_reservations(store) == 1
    assert (await store.usage(session_scope(sid="dropped"))).reserved_tokens == 0


async def test_a_closed_store_fails_every_waiting_write(store: SQLiteStore) -> None:
    waiting = asyncio.ensure_future(store.reserve([session_scope()], 100))
    await asyncio.sleep(0)
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await waiting
