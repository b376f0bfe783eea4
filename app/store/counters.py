"""Counters for the inbound limits: per-minute rates and concurrent leases, kept in process
memory (one process: SQLite, tests) or in Redis (every replica sees the same counts: Redis's
in app.store.redis_counters, imported only by the Redis store).

Rates are GCRA (the "leaky bucket as a meter"): one number per bucket, the theoretical arrival
time `tat` of the next unit. A bucket of `per_minute` units refills continuously (one unit every
60/per_minute seconds) and holds at most a minute's worth, so a quiet key may send its whole
minute at once and then one unit per interval: a sliding window without a list of timestamps,
and the exact wait until a request fits (`Retry-After`) falls out of it. Several buckets are
taken together or not at all (a key's and its tenant's). `adjust` moves a bucket by a signed
amount afterwards (a token estimate settled to the real usage).

Leases are a sorted set per slot, one member per open stream scored by its expiry: a replica
that dies with streams open leaks nothing for longer than the lease's time to live, and a lease
renewed before it expires holds its place (a long-lived WebSocket renews at each request).

Redis keys sit under the tenant's hash tag (`P{T}:lim:…`, as the store's own), so a key's and
its tenant's counters share a Cluster slot and one script updates both. Redis's clock (TIME)
is the only clock: replicas' clocks may differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

WINDOW_MS = 60_000
# `tat - now` loses the last bits of a large clock: a bucket filled exactly to its minute (rpm=1,
# or a token charge of the whole tpm) would otherwise read a few nanoseconds over and refuse
OVER_MS = 0.001

# A bucket: (name, units per minute). A slot: (name, concurrent leases allowed).
Bucket = tuple[str, int]
Slot = tuple[str, int]


def unit_ms(per_minute: int) -> float:
    return WINDOW_MS / per_minute


class LimitCounters(Protocol):
    async def take(self, tenant: str, buckets: Sequence[Bucket], amount: int) -> tuple[float, int]:
        """Take `amount` from every bucket, or from none: (0.0, -1) when taken, else (seconds
        until it would fit, index of the bucket that is the last to free up)."""
        ...

    async def adjust(self, tenant: str, buckets: Sequence[Bucket], delta: int) -> None:
        """Take `delta` more units (or give them back, when negative), whatever the limit."""
        ...

    async def lease(self, tenant: str, slots: Sequence[Slot], lease_id: str, ttl: float) -> int:
        """Hold `lease_id` in every slot for `ttl` seconds (renewing it where it is held
        already): -1 when held, else the index of a slot that is full (nothing held)."""
        ...

    async def unlease(self, tenant: str, names: Sequence[str], lease_id: str) -> None: ...


class MemoryCounters:
    """One process's counters: correct for one worker; with several, each counts its own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[tuple[str, str], float] = {}
        self._leases: dict[tuple[str, str], dict[str, float]] = {}

    def _now_ms(self) -> float:
        return self._clock() * 1000

    async def take(self, tenant: str, buckets: Sequence[Bucket], amount: int) -> tuple[float, int]:
        now = self._now_ms()
        if len(self._tats) > 10_000:  # forget full buckets (every key and tenant ever seen)
            self._tats = {k: v for k, v in self._tats.items() if v > now}
        wait, binding, tats = 0.0, -1, []
        for i, (name, per_minute) in enumerate(buckets):
            tat = max(self._tats.get((tenant, name), 0.0), now) + amount * unit_ms(per_minute)
            tats.append(tat)
            if tat - now - WINDOW_MS > max(wait, OVER_MS):
                wait, binding = tat - now - WINDOW_MS, i
        if binding >= 0:
            return wait / 1000, binding
        for (name, _), tat in zip(buckets, tats, strict=True):
            self._tats[(tenant, name)] = tat
        return 0.0, -1

    async def adjust(self, tenant: str, buckets: Sequence[Bucket], delta: int) -> None:
        now = self._now_ms()
        for name, per_minute in buckets:
            tat = self._tats.get((tenant, name), 0.0)
            if delta > 0:
                tat = max(tat, now)
            self._tats[(tenant, name)] = tat + delta * unit_ms(per_minute)

    async def lease(self, tenant: str, slots: Sequence[Slot], lease_id: str, ttl: float) -> int:
        now = self._now_ms()
        held = []
        for i, (name, allowed) in enumerate(slots):
            leases = self._leases.setdefault((tenant, name), {})
            for expired in [k for k, until in leases.items() if until <= now]:
                del leases[expired]
            if lease_id not in leases and len(leases) >= allowed:
                return i
            held.append(leases)
        for leases in held:
            leases[lease_id] = now + ttl * 1000
        return -1

    async def unlease(self, tenant: str, names: Sequence[str], lease_id: str) -> None:
        for name in names:
            self._leases.get((tenant, name), {}).pop(lease_id, None)
