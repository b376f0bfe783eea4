"""What the OpenAI-compatible and the Anthropic HTTP wires share: a POST timed and mapped to typed
errors, a streamed POST read as Server-Sent Events, and a key probe, written once.

A wire says only what differs: its headers and body, how it reads a whole answer, how it types
an error status, and how it reads its events into chunks (up to its own end marker).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import httpx
from httpx_sse import SSEError

from app.core.errors import UpstreamProtocolError
from app.llm.streaming import SSEEvent, iter_sse, stream_transport_error, whole_as_chunk
from app.llm.types import ChatRequest, ChatResult, StreamChunk
from app.llm.wire import post_json, probe_key, stream_json


class HTTPProvider(ABC):
    """A provider answering chat requests over HTTP, whole (JSON) or streamed (SSE)."""

    name: str
    url: str  # where chat requests are POSTed
    models_url: str  # what `probe` GETs (no tokens spent)

    @abstractmethod
    def headers(self, api_key: str | None) -> dict[str, str]:
        """The wire's headers, with the key where the wire (or a gateway) wants it."""

    @abstractmethod
    def payload(self, request: ChatRequest, *, stream: bool = False) -> dict[str, Any]:
        """The request body; `stream` asks for an SSE answer."""

    @abstractmethod
    def raise_for_error(self, response: httpx.Response, api_key: str | None) -> None:
        """Nothing for a success; else the typed error of `wire.raise_for_status`."""

    @abstractmethod
    def result(
        self, response: httpx.Response, request: ChatRequest, latency_ms: float
    ) -> ChatResult:
        """A 2xx whole answer; UpstreamProtocolError when it is not one of the wire's answers."""

    @abstractmethod
    def read_events(
        self, events: AsyncIterator[SSEEvent], api_key: str | None
    ) -> AsyncIterator[StreamChunk]:
        """The chunks of a streamed answer, up to the wire's end marker; events that run out
        before it (and before a stop reason) are a cut stream (`streaming.stream_cut`)."""

    async def post(
        self,
        http: httpx.AsyncClient,
        url: str,
        body: dict[str, Any],
        timeout: float,
        api_key: str | None,
    ) -> tuple[httpx.Response, float]:
        """One POST: its successful response and latency (ms), or the typed error."""
        started = time.perf_counter()
        response = await post_json(http, self.name, url, body, self.headers(api_key), timeout)
        latency_ms = (time.perf_counter() - started) * 1000
        self.raise_for_error(response, api_key)
        return response, latency_ms

    async def complete(
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float, api_key: str | None
    ) -> ChatResult:
        response, latency_ms = await self.post(
            http, self.url, self.payload(request), timeout, api_key
        )
        return self.result(response, request, latency_ms)

    async def stream(
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float, api_key: str | None
    ) -> AsyncIterator[StreamChunk]:
        """One streamed attempt (see `StreamingProviderClient`); `timeout` bounds the connect
        and each read, not the whole answer."""
        headers = {**self.headers(api_key), "Accept": "text/event-stream"}
        body = self.payload(request, stream=True)
        try:
            async with stream_json(http, self.url, body, headers, timeout) as response:
                if response.status_code >= 400:
                    await response.aread()  # the error body names the cause
                    self.raise_for_error(response, api_key)
                if _is_json(response):
                    # A gateway that ignores `stream: true` answers one whole completion.
                    await response.aread()
                    yield whole_as_chunk(self.result(response, request, 0.0), "stop")
                    return
                async for chunk in self.read_events(iter_sse(response), api_key):
                    yield chunk
        except SSEError as exc:  # neither JSON nor an event stream
            raise UpstreamProtocolError(
                f"{self.name} answered a streamed request with {exc}", upstream=self.name
            ) from exc
        except httpx.HTTPError as exc:
            raise stream_transport_error(self.name, exc, timeout) from exc

    async def probe(self, http: httpx.AsyncClient, api_key: str | None, timeout: float) -> bool:
        return await probe_key(http, self.models_url, self.headers(api_key), timeout)


def _is_json(response: httpx.Response) -> bool:
    content_type = str(response.headers.get("content-type", ""))
    return content_type.lower().startswith("application/json")
