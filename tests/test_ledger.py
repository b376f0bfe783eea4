"""The write-behind ledger: never delays the caller, writes in batches, loses nothing it can."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.services.ledger import Ledger, UsageRecord
from app.services.store import MemoryStore, SQLiteStore, Store, StoreUnavailable
from tests.test_store import BACKENDS, make_record, open_store


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path) as opened:
        yield opened


class FlakyStore:
    """Delegates to a real store; the first `failures` batch writes fail, optionally after writing
    the first half of the batch (a pipeline cut mid-way), and a gate can hold writes back."""

    def __init__(self, inner: Store, failures: int = 0, *, half_written: bool = False) -> None:
        self.inner = inner
        self.failures = failures
        self.half_written = half_written
        self.batches: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def append_usages(self, records: Sequence[UsageRecord]) -> int:
        await self.gate.wait()
        self.batches.append(len(records))
        if self.failures:
            self.failures -= 1
            if self.half_written:
                await self.inner.append_usages(records[: len(records) // 2])
            raise StoreUnavailable("store is down")
        return await self.inner.append_usages(records)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def ledger_over(store: Any, **options: Any) -> Ledger:
    options.setdefault("retry_initial_seconds", 0.01)
    return Ledger(store, **options)


async def test_record_returns_without_waiting_for_the_store() -> None:
    flaky = FlakyStore(MemoryStore())
    flaky.gate.clear()  # the store hangs
    ledger = ledger_over(flaky, batch_interval_seconds=0.0)
    record = make_record()
    ledger.record(record)  # synchronous: nothing to await
    await asyncio.sleep(0.05)
    assert ledger.pending == 1
    flaky.gate.set()
    assert await ledger.flush(timeout=2)
    assert ledger.pending == 0
    assert (await ledger.list_usage("acme")).records == [record]
    await ledger.close()


async def test_close_writes_every_queued_record(store: Store) -> None:
    ledger = ledger_over(store, batch_interval_seconds=5.0)  # nothing would go out before close
    records = [make_record(session=f"s{i % 7}") for i in range(450)]
    for record in records:
        ledger.record(record)
    await ledger.close()
    assert ledger.pending == 0 and ledger.written_total == 450
    status = await store.tenant_status("acme")
    assert status.totals.calls == 450 and status.sessions_total == 7
    page = await store.list_usage("acme", limit=500)
    assert {r.id for r in page.records} == {r.id for r in records}


async def test_writes_in_batches_within_the_interval() -> None:
    flaky = FlakyStore(MemoryStore())
    ledger = ledger_over(flaky, batch_interval_seconds=0.3, max_batch=100)
    ledger.record(make_record())
    await asyncio.sleep(0.1)
    assert ledger.pending == 1 and flaky.batches == []  # still gathering a batch
    await asyncio.sleep(0.4)
    assert ledger.pending == 0 and flaky.batches == [1]

    for _ in range(250):  # full batches go out at once, not after the interval
        ledger.record(make_record())
    await asyncio.sleep(0.05)
    assert ledger.pending == 0
    assert flaky.batches[1:] == [100, 100, 50]
    await ledger.close()


async def test_a_failing_store_is_retried_without_losing_or_duplicating(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyStore(store, failures=3, half_written=True)
    ledger = ledger_over(flaky, batch_interval_seconds=0.0, max_batch=50)
    records = [make_record(prompt=10, completion=1, cost=0.001) for _ in range(120)]
    for record in records:
        ledger.record(record)
    assert await ledger.flush(timeout=5)
    assert ledger.write_failures_total == 3 and ledger.written_total == 120
    status = await store.tenant_status("acme")
    assert status.totals.calls == 120  # the half-written batch was not counted twice
    assert status.totals.prompt_tokens == 1200
    page = await store.list_usage("acme", limit=500)
    assert sorted(r.id for r in page.records) == sorted(r.id for r in records)
    assert "ledger write of 50 records failed (attempt 1)" in caplog.text
    assert "recovered after 3 failed attempts" in caplog.text
    await ledger.close()


async def test_flush_cuts_a_long_backoff_short() -> None:
    flaky = FlakyStore(MemoryStore(), failures=1)
    ledger = Ledger(flaky, batch_interval_seconds=0.0, retry_initial_seconds=60.0)
    ledger.record(make_record())
    await asyncio.sleep(0.05)  # first attempt failed; the next one is a minute away
    assert ledger.pending == 1
    assert await ledger.flush(timeout=2)
    assert ledger.pending == 0
    await ledger.close()


async def test_close_on_a_dead_store_logs_each_record_instead_of_dropping_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = FlakyStore(MemoryStore(), failures=10**9)
    ledger = ledger_over(flaky, batch_interval_seconds=0.0)
    records = [make_record() for _ in range(3)]
    for record in records:
        ledger.record(record)
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

    ledger.record(make_record(record_id="late"))  # after close: logged, not silently dropped
    assert '"id":"late"' in caplog.text


async def test_records_written_through_the_ledger_survive_a_restart(tmp_path: Path) -> None:
    store = await SQLiteStore.open(tmp_path)
    ledger = Ledger(store)
    records = [make_record(session=f"s{i % 3}") for i in range(25)]
    for record in records:
        ledger.record(record)
    await ledger.close()  # the lifespan's order: ledger first, then the store
    await store.close()

    reopened = await SQLiteStore.open(tmp_path)
    try:
        page = await Ledger(reopened).list_usage("acme", limit=100)
        assert {r.id for r in page.records} == {r.id for r in records}
        summary = await reopened.session_summary("acme", "s0")
        assert summary is not None and summary.totals.calls == 9
    finally:
        await reopened.close()


async def test_reads_are_scoped_by_tenant(store: Store) -> None:
    ledger = ledger_over(store)
    ledger.record(make_record("acme", "s1"))
    ledger.record(make_record("globex", "s1"))
    await ledger.flush()
    assert [r.tenant for r in (await ledger.list_usage("acme")).records] == ["acme"]
    summary = await ledger.session_summary("globex", "s1")
    assert summary is not None and summary.tenant == "globex" and summary.totals.calls == 1
    assert (await ledger.tenant_status("acme")).totals.calls == 1
    await ledger.close()
