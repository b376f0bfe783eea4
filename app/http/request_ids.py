"""The request id that ties a request's log lines together, and the one access-log line per
request (ASGI middleware)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.ids import new_id
from app.observability.logs import request_id_var

REQUEST_ID_MAX_LENGTH = 128
_SANE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{REQUEST_ID_MAX_LENGTH}}}")
MAX_LOGGED_PATH = 256

access_log = logging.getLogger("cxrelay.access")


def new_request_id() -> str:
    return new_id()


def accept_request_id(incoming: str | None) -> str:
    """The caller's X-Request-ID when it is a sane token (1-128 of [A-Za-z0-9._-]), else a new
    one: a free-form value would let a caller write anything (spaces, newlines, a secret pasted
    by mistake) into every log line of its request."""
    if incoming is not None and _SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return new_request_id()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class RequestIdMiddleware:
    """Takes a sane X-Request-ID from the caller (or makes one), returns it on the response, and
    writes the request's access line: method, path (never the query string, which may carry a
    credential), status, latency and the client's address; never a header. A WebSocket gets one
    line when it ends, with its close code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = accept_request_id(_header(scope, b"x-request-id"))
        token = request_id_var.set(request_id)
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        started = time.perf_counter()
        seen: dict[str, Any] = {"status": None}

        async def send_with_id(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                seen["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), id_header]
            elif kind == "websocket.accept":
                seen["status"] = 101
                message["headers"] = [*message.get("headers", []), id_header]
            elif kind == "websocket.close":
                seen.setdefault("close_code", message.get("code", 1000))
                if seen["status"] is None:
                    seen["status"] = 403  # closed before the handshake was accepted
            await send(message)

        async def receive_noting_disconnect() -> Message:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                seen.setdefault("close_code", message.get("code", 1000))
            return message

        websocket = scope["type"] == "websocket"
        try:
            await self.app(scope, receive_noting_disconnect if websocket else receive, send_with_id)
        except asyncio.CancelledError:
            seen["cancelled"] = True  # e.g. cut at shutdown: no status unless one was sent
            raise
        except BaseException:
            if seen["status"] is None:
                seen["status"] = 500  # what Starlette's ServerErrorMiddleware answers
            raise
        finally:
            try:
                _log_access(scope, request_id, started, seen)
            finally:
                request_id_var.reset(token)


def _logged_path(scope: Scope) -> str:
    """The path; but a route that takes a session id in it (/budget/sessions/{session_id}) by its
    template: the id a caller sent may be personal data (app.safety.session_ids)."""
    template = getattr(scope.get("route"), "path", None)
    if "session_id" in scope.get("path_params", {}) and isinstance(template, str):
        return template
    return str(scope.get("path", ""))[:MAX_LOGGED_PATH]


def _log_access(scope: Scope, request_id: str, started: float, seen: dict[str, Any]) -> None:
    client = scope.get("client")
    extra: dict[str, Any] = {
        "request_id": request_id,  # the request's, even if a WebSocket frame set its own since
        "method": scope.get("method", "GET"),
        "path": _logged_path(scope),
        "status": seen["status"],
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        "remote": client[0] if client else "",
    }
    if scope["type"] == "websocket":
        extra["websocket"] = True
        extra["close_code"] = seen.get("close_code")
    if seen.get("cancelled"):
        extra["cancelled"] = True
    access_log.info("request", extra=extra)
