"""The shared outbound client on its aiohttp transport raises what httpx's own transport does, so
the provider wires type failures the same way (a refused connection is not a timeout)."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import httpx
import pytest

from app.bootstrap.options import http_client_options
from app.upstream.http_client import build_http_client
from tests.helpers import free_port


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_refused_connection_is_a_connect_error_not_a_timeout(
    make_settings: Any, transport: str
) -> None:
    client = build_http_client(http_client_options(make_settings(http_transport=transport)))
    try:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/v1/models")
    finally:
        await client.aclose()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_server_that_hangs_up_is_a_transport_error_not_a_timeout(
    make_settings: Any, transport: str
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = build_http_client(http_client_options(make_settings(http_transport=transport)))
    try:
        with pytest.raises(httpx.TransportError) as caught:
            await client.get(f"http://127.0.0.1:{port}/v1/models")
        assert not isinstance(caught.value, httpx.TimeoutException)
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_answers_come_back_through_the_aiohttp_transport(
    llm_server: Any, make_settings: Any
) -> None:
    client = build_http_client(http_client_options(make_settings(http_transport="aiohttp")))
    try:
        response = await client.get(
            f"{llm_server.url}/v1/models", headers={"Authorization": "Bearer sk-test-provider-key"}
        )
    finally:
        await client.aclose()
    assert response.status_code == 200
    assert response.json()["data"]


# --- post_json: the provider call's path (straight through aiohttp on the aiohttp transport) ------


class RecordingServer:
    """Answers every request with `answer` (raw HTTP) and keeps what it was sent."""

    def __init__(self, answer: bytes, delay: float = 0.0, then_hold: float = 0.0) -> None:
        """`then_hold`: after the answer, keep the connection open this long (an unfinished
        stream, when the answer is shorter than its Content-Length)."""
        self.answer, self.delay, self.then_hold = answer, delay, then_hold
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.targets: list[str] = []  # the request line's path and query

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        self.targets.append(lines[0].split(" ")[1])
        head = lines[1:]
        headers: dict[str, str] = {}
        for line in filter(None, head):
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} sent twice"
            headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((headers, body))
        await asyncio.sleep(self.delay)
        writer.write(self.answer)
        await writer.drain()
        await asyncio.sleep(self.then_hold)
        writer.close()


def _answer(body: bytes, *extra: str) -> bytes:
    head = [
        "HTTP/1.1 200 OK",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",  # the server hangs up after each answer
    ]
    return ("\r\n".join([*head, *extra]) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_post_json_sends_what_httpx_sends_and_reads_the_answer(
    make_settings: Any, transport: str
) -> None:
    """The same body bytes and headers either way (a caller's header replaces a default of the
    same name, whatever its case), and a gzip answer decoded."""
    server = RecordingServer(_answer(gzip.compress(b'{"ok":"\xc3\xa9"}'), "Content-Encoding: gzip"))
    client = build_http_client(http_client_options(make_settings(http_transport=transport)))
    try:
        async with server as url:
            response = await client.post_json(
                f"{url}/v1/chat/completions",
                {"messages": [{"content": "héllo"}]},
                {"Authorization": "Bearer sk-1", "accept": "application/json"},
                5.0,
            )
    finally:
        await client.aclose()
    assert response.status_code == 200 and response.json() == {"ok": "é"}
    headers, body = server.requests[0]
    assert body == '{"messages":[{"content":"héllo"}]}'.encode()
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == "Bearer sk-1"
    assert headers["accept"] == "application/json"
    assert headers["user-agent"].startswith("python-httpx/")


async def test_post_json_on_aiohttp_fails_as_httpx_does(make_settings: Any) -> None:
    client = build_http_client(http_client_options(make_settings(http_transport="aiohttp")))
    try:
        with pytest.raises(httpx.ConnectError):
            await client.post_json(f"http://127.0.0.1:{free_port()}/x", {}, {}, 2.0)
        async with RecordingServer(b"") as url:  # reads the request, hangs up unanswered
            with pytest.raises(httpx.TransportError) as hung_up:
                await client.post_json(f"{url}/x", {}, {}, 2.0)
        assert not isinstance(hung_up.value, httpx.TimeoutException)
        async with RecordingServer(_answer(b"{}"), delay=1.0) as url:
            with pytest.raises(httpx.TimeoutException):
                await client.post_json(f"{url}/x", {}, {}, 0.2)
    finally:
        await client.aclose()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_get_whole_sends_what_httpx_sends(make_settings: Any, transport: str) -> None:
    server = RecordingServer(_answer(b'{"messages":[]}'))
    client = build_http_client(http_client_options(make_settings(http_transport=transport)))
    try:
        async with server as url:
            response = await client.get_whole(
                f"{url}/incontact/api/v30/contacts/1/messages",
                {"sorting": "createdAt desc", "limit": 20, "who": "ä&b"},
                {"Accept": "application/json", "Authorization": "Bearer t"},
                5.0,
            )
    finally:
        await client.aclose()
    assert response.json() == {"messages": []}
    headers, body = server.requests[0]
    assert server.targets == [
        "/incontact/api/v30/contacts/1/messages?sorting=createdAt+desc&limit=20&who=%C3%A4%26b"
    ]
    assert body == b"" and headers["accept"] == "application/json"
    assert headers["authorization"] == "Bearer t"
    assert headers["user-agent"].startswith("python-httpx/")


SSE = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n'


def _sse_answer() -> bytes:
    head = [
        "HTTP/1.1 200 OK",
        "Content-Type: text/event-stream",
        f"Content-Length: {len(SSE)}",
        "Connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + SSE


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_stream_json_sends_what_httpx_sends_and_streams_the_answer(
    make_settings: Any, transport: str
) -> None:
    server = RecordingServer(_sse_answer())
    client = build_http_client(http_client_options(make_settings(http_transport=transport)))
    try:
        async with (
            server as url,
            client.stream_json(
                f"{url}/v1/chat/completions",
                {"stream": True},
                {"Authorization": "Bearer sk-1", "Accept": "text/event-stream"},
                5.0,
            ) as response,
        ):
            assert response.status_code == 200
            received = b"".join([chunk async for chunk in response.aiter_bytes()])
    finally:
        await client.aclose()
    assert received == SSE
    headers, body = server.requests[0]
    assert body == b'{"stream":true}' and headers["content-type"] == "application/json"
    assert headers["accept"] == "text/event-stream"
    assert headers["user-agent"].startswith("python-httpx/")


async def test_a_stream_left_early_gives_its_connection_back(make_settings: Any) -> None:
    """One connection in the pool: streams abandoned after their first bytes, or failing as
    they open, must each give it back, or the next request waits for ever."""
    settings = make_settings(http_transport="aiohttp", http_max_connections=1)
    client = build_http_client(http_client_options(settings))
    unfinished = _sse_answer() + b"data: "  # half an event; the rest never comes
    unfinished = unfinished.replace(f"Content-Length: {len(SSE)}".encode(), b"Content-Length: 999")
    try:
        async with RecordingServer(unfinished, then_hold=30) as url:
            for _ in range(3):
                async with client.stream_json(f"{url}/x", {}, {}, 2.0) as response:
                    async for _chunk in response.aiter_bytes():
                        break
            with pytest.raises(RuntimeError):
                async with client.stream_json(f"{url}/x", {}, {}, 2.0):
                    raise RuntimeError("the caller failed mid-stream")
        async with RecordingServer(_answer(b"{}")) as url:
            response = await asyncio.wait_for(client.post_json(f"{url}/x", {}, {}, 2.0), 3.0)
            assert response.status_code == 200
    finally:
        await client.aclose()
