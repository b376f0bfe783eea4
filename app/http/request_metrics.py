"""`cxrelay_requests_total`: every request to a product surface, counted exactly once.

Each request gets a Tally (a context variable, so the pipeline's tasks see it too). The pipeline
or the route notes how an answered request went (`note_outcome`: success, or a fallback and its
reason: a 200 either way); a streamed answer that fails after its 200 notes the failure
(`note_failure`). The tally is counted once, when the request is over:

- HTTP (the webhooks, /chat, /v1/chat/completions, /v1/embeddings): by
  RequestMetricsMiddleware, after the response. A 4xx is `rejected` and a 5xx `error`, whatever
  was noted (auth, body size and validation refuse before any pipeline runs), the reason being
  the status except for an inbound limit's 429 (`rate_limited`); otherwise the noted outcome. A
  request that
  ended with nothing noted (the caller left mid-stream) is `rejected` with reason "499", the
  usual code for "client closed request".
- /ws/chat: by the route, per request frame (`counted`), and per refused frame or handshake
  (`count_status`): one socket carries many requests.

The latency of every request that was not rejected is observed with it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.chat_errors import describe
from app.observability.metrics import REQUESTS, TURN_LATENCY

# The HTTP routes of each product surface (/ws/chat counts itself, per frame).
SURFACES = {
    "/webhook/cognigy/fallback": "cognigy",
    "/webhook/cxone": "cxone",
    "/chat": "chat",
    "/v1/chat/completions": "openai",
    "/v1/embeddings": "embeddings",
}
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


_current: ContextVar[Tally | None] = ContextVar("cxrelay_request_tally", default=None)


def note_outcome(outcome: str, reason: str = "") -> None:
    """How an answered request went: "success", or "fallback" with the fallback's reason."""
    tally = _current.get()
    if tally is not None:
        tally.outcome, tally.reason = outcome, reason


def note_failure(error: BaseException) -> None:
    """A failure the caller is told of (an error response, event or frame); a refusal by the
    inbound limits is counted with reason `rate_limited` rather than its status."""
    failure = describe(error) if isinstance(error, Exception) else None
    if failure is not None and failure.code == "rate_limit_exceeded":
        note_outcome("rejected", RATE_LIMITED)
        return
    note_status(failure.status if failure is not None else 500)


def note_status(status: int) -> None:
    tally = _current.get()
    if tally is not None:
        tally.outcome, tally.reason = classify(status)


def count_status(surface: str, status: int, reason: str = "") -> None:
    """A request refused outright (a /ws/chat frame or handshake); `reason` instead of the
    status when it says more (`rate_limited`)."""
    outcome, by_status = classify(status)
    REQUESTS.labels(surface, outcome, reason or by_status).inc()


@contextmanager
def counted(surface: str) -> Iterator[Tally]:
    """One request handled inside the block, counted when it ends."""
    tally = Tally(surface)
    token = _current.set(tally)
    try:
        yield tally
    finally:
        _current.reset(token)
        if tally.outcome is None:
            tally.count(*classify(CLIENT_CLOSED))
        else:
            tally.count(tally.outcome, tally.reason)


class RequestMetricsMiddleware:
    """Counts each HTTP request to a product surface once, after its response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        surface = SURFACES.get(scope["path"]) if scope["type"] == "http" else None
        if surface is None:
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        tally = Tally(surface)
        token = _current.set(tally)
        crashed = False
        try:
            await self.app(scope, receive, noting_status)
        except Exception:
            crashed = True
            raise
        finally:
            _current.reset(token)
            if status and status[0] == 429 and tally.reason == RATE_LIMITED:
                tally.count("rejected", RATE_LIMITED)
            elif status and status[0] >= 400:
                tally.count(*classify(status[0]))
            elif crashed:
                tally.count(*classify(500))
            elif tally.outcome is not None:
                tally.count(tally.outcome, tally.reason)
            else:
                tally.count(*classify(CLIENT_CLOSED))
