"""Scopes on client keys (`CLIENT_API_KEYS` entries `key:tenant[:tokens];scopes=a+b`): a key
with a scope list reaches a guarded route only with the scope it asks for (403 naming it), a
bad key is still a 401, and a key without a list keeps its old reach everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.core.credentials import parse_client_key
from app.core.scopes import INVOKE, METRICS_READ, missing_scope, split_scopes
from app.core.settings import Settings
from app.main import create_app
from app.simulator.faults import FaultPlan

INVOKER = "ck-invoke-only"
READER = "ck-metrics-only"
BOTH = "ck-both-scopes"
PLAIN = "ck-unscoped"
KEYS = [
    f"{INVOKER}:acme;scopes={INVOKE}",
    f"{READER}:acme;scopes={METRICS_READ}",
    f"{BOTH}:acme:2048;scopes={INVOKE} {METRICS_READ}",  # spaces, as OAuth writes a scope list
    f"{PLAIN}:acme",
]
CHAT = {"session_id": "s-1", "messages": [{"role": "user", "content": "Where is my parcel?"}]}
V1 = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("ck:acme", ("ck", "acme", None, None)),
        (f"ck:acme;scopes={INVOKE}", ("ck", "acme", None, frozenset({INVOKE}))),
        (
            f"ck:acme:500;scopes={INVOKE}+{METRICS_READ}",
            ("ck", "acme", 500, frozenset({INVOKE, METRICS_READ})),
        ),
        (f"ck;scopes= {METRICS_READ} ", ("ck", "default", None, frozenset({METRICS_READ}))),
    ],
)
def test_the_scope_list_follows_the_key_tenant_and_tokens(
    entry: str, expected: tuple[Any, ...]
) -> None:
    assert parse_client_key(entry) == expected


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ("ck:acme;scopes=llm.gateway:invoke+llm.gateway:write", "llm.gateway:write"),
        ("ck:acme;scopes=", "without a credential before it or a scope after it"),
        (";scopes=llm.gateway:invoke", "without a credential before it or a scope after it"),
    ],
)
def test_a_bad_scope_list_stops_start_up_naming_the_setting(
    make_settings: Callable[..., Settings], entry: str, named: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        make_settings(client_api_keys=[SecretStr(entry)])
    message = str(refused.value)
    assert "client_api_keys" in message and named in message
    assert "llm.gateway:metrics:read" in message or "scopes=" in message  # says what is known


def test_split_scopes_and_missing_scope() -> None:
    assert split_scopes("k:t") == ("k:t", None)
    assert missing_scope(None, (INVOKE,)) is None  # no list: everywhere
    assert missing_scope(frozenset({INVOKE}), (INVOKE, "llm-inference:execute")) is None
    problem = missing_scope(frozenset({METRICS_READ}), (INVOKE,))
    assert problem is not None and INVOKE in problem and METRICS_READ in problem
    # a right a key must be given (provisioning): no list is no right
    unscoped = missing_scope(None, ("gateway:write",), explicit=True)
    assert unscoped is not None and "gateway:write" in unscoped and "no scope list" in unscoped
    assert missing_scope(frozenset({"gateway:write"}), ("gateway:write",), explicit=True) is None


# --- over HTTP ---------------------------------------------------------------------------------


async def test_each_route_asks_a_scoped_key_for_its_scope(app_client: Callable[..., Any]) -> None:
    async with app_client(client_api_keys=[SecretStr(k) for k in KEYS]) as client:
        refused = await client.post("/chat", json=CHAT, headers=bearer(READER))
        assert refused.status_code == 403
        assert INVOKE in refused.json()["detail"]
        assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]

        v1 = await client.post("/v1/chat/completions", json=V1, headers=bearer(READER))
        assert v1.status_code == 403  # in OpenAI's error shape
        assert v1.json()["error"]["code"] == "insufficient_scope"
        assert INVOKE in v1.json()["error"]["message"]

        budget = await client.get("/budget/status", headers=bearer(INVOKER))
        assert budget.status_code == 403 and METRICS_READ in budget.json()["detail"]

        assert (await client.post("/chat", json=CHAT, headers=bearer(INVOKER))).status_code == 200
        assert (await client.get("/budget/status", headers=bearer(READER))).status_code == 200
        for key in (BOTH, PLAIN):  # both scopes, and no scope list at all: everything
            assert (await client.post("/chat", json=CHAT, headers=bearer(key))).status_code == 200
            v1_ok = await client.post("/v1/chat/completions", json=V1, headers=bearer(key))
            assert v1_ok.status_code == 200
            assert (await client.get("/budget/status", headers=bearer(key))).status_code == 200
            assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200


async def test_a_bad_key_is_still_a_401_before_any_scope(app_client: Callable[..., Any]) -> None:
    async with app_client(client_api_keys=[SecretStr(k) for k in KEYS]) as client:
        unknown = await client.post("/chat", json=CHAT, headers=bearer("ck-nobody"))
        assert unknown.status_code == 401
        missing = await client.get("/budget/status")
        assert missing.status_code == 401


async def test_a_refused_scope_calls_no_model(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with app_client(client_api_keys=[SecretStr(k) for k in KEYS]) as client:
        assert (await client.post("/chat", json=CHAT, headers=bearer(READER))).status_code == 403
    assert llm_plan.requests == []


def test_ws_chat_refuses_a_key_without_an_invoke_scope_with_4403(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(client_api_keys=[SecretStr(k) for k in KEYS])
    with TestClient(create_app(settings)) as tc:
        with tc.websocket_connect("/ws/chat", headers=bearer(READER)) as ws:
            frame = ws.receive_json()
            assert frame["code"] == "forbidden" and INVOKE in frame["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 4403
        with tc.websocket_connect("/ws/chat", headers=bearer(INVOKER)) as ws:
            ws.send_json(CHAT)
            frames = [ws.receive_json()]
            while frames[-1]["type"] not in ("complete", "error"):
                frames.append(ws.receive_json())
            assert frames[-1]["type"] == "complete"
