"""Several processes opening a new data directory at once (WORKERS > 1, or replicas sharing a
volume) all start: SQLite's switch to WAL answers "database is locked" without waiting, so the
preparation is serialised by a file lock (app/store/sqlite_init.py). Without it, 17 of 60
paired starts failed."""

from __future__ import annotations

import asyncio
import multiprocessing
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from app.store.audit import AuditLog
from app.store.sqlite_store import SQLiteStore

pytestmark = pytest.mark.slow  # processes open one data directory together

PROCESSES = 2  # measured: two at a barrier collide most (26 of 40 rounds failed unlocked)
ROUNDS = 40


def _open_both(directory: str, start: Barrier, results: multiprocessing.Queue) -> None:
    async def open_and_close() -> None:
        audit = await AuditLog.open(Path(directory))
        await audit.load_applied()
        store = await SQLiteStore.open(Path(directory), synchronous="NORMAL")
        await store.close()
        await audit.close()

    start.wait()  # every process at the starting line, as uvicorn starts its workers
    try:
        asyncio.run(open_and_close())
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_data_directory_together_all_start(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(ROUNDS):
        directory = tmp_path / f"data-{round_}"
        start, results = context.Barrier(PROCESSES), context.Queue()
        processes = [
            context.Process(target=_open_both, args=(str(directory), start, results))
            for _ in range(PROCESSES)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        outcomes = [results.get(timeout=5) for _ in processes]
        failures += [outcome for outcome in outcomes if outcome != "ok"]
    assert failures == []
