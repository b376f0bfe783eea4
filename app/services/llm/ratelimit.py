"""Outgoing requests-per-minute limit per provider (GCRA, an exact token bucket).

A burst above the rate waits for its slot when the wait fits the caller's budget, and otherwise
is refused at once so the router can fall back, rather than sending a request that would earn a
429 from the provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self, rpm: int, *, burst: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = 60.0 / rpm
        self._tolerance = self.interval * ((burst or max(1, rpm // 60)) - 1)
        self._tat = 0.0  # theoretical arrival time of the next request
        self._clock = clock

    def reserve(self, max_wait: float) -> float | None:
        """Seconds to wait for a slot (reserved now), or None if that is longer than max_wait."""
        now = self._clock()
        tat = max(self._tat, now)
        wait = max(0.0, tat - self._tolerance - now)
        if wait > max_wait:
            return None
        self._tat = tat + self.interval
        return wait

    async def acquire(self, max_wait: float) -> bool:
        wait = self.reserve(max_wait)
        if wait is None:
            return False
        if wait > 0:
            await asyncio.sleep(wait)
        return True


class Unlimited:
    async def acquire(self, max_wait: float) -> bool:
        return True
