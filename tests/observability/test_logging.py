"""Structured logs: every line is JSON with the core fields, a request's lines share its
request id, and no secret, credential or unredacted customer data is ever written.

The leak test captures everything every logger emits (root at DEBUG, the project's JsonFormatter)
while a script drives each surface with real credentials and a customer message carrying a card
number and an email address, then searches the captured text for all of them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from app.auth.signatures import sign_hmac
from app.core.settings import Settings
from app.http.request_ids import REQUEST_ID_MAX_LENGTH, accept_request_id
from app.main import create_app
from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import Fault, FaultPlan
from tests.helpers import (
    API_KEY,
    CXONE_AUTH,
    SECRET,
    WEBHOOK,
    Captured,
    cxone_turn,
    post_turn,
    trigger,
)

CLIENT_KEY = "ck-logging-client-key-7f3a91"
ADMIN_TOKEN = "admin-token-logging-test-c4d2e8"
WRONG_KEY = "ck-wrong-key-never-accepted-0b1c"
PROVIDER_KEY = "sk-test-provider-key"  # conftest's LLM_GATEWAY_API_KEY
BOT_STATE_SECRET = "test-bot-state-secret"  # conftest's BOT_STATE_SECRET
QUERY_SECRET = "query-string-secret-93ad"
CARD = "4111 1111 1111 1111"  # passes Luhn
EMAIL = "jane.doe@example.com"
CUSTOMER_TEXT = f"My card {CARD} was charged twice, write to {EMAIL}"
SESSION = "log-session-1"
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# what a careless upstream might echo back in an error body: the key it was sent, and the user text
UPSTREAM_ECHO = f"bad request from Bearer {PROVIDER_KEY}: {CUSTOMER_TEXT}"

# the card's digits with any separators (spaces, dashes, dots, JSON escapes) between them
CARD_PATTERN = re.compile(r"[^0-9A-Za-z]{0,6}".join("4111111111111111"))
CORE_TURN_FIELDS = {
    "surface",
    "tenant",
    "session_id",
    "provider",
    "model",
    "status",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
}


def settings_overrides() -> dict[str, Any]:
    return {
        "client_api_keys": [SecretStr(f"{CLIENT_KEY}:acme")],
        "admin_token": SecretStr(ADMIN_TOKEN),
        "llm_price_per_1k_prompt": 0.5,
        "llm_price_per_1k_completion": 1.5,
    }


def forbidden(cxone_state: CXoneSimulatorState, extra: list[str]) -> list[str]:
    """Every credential the run used or was issued, and the customer's email."""
    values = [
        SECRET,
        API_KEY,
        CXONE_AUTH.removeprefix("Bearer "),
        PROVIDER_KEY,
        BOT_STATE_SECRET,
        CLIENT_KEY,
        ADMIN_TOKEN,
        WRONG_KEY,
        QUERY_SECRET,
        cxone_state.client_secret,
        cxone_state.access_key_secret,
        *cxone_state.issued,  # the CXone access tokens the service obtained
        EMAIL,
        EMAIL.replace("@", "%40"),
        *extra,
    ]
    return [v for v in values if v]


def assert_nothing_leaked(text: str, values: list[str]) -> None:
    lowered = text.lower()
    for value in values:
        assert value.lower() not in lowered, f"{value!r} was logged"
    match = CARD_PATTERN.search(text)
    assert match is None, f"the card number was logged: {match.group(0)!r}"


def assert_well_formed(lines: list[dict[str, Any]]) -> None:
    for entry in lines:
        for field in ("ts", "level", "logger", "message"):
            assert entry.get(field), (field, entry)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"]), entry


# --- the leak test --------------------------------------------------------------------------------


async def test_a_scripted_run_across_every_surface_logs_no_secret_and_no_pii(
    app_client: Callable[..., Any],
    llm_plan: FaultPlan,
    cxone_state: CXoneSimulatorState,
    captured: Captured,
) -> None:
    signatures: list[str] = []
    request_ids: dict[str, str] = {}
    async with app_client(**settings_overrides()) as client:
        # Cognigy, HMAC-signed
        raw = json.dumps(trigger(lastMessage=CUSTOMER_TEXT)).encode()
        signature = sign_hmac(SECRET, raw)
        signatures.append(signature)
        response = await client.post(
            WEBHOOK,
            content=raw,
            headers={"Content-Type": "application/json", "X-Webhook-Signature": signature},
        )
        assert response.status_code == 200, response.text
        request_ids["cognigy"] = response.headers["x-request-id"]
        # Cognigy, API key
        response = await client.post(
            WEBHOOK,
            json=trigger(conversationId="contact-43", lastMessage=CUSTOMER_TEXT),
            headers={"X-API-Key": API_KEY},
        )
        assert response.status_code == 200, response.text
        # CXone
        response = await cxone_turn(client, user_input=CUSTOMER_TEXT)
        assert response.status_code == 200, response.text
        request_ids["cxone"] = response.headers["x-request-id"]
        # /chat, whole and streamed
        body = {"session_id": SESSION, "messages": [{"role": "user", "content": CUSTOMER_TEXT}]}
        response = await client.post("/chat", json=body, headers=CLIENT)
        assert response.status_code == 200, response.text
        request_ids["chat"] = response.headers["x-request-id"]
        streamed = {**body, "session_id": "log-session-2", "stream": True}
        response = await client.post("/chat", json=streamed, headers=CLIENT)
        assert response.status_code == 200, response.text
        # the OpenAI-compatible surface (other words: not answered from the cache)
        openai_text = f"Hello again. {CUSTOMER_TEXT}"
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": openai_text}]},
            headers={**CLIENT, "X-Session-ID": "log-session-3"},
        )
        assert response.status_code == 200, response.text
        request_ids["openai"] = response.headers["x-request-id"]
        # the admin API
        response = await client.get("/admin/providers", headers=ADMIN)
        assert response.status_code == 200, response.text
        # a credential in the query string (the access line never writes the query)
        response = await client.get(
            "/budget/status", params={"api_key": QUERY_SECRET}, headers=CLIENT
        )
        assert response.status_code < 500, response.text
        # wrong credentials on each kind of route
        response = await client.post(
            "/chat", json=body, headers={"Authorization": f"Bearer {WRONG_KEY}"}
        )
        assert response.status_code == 401
        response = await client.post(
            WEBHOOK, json=trigger(lastMessage=CUSTOMER_TEXT), headers={"X-API-Key": WRONG_KEY}
        )
        assert response.status_code == 401
        response = await client.get("/admin/providers", headers={"X-API-Key": WRONG_KEY})
        assert response.status_code == 401
        response = await client.post(
            "/webhook/cxone",
            json={"virtualAgentId": "b", "userInput": CUSTOMER_TEXT, "userInputType": "TEXT"},
            headers={"Authorization": f"Bearer {WRONG_KEY}"},
        )
        assert response.status_code == 401
        # the upstream fails, echoing the key it was sent and the customer's text
        failure = Fault(status=500, json_body={"error": {"message": UPSTREAM_ECHO}})
        llm_plan.push(*[failure] * 30)
        uncached = [{"role": "user", "content": f"{CUSTOMER_TEXT}, and again"}]
        response = await client.post(
            "/chat", json={"session_id": "log-session-4", "messages": uncached}, headers=CLIENT
        )
        assert response.status_code >= 500, response.text
        request_ids["failed"] = response.headers["x-request-id"]
        response = await post_turn(
            client, trigger(conversationId="contact-44", lastMessage=f"{CUSTOMER_TEXT}, again")
        )
        assert response.status_code == 200, response.text  # Cognigy gets its fallback
    # the service really handled the secrets and the customer's data: the test is not vacuous
    assert PROVIDER_KEY in json.dumps(llm_plan.requests[0]["headers"])
    assert EMAIL in json.dumps([r["body"] for r in llm_plan.requests])
    assert cxone_state.issued

    lines = captured.lines()
    assert_well_formed(lines)
    assert_nothing_leaked(captured.text, forbidden(cxone_state, signatures))

    access = captured.with_message("request")
    assert len(access) >= 14
    for entry in access:
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", entry["request_id"]), entry
        assert {"method", "path", "status", "latency_ms", "remote"} <= entry.keys(), entry
        assert "?" not in entry["path"] and not any("header" in key for key in entry), entry
    assert len({e["request_id"] for e in access}) == len(access)  # one id per request
    statuses = {e["path"]: e["status"] for e in access if e["status"] == 401}
    assert {"/chat", WEBHOOK, "/admin/providers", "/webhook/cxone"} <= statuses.keys()

    turns = [e for e in lines if e["message"].endswith(" turn")]
    by_surface = {e["surface"]: e for e in turns}
    assert {"cognigy", "cxone", "chat", "openai"} <= by_surface.keys()
    for surface, entry in by_surface.items():
        missing = sorted(CORE_TURN_FIELDS - entry.keys())
        assert not missing, (surface, missing)
    for surface in ("cognigy", "cxone", "chat", "openai"):
        mine = [e for e in turns if e["request_id"] == request_ids[surface]]
        assert [e["surface"] for e in mine] == [surface]
        attempts = [
            e
            for e in captured.with_message("llm attempt")
            if e["request_id"] == request_ids[surface]
        ]
        assert attempts and all(a["outcome"] == "ok" for a in attempts), surface
    failed = [
        e for e in captured.with_message("llm attempt") if e["request_id"] == request_ids["failed"]
    ]
    assert len(failed) >= 2 and {a["outcome"] for a in failed} == {"unavailable"}
    assert [e["status"] for e in access if e["request_id"] == request_ids["failed"]] == [502]


def test_each_ws_chat_request_frame_has_its_own_request_id(
    make_settings: Callable[..., Settings],
    cxone_state: CXoneSimulatorState,
    captured: Captured,
) -> None:
    """One socket, many answers: a frame's turn and upstream attempts share `<socket id>.<n>`."""
    settings = make_settings(**settings_overrides())
    handshake = {**CLIENT, "X-Request-ID": "ws-socket-7"}
    with (
        TestClient(create_app(settings)) as tc,
        tc.websocket_connect("/ws/chat", headers=handshake) as ws,
    ):
        assert ws.extra_headers is not None
        assert (b"x-request-id", b"ws-socket-7") in ws.extra_headers
        for n, text in enumerate([CUSTOMER_TEXT, f"Something else. {CUSTOMER_TEXT}"], 1):
            ws.send_json({"session_id": f"ws-{n}", "messages": [{"role": "user", "content": text}]})
            while (frame := ws.receive_json())["type"] == "content":
                pass
            assert frame["type"] == "complete", frame
        ws.close()
        # TestClient cancels the app as the block ends: let it read the close and log first
        give_up = time.monotonic() + 10
        while not _websocket_access(captured) and time.monotonic() < give_up:
            time.sleep(0.01)

    assert_well_formed(captured.lines())
    assert_nothing_leaked(captured.text, forbidden(cxone_state, []))
    turns = captured.with_message("chat turn")
    assert [(t["surface"], t["request_id"]) for t in turns] == [
        ("ws_chat", "ws-socket-7.1"),
        ("ws_chat", "ws-socket-7.2"),
    ]
    assert not CORE_TURN_FIELDS - turns[0].keys()
    attempts = [a["request_id"] for a in captured.with_message("llm attempt")]
    assert attempts == ["ws-socket-7.1", "ws-socket-7.2"]
    access = _websocket_access(captured)
    assert len(access) == 1
    assert access[0]["request_id"] == "ws-socket-7"  # the socket's, not its last frame's
    assert access[0]["path"] == "/ws/chat" and access[0]["status"] == 101
    assert access[0]["close_code"] == 1000


def _websocket_access(captured: Captured) -> list[dict[str, Any]]:
    return [e for e in captured.with_message("request") if e.get("websocket")]


# --- X-Request-ID ---------------------------------------------------------------------------------


async def test_a_sane_incoming_request_id_is_echoed_and_logged(
    app_client: Callable[..., Any], captured: Captured
) -> None:
    async with app_client(**settings_overrides()) as client:
        body = {"session_id": SESSION, "messages": [{"role": "user", "content": "Hi there"}]}
        response = await client.post(
            "/chat", json=body, headers={**CLIENT, "X-Request-ID": "Trace_01.a-b"}
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "Trace_01.a-b"
    mine = [e for e in captured.lines() if e.get("request_id") == "Trace_01.a-b"]
    assert {"request", "chat turn", "llm attempt"} <= {e["message"] for e in mine}


@pytest.mark.parametrize(
    "incoming",
    [
        "has spaces in it",
        "line\nbreak",
        "crlf\r\nX-Injected: 1",
        "x" * 500,
        "x" * (REQUEST_ID_MAX_LENGTH + 1),
        'quote"brace}',
        "",
    ],
)
async def test_an_unsafe_incoming_request_id_is_replaced(
    app_client: Callable[..., Any], captured: Captured, incoming: str
) -> None:
    async with app_client() as client:
        response = await client.get("/healthz", headers={"X-Request-ID": incoming})
    echoed = response.headers["x-request-id"]
    assert echoed != incoming
    assert re.fullmatch(r"[0-9a-f]{32}", echoed)
    access = captured.with_message("request")
    assert [e["request_id"] for e in access] == [echoed]
    if incoming:
        assert incoming not in captured.text


def test_accept_request_id_bounds() -> None:
    longest = "a" * REQUEST_ID_MAX_LENGTH
    assert accept_request_id(longest) == longest
    assert accept_request_id("A-z_0.9") == "A-z_0.9"
    assert accept_request_id(longest + "a") != longest + "a"
    assert accept_request_id("é") != "é"
    assert accept_request_id(None) != accept_request_id(None)  # generated, fresh each time


async def test_a_request_that_raises_is_logged_as_500_and_reraised(captured: Captured) -> None:
    """The access line is written even when the app fails before answering."""
    from app.http.request_ids import RequestIdMiddleware

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    middleware = RequestIdMiddleware(failing)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/chat",
        "query_string": f"key={QUERY_SECRET}".encode(),
        "headers": [(b"authorization", f"Bearer {CLIENT_KEY}".encode())],
        "client": ("10.0.0.9", 5555),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent")

    with pytest.raises(RuntimeError):
        await middleware(scope, receive, send)
    (line,) = captured.with_message("request")
    assert line["status"] == 500 and line["path"] == "/chat" and line["remote"] == "10.0.0.9"
    assert QUERY_SECRET not in captured.text and CLIENT_KEY not in captured.text
