"""Outgoing limits per provider: requests per minute, tokens per minute (GCRA, an exact token
bucket) and requests in flight at once.

A request over a limit waits for its slot when the wait fits the caller's budget, and otherwise
is refused at once so the router can fall back, rather than sending a request that would earn a
429 from the provider. Tokens are the request's estimate (its text at ~4 characters a token,
plus max_tokens), settled to the provider's reported usage once the answer is in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

from app.llm.tokens import char_estimate


class RateLimiter:
    def __init__(
        self, rpm: int, *, burst: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = 60.0 / rpm
        self._tolerance = self.interval * ((burst or max(1, rpm // 60)) - 1)
        self._tat = 0.0  # theoretical arrival time of the next request
        self._clock = clock

    def reserve(self, max_wait: float, cost: int = 1) -> float | None:
        """Seconds to wait for `cost` units (reserved now), or None if that is longer than
        max_wait."""
        now = self._clock()
        tat = max(self._tat, now) + (cost - 1) * self.interval
        wait = max(0.0, tat - self._tolerance - now)
        if wait > max_wait:
            return None
        self._tat = tat + self.interval
        return wait

    def adjust(self, cost: int) -> None:
        """Take `cost` more units (give them back when negative), after the fact."""
        self._tat = (
            max(self._tat, self._clock()) if cost > 0 else self._tat
        ) + cost * self.interval

    async def acquire(self, max_wait: float) -> bool:
        wait = self.reserve(max_wait)
        if wait is None:
            return False
        if wait > 0:
            await asyncio.sleep(wait)
        return True


def request_tokens(messages: Sequence[Mapping[str, str]], max_tokens: int) -> int:
    """A request's tokens for an outgoing tpm cap, counted cheaply (no tokenizer per attempt)."""
    return sum(char_estimate(m.get("content", "")) + 4 for m in messages) + max_tokens


class Permit:
    """An admitted request: holds its concurrency slot until `release`; `settle` replaces its
    token estimate by the provider's count."""

    def __init__(self, limiter: ProviderLimiter, tokens: int) -> None:
        self._limiter, self._tokens, self._held = limiter, tokens, True

    def settle(self, used: int | None) -> None:
        if used is not None and self._limiter.tpm is not None:
            self._limiter.tpm.adjust(used - self._tokens)

    def release(self) -> None:
        if self._held and self._limiter.slots is not None:
            self._limiter.slots.release()
        self._held = False


class ProviderLimiter:
    """A provider's rpm, tpm and max_concurrent (each optional)."""

    def __init__(
        self, rpm: int | None = None, tpm: int | None = None, max_concurrent: int | None = None
    ) -> None:
        self.rpm = RateLimiter(rpm) if rpm else None
        self.tpm = RateLimiter(tpm, burst=tpm) if tpm else None  # a minute's tokens at once
        self.slots = asyncio.Semaphore(max_concurrent) if max_concurrent else None

    async def acquire(self, max_wait: float, tokens: int = 0) -> Permit | str:
        """A permit, after waiting at most `max_wait` in all; else the name of the limit
        (`rpm`, `tpm`, `max_concurrent`) the request would have waited longer for."""
        started = time.monotonic()
        if self.slots is not None and not await _slot(self.slots, max_wait):
            return "max_concurrent"
        permit = Permit(self, tokens)
        left = max(0.0, max_wait - (time.monotonic() - started))
        waits: list[float] = []
        for name, limiter, cost in (("rpm", self.rpm, 1), ("tpm", self.tpm, tokens)):
            if limiter is None or cost <= 0:
                continue
            wait = limiter.reserve(left, cost)
            if wait is None:
                if waits and self.rpm is not None:  # the rpm slot taken just before
                    self.rpm.adjust(-1)
                permit.release()
                return name
            waits.append(wait)
        try:
            if max(waits, default=0.0) > 0:
                await asyncio.sleep(max(waits))
        except BaseException:
            permit.release()
            raise
        return permit


async def _slot(slots: asyncio.Semaphore, max_wait: float) -> bool:
    if not slots.locked():
        await slots.acquire()  # free: taken without waiting
        return True
    if max_wait <= 0:
        return False
    try:
        await asyncio.wait_for(slots.acquire(), max_wait)
    except TimeoutError:
        return False
    return True
