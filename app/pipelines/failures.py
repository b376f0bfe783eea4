"""What a refused or failed call looks like to its caller, before any wire: one status, code and
message per error type the pipelines raise on purpose, in one table (FAILURES).

The surfaces shape it for their wire (app.http.chat_errors: /chat's JSON body and the chat
frames; app.surfaces.openai.errors: OpenAI's error body), the request metrics take its outcome
from it, and the pipelines' failure log lines its code. So that these agree and the table is
read once per failed call, `describe` keeps its answer on the exception it describes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.accounting.budget import BudgetExhausted, BudgetUnavailable, HistoryTooLong
from app.core.errors import (
    OutputInvalid,
    RateLimited,
    RequestUnsupported,
    UnknownModel,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from app.core.principal import Principal
from app.safety.validation import OutputMismatch, SchemaInvalid, output_problems

RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"


@dataclass(frozen=True)
class Failure:
    status: int
    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    # the model's text that broke response_format: only DEBUG_FAILED_OUTPUT shows it to callers
    raw_output: str | None = None


def _rate_limited(error: RateLimited) -> Failure:
    retry = {} if error.retry_after is None else {"Retry-After": str(error.retry_after_header)}
    return Failure(429, RATE_LIMIT_EXCEEDED, str(error), error.as_dict(), retry)


def _output_invalid(error: OutputInvalid) -> Failure:
    when = (
        "(a streamed answer is checked as it was sent, not repaired)"
        if isinstance(error, OutputMismatch) and error.streamed
        else "after one repair"
    )
    message = f"the model's answer did not match response_format {when}: " + "; ".join(
        error.errors[:5]
    )
    problems = {"errors": output_problems(error)}
    return Failure(422, "output_invalid", message, problems, raw_output=error.raw)


# First match wins (subclasses before their bases: UpstreamTimeout and UpstreamRejected are
# UpstreamErrors). The deadline's TimeoutError is a 504 like an upstream's.
Kinds = type[Exception] | tuple[type[Exception], ...]
FAILURES: tuple[tuple[Kinds, Callable[[Any], Failure]], ...] = (
    (SchemaInvalid, lambda e: Failure(400, "invalid_response_format", str(e))),
    (RateLimited, _rate_limited),
    (
        BudgetExhausted,
        lambda e: Failure(429, "budget_exhausted", e.refusal.message, e.refusal.as_dict()),
    ),
    (
        HistoryTooLong,
        lambda e: Failure(
            400,
            "context_length_exceeded",
            f"{e}: shorten the newest message or the system instruction",
        ),
    ),
    (UnknownModel, lambda e: Failure(404, "model_not_found", str(e))),
    (
        RequestUnsupported,
        lambda e: Failure(400, "unsupported_parameter", str(e), {"param": e.param}),
    ),
    (
        BudgetUnavailable,
        lambda e: Failure(503, "budget_unavailable", f"the budget store cannot be read: {e}"),
    ),
    (OutputInvalid, _output_invalid),
    (
        (UpstreamTimeout, TimeoutError),
        lambda e: Failure(504, "upstream_timeout", f"no answer in time: {e}"),
    ),
    (
        UpstreamRejected,
        lambda e: Failure(502, "upstream_rejected", f"the provider refused the request: {e}"),
    ),
    (
        UpstreamError,
        lambda e: Failure(502, "upstream_unavailable", f"no provider could answer: {e}"),
    ),
)

_DESCRIBED = "_cxrelay_failure"  # where describe keeps its answer on the exception


def look_up(error: Exception) -> Failure | None:
    """The table's row for this error, built; None for an error not raised on purpose."""
    for kinds, build in FAILURES:
        if isinstance(error, kinds):
            return build(error)
    return None


def describe(error: BaseException) -> Failure | None:
    """The caller-facing failure for an error a pipeline raises on purpose; None otherwise (a
    bug, or a cancellation). The table is read once per error: the pipeline's log line, the
    wire's answer and the metric outcome all ask, and all get the same answer."""
    if not isinstance(error, Exception):
        return None
    kept: dict[str, Any] | None = getattr(error, "__dict__", None)
    if kept is None:  # an exception class with __slots__ only: nowhere to keep it
        return look_up(error)
    if _DESCRIBED not in kept:
        kept[_DESCRIBED] = look_up(error)
    failure: Failure | None = kept[_DESCRIBED]
    return failure


def failure_fields(
    surface: str, principal: Principal, session_id: str, error: Exception, started: float
) -> dict[str, Any]:
    """A failed call's log line (the attempt and access lines alone would not say which session
    or tenant it was). Only the error's code: a provider's message may quote the caller's text."""
    failure = describe(error)
    return {
        "surface": surface,
        "tenant": principal.tenant,
        "key_id": principal.key_id,
        "session_id": session_id or None,
        "status": "failed",
        "error": failure.code if failure else type(error).__name__,
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
    }
