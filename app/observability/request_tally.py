"""`cxrelay_requests_total`: how each request to a product surface went, counted exactly once.

Each request gets a Tally (a context variable, so the pipeline's tasks see it too). The pipeline
or the route notes how an answered request went (`note_outcome`: success, or a fallback and its
reason: a 200 either way); a streamed answer that fails after its 200 notes the failure's status
(app.http.request_metrics.note_failure). Who counts the tally, and when: HTTP requests by
app.http.request_metrics.RequestMetricsMiddleware after the response; /ws/chat by its route, per
request frame (`counted`), and per refused frame or handshake (`count_status`): one socket
carries many requests.

Framework-free, so the pipelines can note outcomes without importing the HTTP layer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from app.observability.metrics import REQUESTS, TURN_LATENCY

CLIENT_CLOSED = 499
RATE_LIMITED = "rate_limited"  # refused by an inbound limit (a 429, or a webhook's fallback)


def classify(status: int) -> tuple[str, str]:
    """A refused or failed request's (outcome, reason)."""
    return ("error" if status >= 500 else "rejected"), str(status)


@dataclass
class Tally:
    surface: str
    started: float = field(default_factory=time.perf_counter)
    outcome: str | None = None
    reason: str = ""

    def count(self, outcome: str, reason: str) -> None:
        REQUESTS.labels(self.surface, outcome, reason).inc()
        if outcome != "rejected":
            TURN_LATENCY.labels(self.surface).observe(time.perf_counter() - self.started)


current_tally: ContextVar[Tally | None] = ContextVar("cxrelay_request_tally", default=None)


def note_outcome(outcome: str, reason: str = "") -> None:
    """How an answered request went: "success", or "fallback" with the fallback's reason."""
    tally = current_tally.get()
    if tally is not None:
        tally.outcome, tally.reason = outcome, reason


def count_status(surface: str, status: int, reason: str = "") -> None:
    """A request refused outright (a /ws/chat frame or handshake); `reason` instead of the
    status when it says more (`rate_limited`)."""
    outcome, by_status = classify(status)
    REQUESTS.labels(surface, outcome, reason or by_status).inc()


@contextmanager
def counted(surface: str) -> Iterator[Tally]:
    """One request handled inside the block, counted when it ends."""
    tally = Tally(surface)
    token = current_tally.set(tally)
    try:
        yield tally
    finally:
        current_tally.reset(token)
        if tally.outcome is None:
            tally.count(*classify(CLIENT_CLOSED))
        else:
            tally.count(tally.outcome, tally.reason)
