"""Tutorial 004, the CXone bot webhook, as its reader meets cx-relay: the `.env` its code reads,
the service started from it (`python -m app serve` in that directory), a CXone turn in the real
Virtual Agent Hub exchange format (NICE's OpenAPI file, /work/shared/specs/, copied to
tests/fixtures/) answered in its branch shape, and the tutorial's `/health` checks.

The provider and CXone are the project's simulators on loopback ports. Lines of the `.env` that
are not the tutorial's: the Authorization value the Virtual Agent Hub sends (the tutorial's
webhook had no authentication; cx-relay refuses to serve one without), and where the simulated
CXone listens (the tutorial hard-codes hosts that do not exist).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.simulator.cxone import SIM_TENANT_ID, CXoneSimulatorState
from app.simulator.faults import Fault, FaultPlan
from app.simulator.server import LoopbackServer
from tests.helpers import ServiceProcess
from tests.surfaces.cxone.test_cxone_webhook import said, validate_against_spec
from tests.tutorials.dotenv_service import chat_calls, refused_start, serving

pytestmark = pytest.mark.slow  # each test starts the service from the tutorial's .env

VAH_AUTHORIZATION = "Bearer vah-exchange-token-004"
GATEWAY_KEY = "sk-llm-gateway-key-0004-abcdef"
FALLBACK = "I am currently experiencing high demand. Please try again shortly."


def tutorial_lines(llm: LoopbackServer, state: CXoneSimulatorState) -> list[str]:
    """Every variable tutorial 004's code reads, under its names."""
    return [
        f"CXONE_TENANT={state.tenant_id}",
        f"CXONE_CLIENT_ID={state.client_id}",
        f"CXONE_CLIENT_SECRET={state.client_secret}",
        f"LLM_GATEWAY_URL={llm.url}",
        f"LLM_GATEWAY_API_KEY={GATEWAY_KEY}",
        "LLM_MODEL=gpt-4o-mini",
        "LLM_TEMPERATURE=0.7",
        "LLM_MAX_TOKENS=1024",
        f"FALLBACK_BOT_RESPONSE={FALLBACK}",
    ]


def cx_relay_lines(cxone: LoopbackServer) -> list[str]:
    return [
        f"CXONE_WEBHOOK_AUTHORIZATION={VAH_AUTHORIZATION}",
        f"CXONE_TOKEN_URL={cxone.url}/auth/token",
        f"CXONE_DISCOVERY_URL={cxone.url}/.well-known/cxone-configuration",
    ]


@pytest.fixture
def service(
    tmp_path: Path,
    llm_server: LoopbackServer,
    cxone_server: LoopbackServer,
    cxone_state: CXoneSimulatorState,
) -> Iterator[ServiceProcess]:
    lines = tutorial_lines(llm_server, cxone_state) + cx_relay_lines(cxone_server)
    with serving(tmp_path, lines) as running:
        yield running


def exchange(base_url: str, user_input: str, contact_id: int = 548712063) -> dict[str, Any]:
    """One Virtual Agent Hub turn, as CXone sends it (ExternalIntegrationBotExchangeRequest)."""
    request = {
        "virtualAgentId": "TutorialBot",
        "botConfig": None,
        "userInput": user_input,
        "userInputType": "TEXT",
        "executionInfo": {
            "contactId": contact_id,
            "busNo": 4599123,
            "requestId": 1,
            "actionType": "CustomBotExchange",
            "actionId": 12,
            "scriptName": "Company\\Bots\\Tutorial",
        },
        "systemTelemetryData": {
            "consumerProcessHost": "lax-c4cor01",
            "consumerProcessName": "EsnMediaServer.exe",
            "consumerProcessVersion": "24.3.1",
            "inContactClusterAlias": "C7",
            "inContactScriptEngineHost": "lax-c4cor01",
            "consumerMetaData": {"region": "na1"},
        },
        "base64wavFile": None,
        "botSessionState": None,
        "customPayload": None,
        "mediaType": "chat",
    }
    validate_against_spec(request, "ExternalIntegrationBotExchangeRequest")
    response = httpx.post(
        f"{base_url}/webhook/cxone",
        json=request,
        headers={"Authorization": VAH_AUTHORIZATION},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    validate_against_spec(body, "BotExchangeResponse")
    return body


def test_a_bot_turn_is_answered_in_the_branch_shape_with_the_tutorials_settings(
    service: ServiceProcess, llm_plan: FaultPlan, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.add_conversation(
        "548712063", [("inbound", "Hi"), ("outbound", "Hello, how can I help?")]
    )
    body = exchange(service.url, "Where is my order?")

    assert body["branchName"] == "PromptAndCollectNextResponse"
    assert said(body) and said(body) != FALLBACK
    assert "errorDetails" not in body
    assert body["botSessionState"]  # the next turn carries it

    (call,) = chat_calls(llm_plan)
    assert call["body"]["model"] == "gpt-4o-mini"  # LLM_MODEL
    assert call["body"]["temperature"] == 0.7  # LLM_TEMPERATURE
    assert call["body"]["max_tokens"] <= 1024  # LLM_MAX_TOKENS
    assert call["body"]["stream"] is True
    assert call["headers"]["authorization"] == f"Bearer {GATEWAY_KEY}"  # at LLM_GATEWAY_URL
    # CXONE_TENANT found the tenant's API host; CXONE_CLIENT_ID/SECRET got the token
    assert cxone_state.discovery_requests == 1
    assert cxone_state.token_faults.requests[0]["form"]["grant_type"] == "client_credentials"
    assert "Hello, how can I help?" in str(call["body"]["messages"])

    # the tutorial configures no Cognigy webhook: it is off, and says how to turn it on
    cognigy = httpx.post(f"{service.url}/webhook/cognigy/fallback", json={}, timeout=30)
    assert cognigy.status_code == 401
    assert "COGNIGY_WEBHOOK_SECRET" in cognigy.json()["detail"]


def test_health_carries_the_tutorials_config_checks(service: ServiceProcess) -> None:
    body = httpx.get(f"{service.url}/health", timeout=30).json()
    assert body["status"] == "healthy"
    assert body["config_checks"]["valid"] is True
    assert body["config_checks"]["checks"] == {
        "endpoint_reachable": True,
        "temperature_valid": True,
        "model_format_valid": True,
    }


@pytest.mark.parametrize(
    ("reply", "category"),
    [
        ("Sure, to bypass security on the portal just open the admin page.", "illegal_activity"),
        ("That is illegal, but here is how people do it.", "illegal_activity"),
        ("There is a known exploit in the refund form.", "illegal_activity"),
        ("Some customers talk about self-harm when", "self_harm"),
        ("We do not tolerate violence in our stores.", "violence"),
    ],
)
def test_the_tutorials_unsafe_keywords_are_answered_with_its_fallback(
    service: ServiceProcess, llm_plan: FaultPlan, reply: str, category: str
) -> None:
    """Each of the tutorial's keywords blocks a streamed reply with the default settings."""
    llm_plan.push(Fault(content=reply))
    body = exchange(service.url, "How do I get a refund without a receipt?")
    assert said(body) == FALLBACK  # FALLBACK_BOT_RESPONSE, the tutorial's setting
    assert reply not in str(body)
    assert body["branchName"] == "PromptAndCollectNextResponse"
    assert body["errorDetails"]["systemErrorMessage"] == f"reply blocked by the {category} filter"


def test_the_tutorials_env_alone_stops_start_up_naming_the_missing_credential(
    tmp_path: Path, llm_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> None:
    """The tutorial's webhook took anyone's request; cx-relay does not serve one like that."""
    result = refused_start(tmp_path, tutorial_lines(llm_server, cxone_state))
    assert result.returncode == 2, result.stderr
    assert "CXONE_WEBHOOK_AUTHORIZATION" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_tenant_name_in_cxone_tenant_stops_start_up_naming_the_replacement(
    tmp_path: Path,
    llm_server: LoopbackServer,
    cxone_server: LoopbackServer,
    cxone_state: CXoneSimulatorState,
) -> None:
    """The tutorial's CXONE_TENANT is a host name part ("your-tenant"); discovery needs the id."""
    lines = tutorial_lines(llm_server, cxone_state) + cx_relay_lines(cxone_server)
    lines[0] = "CXONE_TENANT=your-tenant"
    result = refused_start(tmp_path, lines)
    assert result.returncode == 2, result.stderr
    assert "CXONE_TENANT='your-tenant'" in result.stderr
    assert "CXONE_TENANT_ID" in result.stderr and "CXONE_API_BASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_cxone_tenant_and_cxone_tenant_id_disagreeing_stops_start_up_naming_both(
    tmp_path: Path,
    llm_server: LoopbackServer,
    cxone_server: LoopbackServer,
    cxone_state: CXoneSimulatorState,
) -> None:
    other = SIM_TENANT_ID.replace("cafe", "beef")
    lines = tutorial_lines(llm_server, cxone_state) + cx_relay_lines(cxone_server)
    result = refused_start(tmp_path, [*lines, f"CXONE_TENANT_ID={other}"])
    assert result.returncode == 2, result.stderr
    assert "CXONE_TENANT_ID and CXONE_TENANT are both set" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_tutorials_own_body_is_a_422_saying_what_the_endpoint_takes(
    service: ServiceProcess, llm_plan: FaultPlan
) -> None:
    """The tutorial's client posted `{botId, sessionId}`; no CXone sends that. It must not be
    read as a silent no-input turn."""
    response = httpx.post(
        f"{service.url}/webhook/cxone",
        json={"botId": "bot-1", "sessionId": "session-1"},
        headers={"Authorization": VAH_AUTHORIZATION},
        timeout=30,
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert "Virtual Agent Hub" in error["msg"] and "botId/sessionId" in error["msg"]
    assert chat_calls(llm_plan) == []
