"""Spans for the service's steps, and the W3C trace headers its outbound calls carry.

Tracing is off unless the lifespan turns it on (app.observability.tracing_setup reads the
standard OTEL_* variables). While it is off nothing of OpenTelemetry is imported: `span()` hands
back one shared do-nothing context manager and `with_trace_headers()` the headers it was given,
so a request pays a function call and a None check per step (docs/tracing.md has the numbers).

What a span may carry is decided where it is opened: names, counts, outcomes, configured
provider and model names, key fingerprints. Never prompt or answer text, PII, a key, or an
exception's message (it can quote either): a failed step's status names the exception's type.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

AttributeValue = str | bool | int | float
Attributes = Mapping[str, AttributeValue]

_tracer: Tracer | None = None
_OFF: nullcontext[None] = nullcontext()
# set for a request that is not traced (a probe): its steps open no spans either, rather than
# each becoming a trace of its own
_untraced: ContextVar[bool] = ContextVar("cxrelay_untraced", default=False)


def enable(tracer: Tracer) -> None:
    """Spans from now on come from `tracer` (the lifespan's, one per process)."""
    global _tracer
    _tracer = tracer


def disable() -> None:
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def current_tracer() -> Tracer | None:
    """The tracer in use (None: off), for the request layer (app.http.tracing)."""
    return _tracer


@contextmanager
def untraced() -> Iterator[None]:
    """No span for the steps run inside (a request the operator excluded from tracing)."""
    token = _untraced.set(True)
    try:
        yield
    finally:
        _untraced.reset(token)


def span(name: str, attributes: Attributes | None = None) -> AbstractContextManager[Span | None]:
    """A child of the current span for the step the block runs (None inside when off)."""
    if _tracer is None or _untraced.get():
        return _OFF
    return _Step(_tracer, name, attributes)


def annotate(attributes: Attributes) -> None:
    """Add what a step learnt on its way (an outcome, token counts) to the current span."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(attributes)


def failed(description: str) -> None:
    """Mark the current span as failed without an exception (an answer refused, a fallback)."""
    if _tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    trace.get_current_span().set_status(Status(StatusCode.ERROR, description))


def with_trace_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    """`headers` plus the current trace's `traceparent` (and `tracestate`), for an outbound call,
    so the upstream's spans join the caller's trace; `headers` itself while tracing is off."""
    if _tracer is None:
        return headers
    from opentelemetry import propagate

    carried = dict(headers)
    propagate.inject(carried)
    return carried


class _Step:
    """start_as_current_span, with an exception recorded as the span's status by its type only
    (OpenTelemetry's own would record its message and stack trace)."""

    __slots__ = ("_opened", "_span")

    def __init__(self, tracer: Tracer, name: str, attributes: Attributes | None) -> None:
        self._opened = tracer.start_as_current_span(
            name,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )

    def __enter__(self) -> Span:
        self._span = self._opened.__enter__()
        return self._span

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        if kind is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, kind.__name__))
            self._span.set_attribute("error.type", kind.__name__)
        return self._opened.__exit__(kind, error, traceback)
