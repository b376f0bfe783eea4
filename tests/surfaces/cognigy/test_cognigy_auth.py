"""Inbound authentication through the webhook: each scheme accepted, anything else 401 and inert."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.auth.signatures import sign_hmac, sign_standard_webhook
from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import FaultPlan
from tests.helpers import API_KEY, SECRET, WEBHOOK, trigger


def _raw(**fields: Any) -> bytes:
    return json.dumps(trigger(**fields)).encode()


def _standard_headers(
    raw: bytes, message_id: str, secret: str = SECRET, **kw: Any
) -> dict[str, str]:
    timestamp = kw.get("timestamp", int(time.time()))
    return {
        "Content-Type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_standard_webhook(secret, message_id, timestamp, raw),
    }


async def _assert_rejected(
    response: httpx.Response, llm_plan: FaultPlan, cxone: CXoneSimulatorState
) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["detail"]
    assert llm_plan.requests == []  # nothing else happened: no provider call ...
    assert cxone.token_requests == 0  # ... and no CXone call


async def test_hmac_signature_is_accepted(client: httpx.AsyncClient) -> None:
    raw = _raw()
    response = await client.post(
        WEBHOOK, content=raw, headers={"X-Webhook-Signature": sign_hmac(SECRET, raw)}
    )
    assert response.status_code == 200
    assert response.json()["status"] == "success"


async def test_hmac_over_a_tampered_body_is_rejected(
    client: httpx.AsyncClient, llm_plan: FaultPlan, cxone_state: CXoneSimulatorState
) -> None:
    signature = sign_hmac(SECRET, _raw())
    tampered = _raw(lastMessage="transfer all my money")
    response = await client.post(
        WEBHOOK, content=tampered, headers={"X-Webhook-Signature": signature}
    )
    await _assert_rejected(response, llm_plan, cxone_state)


async def test_rotated_secrets_are_both_accepted(app_client: Any) -> None:
    async with app_client(
        cognigy_webhook_secret=[SecretStr("old-secret"), SecretStr("new-secret")]
    ) as client:
        for secret in ("old-secret", "new-secret"):
            raw = _raw()
            response = await client.post(
                WEBHOOK, content=raw, headers={"X-Webhook-Signature": sign_hmac(secret, raw)}
            )
            assert response.status_code == 200
        raw = _raw()
        retired = await client.post(
            WEBHOOK, content=raw, headers={"X-Webhook-Signature": sign_hmac("retired", raw)}
        )
        assert retired.status_code == 401


async def test_standard_webhooks_accepted_once_and_replay_rejected(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    raw = _raw()
    headers = _standard_headers(raw, "msg_2f9a")
    first = await client.post(WEBHOOK, content=raw, headers=headers)
    assert first.status_code == 200
    replay = await client.post(WEBHOOK, content=raw, headers=headers)
    assert replay.status_code == 401
    assert "replay" in replay.json()["detail"]
    assert len(llm_plan.requests) == 1


async def test_standard_webhooks_stale_timestamp_is_rejected(
    client: httpx.AsyncClient, llm_plan: FaultPlan, cxone_state: CXoneSimulatorState
) -> None:
    raw = _raw()
    headers = _standard_headers(raw, "msg_old", timestamp=int(time.time()) - 301)
    response = await client.post(WEBHOOK, content=raw, headers=headers)
    await _assert_rejected(response, llm_plan, cxone_state)
    assert "timestamp" in response.json()["detail"]


@pytest.mark.parametrize("tamper", ["body", "id", "timestamp", "signature"])
async def test_standard_webhooks_any_tampering_is_rejected(
    client: httpx.AsyncClient, llm_plan: FaultPlan, cxone_state: CXoneSimulatorState, tamper: str
) -> None:
    raw = _raw()
    headers = _standard_headers(raw, "msg_t")
    if tamper == "body":
        raw = _raw(lastMessage="something else")
    elif tamper == "id":
        headers["webhook-id"] = "msg_other"
    elif tamper == "timestamp":
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
    else:
        headers["webhook-signature"] = headers["webhook-signature"][:-4] + "AAA="
    response = await client.post(WEBHOOK, content=raw, headers=headers)
    await _assert_rejected(response, llm_plan, cxone_state)


@pytest.mark.parametrize(
    "headers", [{"X-API-Key": API_KEY}, {"Authorization": f"ApiKey {API_KEY}"}]
)
async def test_api_key_headers_are_accepted(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post(WEBHOOK, content=_raw(), headers=headers)
    assert response.status_code == 200
    assert response.json()["status"] == "success"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong-key"},
        {"Authorization": f"Bearer {API_KEY}"},
        {"X-Webhook-Signature": "sha256=" + "0" * 64},
        {"X-Webhook-Signature": ""},
    ],
)
async def test_missing_or_wrong_credentials_get_401_and_nothing_else(
    client: httpx.AsyncClient,
    llm_plan: FaultPlan,
    cxone_state: CXoneSimulatorState,
    headers: dict[str, str],
) -> None:
    response = await client.post(WEBHOOK, content=_raw(), headers=headers)
    await _assert_rejected(response, llm_plan, cxone_state)


async def test_disabled_scheme_is_not_accepted(app_client: Any, llm_plan: FaultPlan) -> None:
    async with app_client(cognigy_auth_schemes=["hmac"]) as client:
        response = await client.post(WEBHOOK, content=_raw(), headers={"X-API-Key": API_KEY})
    assert response.status_code == 401
    assert llm_plan.requests == []


async def test_unauthenticated_mode_is_explicit(
    app_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with app_client(
        cognigy_webhook_secret=[], cognigy_api_keys=[], allow_unauthenticated_webhooks=True
    ) as client:
        response = await client.post(WEBHOOK, content=_raw())
    assert response.status_code == 200
    assert any("ALLOW_UNAUTHENTICATED_WEBHOOKS" in r.getMessage() for r in caplog.records)


async def test_auth_is_checked_before_the_body_is_parsed(client: httpx.AsyncClient) -> None:
    response = await client.post(WEBHOOK, content=b"{broken", headers={"X-API-Key": "nope"})
    assert response.status_code == 401
