"""CXone context: the OAuth token cache, discovery, pagination and 401 recovery, over real HTTP."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest

from app.core.deadline import Deadline
from app.core.errors import UpstreamRejected, UpstreamUnavailable
from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import Fault
from app.simulator.server import LoopbackServer
from app.upstream.cxone_context import CXoneContextClient
from app.upstream.oauth import TokenCache, TokenRequest
from tests.helpers import post_turn, trigger


def _tokens(
    http: httpx.AsyncClient, server: LoopbackServer, state: CXoneSimulatorState, **kw: Any
) -> TokenCache:
    form = {
        "grant_type": "password",
        "username": state.access_key_id,
        "password": state.access_key_secret,
    }
    request = TokenRequest(f"{server.url}/auth/token", form, (state.client_id, state.client_secret))
    return TokenCache(http, request, **kw)


def _client(
    http: httpx.AsyncClient, server: LoopbackServer, tokens: TokenCache, **kw: Any
) -> CXoneContextClient:
    options: dict[str, Any] = {
        "api_base_url": server.url,
        "discovery_url": f"{server.url}/.well-known/cxone-configuration",
        "tenant_id": None,
        "timeout_seconds": 2.0,
    }
    options.update(kw)
    return CXoneContextClient(http, tokens, **options)


async def test_fifty_concurrent_turns_share_one_token_request(
    client: httpx.AsyncClient, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.token_delay = 0.2  # keep the first refresh in flight while the others arrive
    responses = await asyncio.gather(
        *(post_turn(client, trigger(conversationId=f"c-{i}")) for i in range(50))
    )
    assert all(r.json()["context"] == "available" for r in responses)
    assert cxone_state.token_requests == 1
    assert len(cxone_state.message_faults.requests) == 50


async def test_password_grant_sends_access_key_and_basic_client_credentials(
    cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    async with httpx.AsyncClient() as http:
        token = await _tokens(http, cxone_server, cxone_state).get()
    sent = cxone_state.token_faults.requests[0]
    assert sent["form"] == {
        "grant_type": "password",
        "username": cxone_state.access_key_id,
        "password": cxone_state.access_key_secret,
    }
    basic = base64.b64encode(f"{cxone_state.client_id}:{cxone_state.client_secret}".encode())
    assert sent["headers"]["authorization"] == f"Basic {basic.decode()}"
    assert token.count(".") == 2


async def test_client_credentials_grant_through_the_app(
    app_client: Any, cxone_state: CXoneSimulatorState
) -> None:
    async with app_client(
        cxone_grant_type="client_credentials",
        cxone_access_key_id=None,
        cxone_access_key_secret=None,
    ) as client:
        body = (await post_turn(client, trigger())).json()
    assert body["context"] == "available"
    assert cxone_state.token_faults.requests[0]["form"] == {"grant_type": "client_credentials"}


async def test_wrong_client_secret_means_context_unavailable_not_an_error(
    app_client: Any,
) -> None:
    from pydantic import SecretStr

    async with app_client(cxone_client_secret=SecretStr("wrong")) as client:
        response = await post_turn(client, trigger())
    assert response.status_code == 200
    assert response.json()["status"] == "success"
    assert response.json()["context"] == "unavailable"


async def test_token_endpoint_down_means_context_unavailable(
    client: httpx.AsyncClient, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.token_faults.push(Fault(status=503))
    body = (await post_turn(client, trigger())).json()
    assert body["status"] == "success"
    assert body["context"] == "unavailable"


async def test_token_is_cached_until_shortly_before_expiry(
    cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    async with httpx.AsyncClient() as http:
        long_lived = _tokens(http, cxone_server, cxone_state, margin_seconds=60)
        first = await long_lived.get()
        assert await long_lived.get() == first
        assert cxone_state.token_requests == 1

        cxone_state.expires_in = 30  # shorter than the refresh margin: never considered fresh
        short_lived = _tokens(http, cxone_server, cxone_state, margin_seconds=60)
        await short_lived.get()
        await short_lived.get()
        assert cxone_state.token_requests == 3


async def test_401_drops_the_token_refreshes_once_and_retries(
    cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.add_conversation("c1", [("inbound", "hello"), ("outbound", "hi there")])
    async with httpx.AsyncClient() as http:
        tokens = _tokens(http, cxone_server, cxone_state)
        cxone = _client(http, cxone_server, tokens)
        await cxone.fetch_history("c1", 10, Deadline.after(5))
        cxone_state.revoke_all()  # the cached token is now refused with 401
        history = await cxone.fetch_history("c1", 10, Deadline.after(5))
    assert [t.text for t in history] == ["hello", "hi there"]
    assert cxone_state.token_requests == 2


async def test_a_second_401_is_not_retried_forever(
    cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.message_faults.push(Fault(status=401), Fault(status=401), Fault(status=401))
    async with httpx.AsyncClient() as http:
        cxone = _client(http, cxone_server, _tokens(http, cxone_server, cxone_state))
        with pytest.raises(UpstreamRejected):
            await cxone.fetch_history("c1", 10, Deadline.after(5))
    assert len(cxone_state.message_faults.requests) == 2
    assert cxone_state.token_requests == 2


async def test_history_follows_scroll_token_pages_and_stops_at_the_turn_bound(
    cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    turns = [("inbound" if i % 2 == 0 else "outbound", f"message {i}") for i in range(120)]
    cxone_state.add_conversation("long", turns)
    async with httpx.AsyncClient() as http:
        cxone = _client(http, cxone_server, _tokens(http, cxone_server, cxone_state))
        history = await cxone.fetch_history("long", 70, Deadline.after(5))
    assert [t.text for t in history] == [f"message {i}" for i in range(50, 120)]  # newest 70
    assert history[-1].role == "agent" and history[-2].role == "customer"
    pages = cxone_state.message_faults.requests
    assert len(pages) == 2  # 50 + 20, following the scrollToken of the first page
    assert pages[0]["params"]["sortingType"] == "desc"
    assert pages[1]["params"]["scrollToken"] == "50"
    assert pages[1]["params"]["limit"] == "20"


async def test_short_history_is_read_in_one_page(
    cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.add_conversation("short", [("inbound", "only one")])
    async with httpx.AsyncClient() as http:
        cxone = _client(http, cxone_server, _tokens(http, cxone_server, cxone_state))
        history = await cxone.fetch_history("short", 10, Deadline.after(5))
    assert [(t.role, t.text) for t in history] == [("customer", "only one")]
    assert len(cxone_state.message_faults.requests) == 1


async def test_non_text_messages_are_skipped(
    cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.add_conversation("rich", [("inbound", "text one")])
    cxone_state.conversations["rich"].append(
        {"id": "x", "direction": "inbound", "messageContent": {"type": "FILE", "payload": {}}}
    )
    async with httpx.AsyncClient() as http:
        cxone = _client(http, cxone_server, _tokens(http, cxone_server, cxone_state))
        history = await cxone.fetch_history("rich", 10, Deadline.after(5))
    assert [t.text for t in history] == ["text one"]


async def test_api_host_is_discovered_from_the_token_tenant(
    cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.add_conversation("c1", [("inbound", "hello")])
    async with httpx.AsyncClient() as http:
        cxone = _client(
            http, cxone_server, _tokens(http, cxone_server, cxone_state), api_base_url=None
        )
        assert [t.text for t in await cxone.fetch_history("c1", 5, Deadline.after(5))] == ["hello"]
        await cxone.fetch_history("c1", 5, Deadline.after(5))
    assert len(cxone_state.message_faults.requests) == 2
    assert cxone_state.discovery_requests == 1  # discovered once, then cached


async def test_discovery_with_unknown_tenant_fails_cleanly(
    cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    async with httpx.AsyncClient() as http:
        cxone = _client(
            http,
            cxone_server,
            _tokens(http, cxone_server, cxone_state),
            api_base_url=None,
            tenant_id="not-a-tenant",
        )
        with pytest.raises(UpstreamRejected):
            await cxone.fetch_history("c1", 5, Deadline.after(5))


async def test_cxone_5xx_is_an_upstream_error(
    cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.message_faults.push(Fault(status=500))
    async with httpx.AsyncClient() as http:
        cxone = _client(http, cxone_server, _tokens(http, cxone_server, cxone_state))
        with pytest.raises(UpstreamUnavailable):
            await cxone.fetch_history("c1", 5, Deadline.after(5))
