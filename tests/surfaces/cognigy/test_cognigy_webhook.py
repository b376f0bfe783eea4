"""The Cognigy fallback webhook end to end, against the fake provider and fake CXone on loopback."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import Fault, FaultPlan
from tests.helpers import WEBHOOK, post_turn, signed, trigger

VALID_DECISION = {
    "classified_intent": "billing_question",
    "confidence": 0.83,
    "extracted_parameters": {"charge": "duplicate"},
    "suggested_response": "I can look into that double charge for you.",
    "requires_human_agent": False,
}


def _fallback_checks(body: dict[str, Any], status: str) -> None:
    assert body["status"] == status
    assert body["fallback_action"] == "route_to_human"
    assert body["routing_decision"]["requires_human_agent"] is True
    assert body["suggested_response"] == body["routing_decision"]["suggested_response"]
    assert body["reason"]


async def test_success_returns_the_validated_routing_decision(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content=json.dumps(VALID_DECISION)))
    response = await post_turn(client, trigger())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success"
    assert body["conversationId"] == "contact-42"
    assert body["routing_decision"] == VALID_DECISION
    assert body["context"] == "available"
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert body["usage"]["prompt_tokens"] > 0
    assert body["latency_ms"] > 0
    assert response.headers["x-request-id"] == body["request_id"]


async def test_provider_request_is_json_mode_low_temperature_and_bounded(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    await post_turn(client, trigger())
    sent = llm_plan.requests[0]
    assert sent["headers"]["authorization"] == "Bearer sk-test-provider-key"
    body = sent["body"]
    assert body["response_format"] == {"type": "json_object"}
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 300  # ROUTING_MAX_TOKENS: what a decision needs, not 1024
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"][0]["role"] == "system"
    assert "I was charged twice" in body["messages"][1]["content"]


async def test_cognigy_flow_field_names_are_accepted(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    flow_input = {
        "sessionId": "sess-1",
        "text": "I want to talk to a human",
        "intent": None,
        "intentScore": None,
    }
    response = await post_turn(client, flow_input)
    assert response.status_code == 200, response.text
    assert response.json()["conversationId"] == "sess-1"
    assert 'NLU guessed the intent "none"' in llm_plan.requests[0]["body"]["messages"][1]["content"]


async def test_history_from_cxone_goes_into_the_prompt_oldest_first(
    client: httpx.AsyncClient, llm_plan: FaultPlan, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.add_conversation(
        "contact-42",
        [("inbound", "first customer words"), ("outbound", "agent reply"), ("inbound", "latest")],
    )
    response = await post_turn(client, trigger())
    assert response.json()["context"] == "available"
    prompt = llm_plan.requests[0]["body"]["messages"][1]["content"]
    assert prompt.index("customer: first customer words") < prompt.index("agent: agent reply")
    assert prompt.index("agent: agent reply") < prompt.index("customer: latest")


async def test_metadata_contact_id_selects_the_cxone_contact(
    client: httpx.AsyncClient, cxone_state: CXoneSimulatorState
) -> None:
    await post_turn(client, trigger(metadata={"cxoneContactId": "987654"}))
    assert cxone_state.message_faults.requests[0]["contact_id"] == "987654"


async def test_cxone_failure_still_answers_with_context_unavailable(
    client: httpx.AsyncClient, cxone_state: CXoneSimulatorState, llm_plan: FaultPlan
) -> None:
    cxone_state.message_faults.push(Fault(status=503))
    response = await post_turn(client, trigger())
    body = response.json()
    assert body["status"] == "success"
    assert body["context"] == "unavailable"
    assert "No earlier conversation" in llm_plan.requests[0]["body"]["messages"][1]["content"]


async def test_cxone_timeout_leaves_time_for_the_answer(
    app_client: Any, cxone_state: CXoneSimulatorState
) -> None:
    cxone_state.message_faults.push(Fault(delay=3.0))
    async with app_client(cxone_timeout_seconds=0.3) as client:
        started = time.monotonic()
        body = (await post_turn(client, trigger())).json()
    assert body["status"] == "success"
    assert body["context"] == "unavailable"
    assert time.monotonic() - started < 2.0


async def test_without_cxone_settings_context_is_not_configured(
    app_client: Any,
) -> None:
    async with app_client(cxone_client_id=None, cxone_api_base_url=None) as client:
        body = (await post_turn(client, trigger())).json()
    assert body["status"] == "success"
    assert body["context"] == "not_configured"


# --- the caller's mistakes -----------------------------------------------------------------------


async def test_confidence_above_threshold_is_400_with_the_reason(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    response = await post_turn(client, trigger(confidenceScore=0.9))
    assert response.status_code == 400
    assert "0.9" in response.json()["detail"] and "0.75" in response.json()["detail"]
    assert llm_plan.requests == []


async def test_confidence_at_the_threshold_is_handled(client: httpx.AsyncClient) -> None:
    response = await post_turn(client, trigger(confidenceScore=0.75))
    assert response.status_code == 200


async def test_threshold_is_configurable(app_client: Any) -> None:
    async with app_client(cognigy_confidence_threshold=0.95) as client:
        response = await post_turn(client, trigger(confidenceScore=0.9))
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"lastMessage": "hi", "confidenceScore": 0.1}, "conversationId"),
        ({"conversationId": "c", "confidenceScore": 0.1}, "lastMessage"),
        ({"conversationId": "c", "lastMessage": "hi", "confidenceScore": 1.5}, "confidenceScore"),
        (
            {"conversationId": "c", "lastMessage": "hi", "confidenceScore": "high"},
            "confidenceScore",
        ),
        ({"conversationId": "c", "lastMessage": "hi", "metadata": [1, 2]}, "metadata"),
    ],
)
async def test_malformed_trigger_is_422_naming_the_field(
    client: httpx.AsyncClient, llm_plan: FaultPlan, body: dict[str, Any], field: str
) -> None:
    response = await post_turn(client, body)
    assert response.status_code == 422
    locations = [error["loc"] for error in response.json()["detail"]]
    assert any(field in loc for loc in locations), locations
    assert llm_plan.requests == []


async def test_body_that_is_not_json_is_422(client: httpx.AsyncClient) -> None:
    response = await post_turn(client, b"{not json")
    assert response.status_code == 422


async def test_oversized_body_is_413_before_parsing(app_client: Any, llm_plan: FaultPlan) -> None:
    async with app_client(max_body_bytes=2048) as client:
        big = trigger(lastMessage="x" * 4000)
        response = await post_turn(client, big)
        assert response.status_code == 413
        assert "2048" in response.json()["detail"]

        async def chunks() -> Any:  # no Content-Length: the stream itself is counted
            for _ in range(10):
                yield b"x" * 1000

        _, headers = signed(b"x" * 10_000)
        chunked = await client.post(WEBHOOK, content=chunks(), headers=headers)
        assert chunked.status_code == 413
    assert llm_plan.requests == []


async def test_default_body_limit_is_256_kib(client: httpx.AsyncClient) -> None:
    response = await post_turn(client, trigger(metadata={"blob": "y" * (256 * 1024)}))
    assert response.status_code == 413


async def test_customer_text_is_never_evaluated_as_template_code(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    sneaky = "{{ 7*7 }} {% for x in range(3) %}loop{% endfor %} {{ config }}"
    response = await post_turn(client, trigger(lastMessage=sneaky, metadata={"note": "{{ 6*6 }}"}))
    assert response.status_code == 200
    prompt = llm_plan.requests[0]["body"]["messages"][1]["content"]
    assert sneaky in prompt
    assert "{{ 6*6 }}" in prompt
    assert "49" not in prompt and "looploop" not in prompt


# --- resilience of the LLM call -----------------------------------------------------------------


async def test_429_with_retry_after_is_retried_after_the_wait(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(status=429, headers={"Retry-After": "1"}))
    started = time.monotonic()
    response = await post_turn(client, trigger())
    waited = time.monotonic() - started
    assert response.json()["status"] == "success"
    assert len(llm_plan.requests) == 2
    assert waited >= 1.0  # honoured the provider's Retry-After, not the 10 ms backoff


async def test_5xx_is_retried_then_succeeds(client: httpx.AsyncClient, llm_plan: FaultPlan) -> None:
    llm_plan.push(Fault(status=500), Fault(status=502))
    response = await post_turn(client, trigger())
    assert response.json()["status"] == "success"
    assert len(llm_plan.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_client_errors_are_not_retried_and_fall_back(
    client: httpx.AsyncClient, llm_plan: FaultPlan, status: int
) -> None:
    llm_plan.push(Fault(status=status))
    body = (await post_turn(client, trigger())).json()
    _fallback_checks(body, "llm_unavailable")
    assert len(llm_plan.requests) == 1


async def test_retries_exhausted_fall_back_to_a_human(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(*[Fault(status=503)] * 3)
    response = await post_turn(client, trigger())
    assert response.status_code == 200
    _fallback_checks(response.json(), "llm_unavailable")
    assert len(llm_plan.requests) == 3


async def test_unreachable_provider_falls_back(app_client: Any) -> None:
    async with app_client(llm_gateway_base_url="http://127.0.0.1:9") as client:
        body = (await post_turn(client, trigger())).json()
    _fallback_checks(body, "llm_unavailable")


async def test_deadline_reached_answers_the_fallback_within_the_deadline(
    app_client: Any, llm_plan: FaultPlan
) -> None:
    llm_plan.push(*[Fault(delay=5.0)] * 3)
    async with app_client(cognigy_deadline_seconds=1.0, llm_timeout_seconds=10.0) as client:
        started = time.monotonic()
        response = await post_turn(client, trigger())
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    body = response.json()
    assert body["status"] in ("deadline_exceeded", "llm_unavailable")
    _fallback_checks(body, body["status"])
    assert elapsed < 1.5


async def test_a_retry_that_cannot_finish_before_the_deadline_is_not_attempted(
    app_client: Any, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(status=429, headers={"Retry-After": "30"}))
    async with app_client(cognigy_deadline_seconds=2.0) as client:
        started = time.monotonic()
        body = (await post_turn(client, trigger())).json()
    _fallback_checks(body, "llm_unavailable")
    assert time.monotonic() - started < 1.0
    assert len(llm_plan.requests) == 1


# --- output validation and repair ---------------------------------------------------------------


async def test_markdown_fences_around_json_are_tolerated(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content="```json\n" + json.dumps(VALID_DECISION) + "\n```"))
    body = (await post_turn(client, trigger())).json()
    assert body["status"] == "success"
    assert body["routing_decision"] == VALID_DECISION
    assert len(llm_plan.requests) == 1


async def test_invalid_json_is_repaired_once_then_succeeds(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(
        Fault(content="Sure! The intent is billing."), Fault(content=json.dumps(VALID_DECISION))
    )
    body = (await post_turn(client, trigger())).json()
    assert body["status"] == "success"
    assert len(llm_plan.requests) == 2
    repair = llm_plan.requests[1]["body"]["messages"]
    assert repair[-2] == {"role": "assistant", "content": "Sure! The intent is billing."}
    assert "not JSON" in repair[-1]["content"]
    assert '"requires_human_agent"' in repair[-1]["content"]  # the schema is shown
    assert body["usage"]["prompt_tokens"] > 0


async def test_schema_breaking_output_is_repaired_with_the_errors_shown(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    broken = {**VALID_DECISION, "confidence": 7, "requires_human_agent": "yes"}
    llm_plan.push(Fault(content=json.dumps(broken)), Fault(content=json.dumps(VALID_DECISION)))
    body = (await post_turn(client, trigger())).json()
    assert body["status"] == "success"
    feedback = llm_plan.requests[1]["body"]["messages"][-1]["content"]
    assert "confidence" in feedback and "requires_human_agent" in feedback


async def test_repair_that_fails_again_gives_the_schema_fallback(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content='{"intent": "x"}'), Fault(content='{"still": "wrong"}'))
    response = await post_turn(client, trigger())
    body = response.json()
    assert response.status_code == 200
    _fallback_checks(body, "schema_validation_failed")
    assert body["routing_decision"]["classified_intent"] == "billing"  # the NLU's own guess
    assert len(llm_plan.requests) == 2  # exactly one repair attempt


async def test_no_repair_when_the_deadline_does_not_allow_it(
    app_client: Any, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content="not json", delay=0.6), Fault(content=json.dumps(VALID_DECISION)))
    async with app_client(cognigy_deadline_seconds=1.0, cognigy_repair_min_seconds=0.5) as client:
        body = (await post_turn(client, trigger())).json()
    _fallback_checks(body, "schema_validation_failed")
    assert len(llm_plan.requests) == 1


async def test_extra_keys_in_the_decision_are_rejected(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    extra = {**VALID_DECISION, "sql": "DROP TABLE"}
    llm_plan.push(Fault(content=json.dumps(extra)), Fault(content=json.dumps(extra)))
    body = (await post_turn(client, trigger())).json()
    _fallback_checks(body, "schema_validation_failed")


async def test_provider_answer_without_choices_is_retried(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(raw_body='{"object": "chat.completion"}'))
    body = (await post_turn(client, trigger())).json()
    assert body["status"] == "success"
    assert len(llm_plan.requests) == 2
