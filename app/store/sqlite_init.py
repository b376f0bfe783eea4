"""One process at a time opens and prepares a SQLite file (WAL switch, schema).

Two workers, or two replicas on one volume, starting together on a new data directory race on
the switch to WAL, which SQLite answers with "database is locked" at once instead of waiting
(measured: 17 of 60 paired starts, and 26 of 40 when started at one barrier; the worker then
exits and uvicorn stops the service). An exclusive
`flock` on a file beside the database serialises the preparation; everything after it runs
concurrently as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no inter-process lock, as before
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def preparing(database: Path) -> Iterator[None]:
    """Hold the exclusive preparation lock of `database` (its directory must exist)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(database.with_name(database.name + ".prepare-lock"), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
