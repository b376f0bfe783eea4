"""/chat's and /ws/chat's wire for a failed call: the JSON error body of /chat, and the error
frame that ends a streamed answer (SSE on /chat, the /ws/chat socket). What the failure is
comes from the one table (app.pipelines.failures); this only shapes it."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from app.http.request_metrics import note_failure
from app.pipelines.failures import Failure, describe

INTERNAL_ERROR_FRAME = {"type": "error", "code": "internal_error", "message": "internal error"}


def failure_response(error: Exception, *, raw_output: bool = False) -> JSONResponse:
    """The error's status and body, its outcome noted for the request metrics; an error the
    pipeline does not raise on purpose is re-raised. `raw_output` (DEBUG_FAILED_OUTPUT) adds the
    model's text to an output_invalid body."""
    failure = describe(error)
    if failure is None:
        raise error
    note_failure(failure)  # a rate-limit refusal is counted by its own reason, not just 429
    body = {"error": failure.code, "message": failure.message, **failure.detail}
    if raw_output and failure.raw_output is not None:
        body["raw_output"] = failure.raw_output
    return JSONResponse(body, status_code=failure.status, headers=failure.headers)


def error_frame(failure: Failure | None) -> dict[str, Any]:
    """The frame that ends a streamed /chat answer; None (not a failure on purpose) is an
    internal error."""
    if failure is None:
        return dict(INTERNAL_ERROR_FRAME)
    return {"type": "error", "code": failure.code, "message": failure.message}


def failure_frame(failure: Failure | None) -> dict[str, Any]:
    """/ws/chat's error frame: a refusal's detail (scope, what is left) goes with it."""
    frame = error_frame(failure)
    if failure is not None and failure.detail:
        frame["detail"] = {k: v for k, v in failure.detail.items() if k not in ("error", "message")}
    return frame
