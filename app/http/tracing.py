"""The server span of each request, a child of the caller's trace (W3C `traceparent`).

Added by create_app only when tracing is on (app.observability.tracing_setup), so a service
with tracing off has no such layer at all. Its own, not opentelemetry-instrumentation-asgi
(docs/tracing.md has the comparison): it names the span by the route template once routing has
matched (`POST /webhook/cognigy/fallback`), records no URL path or query (a session id or a
phone number can be in either), no header, and a failure by its exception's type only.
"""

from __future__ import annotations

import re
from typing import Any

from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability import tracing

# the headers a caller's trace context arrives in (W3C Trace Context and Baggage)
_PROPAGATED = frozenset({b"traceparent", b"tracestate", b"baggage"})


class TracingMiddleware:
    """`excluded`: the requests not traced (app.observability.tracing_setup.excluded_urls), matched
    against the URL without its query, as OpenTelemetry's own instrumentations do; the URL is
    never recorded."""

    def __init__(self, app: ASGIApp, excluded: re.Pattern[str] | None = None) -> None:
        self.app = app
        self.excluded = excluded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = tracing.current_tracer()
        if tracer is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.excluded is not None and self.excluded.search(_url(scope)):
            with tracing.untraced():
                await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _PROPAGATED
        }
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        with tracer.start_as_current_span(
            method,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            except BaseException as error:
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                span.set_attribute("error.type", type(error).__name__)
                raise
            finally:
                template = getattr(scope.get("route"), "path", None)  # set by routing
                if isinstance(template, str):
                    span.update_name(f"{method} {template}")
                    span.set_attribute("http.route", template)


def _url(scope: Scope) -> str:
    """scheme://host/path, as a request's URL reads without its query."""
    host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
    if host is None:
        server = scope.get("server") or ("", None)
        host = server[0] if server[1] is None else f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}{scope['path']}"
