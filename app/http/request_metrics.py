"""`cxrelay_requests_total`: every request to a product surface, counted exactly once.

Each request gets a Tally (app.observability.request_tally: a context variable, so the
pipeline's tasks see it too). The pipeline or the route notes how an answered request went
(`note_outcome`: success, or a fallback and its reason: a 200 either way); a failure the caller
is told of notes the outcome its described failure implies (`note_failure`: the status, or
`rate_limited`). The tally is counted once, when the request is over:

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

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability.metrics import REQUESTS
from app.observability.request_tally import (
    CLIENT_CLOSED,
    RATE_LIMITED,
    Tally,
    classify,
    current_tally,
    note_outcome,
)
from app.pipelines.failures import RATE_LIMIT_EXCEEDED, Failure

# The HTTP routes of each product surface (/ws/chat counts itself, per frame).
SURFACES = {
    "/webhook/cognigy/fallback": "cognigy",
    "/webhook/cxone": "cxone",
    "/chat": "chat",
    "/v1/chat/completions": "openai",
    "/v1/embeddings": "embeddings",
}


def failure_outcome(failure: Failure | None) -> tuple[str, str]:
    """The (outcome, reason) of a failure the caller is told of: an unexpected error (None) is a
    500; a refusal by the inbound limits has reason `rate_limited` rather than its status."""
    if failure is not None and failure.code == RATE_LIMIT_EXCEEDED:
        return "rejected", RATE_LIMITED
    return classify(failure.status if failure is not None else 500)


def note_failure(failure: Failure | None) -> None:
    """This request failed as described (an error response, event or frame)."""
    note_outcome(*failure_outcome(failure))


def count_failure(surface: str, failure: Failure | None) -> None:
    """A request refused outright with a described failure (a /ws/chat handshake)."""
    REQUESTS.labels(surface, *failure_outcome(failure)).inc()


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
        token = current_tally.set(tally)
        crashed = False
        try:
            await self.app(scope, receive, noting_status)
        except Exception:
            crashed = True
            raise
        finally:
            current_tally.reset(token)
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
