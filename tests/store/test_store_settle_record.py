"""`Store.settle_and_record` on every backend: a finished call's settle and its ledger record are
one atomic write, so the budgets always equal the sum of the ledger (the crash-consistency
promise `make reliability` checks against the real service)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.store import Reservation, SQLiteStore, Store, StoreUnavailable
from app.store import sqlite_store as sqlite_store_module
from tests.store.test_store import BACKENDS, make_record, open_store, session_scope


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path) as opened:
        yield opened


async def reserve(store: Store, tokens: int, sid: str = "s1", limit: int = 1000) -> Reservation:
    held = await store.reserve([session_scope(limit, sid=sid)], tokens)
    assert isinstance(held, Reservation)
    return held


async def test_settles_and_records_in_one_step(store: Store) -> None:
    held = await reserve(store, 400)
    record = make_record(prompt=250, completion=50, cost=0.003)
    assert await store.settle_and_record(held, record) is True
    usage = await store.usage(session_scope())
    assert (usage.used_tokens, usage.reserved_tokens, usage.remaining_tokens) == (300, 0, 700)
    assert usage.used_cost_micros == record.cost_micros == 3000
    assert (await store.list_usage("acme")).records == [record]
    summary = await store.session_summary("acme", "s1")
    assert summary is not None and summary.totals.total_tokens == 300


async def test_a_retry_writes_nothing_twice(store: Store) -> None:
    held = await reserve(store, 400)
    record = make_record(prompt=250, completion=50)
    assert await store.settle_and_record(held, record) is True
    assert await store.settle_and_record(held, record) is False
    # the pair is one unit: a settled reservation takes no second record, whatever its id
    assert await store.settle_and_record(held, make_record(prompt=1, completion=1)) is False
    assert (await store.usage(session_scope())).used_tokens == 300
    assert [r.id for r in (await store.list_usage("acme")).records] == [record.id]


async def test_a_record_of_another_tenant_is_refused(store: Store) -> None:
    held = await reserve(store, 400)
    with pytest.raises(ValueError):
        await store.settle_and_record(held, make_record(tenant="globex"))


async def test_concurrent_calls_leave_budgets_equal_to_the_ledger(store: Store) -> None:
    async def call(i: int) -> None:
        sid = f"s{i % 5}"
        held = await reserve(store, 100, sid, limit=100_000)
        await store.settle_and_record(held, make_record(session=sid, prompt=40 + i, completion=7))

    await asyncio.gather(*(call(i) for i in range(60)))
    for n in range(5):
        sid = f"s{n}"
        usage = await store.usage(session_scope(100_000, sid=sid))
        page = await store.list_usage("acme", sid, limit=500)
        assert usage.used_tokens == sum(r.total_tokens for r in page.records)
        assert usage.reserved_tokens == 0


async def test_sqlite_rolls_the_settle_back_when_the_record_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await SQLiteStore.open(tmp_path)
    try:
        held = await reserve(store, 400)

        def broken(db: sqlite3.Connection, records: object) -> int:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(sqlite_store_module, "insert_records", broken)
        with pytest.raises(StoreUnavailable):
            await store.settle_and_record(held, make_record())
        usage = await store.usage(session_scope())
        assert (usage.used_tokens, usage.reserved_tokens) == (0, 400)  # neither half happened
        monkeypatch.undo()
        assert await store.settle_and_record(held, make_record()) is True  # the retry counts
        assert (await store.usage(session_scope())).used_tokens == 120
    finally:
        await store.close()


async def test_an_expired_reservation_is_still_counted_when_it_settles_late(
    tmp_path: Path,
) -> None:
    async with open_store("sqlite", tmp_path, reservation_ttl_seconds=0.05) as store:
        held = await reserve(store, 400)
        await asyncio.sleep(0.1)
        assert (await store.usage(session_scope())).reserved_tokens == 0  # given back
        assert await store.settle_and_record(held, make_record()) is True
        usage = await store.usage(session_scope())
        assert (usage.used_tokens, usage.reserved_tokens) == (120, 0)
        assert len((await store.list_usage("acme")).records) == 1
