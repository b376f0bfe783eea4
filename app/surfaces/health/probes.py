"""Provider probes for `/health`: cached and single-flight, so a burst of monitoring requests is
at most one upstream probe per provider per HEALTH_CACHE_SECONDS, never an upstream storm."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from app.llm.router import LLMRouter
from app.llm.routes import ProviderRuntime

log = logging.getLogger("cxrelay.health")


@dataclass(frozen=True)
class Probe:
    reachable: bool
    latency_ms: float
    error: str | None = None


@dataclass(frozen=True)
class ProbeRound:
    router: LLMRouter
    results: dict[str, Probe]
    finished: float  # on the probes' clock


class ProviderProbes:
    """One probe per provider per round, a round reused for `cache_seconds` and shared by every
    request that arrives while it runs (single flight), so /health never multiplies upstream
    traffic. A round belongs to one router: a configuration swap starts a fresh one."""

    def __init__(
        self,
        cache_seconds: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        self._clock = clock
        self._last: ProbeRound | None = None
        self._inflight: asyncio.Task[ProbeRound] | None = None
        self._inflight_router: LLMRouter | None = None

    @property
    def cache_seconds(self) -> float:
        return self._cache_seconds

    def age(self, probe_round: ProbeRound) -> float:
        return round(self._clock() - probe_round.finished, 3)

    async def results(self, router: LLMRouter, http: httpx.AsyncClient) -> ProbeRound:
        last = self._last
        if (
            last is not None
            and last.router is router
            and self._clock() - last.finished < self._cache_seconds
        ):
            return last
        task = self._inflight
        if task is None or task.done() or self._inflight_router is not router:
            task = asyncio.create_task(self._round(router, http), name="health-probes")
            self._inflight, self._inflight_router = task, router
        # shield: a caller that goes away must not cancel the round the others are waiting on
        return await asyncio.shield(task)

    async def _round(self, router: LLMRouter, http: httpx.AsyncClient) -> ProbeRound:
        names = list(router.providers)
        probes = await asyncio.gather(*(self._probe(router.providers[n], http) for n in names))
        done = ProbeRound(router, dict(zip(names, probes, strict=True)), self._clock())
        self._last = done
        return done

    async def _probe(self, runtime: ProviderRuntime, http: httpx.AsyncClient) -> Probe:
        key = next((k for k in runtime.keys.keys if k.healthy), None)
        if key is None:
            return Probe(False, 0.0, "every key is set aside (refused with 401/403): none to probe")
        started = time.perf_counter()
        try:
            ok = await asyncio.wait_for(
                runtime.client.probe(http, key.secret, self._timeout), self._timeout
            )
        except TimeoutError:
            return Probe(False, _ms(started), f"no answer within {self._timeout:g}s")
        except Exception as exc:  # a probe reports every failure; it never raises one
            log.warning("provider probe failed", extra={"provider": runtime.spec.name})
            return Probe(False, _ms(started), f"probe failed: {type(exc).__name__}")
        if not ok:
            return Probe(False, _ms(started), "the probe failed: unreachable, or the key refused")
        return Probe(True, _ms(started))


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
