"""Usage and cost accounting: each answered call's UsageRecord, written before the answer goes out.

`Ledger.commit(record, reservation)` settles the call's budget reservation with the record's
tokens and cost AND appends the record, in one atomic store write (`Store.settle_and_record`:
one SQLite transaction, one Redis Lua script), and returns once it is stored. So the budgets
always equal the sum of the ledger, and a crash (SIGKILL, OOM, power cut with
SQLITE_SYNCHRONOUS=full) at any moment loses no record of an answer that went out: the answer
is only sent after its write committed. A cache hit has no reservation; its (zero-cost) record is
appended the same way. The write costs about what the settle alone did (one more INSERT in the
same transaction, or in the same script), so nothing is batched behind the answer any more.

The write is not lost if the request is cancelled mid-way (the deadline fired, the client left):
it is idempotent (on the reservation; a cache hit's on the record id), so a cancelled write is
simply written again in a task the ledger keeps, and a clean shutdown waits for it.

When the store refuses the write (down, unreachable), the answer still goes out — the provider
has already been paid — and the entry joins a backlog retried in the background with exponential
backoff by tenacity (the write is idempotent on the reservation and the record id, so an
ambiguous failure is simply written again); the wait itself is ours, so a flush or close cuts
it short. `flush()` and `close()` drain the backlog; the lifespan closes the ledger on shutdown,
after the server stopped taking requests and before it closes the store. If the store is still
failing when `close()` gives up, each unwritten record is logged at ERROR as JSON (with its
reservation id), so it can be replayed from the logs. Only that backlog — records of a store
outage — is lost by a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from app.observability import tracing
from app.store import Reservation, Store, StoreUnavailable, UsageRecord

__all__ = ["Ledger", "UsageRecord"]

log = logging.getLogger("cxrelay.ledger")


@dataclass(frozen=True)
class _Entry:
    record: UsageRecord
    reservation: Reservation | None  # None: nothing to settle (a cache hit)


class Ledger:
    """Writes each call's record with its settlement; reads go straight to the Store (its
    `list_usage`, `session_summary`, `tenant_status`)."""

    def __init__(
        self,
        store: Store,
        *,
        retry_initial_seconds: float = 0.2,
        retry_max_seconds: float = 30.0,
        backlog_warning: int = 10_000,
    ) -> None:
        self.store = store
        self._retry_initial = retry_initial_seconds
        self._backoff = wait_exponential(multiplier=retry_initial_seconds, max=retry_max_seconds)
        self._failed_attempts = 0  # of the backlog's writes, since it last emptied
        self._backlog_warning = backlog_warning
        self._backlog: deque[_Entry] = deque()
        self._writing: set[asyncio.Task[bool]] = set()  # writes finished behind a cancellation
        self._retry_now = asyncio.Event()  # a flush or close cuts a backoff short
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._warned_backlog = False
        self.written_total = 0
        self.write_failures_total = 0

    @property
    def pending(self) -> int:
        """Records accepted but not yet stored (writes behind a cancellation, the backlog)."""
        return len(self._writing) + len(self._backlog)

    async def commit(self, record: UsageRecord, reservation: Reservation | None = None) -> bool:
        """Store the record (and settle `reservation` with its usage) in one write; True once
        stored. Never raises for the store: False means it failed and the entry waits in the
        backlog. A cancellation propagates, and the write is finished behind the caller."""
        entry = _Entry(record, reservation)
        if self._closing:
            self._lost(entry, "ledger record after close, not written")
            return False
        try:
            with tracing.span("ledger.commit", {"cxrelay.ledger.settles": reservation is not None}):
                stored = await self._commit(entry)
                tracing.annotate({"cxrelay.ledger.stored": stored})
                if not stored:
                    tracing.failed("kept for retry")
                return stored
        except asyncio.CancelledError:
            # cancelled mid-write: it may or may not have been applied, and it is idempotent,
            # so it is written again behind the caller (cheaper than shielding every write)
            task = asyncio.get_running_loop().create_task(self._commit(entry))
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)
            raise

    async def _commit(self, entry: _Entry) -> bool:
        try:
            await self._write(entry)
        except StoreUnavailable as exc:
            self.write_failures_total += 1
            log.error(
                "ledger write failed, kept for retry: %s",
                exc,
                extra={"tenant": entry.record.tenant, "session_id": entry.record.session or None},
            )
            self._defer(entry)
            return False
        except Exception:  # a bug, not an outage: retrying would not help
            log.exception("ledger write failed")
            self._lost(entry, "ledger record not written")
            return False
        self.written_total += 1
        return True

    async def _write(self, entry: _Entry) -> None:
        if entry.reservation is None:
            await self.store.append_usage(entry.record)
        else:
            await self.store.settle_and_record(entry.reservation, entry.record)

    def _defer(self, entry: _Entry) -> None:
        self._backlog.append(entry)
        if len(self._backlog) >= self._backlog_warning and not self._warned_backlog:
            self._warned_backlog = True
            log.warning("ledger backlog: %d records waiting to be written", len(self._backlog))
        self._start_retries()

    def _start_retries(self) -> asyncio.Task[None]:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._drain(), name="cxrelay-ledger-retry"
            )
        return self._worker

    async def _drain(self) -> None:
        """Retry the backlog, oldest first, until the store takes all of it."""
        while self._backlog:
            entry = self._backlog[0]
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(StoreUnavailable),
                wait=self._delay,
                sleep=self._pause,
                before_sleep=self._failed,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._write(entry)
            except Exception:  # a bug, not an outage (retry_if_exception_type let it through)
                log.exception("ledger write failed")
                self._lost(self._backlog.popleft(), "ledger record not written")
                continue
            self._backlog.popleft()
            self.written_total += 1
        if self._failed_attempts:
            log.warning("ledger writes recovered after %d failed attempts", self._failed_attempts)
        self._failed_attempts = 0
        self._warned_backlog = False

    def _delay(self, state: RetryCallState) -> float:
        """Exponential backoff; closing: retry soon, not in 30 s."""
        delay = float(self._backoff(state))
        return min(delay, self._retry_initial) if self._closing else delay

    async def _pause(self, seconds: float) -> None:
        """tenacity's sleep, cut short when a flush or close asks for a retry now."""
        self._retry_now.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._retry_now.wait(), seconds)

    def _failed(self, state: RetryCallState) -> None:
        self._failed_attempts += 1
        self.write_failures_total += 1
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.error(
            "ledger retry of %d waiting records failed (attempt %d), next in %.1fs: %s",
            len(self._backlog),
            self._failed_attempts,
            delay,
            error,
        )

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait for the writes in progress and the backlog; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._settled(), timeout)
        except TimeoutError:
            return False
        return True

    async def _settled(self) -> None:
        while self._writing or self._backlog:
            if self._writing:
                await asyncio.wait(set(self._writing))
            if self._backlog:
                worker = self._start_retries()
                self._retry_now.set()
                await asyncio.wait({worker}, timeout=self._retry_initial)

    async def close(self, timeout: float = 10.0) -> None:
        """Drain (up to `timeout`), stop the retries, log any record left unwritten."""
        if self._closing and self._worker is None:
            return
        self._closing = True
        self._retry_now.set()
        await self.flush(timeout)
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        if self._backlog:
            log.error(
                "ledger closed with %d records not written (store failing); logged below as JSON",
                len(self._backlog),
            )
            while self._backlog:
                self._lost(self._backlog.popleft(), "ledger record not written")

    @staticmethod
    def _lost(entry: _Entry, why: str) -> None:
        reservation = entry.reservation.id if entry.reservation is not None else None
        log.error("%s: %s", why, entry.record.to_json(), extra={"reservation": reservation})
