"""The one factory for the shared outbound HTTP client.

Every outbound call (LLM providers, CXone, token endpoints) goes through the client built here,
once per process in the lifespan, so pool limits and timeouts are set in one place and the
transport can be swapped after measuring without touching any caller.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions
from multidict import CIMultiDict


@dataclass(frozen=True)
class HttpClientOptions:
    timeout_seconds: float  # a whole outbound call's default (each caller may set its own)
    connect_timeout_seconds: float
    max_connections: int
    max_keepalive_connections: int
    transport: Literal["aiohttp", "httpx"] = "aiohttp"


class _Transport(AiohttpTransport):
    """httpx-aiohttp maps every aiohttp connection error to httpx.ConnectTimeout; a refused
    connection or a server that hung up is not a timeout (it is answered 502, not 504, and
    retried as such), so those are mapped to what httpx's own transport raises."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectTimeout as exc:
            raise _not_a_timeout(exc, request) from exc.__cause__

    async def send_whole(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: float,
    ) -> httpx.Response:
        """Send and read the whole answer on the session httpx's requests use, raising what
        `handle_async_request` raises."""
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        try:
            with map_aiohttp_exceptions():
                async with self.client.request(
                    method,
                    url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    auto_decompress=False,  # the httpx.Response decodes, as httpx's path does
                    compress=False,
                    timeout=aiohttp.ClientTimeout(
                        sock_connect=timeout, sock_read=timeout, connect=timeout
                    ),
                ) as answer:
                    content = await answer.read()
        except httpx.ConnectTimeout as exc:
            raise _not_a_timeout(exc, None) from exc.__cause__
        return httpx.Response(answer.status, headers=answer.raw_headers, content=content)

    async def open_stream(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> httpx.Response:
        """Send, and answer with the response whose body is still to be read (as httpx's
        `send(..., stream=True)` does): the caller reads it and must `aclose()` it."""
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        try:
            with map_aiohttp_exceptions():
                answer = await self.client.request(
                    method,
                    url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    auto_decompress=False,
                    compress=False,
                    timeout=aiohttp.ClientTimeout(
                        sock_connect=timeout, sock_read=timeout, connect=timeout
                    ),
                ).__aenter__()
        except httpx.ConnectTimeout as exc:
            raise _not_a_timeout(exc, None) from exc.__cause__
        return httpx.Response(
            answer.status, headers=answer.raw_headers, stream=AiohttpResponseStream(answer)
        )


def _not_a_timeout(exc: httpx.ConnectTimeout, request: httpx.Request | None) -> httpx.HTTPError:
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ServerTimeoutError) or not isinstance(
        cause, aiohttp.ClientConnectionError
    ):
        return exc
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc), request=request)
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(str(exc), request=request)
    return httpx.ReadError(str(exc), request=request)


class UpstreamClient(httpx.AsyncClient):
    """The shared client: httpx's interface for every caller, and for the calls of every
    request (the provider's answer, whole or streamed, and CXone's history) a request sent
    straight through aiohttp. httpx's request and response handling around aiohttp measured
    more than half of such a call's CPU (228 vs 103 µs, docs/PERFORMANCE.md); the answer is
    still an httpx.Response, so callers and their error handling do not change. With
    HTTP_TRANSPORT=httpx it is plain httpx."""

    def __init__(self, *, direct: _Transport | None, **options: Any) -> None:
        super().__init__(transport=direct, **options)
        self._direct = direct

    async def post_json(
        self, url: str, body: Any, headers: Mapping[str, str], timeout: float
    ) -> httpx.Response:
        """`self.post(url, json=body, headers=headers, timeout=timeout)`, the same request."""
        if self._direct is None:
            return await self.post(url, json=body, headers=headers, timeout=timeout)
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        sent = self._with_defaults(headers, {"Content-Type": "application/json"})
        return await self._direct.send_whole("POST", url, content.encode(), sent, timeout)

    @asynccontextmanager
    async def stream_json(
        self, url: str, body: Any, headers: Mapping[str, str], timeout: float
    ) -> AsyncIterator[httpx.Response]:
        """`self.stream("POST", url, json=body, headers=headers, timeout=timeout)`, the same
        request; the response is closed (its connection given back) however the block ends."""
        if self._direct is None:
            async with self.stream(
                "POST", url, json=body, headers=headers, timeout=timeout
            ) as response:
                yield response
            return
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        sent = self._with_defaults(headers, {"Content-Type": "application/json"})
        response = await self._direct.open_stream("POST", url, content.encode(), sent, timeout)
        try:
            yield response
        finally:
            await response.aclose()

    async def get_whole(
        self,
        url: str,
        params: Mapping[str, str | int],
        headers: Mapping[str, str],
        timeout: float,
    ) -> httpx.Response:
        """`self.get(url, params=params, headers=headers, timeout=timeout)`, the same request."""
        if self._direct is None:
            return await self.get(url, params=params, headers=headers, timeout=timeout)
        full = str(httpx.URL(url, params=params))  # encoded as httpx encodes it
        return await self._direct.send_whole(
            "GET", full, None, self._with_defaults(headers), timeout
        )

    def _with_defaults(
        self, headers: Mapping[str, str], content: Mapping[str, str] | None = None
    ) -> CIMultiDict[str]:
        sent = CIMultiDict(self.headers.items())  # a caller's header replaces a default
        sent.update(content or {})
        sent.update(headers)
        return sent


def build_http_client(options: HttpClientOptions) -> UpstreamClient:
    timeout = httpx.Timeout(options.timeout_seconds, connect=options.connect_timeout_seconds)
    limits = httpx.Limits(
        max_connections=options.max_connections,
        max_keepalive_connections=options.max_keepalive_connections,
        keepalive_expiry=30.0,
    )
    # aiohttp under httpx's interface: measured about 30% less CPU per upstream call than
    # httpx's own transport (docs/PERFORMANCE.md); HTTP_TRANSPORT=httpx switches back
    transport = _Transport(limits=limits) if options.transport == "aiohttp" else None
    return UpstreamClient(direct=transport, timeout=timeout, limits=limits, follow_redirects=False)
