"""What a refused or failed chat call looks like to the caller: one status, code and message per
error type, shared by /chat, /v1/chat/completions (in OpenAI's error shape) and /ws/chat."""

from __future__ import annotations

import time
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
from app.safety.validation import SchemaInvalid, output_problems


@dataclass(frozen=True)
class ChatFailure:
    status: int
    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def describe(error: Exception, *, raw_output: bool = False) -> ChatFailure | None:
    """The caller-facing failure for an error the pipeline raises on purpose; None otherwise.

    An answer that broke the caller's schema lists each problem as `errors: [{path, message}]`;
    the answer itself only with `raw_output` (DEBUG_FAILED_OUTPUT): it is the model's text."""
    if isinstance(error, SchemaInvalid):
        return ChatFailure(400, "invalid_response_format", str(error))
    if isinstance(error, RateLimited):
        retry = {} if error.retry_after is None else {"Retry-After": str(error.retry_after_header)}
        return ChatFailure(429, "rate_limit_exceeded", str(error), error.as_dict(), retry)
    if isinstance(error, BudgetExhausted):
        return ChatFailure(429, "budget_exhausted", error.refusal.message, error.refusal.as_dict())
    if isinstance(error, HistoryTooLong):
        return ChatFailure(
            400,
            "context_length_exceeded",
            f"{error}: shorten the newest message or the system instruction",
        )
    if isinstance(error, UnknownModel):
        return ChatFailure(404, "model_not_found", str(error))
    if isinstance(error, RequestUnsupported):
        return ChatFailure(400, "unsupported_parameter", str(error), {"param": error.param})
    if isinstance(error, BudgetUnavailable):
        return ChatFailure(503, "budget_unavailable", f"the budget store cannot be read: {error}")
    if isinstance(error, OutputInvalid):
        detail: dict[str, Any] = {"errors": output_problems(error)}
        if raw_output:
            detail["raw_output"] = error.raw
        return ChatFailure(
            422,
            "output_invalid",
            "the model's answer did not match response_format after one repair: "
            + "; ".join(error.errors[:5]),
            detail,
        )
    if isinstance(error, UpstreamTimeout | TimeoutError):
        return ChatFailure(504, "upstream_timeout", f"no answer in time: {error}")
    if isinstance(error, UpstreamRejected):
        return ChatFailure(502, "upstream_rejected", f"the provider refused the request: {error}")
    if isinstance(error, UpstreamError):
        return ChatFailure(502, "upstream_unavailable", f"no provider could answer: {error}")
    return None


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
