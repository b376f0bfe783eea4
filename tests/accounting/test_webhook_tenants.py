"""Webhook turns are charged to the tenant their credential names (`value:tenant`, the same
reading as CLIENT_API_KEYS): the ledger, budgets and the intent cache count them there, and a
tenant reads them back through /budget/* like any other usage."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.auth.signatures import sign_hmac, sign_standard_webhook
from app.core.errors import ConfigError
from app.core.principal import DEFAULT_TENANT, Principal
from app.core.settings_loading import load_settings
from tests.helpers import CXONE_WEBHOOK, SECRET, WEBHOOK, parts, trigger

HMAC_ACME = "hmac-secret-acme-5e1f"
WHSEC_GLOBEX = "whsec_" + base64.b64encode(b"globex-standard-webhooks-key-32b").decode()
APIKEY_INITECH = "cognigy-key-initech-77aa"
CXONE_ACME, CXONE_GLOBEX, CXONE_PLAIN = "Bearer cx-acme-91", "Bearer cx-globex-92", "Bearer cx-93"
CK_ACME, CK_GLOBEX, ADMIN = "ck-acme-0001", "ck-globex-0002", "admin-token-tenants-0003"


@pytest.fixture
def tenants(app_client: Any, tmp_path: Any) -> Any:
    def start(**overrides: Any) -> Any:
        values: dict[str, Any] = {
            "data_dir": tmp_path,
            "cognigy_webhook_secret": [
                SecretStr(f"{HMAC_ACME}:acme"),
                SecretStr(f"{WHSEC_GLOBEX}:globex"),
                SecretStr(SECRET),  # no tenant: the default one
            ],
            "cognigy_api_keys": [SecretStr(f"{APIKEY_INITECH}:initech")],
            "cxone_webhook_authorization": [
                SecretStr(f"{CXONE_ACME}:acme"),
                SecretStr(f"{CXONE_GLOBEX}:globex"),
                SecretStr(CXONE_PLAIN),
            ],
            "client_api_keys": [SecretStr(f"{CK_ACME}:acme"), SecretStr(f"{CK_GLOBEX}:globex")],
            "admin_token": SecretStr(ADMIN),
        }
        return app_client(**{**values, **overrides})

    return start


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _cognigy(client: httpx.AsyncClient, how: str, **fields: Any) -> dict[str, Any]:
    raw = json.dumps(trigger(**fields)).encode()
    headers = {"Content-Type": "application/json"}
    if how == "hmac-acme":
        headers["X-Webhook-Signature"] = sign_hmac(HMAC_ACME, raw)
    elif how == "standard-globex":
        now, message_id = int(time.time()), f"msg-{fields['conversationId']}"
        headers |= {
            "webhook-id": message_id,
            "webhook-timestamp": str(now),
            "webhook-signature": sign_standard_webhook(WHSEC_GLOBEX, message_id, now, raw),
        }
    elif how == "apikey-initech":
        headers["X-API-Key"] = APIKEY_INITECH
    else:
        headers["X-Webhook-Signature"] = sign_hmac(SECRET, raw)
    response = await client.post(WEBHOOK, content=raw, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _cxone(client: httpx.AsyncClient, authorization: str, contact: int) -> dict[str, Any]:
    body = {
        "virtualAgentId": "test-bot",
        "userInput": f"Where is order {contact}?",
        "userInputType": "TEXT",
        "executionInfo": {"contactId": contact, "busNo": 4599123, "requestId": 1},
        "mediaType": "chat",
    }
    response = await client.post(
        CXONE_WEBHOOK,
        json=body,
        headers={"Authorization": authorization, "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def _status(client: httpx.AsyncClient, tenant: str) -> dict[str, Any]:
    """The tenant's /budget/status, read with its own client key where it has one."""
    own = {"acme": CK_ACME, "globex": CK_GLOBEX}.get(tenant)
    query = "" if own else f"?tenant={tenant}"
    response = await client.get(f"/budget/status{query}", headers=_bearer(own or ADMIN))
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()
    assert status["tenant"] == tenant
    return status


# --- the syntax --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("COGNIGY_WEBHOOK_SECRET", "shared-secret:acme,shared-secret:globex"),
        ("COGNIGY_API_KEYS", "shared-key:acme,shared-key"),
        ("CXONE_WEBHOOK_AUTHORIZATION", "Bearer shared:acme,Bearer shared:globex"),
        ("CLIENT_API_KEYS", "ck-shared:acme:100,ck-shared:globex"),
    ],
)
def test_one_credential_for_two_tenants_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, setting: str, value: str
) -> None:
    monkeypatch.setenv(setting, value)
    with pytest.raises(ConfigError) as error:
        load_settings(_env_file=None, simulate=True)
    assert setting in str(error.value) and "several tenants" in str(error.value)
    assert "shared" not in str(error.value)  # the tenants are named, never the credential


# --- Cognigy ------------------------------------------------------------------------------------


async def test_each_cognigy_credential_charges_its_own_tenant(tenants: Any) -> None:
    running = tenants()
    async with running as client:
        turns = {
            "acme": await _cognigy(client, "hmac-acme", conversationId="conv-acme"),
            "globex": await _cognigy(client, "standard-globex", conversationId="conv-globex"),
            "initech": await _cognigy(client, "apikey-initech", conversationId="conv-initech"),
            DEFAULT_TENANT: await _cognigy(client, "plain", conversationId="conv-default"),
        }
        for tenant, turn in turns.items():
            status = await _status(client, tenant)
            session = f"conv-{'default' if tenant == DEFAULT_TENANT else tenant}"
            assert list(status["session_costs"]) == [session], tenant  # its own turn, only
            assert status["totals"]["total_tokens"] == turn["usage"]["total_tokens"] > 0
        # another tenant's webhook session is a 404 for acme's key, as any foreign session
        foreign = await client.get("/budget/sessions/conv-globex", headers=_bearer(CK_ACME))
        assert foreign.status_code == 404
        own = await client.get("/budget/sessions/conv-acme", headers=_bearer(CK_ACME))
        assert own.json()["total_tokens"] == turns["acme"]["usage"]["total_tokens"]


async def test_budgets_and_the_intent_cache_are_per_tenant_for_webhook_turns(
    tenants: Any,
) -> None:
    """acme's session limit is too small for any call; globex has none. The same question from
    both: acme is refused by its budget, globex answered, and the default tenant, asking what
    globex asked, is not served from globex's cache entry."""
    running = tenants(budget_session_tokens_by_tenant={"acme": 50})
    async with running as client:
        acme = await _cognigy(client, "hmac-acme", conversationId="conv-1")
        globex = await _cognigy(client, "standard-globex", conversationId="conv-2")
        again = await _cognigy(client, "standard-globex", conversationId="conv-3")
        default = await _cognigy(client, "plain", conversationId="conv-4")
        acme_status = await _status(client, "acme")
        budget = parts(running.app).metering.budget
        globex_usage = await budget.session_budget(Principal("globex", "t", "webhook"), "conv-2")
    assert acme["status"] == "budget_exhausted" and "50" in acme["reason"]
    assert acme_status["totals"]["calls"] == 0
    assert globex["status"] == "success"
    assert globex_usage.used_tokens == globex["usage"]["total_tokens"] > 0
    assert again["status"] == "success" and again["usage"]["total_tokens"] == 0  # cache hit
    assert default["status"] == "success" and default["usage"]["total_tokens"] > 0  # no hit


# --- CXone --------------------------------------------------------------------------------------


async def test_each_cxone_authorization_charges_its_own_tenant(tenants: Any) -> None:
    running = tenants()
    async with running as client:
        turns = {
            "acme": await _cxone(client, CXONE_ACME, 1001),
            "globex": await _cxone(client, CXONE_GLOBEX, 1002),
            DEFAULT_TENANT: await _cxone(client, CXONE_PLAIN, 1003),
        }
        for tenant, turn in turns.items():
            status = await _status(client, tenant)
            payload = turn["customPayload"]
            assert list(status["session_costs"]) == [payload["sessionId"]], tenant
            total = payload["promptTokens"] + payload["completionTokens"]
            assert status["totals"]["total_tokens"] == total > 0
        # the tenant suffix is configuration, not part of the header CXone sends
        suffixed = await client.post(
            CXONE_WEBHOOK,
            json={"userInput": "hi", "userInputType": "TEXT"},
            headers={"Authorization": f"{CXONE_ACME}:acme"},
        )
        assert suffixed.status_code == 401


async def test_a_cxone_turn_is_refused_by_its_own_tenants_budget(tenants: Any) -> None:
    running = tenants(budget_session_tokens_by_tenant={"globex": 50})
    async with running as client:
        refused = await _cxone(client, CXONE_GLOBEX, 2001)
        answered = await _cxone(client, CXONE_ACME, 2002)
    assert refused["branchName"] == "ReturnControlToScript"
    assert refused["customPayload"]["handoffReason"] == "budget_exhausted"
    assert answered["branchName"] == "PromptAndCollectNextResponse"
