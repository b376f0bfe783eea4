"""The ledger: a call's record and its budget settlement are stored together before the caller
can answer; a store outage delays them (retried, never dropped silently), a cancellation does not
lose them."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.accounting.ledger import Ledger, UsageRecord
from app.store import (
    MemoryStore,
    Reservation,
    SQLiteStore,
    Store,
    StoreUnavailable,
)
from tests.store.test_store import BACKENDS, make_record, open_store, session_scope


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path) as opened:
        yield opened


class FlakyStore:
    """Delegates to a real store; the first `failures` writes fail (after committing, with
    `committed`: the ambiguous failure of a reply lost on the way back), and a gate can hold
    writes back."""

    def __init__(self, inner: Store, failures: int = 0, *, committed: bool = False) -> None:
        self.inner = inner
        self.failures = failures
        self.committed = committed
        self.writes = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def _fail_or(self, write: Any) -> Any:
        await self.gate.wait()
        self.writes += 1
        if self.failures:
            self.failures -= 1
            if self.committed:
                await write()
            raise StoreUnavailable("store is down")
        return await write()

    async def settle_and_record(self, reservation: Reservation, record: UsageRecord) -> bool:
        result: bool = await self._fail_or(
            lambda: self.inner.settle_and_record(reservation, record)
        )
        return result

    async def append_usage(self, record: UsageRecord) -> bool:
        result: bool = await self._fail_or(lambda: self.inner.append_usage(record))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def ledger_over(store: Any, **options: Any) -> Ledger:
    options.setdefault("retry_initial_seconds", 0.01)
    return Ledger(store, **options)


async def reserve(store: Store, tokens: int = 500, session: str = "s1") -> Reservation:
    held = await store.reserve([session_scope(4000, sid=session)], tokens)
    assert isinstance(held, Reservation)
    return held


async def test_commit_stores_the_record_and_settles_before_it_returns(store: Store) -> None:
    ledger = ledger_over(store)
    held = await reserve(store)
    record = make_record(prompt=300, completion=40, cost=0.002)
    assert await ledger.commit(record, held) is True
    assert ledger.pending == 0
    assert (await store.list_usage("acme")).records == [record]
    usage = await store.usage(session_scope(4000))
    assert (usage.used_tokens, usage.reserved_tokens, usage.used_cost) == (340, 0, 0.002)
    cached = make_record(prompt=0, completion=0, cost=0.0, cached=True)
    assert await ledger.commit(cached) is True  # a cache hit: no reservation, still a record
    assert {r.id for r in (await store.list_usage("acme")).records} == {record.id, cached.id}
    await ledger.close()


async def test_a_failing_store_is_retried_without_losing_or_duplicating(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    # each of the first 3 writes commits and then reports a failure: retried, counted once
    flaky = FlakyStore(store, failures=3, committed=True)
    ledger = ledger_over(flaky)
    records = [make_record(session=f"s{i}", prompt=10, completion=1, cost=0.001) for i in range(6)]
    for record in records:
        held = await reserve(store, 100, record.session)
        await ledger.commit(record, held)
    assert ledger.write_failures_total >= 3
    assert await ledger.flush(timeout=5)
    assert ledger.pending == 0 and ledger.written_total == 6
    status = await store.tenant_status("acme")
    assert status.totals.calls == 6 and status.totals.prompt_tokens == 60
    for record in records:
        usage = await store.usage(session_scope(4000, sid=record.session))
        assert (usage.used_tokens, usage.reserved_tokens) == (11, 0)  # settled exactly once
    assert "ledger write failed, kept for retry: store is down" in caplog.text
    await ledger.close()


async def test_a_store_outage_delays_records_and_flush_cuts_a_long_backoff_short() -> None:
    flaky = FlakyStore(MemoryStore(), failures=2)
    ledger = Ledger(flaky, retry_initial_seconds=60.0)
    assert await ledger.commit(make_record()) is False  # answered anyway; kept for retry
    await asyncio.sleep(0.05)  # the first retry failed; the next one is two minutes away
    assert ledger.pending == 1
    assert await ledger.flush(timeout=2)
    assert ledger.pending == 0 and flaky.writes == 3
    await ledger.close()


async def test_retries_back_off_exponentially_up_to_the_maximum(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = FlakyStore(MemoryStore(), failures=5)
    ledger = ledger_over(flaky, retry_initial_seconds=0.01, retry_max_seconds=0.04)
    with caplog.at_level(logging.WARNING, logger="cxrelay.ledger"):
        assert await ledger.commit(make_record()) is False
        assert await ledger.flush(timeout=2)
    retries = [r for r in caplog.records if r.getMessage().startswith("ledger retry of")]
    waits = [r.args[2] for r in retries if isinstance(r.args, tuple)]
    # the commit itself failed once; its retries wait 0.01, 0.02, 0.04 (the maximum), 0.04 s
    assert waits == pytest.approx([0.01, 0.02, 0.04, 0.04])
    assert flaky.writes == 6 and ledger.pending == 0 and ledger.write_failures_total == 5
    assert "ledger writes recovered after 4 failed attempts" in caplog.text
    await ledger.close()


async def test_the_write_completes_even_if_the_request_is_cancelled(store: Store) -> None:
    flaky = FlakyStore(store)
    flaky.gate.clear()  # the write is under way when the request is cancelled
    ledger = ledger_over(flaky)
    held = await reserve(store)
    record = make_record(prompt=300, completion=100, cost=0.0)
    request = asyncio.create_task(ledger.commit(record, held))
    await asyncio.sleep(0.01)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert ledger.pending == 1
    flaky.gate.set()
    await ledger.close()  # a clean shutdown waits for the write
    usage = await store.usage(session_scope(4000))
    assert (usage.used_tokens, usage.reserved_tokens) == (400, 0)
    assert (await store.list_usage("acme")).records == [record]


async def test_close_on_a_dead_store_logs_each_record_instead_of_dropping_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = FlakyStore(MemoryStore(), failures=10**9)
    ledger = ledger_over(flaky)
    records = [make_record() for _ in range(3)]
    for record in records:
        await ledger.commit(record)
    assert await ledger.flush(timeout=0.1) is False
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(ledger.close(timeout=0.2), 2)
    lost = [
        json.loads(r.getMessage().split(": ", 1)[1])
        for r in caplog.records
        if r.getMessage().startswith("ledger record not written")
    ]
    assert [UsageRecord.from_dict(data) for data in lost] == records
    assert "3 records not written" in caplog.text

    await ledger.commit(make_record(record_id="late"))  # after close: logged, not dropped
    assert '"id":"late"' in caplog.text


async def test_records_and_budgets_survive_a_restart(tmp_path: Path) -> None:
    store = await SQLiteStore.open(tmp_path)
    ledger = Ledger(store)
    records = [make_record(session=f"s{i % 3}") for i in range(24)]
    for record in records:
        await ledger.commit(record, await reserve(store, 200, record.session))
    await ledger.close()  # the lifespan's order: ledger first, then the store
    await store.close()

    reopened = await SQLiteStore.open(tmp_path)
    try:
        page = await reopened.list_usage("acme", limit=100)
        assert {r.id for r in page.records} == {r.id for r in records}
        summary = await reopened.session_summary("acme", "s0")
        assert summary is not None and summary.totals.calls == 8
        usage = await reopened.usage(session_scope(4000, sid="s0"))
        assert (usage.used_tokens, usage.reserved_tokens) == (8 * 120, 0)
    finally:
        await reopened.close()


async def test_reads_are_scoped_by_tenant(store: Store) -> None:
    ledger = ledger_over(store)
    await ledger.commit(make_record("acme", "s1"))
    await ledger.commit(make_record("globex", "s1"))
    assert [r.tenant for r in (await store.list_usage("acme")).records] == ["acme"]
    summary = await store.session_summary("globex", "s1")
    assert summary is not None and summary.tenant == "globex" and summary.totals.calls == 1
    assert (await store.tenant_status("acme")).totals.calls == 1
    await ledger.close()
