"""/ws/chat (and the gateway tutorial's /ws/v1/llm-gateway/stream, the same socket): the /chat
surface over one WebSocket, for tools that keep a socket per conversation.

Frames are JSON text. The client sends a request frame shaped like the /chat body (`"type":
"request"` is optional); the server answers `{"type": "content", "delta": ...}` frames, then one
`{"type": "complete", ...}` (the SSE stream's last frame) or one `{"type": "error", "code": ...,
"message": ...}`. Choices, and why:

- Authentication: browsers cannot set headers on a WebSocket, so the key comes either on the
  handshake (`Authorization: Bearer` / `X-API-Key`, for servers) or in a first frame
  `{"type": "auth", "api_key": ...}` sent within AUTH_FRAME_SECONDS. Never a query parameter: URLs
  end up in access logs. A failure is an error frame (code `unauthorized`), then close 4401 (the
  4000s are the application's; 4xxx mirrors the HTTP status, as 4408 and 4429 below). No frame
  acknowledges success: the client simply sends its first request.
- One socket carries many requests, answered one at a time. A frame that arrives while an answer
  is running is refused at once with an error frame of code `busy` (the running answer goes on
  and still ends with its own complete/error frame). Not queued: a conversation's next turn needs
  the previous answer in its history, so an overlapping request is a client bug to show, not hide.
  The answer counts as running until its last frame is handed to the socket: a request sent the
  moment the client reads `complete` (or `error`) is the next request, never `busy`.
- A bad frame (binary, not JSON, not an object, unknown type, fails ChatBody) gets an error frame
  of code `invalid_request` and the socket stays open; so does any refused call (budget exhausted
  or a requests/tokens-per-minute limit, with the refusal under `detail`; unknown model; upstream
  failure). An open socket is one of its key's and tenant's concurrent streams from
  authentication to close (the slot is renewed in the background and given back however the
  socket ends): over that limit at connect, a `rate_limit_exceeded` error frame, then close 4429.
  A frame over MAX_BODY_BYTES
  gets an error frame and close 1009: the limit protects memory, so the sender is cut off.
- `stream` in a request is ignored: a socket always streams. A response_format json_schema answer
  is validated whole (and maybe repaired), so it goes out as one content frame after validation.
- The client leaving mid-answer cancels the call, which releases its budget reservation.
- Liveness is two clocks. A dead peer: ASGI has no ping message, so uvicorn pings every
  WS_PING_INTERVAL_SECONDS and closes with 1011 when the pong is WS_PONG_TIMEOUT_SECONDS late
  (app/serving.py passes both); the route then sees a disconnect and cancels any running call. A
  live but idle peer: with no answer running, a socket that sends no request frame within
  WS_IDLE_TIMEOUT_SECONDS (counted from authentication or from the end of the last answer) is
  closed with 4408 (not 1000/1001: the client should be able to tell "you went quiet" from a
  normal close or a server going away). Refused frames do not restart that clock: a socket that
  only sends frames the server cannot act on is as idle as a silent one.
- An unexpected failure (a bug, not a refused call) gets an `internal_error` frame and close 1011,
  instead of a dropped connection (1006) the client cannot tell from a network cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.types import Message

from app.accounting.inbound_limits import InboundLimiter
from app.auth.clients import ClientAuthenticator
from app.core.errors import AuthenticationFailed, RateLimited
from app.core.principal import Principal
from app.core.scopes import INVOKE_SCOPES, missing_scope
from app.deps import (
    CallerTemplatesDep,
    ChatPipelineDep,
    ClientAuthDep,
    LimiterDep,
    SessionIdsDep,
    SettingsDep,
)
from app.http.caller import record_auth_failure
from app.http.chat_errors import INTERNAL_ERROR_FRAME, failure_frame
from app.http.request_ids import new_request_id
from app.http.request_metrics import count_failure, note_failure
from app.observability.logs import request_id_var
from app.observability.request_tally import count_status, counted
from app.pipelines.chat import ChatPipeline
from app.pipelines.chat_call import ChatCall, ChatOutcome
from app.pipelines.failures import describe
from app.pipelines.text_stream import TextStream, stream_slot
from app.prompts.caller_templates import CallerTemplates
from app.safety.session_ids import SessionIds
from app.surfaces.chat.calls import build_call, complete_frame
from app.surfaces.chat.schemas import ChatBody

router = APIRouter(tags=["chat"])
log = logging.getLogger("cxrelay.ws_chat")

AUTH_FRAME_SECONDS = 5.0
SURFACE = "ws_chat"
# Close codes (the table in docs/chat.md, "WebSocket")
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011  # also uvicorn's code for a missing pong
UNAUTHENTICATED = 4401
FORBIDDEN = 4403  # a scoped key or token without an invoke scope
IDLE_TIMEOUT = 4408
LIMITED = 4429  # over the key's or tenant's concurrent streams (CLIENT_MAX_CONCURRENT_STREAMS)
CLOSE_REASONS = {
    MESSAGE_TOO_BIG: "frame too large",
    INTERNAL_ERROR: "internal error",
    UNAUTHENTICATED: "unauthenticated",
    FORBIDDEN: "insufficient scope",
    IDLE_TIMEOUT: "idle timeout",
    LIMITED: "limited",
}
# What Connection.answer returns when the socket is done: a disconnect, as receive() gives it.
GONE: Message = {"type": "websocket.disconnect", "code": 1000}
# A refused frame in cxrelay_requests_total: the status the same refusal has over HTTP.
FRAME_STATUS = {
    "unauthorized": 401,
    "forbidden": 403,
    "invalid_request": 400,
    "request_too_large": 413,
    "busy": 409,
}


class FrameRefused(Exception):
    """A frame the server will not act on: answered with an error frame, maybe then a close."""

    def __init__(self, code: str, message: str, close: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.close = close

    def frame(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": str(self)}


def read_frame(message: Message, limit: int) -> dict[str, Any]:
    """The JSON object a received message carries; the size is checked before anything parses."""
    text: str | None = message.get("text")
    data: bytes | None = message.get("bytes")
    size = len(text.encode()) if text is not None else len(data or b"")
    if size > limit:
        raise FrameRefused(
            "request_too_large", f"frame exceeds the {limit}-byte limit", MESSAGE_TOO_BIG
        )
    if text is None:
        raise FrameRefused("invalid_request", "send each frame as JSON text, not binary")
    try:
        frame = json.loads(text)
    except ValueError:
        raise FrameRefused("invalid_request", "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise FrameRefused("invalid_request", "a frame is a JSON object")
    return frame


def parse_request(frame: dict[str, Any]) -> ChatBody:
    kind = frame.pop("type", "request")
    if kind == "auth":
        raise FrameRefused("invalid_request", "already authenticated")
    if kind != "request":
        raise FrameRefused(
            "invalid_request", f"unknown frame type {kind!r}: send a request (the /chat body)"
        )
    # a socket always streams (either spelling); keeps json_schema requests valid
    frame.pop("stream", None)
    frame.pop("streaming", None)
    try:
        return ChatBody.model_validate(frame)
    except ValidationError as error:
        raise FrameRefused("invalid_request", summarise(error)) from None


def summarise(error: ValidationError, limit: int = 5) -> str:
    """Pydantic's errors as one line: `where: what`, the first few."""
    parts = []
    for item in error.errors(include_url=False)[:limit]:
        where = ".".join(str(part) for part in item["loc"]) or "request"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def has_header_credential(headers: Mapping[str, str]) -> bool:
    """Whether the handshake offers a client key (a browser's Basic credential is no offer)."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    bearer = scheme.lower() == "bearer" and bool(value.strip())
    return bearer or bool(headers.get("x-api-key", "").strip())


# The gateway tutorial's path for the same socket: its request frame is the /chat body in the
# tutorial's camelCase, and its content / complete / error frames are these.
TUTORIAL_PATH = "/ws/v1/llm-gateway/stream"


@router.websocket("/ws/chat")
@router.websocket(TUTORIAL_PATH)
async def ws_chat(
    websocket: WebSocket,
    settings: SettingsDep,
    client_auth: ClientAuthDep,
    limits: LimiterDep,
    pipeline: ChatPipelineDep,
    templates: CallerTemplatesDep,
    session_ids: SessionIdsDep,
) -> None:
    await websocket.accept()
    connection = Connection(
        websocket,
        client_auth=client_auth,
        limits=limits,
        pipeline=pipeline,
        templates=templates,
        session_ids=session_ids,
        max_frame_bytes=settings.max_body_bytes,
        idle_seconds=settings.ws_idle_timeout_seconds,
    )
    with contextlib.suppress(WebSocketDisconnect):
        try:
            if await connection.authenticate():
                await connection.serve_as_one_stream()
        except WebSocketDisconnect:
            raise
        except Exception:
            log.exception("ws chat connection failed")
            count_status(SURFACE, 500)
            with contextlib.suppress(Exception):  # the socket may be gone already
                await connection.send(INTERNAL_ERROR_FRAME, INTERNAL_ERROR)


@dataclass(eq=False)
class Connection:
    """One socket: authenticate it, then answer its requests in turn."""

    websocket: WebSocket
    _: KW_ONLY
    client_auth: ClientAuthenticator
    limits: InboundLimiter
    pipeline: ChatPipeline
    templates: CallerTemplates
    session_ids: SessionIds
    max_frame_bytes: int
    idle_seconds: float
    principal: Principal | None = field(default=None, init=False)
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    # the socket's id (from the handshake); each request frame gets `<this>.<n>`, so one
    # answer's log lines (turn, upstream attempts) share an id, and a socket's share a prefix
    request_id: str = field(
        default_factory=lambda: request_id_var.get() or new_request_id(), init=False
    )
    frames: int = field(default=0, init=False)
    _answering: bool = field(default=False, init=False)  # an answer runs, its last frame unsent

    async def send(self, frame: dict[str, Any], close: int | None = None) -> None:
        """One frame, maybe then the close; locked, as busy replies and an answer share the
        socket (nothing slips in between a refusal and its close)."""
        async with self._send_lock:
            await self.websocket.send_text(json.dumps(frame, ensure_ascii=False))
            if close is not None:
                await self.websocket.close(close, CLOSE_REASONS.get(close))

    async def refuse(self, refused: FrameRefused) -> None:
        count_status(SURFACE, FRAME_STATUS.get(refused.code, 400))
        await self.send(refused.frame(), refused.close)

    async def authenticate(self) -> bool:
        """From the handshake headers, else from a first `auth` frame; False once closed."""
        reason = "missing"  # no auth frame in time, or a first frame that is not one
        try:
            principal = await self.client_auth.verify(await self._credential())
            if (problem := missing_scope(principal.scopes, INVOKE_SCOPES)) is None:
                self.principal = principal
                return True
            reason = "scope"
            refused = FrameRefused("forbidden", problem, FORBIDDEN)
        except AuthenticationFailed as failure:
            reason = failure.reason
            refused = FrameRefused("unauthorized", str(failure), UNAUTHENTICATED)
        except FrameRefused as frame_refused:
            refused = frame_refused
        except TimeoutError:
            refused = FrameRefused(
                "unauthorized",
                f"no credential: send an auth frame within {AUTH_FRAME_SECONDS:g} seconds",
                UNAUTHENTICATED,
            )
        if refused.close in (UNAUTHENTICATED, FORBIDDEN):
            record_auth_failure(
                log, "client authentication failed", self.websocket, reason, str(refused)
            )
        await self.refuse(refused)
        return False

    async def serve_as_one_stream(self) -> None:
        """The socket is one stream of its key and tenant from authentication to close.
        Refused: an error frame, then close 4429."""
        assert self.principal is not None
        async with contextlib.AsyncExitStack() as held:
            try:
                await held.enter_async_context(stream_slot(self.limits, self.principal))
            except RateLimited as limited:
                failure = describe(limited)
                count_failure(SURFACE, failure)
                await self.send(failure_frame(failure), LIMITED)
                return
            await self.serve()

    async def _credential(self) -> Mapping[str, str]:
        if has_header_credential(self.websocket.headers):
            return self.websocket.headers
        message = await asyncio.wait_for(self.websocket.receive(), AUTH_FRAME_SECONDS)
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        try:
            frame = read_frame(message, self.max_frame_bytes)
        except FrameRefused as bad:
            if bad.close is not None:
                raise
            frame = {}  # not even a frame: refused below like any other first frame
        key = frame.get("api_key")
        if frame.get("type") != "auth" or not isinstance(key, str):
            raise FrameRefused(
                "unauthorized",
                "authenticate first: send Authorization: Bearer or X-API-Key on the handshake, "
                'or {"type": "auth", "api_key": "..."} as the first frame',
                UNAUTHENTICATED,
            )
        return {"x-api-key": key}

    async def serve(self) -> None:
        """Read, answer, repeat, until the client leaves, a frame closes the socket, or no request
        comes within the idle timeout (the clock restarts when an answer ends)."""
        assert self.principal is not None
        idle = self.idle_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + idle
        message: Message | None = None  # a request that arrived as the last answer ended
        while True:
            if message is None:
                try:
                    message = await asyncio.wait_for(
                        self.websocket.receive(), deadline - loop.time()
                    )
                except TimeoutError:
                    route = self.websocket.url.path
                    log.info("ws chat socket closed: idle", extra={"route": route})
                    async with self._send_lock:
                        await self.websocket.close(IDLE_TIMEOUT, CLOSE_REASONS[IDLE_TIMEOUT])
                    return
            if message["type"] == "websocket.disconnect":
                return
            received, message = message, None
            self.frames += 1
            request_id_var.set(f"{self.request_id}.{self.frames}")  # the middleware resets it
            try:
                body = parse_request(read_frame(received, self.max_frame_bytes))
                call = build_call(body, self.principal, self.templates, self.session_ids, SURFACE)
            except FrameRefused as refused:
                await self.refuse(refused)
                if refused.close is not None:
                    return
                continue
            except HTTPException as error:  # the template could not be rendered
                await self.refuse(FrameRefused("invalid_request", str(error.detail)))
                continue
            with counted(SURFACE):  # one request: the pipeline notes how it went
                message = await self.answer(call, whole=call.json_schema is not None)
            deadline = loop.time() + idle

    async def answer(self, call: ChatCall, *, whole: bool) -> Message | None:
        """Run one call while watching the socket. A disconnect message when the socket is done
        (the client gone, or closed for an oversize frame); else the message that arrived once
        the answer's last frame was out (the next request), or None. The call is cancelled
        whenever it is left unfinished."""
        stream: TextStream[ChatOutcome] = TextStream(
            lambda put: self.pipeline.run(call, None if whole else put)
        )
        self._answering = True
        pump = asyncio.create_task(self._pump(call, stream, whole))
        watch = asyncio.create_task(self._watch())
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                arrived = watch.result()
                if arrived["type"] != "websocket.disconnect":
                    await pump  # the last frame is on its way: let it finish
                return arrived
            pump.result()  # raises if a send failed: the client is gone
            watch.cancel()  # receive() may be cancelled without losing a message
            await asyncio.gather(watch, return_exceptions=True)
            if watch.cancelled():
                return None
            return watch.result()  # it took a message in the same moment: the next request
        except WebSocketDisconnect:
            return GONE
        finally:
            pump.cancel()
            watch.cancel()
            await stream.close()
            await asyncio.gather(pump, watch, return_exceptions=True)

    async def _pump(self, call: ChatCall, stream: TextStream[ChatOutcome], whole: bool) -> None:
        try:
            async for text in stream.texts():
                await self.send({"type": "content", "delta": text})
            outcome = await stream.result()
        except WebSocketDisconnect:
            raise
        except Exception as error:
            failure = describe(error)
            note_failure(failure)
            if failure is None:
                log.exception("ws chat call failed", extra={"session_id": call.session_id})
            await self._last(failure_frame(failure))
            return
        if whole and outcome.content:
            await self.send({"type": "content", "delta": outcome.content})
        await self._last(complete_frame(call, outcome))

    async def _last(self, frame: dict[str, Any]) -> None:
        """The answer's last frame. The answer stops counting as running before it is sent,
        so a request the client sends on reading it is never refused as busy."""
        self._answering = False
        await self.send(frame)

    async def _watch(self) -> Message:
        """Frames that arrive mid-answer are refused as `busy` (close 1009 if oversize). Returns
        a disconnect once the socket is done, or the first message that arrives after the
        answer's last frame went out (the next request, for `serve`)."""
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect" or not self._answering:
                return message
            try:
                read_frame(message, self.max_frame_bytes)
            except FrameRefused as bad:
                if bad.close is not None:
                    await self.refuse(bad)
                    return GONE
            await self.refuse(FrameRefused("busy", "an answer is still running on this socket"))
