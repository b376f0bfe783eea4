"""A circuit breaker per provider: after repeated failures the provider is skipped for a while,
then one trial request tests whether it recovered, so a dead provider costs no deadline time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Literal

from app.observability.metrics import CIRCUIT_STATE

log = logging.getLogger("cxrelay.circuit")

State = Literal["closed", "open", "half_open"]
_GAUGE = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(eq=False)
class CircuitBreaker:
    provider: str
    _: KW_ONLY
    failure_threshold: int = 5
    reset_seconds: float = 30.0
    clock: Callable[[], float] = time.monotonic
    # what went wrong last (for the operator: logs, /health), so an open circuit does not hide
    # the cause that opened it
    last_failure: str = field(default="", init=False)
    last_failure_at: float | None = field(default=None, init=False)  # time.time()
    _failures: int = field(default=0, init=False)
    _opened_at: float = field(default=0.0, init=False)
    _trial_in_flight: bool = field(default=False, init=False)
    _state: State = field(default="closed", init=False)

    def __post_init__(self) -> None:
        CIRCUIT_STATE.labels(self.provider).set(0)

    @property
    def state(self) -> State:
        if self._state == "open" and self.clock() - self._opened_at >= self.reset_seconds:
            return "half_open"
        return self._state

    def allow(self) -> bool:
        """May a request go to this provider now? In half-open, only one trial at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial_in_flight:
            self._set("half_open")
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._trial_in_flight = False
        if self._state != "closed":
            log.warning("provider recovered; circuit closed", extra={"provider": self.provider})
            self._set("closed")

    def record_failure(self, cause: str = "") -> None:
        self.last_failure, self.last_failure_at = cause, time.time()
        self._failures += 1
        was_trial = self._trial_in_flight
        self._trial_in_flight = False
        if was_trial or self._failures >= self.failure_threshold:
            if self._state != "open" or was_trial:
                log.warning(
                    "provider failing; circuit open",
                    extra={
                        "provider": self.provider,
                        "failures": self._failures,
                        "reset_s": self.reset_seconds,
                        "error": cause,
                    },
                )
            self._opened_at = self.clock()
            self._set("open")

    def release_trial(self) -> None:
        """A trial that ended without a verdict on the provider (e.g. the caller's 400)."""
        self._trial_in_flight = False

    def _set(self, state: State) -> None:
        self._state = state
        CIRCUIT_STATE.labels(self.provider).set(_GAUGE[state])
