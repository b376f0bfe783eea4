"""Abuse of the credentials: replayed webhooks, and wrong or nearly-right credentials, which must
never reach a provider, CXone or the admin API's health checks (timing: test_abuse_timing.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from app.auth.signatures import (
    sign_hmac,
    sign_standard_webhook,
)
from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import FaultPlan
from app.simulator.server import LoopbackServer
from tests.helpers import API_KEY, CXONE_AUTH, CXONE_WEBHOOK, SECRET, WEBHOOK, trigger

CLIENT_KEY = "abuse-client-key-3c9f1a"
ADMIN_TOKEN = "abuse-admin-token-d07b42"
PROVIDER_KEY = "sk-test-provider-key"  # conftest's LLM_GATEWAY_API_KEY
KEYS: dict[str, Any] = {
    "client_api_keys": [SecretStr(f"{CLIENT_KEY}:acme")],
    "admin_token": SecretStr(ADMIN_TOKEN),
}


def _standard(raw: bytes, message_id: str, timestamp: int | None = None) -> dict[str, str]:
    sent_at = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(sent_at),
        "webhook-signature": sign_standard_webhook(SECRET, message_id, sent_at, raw),
    }


def _inert(llm_plan: FaultPlan, cxone: CXoneSimulatorState) -> None:
    assert llm_plan.requests == []  # no provider call ...
    assert cxone.token_requests == 0  # ... no CXone token ...
    assert cxone.message_faults.requests == []  # ... and no history read


# --- replay --------------------------------------------------------------------------------------


async def test_a_replayed_standard_webhook_is_refused_and_does_nothing(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    raw = json.dumps(trigger(conversationId="replay-1")).encode()
    headers = _standard(raw, "msg_replay_1")
    async with app_client() as client:
        first = await client.post(WEBHOOK, content=raw, headers=headers)
        calls = len(llm_plan.requests)
        replay = await client.post(WEBHOOK, content=raw, headers=headers)
        # the sender's own retry of that id with another body, correctly signed: still the id
        other = json.dumps(trigger(conversationId="replay-1", lastMessage="again")).encode()
        reused = await client.post(WEBHOOK, content=other, headers=_standard(other, "msg_replay_1"))
    assert first.status_code == 200 and first.json()["status"] == "success"
    for refused in (replay, reused):
        assert refused.status_code == 401
        assert "replay" in refused.json()["detail"]
    assert len(llm_plan.requests) == calls == 1


async def test_a_burst_of_the_same_delivery_is_served_exactly_once(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    """Ten copies at once (a replaying attacker racing the original): one wins."""
    raw = json.dumps(trigger(conversationId="replay-2")).encode()
    headers = _standard(raw, "msg_replay_burst")
    async with app_client() as client:
        answers = await asyncio.gather(
            *(client.post(WEBHOOK, content=raw, headers=headers) for _ in range(10))
        )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] + [401] * 9, statuses
    assert len(llm_plan.requests) == 1


@pytest.mark.parametrize("age", [301, 3600, -301])
async def test_a_captured_delivery_outside_the_tolerance_is_refused_even_if_never_seen(
    app_client: Callable[..., Any],
    llm_plan: FaultPlan,
    cxone_state: CXoneSimulatorState,
    age: int,
) -> None:
    """Ids are remembered for twice the tolerance; older captures fail on their timestamp."""
    raw = json.dumps(trigger(conversationId="replay-3")).encode()
    async with app_client() as client:
        # signed once the app is up: a slow start must not bring a future timestamp in range
        headers = _standard(raw, f"msg_old_{age}", int(time.time()) - age)
        response = await client.post(WEBHOOK, content=raw, headers=headers)
    assert response.status_code == 401
    assert "webhook-timestamp" in response.json()["detail"]
    _inert(llm_plan, cxone_state)


async def test_a_deployment_that_must_refuse_replays_can_accept_standard_webhooks_only(
    app_client: Callable[..., Any], llm_plan: FaultPlan, cxone_state: CXoneSimulatorState
) -> None:
    """HMAC over the body alone carries no timestamp or id (README, Authentication): a captured
    request stays valid. COGNIGY_AUTH_SCHEMES=standard_webhooks closes that door."""
    raw = json.dumps(trigger(conversationId="replay-4")).encode()
    hmac_headers = {
        "Content-Type": "application/json",
        "X-Webhook-Signature": sign_hmac(SECRET, raw),
    }
    async with app_client(cognigy_auth_schemes=["standard_webhooks"]) as client:
        captured = await client.post(WEBHOOK, content=raw, headers=hmac_headers)
        api_key = await client.post(
            WEBHOOK, content=raw, headers={"Content-Type": "application/json", "X-API-Key": API_KEY}
        )
        assert captured.status_code == api_key.status_code == 401
        _inert(llm_plan, cxone_state)
        signed = await client.post(WEBHOOK, content=raw, headers=_standard(raw, "msg_only_sw"))
    assert signed.status_code == 200, signed.text


# --- wrong credentials never reach anything ------------------------------------------------------


def _near_misses(value: str, case_sensitive: bool = True) -> list[str]:
    """Values an attacker or a misconfigured sender would try around a real credential."""
    misses = [
        value[:-1],
        value + "x",
        value[:-1] + ("0" if value[-1] != "0" else "1"),
        ("0" if value[0] != "0" else "1") + value[1:],
        f" {value}x ",
        PROVIDER_KEY,  # the key this service holds for the provider is no credential here
        "",
    ]
    if case_sensitive:
        misses.append(value.upper() if value.upper() != value else value.lower())
    return misses


async def test_nearly_right_credentials_get_401_and_reach_nothing(
    app_client: Callable[..., Any], llm_plan: FaultPlan, cxone_state: CXoneSimulatorState
) -> None:
    raw = json.dumps(trigger()).encode()
    chat = {"session_id": "s1", "messages": [{"role": "user", "content": "hello"}]}
    openai = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    cxone = {"virtualAgentId": "b", "userInput": "hello", "userInputType": "TEXT"}
    signature = sign_hmac(SECRET, raw).removeprefix("sha256=")
    refused: list[httpx.Response] = []
    # which credentials match is the question here, not how many wrong ones an address may send
    # (ADMIN_MAX_FAILURES_PER_ADDRESS: tests/surfaces/admin/test_keys.py)
    async with app_client(**KEYS, admin_max_failures_per_address=None) as client:
        for wrong in _near_misses(signature, case_sensitive=False):  # hex: either case
            refused.append(
                await client.post(WEBHOOK, content=raw, headers={"X-Webhook-Signature": wrong})
            )
        for wrong in _near_misses(API_KEY):
            refused.append(await client.post(WEBHOOK, content=raw, headers={"X-API-Key": wrong}))
        for wrong in _near_misses(CXONE_AUTH.removeprefix("Bearer ")):
            refused.append(
                await client.post(
                    CXONE_WEBHOOK, json=cxone, headers={"Authorization": f"Bearer {wrong}"}
                )
            )
        for wrong in _near_misses(CLIENT_KEY) + _near_misses(ADMIN_TOKEN):
            bearer = {"Authorization": f"Bearer {wrong}"}
            refused.append(await client.post("/chat", json=chat, headers=bearer))
            refused.append(await client.post("/v1/chat/completions", json=openai, headers=bearer))
            refused.append(await client.get("/budget/status", headers=bearer))
        for wrong in [*_near_misses(ADMIN_TOKEN), CLIENT_KEY]:  # a client key is no admin token
            bearer = {"Authorization": f"Bearer {wrong}"}
            refused.append(await client.get("/admin/providers", headers=bearer))
            refused.append(await client.delete("/admin/config/applied", headers=bearer))
        audit = await client.get("/admin/audit", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    for response in refused:
        assert response.status_code == 401, (response.request.url, response.text)
    _inert(llm_plan, cxone_state)
    assert audit.json()["total"] == 0  # no admin action was even attempted


class Recorder:
    """A provider that records every request it gets (the admin API health-checks new ones)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.app = FastAPI()

        @self.app.api_route("/{path:path}", methods=["GET", "POST"])
        async def record(path: str, request: Request) -> JSONResponse:
            with self._lock:
                self.requests.append((request.method, f"/{path}"))
            return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini"}]})


@pytest.fixture
def rogue() -> Iterator[tuple[Recorder, str]]:
    recorder = Recorder()
    with LoopbackServer(recorder.app) as server:
        yield recorder, server.url


async def test_a_wrong_admin_token_never_reaches_the_provider_it_names(
    app_client: Callable[..., Any], rogue: tuple[Recorder, str]
) -> None:
    recorder, url = rogue
    candidate = {
        "allow_literal_keys": True,
        "providers": [
            {
                "name": "rogue",
                "base_url": url,
                "api_keys": ["literal:sk-rogue-key"],
                "models": [{"name": "gpt-4o-mini"}],
            }
        ],
    }
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with app_client(**KEYS, admin_max_failures_per_address=None) as client:  # as above
        for wrong in [*_near_misses(ADMIN_TOKEN), CLIENT_KEY]:
            bearer = {"Authorization": f"Bearer {wrong}"}
            applied = await client.put("/admin/config", json=candidate, headers=bearer)
            validated = await client.post("/admin/config/validate", json=candidate, headers=bearer)
            assert applied.status_code == validated.status_code == 401
        before = (await client.get("/admin/providers", headers=admin)).json()
        assert recorder.requests == []  # no health check of the named provider
        assert before["source"] == "env"
        # control: with the token the same body is health-checked (the recorder does see it)
        accepted = await client.put("/admin/config", json=candidate, headers=admin)
    assert accepted.status_code == 200, accepted.text
    assert ("GET", "/v1/models") in recorder.requests
