"""OpenAI's error wire for the /v1 routes: every failure (the key check, request validation, the
413 and the chat and embeddings pipelines' refusals) as `{"error": {...}}` with the status that
makes the official clients raise the matching exception class."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from app.http.request_metrics import note_failure
from app.pipelines.failures import Failure, describe
from app.surfaces.openai.schemas import ErrorBody, ErrorDetail

log = logging.getLogger("cxrelay.openai")

NO_RETRY = {"x-should-retry": "false"}  # the official clients honour it: retrying cannot help


class OpenAIError(Exception):
    """A failure already in OpenAI's terms; the route class turns it into the response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, code=code, param=param, **extra or {})
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorBody(error=self.detail).model_dump(mode="json")
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_http(error: HTTPException) -> OpenAIError:
    """The key check (401) and the body limit (413) raise FastAPI's HTTPException."""
    codes = {401: "invalid_api_key", 403: "insufficient_scope", 413: "request_too_large"}
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return OpenAIError(
        error.status_code,
        str(error.detail),
        type=kind,
        code=codes.get(error.status_code),
        headers=dict(error.headers or {}),
    )


def from_validation(errors: Sequence[Any]) -> OpenAIError:
    """OpenAI answers an invalid request with 400 naming the first offending parameter."""
    if not errors:
        return OpenAIError(400, "invalid request")
    first = errors[0]
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return OpenAIError(400, f"the request body is not valid JSON: {reason}")
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is not None:
        message = f"Invalid '{param}': {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    if kind == "missing":
        code = "missing_required_parameter"
    elif kind.endswith(("_type", "_parsing")):
        code = "invalid_type"
    else:
        code = "invalid_value"
    return OpenAIError(400, message, code=code, param=param)


def from_failure(failure: Failure) -> OpenAIError:
    """A failed call (app.pipelines.failures) on OpenAI's wire."""
    if failure.code == "rate_limit_exceeded":  # retrying after Retry-After helps
        limit = {k: v for k, v in failure.detail.items() if k not in ("error", "message")}
        headers = failure.headers or NO_RETRY  # no Retry-After: the call can never fit
        return OpenAIError(
            429,
            failure.message,
            type=failure.code,
            code=failure.code,
            extra={"limit": limit},
            headers=headers,
        )
    if failure.code == "budget_exhausted":
        budget = {k: v for k, v in failure.detail.items() if k not in ("error", "message")}
        return OpenAIError(
            429,
            failure.message,
            type="insufficient_quota",
            code=failure.code,
            extra={"budget": budget},
            headers=NO_RETRY,
        )
    params = {"context_length_exceeded": "messages", "model_not_found": "model"}
    kind = "invalid_request_error" if failure.status < 422 else "server_error"
    return OpenAIError(
        failure.status,
        failure.message,
        type=kind,
        code=failure.code,
        param=failure.detail.get("param") or params.get(failure.code),
        headers=NO_RETRY if failure.code == "upstream_rejected" else None,
    )


def openai_failure(error: Exception) -> OpenAIError:
    """Any error leaving a /v1 route (or ending its stream) in OpenAI's terms. A failed call is
    described once, and its outcome noted for the request metrics from that description (a
    rate-limit refusal by its own reason, not just 429)."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, HTTPException):
        return from_http(error)
    if isinstance(error, RequestValidationError):
        return from_validation(error.errors())
    failure = describe(error)
    note_failure(failure)
    if failure is not None:
        return from_failure(failure)
    log.error("unexpected error on the OpenAI surface", exc_info=error)
    return OpenAIError(500, "internal error", type="server_error", code="internal_error")


class OpenAIRoute(APIRoute):
    """Failures leave these routes in OpenAI's shape, including the CallerDep's 401 and FastAPI's
    own validation, which would otherwise get the app-wide `{"detail": ...}` body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:
                return openai_failure(error).response()

        return guarded


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "invalid request, or the newest message does not fit the context window",
        401: "missing or unknown client API key",
        404: "unknown model",
        413: "body over MAX_BODY_BYTES",
        422: "an answer that broke response_format after one repair",
        429: "an inbound limit (type rate_limit_exceeded, with Retry-After) or an exhausted "
        "session or tenant budget (type insufficient_quota)",
        502: "no provider could answer",
        503: "the budget store cannot be read",
        504: "no answer within CHAT_DEADLINE_SECONDS",
    }.items()
}
