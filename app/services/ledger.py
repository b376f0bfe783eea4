"""Usage and cost accounting: each completed call appends a UsageRecord, written behind the answer.

`Ledger.record()` only appends to an in-memory queue, so accounting never delays a webhook's
answer; one background task writes the queue to the Store in batches (at most `max_batch`
records, at most `batch_interval_seconds` after the first one waits, at once when a batch is full
or someone flushes). `flush()` and `close()` drain everything; the lifespan closes the ledger on
shutdown, after the server has stopped taking requests and before it closes the store.

A failed write is retried with exponential backoff and the batch stays at the head of the queue:
records are never dropped silently. Writes are idempotent on the record id, so a batch that
failed half-way (Redis pipeline, network cut after the commit) is simply written again.

Crash window: records still queued are lost if the process is killed without a shutdown (SIGKILL,
OOM, power cut). That is at most the last `batch_interval_seconds` (200 ms by default) plus one
write's latency of records in normal operation, and everything queued since a store outage began
if the store is down. If the store is still failing when `close()` gives up, each unwritten record
is logged at ERROR as JSON, so it can be replayed from the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque

from app.services.store import (
    DEFAULT_ACTIVE_WINDOW_SECONDS,
    SessionSummary,
    Store,
    TenantStatus,
    UsagePage,
    UsageRecord,
)

__all__ = ["Ledger", "UsageRecord"]

log = logging.getLogger("cxrelay.ledger")

DEFAULT_BATCH_INTERVAL_SECONDS = 0.2
DEFAULT_MAX_BATCH = 200


class Ledger:
    """A write-behind queue in front of the Store's ledger; reads go straight to the Store."""

    def __init__(
        self,
        store: Store,
        *,
        batch_interval_seconds: float = DEFAULT_BATCH_INTERVAL_SECONDS,
        max_batch: int = DEFAULT_MAX_BATCH,
        retry_initial_seconds: float = 0.2,
        retry_max_seconds: float = 30.0,
        backlog_warning: int = 10_000,
    ) -> None:
        if max_batch < 1 or batch_interval_seconds < 0:
            raise ValueError("max_batch must be positive and the batch interval not negative")
        self.store = store
        self._interval = batch_interval_seconds
        self._max_batch = max_batch
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self._backlog_warning = backlog_warning
        self._queue: deque[UsageRecord] = deque()
        self._has_work = asyncio.Event()
        self._urgent = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._retry_now = asyncio.Event()  # a flush or close cuts a backoff short
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._warned_backlog = False
        self.written_total = 0
        self.write_failures_total = 0

    @property
    def pending(self) -> int:
        """Records accepted but not yet written (including the batch being written)."""
        return len(self._queue)

    def start(self) -> None:
        """Start the writer (optional: the first `record()` starts it too). Needs a running loop."""
        if self._closing:
            raise RuntimeError("the ledger is closed")
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name="cxrelay-ledger-writer"
            )

    def record(self, record: UsageRecord) -> None:
        """Accept a record for writing; returns at once, never awaits I/O."""
        if self._closing:
            log.error("ledger record after close, not written: %s", record.to_json())
            return
        self._queue.append(record)
        self._idle.clear()
        self._has_work.set()
        if len(self._queue) >= self._max_batch:
            self._urgent.set()  # a full batch need not wait out the interval
        if len(self._queue) >= self._backlog_warning and not self._warned_backlog:
            self._warned_backlog = True
            log.warning("ledger backlog: %d records waiting to be written", len(self._queue))
        self.start()

    async def flush(self, timeout: float | None = None) -> bool:
        """Write everything queued so far; False if `timeout` passed first (store failing)."""
        if not self._queue:
            return True
        self.start()
        self._urgent.set()
        self._retry_now.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 10.0) -> None:
        """Drain the queue (up to `timeout`), stop the writer, log any record left unwritten."""
        if self._closing and self._worker is None:
            return
        self._closing = True
        worker = self._worker
        if worker is not None and not worker.done():
            self._urgent.set()
            self._retry_now.set()
            self._has_work.set()
            try:
                await asyncio.wait_for(asyncio.shield(worker), timeout)
            except asyncio.TimeoutError:
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
        self._worker = None
        if self._queue:
            log.error(
                "ledger closed with %d records not written (store failing); logged below as JSON",
                len(self._queue),
            )
            while self._queue:
                log.error("ledger record not written: %s", self._queue.popleft().to_json())

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._has_work.wait()
            if not self._urgent.is_set():  # let a batch gather, unless someone is waiting
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self._interval)
            while self._queue:
                batch = list(itertools.islice(self._queue, self._max_batch))
                try:
                    await self.store.append_usages(batch)
                except Exception as exc:
                    failures += 1
                    self.write_failures_total += 1
                    delay = min(self._retry_max, self._retry_initial * 2 ** min(failures - 1, 16))
                    if self._urgent.is_set():  # flushing or closing: retry soon, not in 30 s
                        delay = min(delay, self._retry_initial)
                    log.error(
                        "ledger write of %d records failed (attempt %d), retrying in %.1fs: %s",
                        len(batch),
                        failures,
                        delay,
                        exc,
                        exc_info=failures == 1,
                    )
                    self._retry_now.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._retry_now.wait(), delay)
                    continue
                if failures:
                    log.warning("ledger writes recovered after %d failed attempts", failures)
                failures = 0
                for _ in batch:
                    self._queue.popleft()
                self.written_total += len(batch)
            self._warned_backlog = False
            self._has_work.clear()
            self._urgent.clear()
            self._idle.set()
            if self._closing:
                return

    # --- reads (scoped by tenant; they do not see records still queued) -------------------------

    async def list_usage(
        self, tenant: str, session: str | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> UsagePage:
        return await self.store.list_usage(tenant, session, limit=limit, cursor=cursor)

    async def session_summary(self, tenant: str, session_id: str) -> SessionSummary | None:
        return await self.store.session_summary(tenant, session_id)

    async def tenant_status(
        self,
        tenant: str,
        *,
        active_window_seconds: float = DEFAULT_ACTIVE_WINDOW_SECONDS,
        session_limit: int = 100,
    ) -> TenantStatus:
        return await self.store.tenant_status(
            tenant, active_window_seconds=active_window_seconds, session_limit=session_limit
        )
