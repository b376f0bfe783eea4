"""Typed exceptions raised by services; routers map them to responses in one place.

A hierarchy (rather than status codes passed around) lets each caller decide what is retryable,
what degrades the answer and what is the caller's own fault.
"""

from __future__ import annotations

import math


class CxRelayError(Exception):
    """Base of every error this service raises on purpose."""


class ConfigError(CxRelayError):
    """Settings or templates are invalid: start-up must stop with this message."""


class AuthenticationFailed(CxRelayError):
    """The caller's credential is missing or wrong (always answered with 401).

    `reason` is one word of a fixed vocabulary (AUTH_FAILURE_REASONS in
    app/observability/metrics.py: missing, invalid, malformed, expired, replayed, disabled; a
    403 for a scope is counted as `scope`), safe as a metric label; the message says more, for
    the caller, and never repeats the presented credential."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class UpstreamError(CxRelayError):
    """A call to an upstream (LLM provider, CXone) failed."""

    retryable = False

    def __init__(
        self, message: str, *, upstream: str = "", status: int | None = None, detail: str = ""
    ) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.status = status
        # for the operator (logs, /health), never for the caller: e.g. the transport's own
        # words, which may name internal hosts
        self.detail = detail
        self.trail: tuple[object, ...] = ()  # the attempts made before giving up (llm router)

    def for_operator(self) -> str:
        return f"{self} ({self.detail})" if self.detail else str(self)


class UpstreamRateLimited(UpstreamError):
    """429: the upstream asks us to slow down, possibly saying for how long."""

    retryable = True

    def __init__(
        self, message: str, *, upstream: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message, upstream=upstream, status=429)
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    """5xx or a connection failure: worth another try."""

    retryable = True


class CircuitOpen(UpstreamUnavailable):
    """The provider is skipped while its circuit is open. Not retried (when every provider of a
    route is open there is nothing to try, and the caller answers its fallback at once), unless
    a trial request is testing the provider right now (half-open)."""

    retryable = False


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the time this attempt had."""

    retryable = True


class UpstreamRejected(UpstreamError):
    """4xx other than 429 (bad request, bad key): retrying the same request cannot help."""


class ContextLengthExceeded(UpstreamRejected):
    """The prompt does not fit this model's context window: another model in the route may fit."""


class UpstreamProtocolError(UpstreamError):
    """The upstream answered 2xx with a body that does not follow its wire format."""

    retryable = True


class StreamBroken(UpstreamError):
    """A stream failed after part of the answer (`partial`, this attempt's text) was already
    passed on to the caller. It is never answered afresh, since a second answer would be glued
    onto half of the first: the route's next entry may only continue it."""

    def __init__(self, message: str, *, upstream: str = "", partial: str = "") -> None:
        super().__init__(message, upstream=upstream)
        self.partial = partial


class OutputInvalid(CxRelayError):
    """The model's output does not parse or does not match the expected schema."""

    def __init__(self, message: str, *, raw: str, errors: list[str]) -> None:
        super().__init__(message)
        self.raw = raw
        self.errors = errors


class RequestUnsupported(CxRelayError):
    """No model of the route can take what the request asks for (image or audio parts, tools,
    an option its provider's API has not): refused before anything is spent, naming `param`."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class UnknownModel(CxRelayError):
    """The requested model is neither a route nor a model of any configured provider."""


class RateLimited(CxRelayError):
    """An inbound limit refuses the request: a client key's or its tenant's requests or tokens
    per minute, or concurrent streams. `retry_after` is the seconds until it would fit (None: the
    request is larger than the whole per-minute limit, so waiting cannot help)."""

    def __init__(
        self, message: str, *, scope: str, limit: str, allowed: int, retry_after: float | None
    ) -> None:
        super().__init__(message)
        self.scope = scope  # "key" or "tenant"
        self.limit = limit  # "requests", "tokens" or "streams"
        self.allowed = allowed
        self.retry_after = retry_after

    def as_dict(self) -> dict[str, object]:
        return {
            "scope": self.scope,
            "limit": self.limit,
            "allowed": self.allowed,
            "retry_after_seconds": None if self.retry_after is None else self.retry_after_header,
        }

    @property
    def retry_after_header(self) -> int:
        """Whole seconds, at least 1 (HTTP's Retry-After takes no fractions)."""
        return max(1, math.ceil(self.retry_after or 0))
