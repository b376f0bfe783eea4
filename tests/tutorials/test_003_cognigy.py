"""Tutorial 003, the Cognigy fallback webhook, as its reader meets cx-relay: the `.env` its code
reads, the service started from it (`python -m app serve` in that directory), and a Cognigy-side
client written here from the tutorial's wire format — an HMAC-SHA256 hex digest of the raw body
in `X-Webhook-Signature`, its trigger fields, its answer's `status` / `routing_decision` /
`error` / `fallback_action` / `suggested_response`.

The provider and CXone are the project's simulators on loopback ports. The tutorial hard-codes
CXone's hosts (`api.mynicecx.com`, which does not exist), so the only lines of the `.env` that
are not the tutorial's say where the simulated CXone listens, in cx-relay's own names.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import Fault, FaultPlan
from app.simulator.server import LoopbackServer
from tests.helpers import ServiceProcess
from tests.tutorials.dotenv_service import chat_calls, serving

pytestmark = pytest.mark.slow  # each test starts the service from the tutorial's .env

SECRET = "cognigy-tutorial-webhook-secret"
GATEWAY_KEY = "sk-llm-gateway-key-0001"
FALLBACK_PATH = "/webhook/cognigy/fallback"


class RoutingDecision(BaseModel):
    """The decision the tutorial's flow reads, as strictly as its own schema demands."""

    model_config = ConfigDict(extra="forbid")

    classified_intent: str
    confidence: float = Field(ge=0.0, le=1.0)
    extracted_parameters: dict[str, Any]
    suggested_response: str
    requires_human_agent: bool


def tutorial_env(
    llm: LoopbackServer, cxone: LoopbackServer, state: CXoneSimulatorState
) -> list[str]:
    """Every variable tutorial 003's code reads, under its names; then where CXone listens."""
    return [
        f"CXONE_CLIENT_ID={state.client_id}",
        f"CXONE_CLIENT_SECRET={state.client_secret}",
        f"COGNIGY_WEBHOOK_SECRET={SECRET}",
        f"LLM_GATEWAY_BASE_URL={llm.url}",  # its client appends /v1/chat/completions
        f"LLM_GATEWAY_API_KEY={GATEWAY_KEY}",
        "LLM_MODEL=gpt-4o-mini",
        # not the tutorial's: the simulated CXone instead of its hard-coded hosts
        f"CXONE_TOKEN_URL={cxone.url}/auth/token",
        f"CXONE_API_BASE_URL={cxone.url}",
    ]


@pytest.fixture
def service(
    tmp_path: Path,
    llm_server: LoopbackServer,
    cxone_server: LoopbackServer,
    cxone_state: CXoneSimulatorState,
) -> Iterator[ServiceProcess]:
    with serving(tmp_path, tutorial_env(llm_server, cxone_server, cxone_state)) as running:
        yield running


def fallback_trigger(
    base_url: str, trigger: dict[str, Any], secret: str = SECRET
) -> httpx.Response:
    """What Cognigy's side of the tutorial sends: the JSON body and its bare hex HMAC."""
    body = json.dumps(trigger).encode()
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return httpx.post(
        base_url + FALLBACK_PATH,
        content=body,
        headers={"Content-Type": "application/json", "X-Webhook-Signature": signature},
        timeout=30,
    )


def trigger(conversation_id: str = "a1b2c3d4-e5f6-7890", **fields: Any) -> dict[str, Any]:
    return {
        "conversationId": conversation_id,
        "userId": "user-external-9876",
        "lastMessage": "I need help resetting my password but the link expired",
        "confidenceScore": 0.42,
        "detectedIntent": None,
        "metadata": {"channel": "webchat"},
        **fields,
    }


def test_a_signed_turn_is_answered_from_the_llm_with_the_cxone_history(
    service: ServiceProcess, llm_plan: FaultPlan, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.add_conversation(
        "conv-003",
        [("inbound", "My reset link says it expired"), ("outbound", "Which account is it?")],
    )
    response = fallback_trigger(service.url, trigger("conv-003"))

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    assert body["conversationId"] == "conv-003"
    decision = RoutingDecision.model_validate(body["routing_decision"])
    assert decision.suggested_response
    assert body["error"] is None and body["fallback_action"] is None
    assert body["context"] == "available"  # the history came from (simulated) CXone

    # CXone: the tutorial's client-credentials grant with CXONE_CLIENT_ID/SECRET alone
    (token_request,) = cxone_state.token_faults.requests
    assert token_request["form"]["grant_type"] == "client_credentials"
    # the LLM call the tutorial's gateway client made: its model, key, JSON mode and history
    (call,) = chat_calls(llm_plan)
    assert call["body"]["model"] == "gpt-4o-mini"
    assert call["body"]["response_format"] == {"type": "json_object"}
    assert call["headers"]["authorization"] == f"Bearer {GATEWAY_KEY}"
    prompt = json.dumps(call["body"]["messages"])
    assert "My reset link says it expired" in prompt
    assert "the link expired" in prompt


def test_a_decision_that_breaks_the_schema_answers_with_the_tutorials_error_key(
    service: ServiceProcess, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content="Sure! The intent is password reset."), Fault(content="{}"))
    response = fallback_trigger(service.url, trigger())

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "schema_validation_failed"
    assert isinstance(body["error"], str) and body["error"]  # the tutorial's key
    assert body["error"] == body["reason"]
    assert body["fallback_action"] == "route_to_human"
    assert body["suggested_response"]
    assert RoutingDecision.model_validate(body["routing_decision"]).requires_human_agent is True


def test_the_tutorials_refusals(service: ServiceProcess, llm_plan: FaultPlan) -> None:
    """Above the fallback threshold (0.75) is 400, as in the tutorial; a bad signature is 401
    where the tutorial said 403 (the differences table in docs/tutorials.md); neither reaches the
    provider."""
    confident = fallback_trigger(service.url, trigger(confidenceScore=0.9))
    assert confident.status_code == 400
    assert "threshold" in confident.json()["detail"]

    forged = fallback_trigger(service.url, trigger(), secret="not-the-secret")
    assert forged.status_code == 401
    assert chat_calls(llm_plan) == []
