"""Chat completions streamed over a WebSocket, for gateways that offer that transport.

The protocol (defined by cx-relay's simulator and docs; the payloads are OpenAI's):

1. Connect to the provider's WebSocket URL, by default the base URL with `http` → `ws` and
   `https` → `wss` and the path `/v1/chat/completions/ws`. The handshake carries the same
   credentials as the HTTP wire: `Authorization: Bearer <key>`, or the provider's own
   `auth_header: <key>`. A handshake refused with an HTTP status is typed like that status on
   the HTTP wire (401/403 → UpstreamRejected, 429 → UpstreamRateLimited with Retry-After,
   5xx → UpstreamUnavailable).
2. Send ONE text frame: the chat completion request JSON, with `"stream": true` and
   `"stream_options": {"include_usage": true}`.
3. Receive text frames, each one `chat.completion.chunk` JSON exactly like an SSE `data:`
   payload (content in `choices[0].delta.content`, `finish_reason`, the usage in a last chunk
   with no choices), then a text frame `[DONE]`. The client closes the connection after it.
4. An error frame `{"error": {"message": ..., "code": 429|500|401|..., "retry_after": 7}}`
   (`code` is the HTTP-equivalent status, or one of OpenAI's string codes; `retry_after` in
   seconds is optional) raises the typed error of that status. The connection closing before
   `[DONE]` (and before a finish_reason) is a cut stream: UpstreamUnavailable("stream cut").
5. Opening the connection and every receive are bounded by the attempt's timeout
   (UpstreamTimeout).

One connection per attempt: no multiplexing, so closing it releases everything.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from app.core.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from app.llm.openai_provider import (
    OpenAICompatibleProvider,
    StructuredOutputs,
    chunks_until_done,
)
from app.llm.streaming import collect_stream, stream_cut
from app.llm.types import ChatRequest, ChatResult, StreamChunk
from app.observability.tracing import with_trace_headers

WS_PATH = "/chat/completions/ws"

# How long closing waits for the server's close frame: the answer is complete by then.
CLOSE_TIMEOUT = 1.0


class _NoDebugLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets logs every handshake header (`Authorization: Bearer <key or token>`) and every
    frame (the prompt) at DEBUG; with this logger it never does, whatever the level."""

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs


_WS_LOG = _NoDebugLogger(logging.getLogger("websockets.client"))


async def _text_frames(connection: ClientConnection, timeout: float) -> AsyncIterator[str]:
    """The frames received, as text, each within `timeout`, until the connection closes."""
    try:
        while True:
            frame = await asyncio.wait_for(connection.recv(), timeout)
            yield frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
    except ConnectionClosed:
        return


def websocket_url(base_url: str) -> str:
    """`https://host`, `https://host/v1` and `https://host/v1/chat/completions` all mean
    `wss://host/v1/chat/completions/ws` (`http` → `ws`; a `ws(s)://` URL keeps its scheme)."""
    base = base_url.rstrip("/")
    scheme, separator, rest = base.partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme.lower())
    base = f"{scheme}{separator}{rest}"
    if base.endswith(WS_PATH):
        return base
    if base.endswith("/chat/completions"):
        return base + "/ws"
    return base + (WS_PATH if base.endswith("/v1") else "/v1" + WS_PATH)


class OpenAIWebSocketProvider(OpenAICompatibleProvider):
    """A provider streaming OpenAI chat completion chunks over a WebSocket (see the module
    docstring for the protocol). It also answers `complete` (the stream collected) and `probe`
    (does the handshake succeed with this key), so it is a full ProviderClient; the request body
    and embeddings (which have no WebSocket form) are the HTTP wire's, to its base URL."""

    def __init__(
        self,
        name: str,
        base_url: str,
        auth_header: str | None = None,
        ws_url: str | None = None,
        structured_outputs: StructuredOutputs = True,
    ) -> None:
        super().__init__(name, base_url, auth_header, structured_outputs)
        self.url = ws_url or websocket_url(base_url)

    async def complete(
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float, api_key: str | None
    ) -> ChatResult:
        return await collect_stream(
            self.stream(http, request, timeout, api_key),
            provider=self.name,
            model=request.model,
            first_token_timeout=timeout,
            total_timeout=timeout,
        )

    async def stream(
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float, api_key: str | None
    ) -> AsyncIterator[StreamChunk]:
        """One streamed attempt; `http` is unused (the protocol's signature). `timeout` bounds
        the handshake and each receive, not the whole answer."""
        try:
            async with self._connect(api_key, timeout) as connection:
                body = self.payload(request, stream=True)
                await asyncio.wait_for(connection.send(json.dumps(body)), timeout)
                frames = _text_frames(connection, timeout)
                async for chunk in chunks_until_done(
                    self.name, frames, api_key, "the connection closed"
                ):
                    yield chunk
        except InvalidStatus as exc:
            raise self._refused(exc, api_key) from exc
        except ConnectionClosed as exc:  # while sending the request
            raise stream_cut(self.name, f"the connection closed before [DONE] ({exc})") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"{self.name} did not answer within {timeout:.2f}s", upstream=self.name
            ) from exc
        except (OSError, WebSocketException) as exc:
            raise UpstreamUnavailable(
                f"{self.name} unreachable: {type(exc).__name__}", upstream=self.name
            ) from exc

    async def probe(self, http: httpx.AsyncClient, api_key: str | None, timeout: float) -> bool:
        """Does this key open a connection? No request is sent, so no tokens are spent."""
        try:
            async with self._connect(api_key, timeout):
                return True
        except (OSError, TimeoutError, WebSocketException):
            return False

    def _connect(self, api_key: str | None, timeout: float) -> connect:
        return connect(
            self.url,
            additional_headers=with_trace_headers(self.headers(api_key)),
            open_timeout=timeout,
            close_timeout=CLOSE_TIMEOUT,
            ping_interval=None,  # one short exchange: the receive timeout is the liveness check
            logger=_WS_LOG,
        )

    def _refused(self, exc: InvalidStatus, api_key: str | None) -> UpstreamError:
        """A handshake answered with an HTTP status: typed exactly as on the HTTP wire."""
        refusal = exc.response
        response = httpx.Response(
            refusal.status_code,
            headers=list(refusal.headers.raw_items()),
            content=bytes(refusal.body or b""),
        )
        try:
            self.raise_for_error(response, api_key)
        except UpstreamError as typed:
            return typed
        return UpstreamUnavailable(  # a 1xx/2xx/3xx that is not 101: no WebSocket here
            f"{self.name} refused the WebSocket upgrade ({refusal.status_code})",
            upstream=self.name,
            status=refusal.status_code,
        )
