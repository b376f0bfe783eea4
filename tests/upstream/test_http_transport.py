"""The shared outbound client on its aiohttp transport raises what httpx's own transport does, so
the provider wires type failures the same way (a refused connection is not a timeout)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest

from app.bootstrap.options import http_client_options
from app.upstream.http_client import build_http_client


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_refused_connection_is_a_connect_error_not_a_timeout(
    make_settings: Any, transport: str
) -> None:
    client = build_http_client(http_client_options(make_settings(http_transport=transport)))
    try:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{_dead_port()}/v1/models")
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
