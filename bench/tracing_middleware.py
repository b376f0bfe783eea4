"""The request layer alone: app.http.tracing.TracingMiddleware against
opentelemetry-instrumentation-asgi's OpenTelemetryMiddleware, CPU per request.

    uv venv /tmp/asgi && VIRTUAL_ENV=/tmp/asgi uv pip install opentelemetry-sdk==1.45.2 \
        opentelemetry-instrumentation-asgi==0.66b2 starlette==1.10.0
    PYTHONPATH=. /tmp/asgi/bin/python bench/tracing_middleware.py

(instrumentation-asgi is not a dependency of cx-relay: this is how it was compared.) Both wrap
the same tiny ASGI app (a 200 with a small body, the route template set as routing sets it),
trace into one SDK provider whose exporter discards, and are called directly with an HTTP scope
carrying a `traceparent`; no network. Variants in turn, median of the rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from app.http.tracing import TracingMiddleware
from app.observability import tracing


class Discard(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


class Route:
    path = "/v1/chat/completions"


async def endpoint(scope: Any, receive: Any, send: Any) -> None:
    scope["route"] = Route()  # as Starlette's router does
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"y")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/v1/chat/completions",
    "raw_path": b"/v1/chat/completions",
    "query_string": b"",
    "root_path": "",
    "headers": [
        (b"host", b"relay"),
        (b"content-type", b"application/json"),
        (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ],
    "client": ("127.0.0.1", 5000),
    "server": ("127.0.0.1", 8000),
}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


async def send(message: Any) -> None:
    pass


async def per_request(app: Any, n: int) -> float:
    for _ in range(200):
        await app(dict(SCOPE), receive, send)
    started = time.process_time()
    for _ in range(n):
        await app(dict(SCOPE), receive, send)
    return (time.process_time() - started) / n * 1e6


async def main(rounds: int = 7, n: int = 5000) -> None:
    exporter = Discard()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider.get_tracer("bench"))
    variants = {
        "none": endpoint,
        "TracingMiddleware (app.http.tracing)": TracingMiddleware(endpoint),
        "OpenTelemetryMiddleware (instrumentation-asgi)": OpenTelemetryMiddleware(
            endpoint, tracer_provider=provider
        ),
        "OpenTelemetryMiddleware, send/receive spans excluded": OpenTelemetryMiddleware(
            endpoint, tracer_provider=provider, exclude_spans=["receive", "send"]
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, app in variants.items():
            before = exporter.spans
            results[name].append(await per_request(app, n))
            spans = (exporter.spans - before) / (n + 200)
            print(f"{name}: {results[name][-1]:.1f} µs, {spans:.0f} spans/request")
    print(f"\nCPU per request, median of {rounds} rounds x {n}:")
    for name, values in results.items():
        print(f"  {statistics.median(values):6.1f} µs  {name}")


if __name__ == "__main__":
    asyncio.run(main())
