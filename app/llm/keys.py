"""A provider's API-key pool: round robin over usable keys, revoked keys set aside, rate-limited
keys cooled down, so one bad or throttled key never fails a turn that another key can serve."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from app.auth.signatures import fingerprint
from app.observability.metrics import KEY_FAILURES, KEYS_HEALTHY

log = logging.getLogger("cxrelay.keys")

KeyRotation = Literal["round_robin", "on_failure"]


@dataclass
class ApiKey:
    secret: str | None  # None: a provider that takes no key (a local vLLM, say)
    key_id: str
    healthy: bool = True
    cooling_until: float = 0.0

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.cooling_until


class KeyPool:
    def __init__(
        self,
        provider: str,
        secrets: list[str],
        *,
        default_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rotation: KeyRotation = "round_robin",
    ) -> None:
        self.provider = provider
        # round_robin: each call takes the next usable key; on_failure: calls stay on one key
        # until it is refused or cooling, then move to the next one in the list and stay there
        self._advance = 1 if rotation == "round_robin" else 0
        self.keys = [ApiKey(s, fingerprint(s)) for s in secrets] or [ApiKey(None, "nokey")]
        self._default_cooldown = default_cooldown
        self._clock = clock
        self._next = 0
        self._publish()

    def acquire(self, exclude: set[str]) -> ApiKey | None:
        """The next usable key in round-robin order not yet tried for this request."""
        now = self._clock()
        for offset in range(len(self.keys)):
            key = self.keys[(self._next + offset) % len(self.keys)]
            if key.key_id not in exclude and key.usable(now):
                self._next = (self._next + offset + self._advance) % len(self.keys)
                return key
        return None

    async def acquire_waiting(self, budget: float) -> ApiKey | None:
        """A key for a fresh pass, waiting for a cooling one if it is free within `budget` seconds.

        Without the wait, a pass that finds every key still cooling (another turn's later 429 can
        push a key's cooling past this turn's Retry-After) sends nothing yet spends a retry."""
        while True:
            key = self.acquire(set())
            if key is not None:
                return key
            wait = self.next_available_in()
            if wait is None or wait >= budget:
                return None
            pause = max(wait, 0.001)  # never a busy loop on a key whose cooling ends right now
            await asyncio.sleep(pause)
            budget -= pause

    def mark_unauthorized(self, key: ApiKey, status: int | None) -> None:
        if key.healthy:
            key.healthy = False
            KEY_FAILURES.labels(self.provider, "unauthorized").inc()
            log.warning(
                "API key refused by the provider; set aside until a probe succeeds",
                extra={"provider": self.provider, "key_id": key.key_id, "status": status},
            )
            self._publish()

    def mark_rate_limited(self, key: ApiKey, retry_after: float | None) -> None:
        wait = self._default_cooldown if retry_after is None else retry_after
        key.cooling_until = self._clock() + wait
        KEY_FAILURES.labels(self.provider, "rate_limited").inc()
        log.info(
            "API key rate-limited; cooling down",
            extra={"provider": self.provider, "key_id": key.key_id, "cooldown_s": round(wait, 3)},
        )

    def restore(self, key: ApiKey) -> None:
        if not key.healthy:
            key.healthy = True
            log.warning(
                "API key works again", extra={"provider": self.provider, "key_id": key.key_id}
            )
            self._publish()

    def unhealthy(self) -> list[ApiKey]:
        return [k for k in self.keys if not k.healthy]

    @property
    def healthy_count(self) -> int:
        return sum(k.healthy for k in self.keys)

    def next_available_in(self) -> float | None:
        """Seconds until a cooling (but not revoked) key is usable again; None if none will be."""
        now = self._clock()
        waits = [max(0.0, k.cooling_until - now) for k in self.keys if k.healthy]
        return min(waits) if waits else None

    def _publish(self) -> None:
        KEYS_HEALTHY.labels(self.provider).set(self.healthy_count)
