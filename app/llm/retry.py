"""Backoff and stop rules for retries, used by the router with tenacity.

The wait is the provider's Retry-After when it sent one, else exponential backoff with jitter.
A retry whose wait would not end before the deadline is not attempted: the caller gets the last
error at once and can answer with its fallback in time.
"""

from __future__ import annotations

from dataclasses import dataclass

from tenacity import (
    RetryCallState,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from app.core.deadline import Deadline
from app.core.errors import UpstreamRateLimited

MIN_ATTEMPT_SECONDS = 0.05
# An attempt's own timeout ends this long before the caller's deadline, so that a provider that
# hangs is the router's timeout to record rather than the caller's cancellation.
DEADLINE_MARGIN_SECONDS = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_wait: float = 0.2
    max_wait: float = 2.0
    max_retry_after: float = 30.0


class RetryWait:
    """Retry-After when the provider sends one, else exponential backoff with jitter."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._backoff = wait_exponential(multiplier=policy.initial_wait, max=policy.max_wait) + (
            wait_random(0, policy.initial_wait)
        )

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, UpstreamRateLimited) and error.retry_after is not None:
            return min(error.retry_after, self._policy.max_retry_after)
        return float(self._backoff(state))


class WaitOutlastsDeadline(stop_base):
    """Stop when the next wait would leave no time for another attempt before the deadline."""

    def __init__(self, deadline: Deadline) -> None:
        self._deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        needed = state.upcoming_sleep + MIN_ATTEMPT_SECONDS + DEADLINE_MARGIN_SECONDS
        return needed >= self._deadline.remaining()
