"""The trail of a routed request: one Attempt per step, and the outcome names they carry.

The router records an Attempt for every key tried, circuit skipped or rate limit hit; the trail
ends up on the ChatResult (or the UpstreamError) for the response, the logs and the metrics.
The outcome names ("ok", "rate_limited", "timeout", "unauthorized" ...) are metric labels, so
they live here, in one place, apart from the routing logic that decides what to try next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from app.core.errors import (
    CircuitOpen,
    ContextLengthExceeded,
    StreamBroken,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from app.observability.metrics import LLM_ATTEMPTS, UPSTREAM_LATENCY

# Outcomes recorded without a call going out: nothing upstream to time.
NOT_SENT = frozenset({"circuit_open", "local_rate_limit"})
# "cancelled": the caller left (a client hung up) while the attempt was under way; not a
# failure of the provider. An attempt cut by the caller's deadline is a "timeout".

# The outcome of each other kind of upstream error (a refusal's is `rejection`'s; the rest,
# UpstreamUnavailable and its kin, are "unavailable").
_OUTCOMES: tuple[tuple[type[UpstreamError], str], ...] = (
    (UpstreamRateLimited, "rate_limited"),
    (UpstreamTimeout, "timeout"),
    (UpstreamProtocolError, "protocol_error"),
    (StreamBroken, "stream_broken"),
    (CircuitOpen, "circuit_open"),
)


@dataclass(frozen=True)
class Attempt:
    """One step of a request's way through its route, for the response, logs and metrics."""

    provider: str
    model: str
    key_id: str
    outcome: str
    latency_ms: float = 0.0

    def public(self) -> dict[str, str | float]:
        return {
            "provider": self.provider,
            "model": self.model,
            "outcome": self.outcome,
            "latency_ms": self.latency_ms,
        }


def observe(attempt: Attempt) -> None:
    """The attempt in the metrics: counted, and timed when a call went out."""
    LLM_ATTEMPTS.labels(attempt.provider, attempt.model, attempt.outcome).inc()
    if attempt.outcome not in NOT_SENT:
        UPSTREAM_LATENCY.labels(attempt.provider, attempt.model, attempt.outcome).observe(
            attempt.latency_ms / 1000
        )


def ms(started: float) -> float:
    """Milliseconds since `started` (a time.perf_counter() reading), to a tenth."""
    return round((time.perf_counter() - started) * 1000, 1)


def rejection(error: UpstreamRejected) -> str:
    """The outcome of a refusal: the context was too long, the key was refused, or the request."""
    if isinstance(error, ContextLengthExceeded):
        return "context_length"
    return "unauthorized" if error.status in (401, 403) else "rejected"


def reason(error: UpstreamError) -> str:
    """The outcome (and fallback reason label) an upstream error stands for."""
    if isinstance(error, UpstreamRejected):
        return rejection(error)
    return next((outcome for kind, outcome in _OUTCOMES if isinstance(error, kind)), "unavailable")
