"""The CXone bot webhook end to end: NICE's wire format (validated against NICE's own OpenAPI
file), each userInputType and branch, signed session state, streaming, safety and fallbacks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from app.llm.tokens import text_tokens
from app.simulator.faults import Fault, FaultPlan
from app.surfaces.cxone.schemas import ExternalIntegrationBotExchangeRequest
from tests.helpers import CXONE_AUTH, CXONE_WEBHOOK, cxone_turn, websocket_gateway_and_backup

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
# NICE's OpenAPI file for the exchange, as published (a copy of ../shared/specs/).
SPEC = json.loads((FIXTURES / "cxone-virtualagenthub-swagger.json").read_text())


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` is JSON Schema's `type: [T, "null"]`."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


COMPONENTS = _json_schema(SPEC["components"])


def validate_against_spec(body: dict[str, Any], schema_name: str) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": COMPONENTS}
    jsonschema.Draft7Validator(schema).validate(body)


async def answer(client: httpx.AsyncClient, *args: Any, **kw: Any) -> dict[str, Any]:
    response = await cxone_turn(client, *args, **kw)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    validate_against_spec(body, "BotExchangeResponse")  # every answer, every branch
    return body


def said(body: dict[str, Any]) -> str:
    return " ".join(p["transcript"] for p in body["nextPromptSequence"]["prompts"])


# --- the wire format ---------------------------------------------------------------------------


def test_nice_example_request_validates_against_the_published_schema() -> None:
    example = json.loads((FIXTURES / "cxone_exchange_request.json").read_text())
    validate_against_spec(example, "ExternalIntegrationBotExchangeRequest")
    parsed = ExternalIntegrationBotExchangeRequest.model_validate(example)
    assert parsed.contact_id == "548712063"
    assert parsed.input_type.value == "TEXT"


async def test_the_example_request_gets_a_spec_valid_answer(client: httpx.AsyncClient) -> None:
    example = (FIXTURES / "cxone_exchange_request.json").read_bytes()
    response = await client.post(
        CXONE_WEBHOOK,
        content=example,
        headers={"Authorization": CXONE_AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 200
    body = response.json()
    validate_against_spec(body, "BotExchangeResponse")
    assert body["branchName"] == "PromptAndCollectNextResponse"
    assert "Men's basketball shoes" in said(body)  # the simulator echoes the customer


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "text/json",
        "application/vnd.nice.bot+json",
        "application/json; charset=utf-8",
    ],
)
async def test_the_spec_content_types_are_accepted(
    client: httpx.AsyncClient, content_type: str
) -> None:
    body = json.dumps({"userInput": "hi", "userInputType": "TEXT"})
    response = await client.post(
        CXONE_WEBHOOK,
        content=body,
        headers={"Authorization": CXONE_AUTH, "Content-Type": content_type},
    )
    assert response.status_code == 200


async def test_other_content_types_get_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CXONE_WEBHOOK,
        content="userInput=hi",
        headers={"Authorization": CXONE_AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": CXONE_AUTH + "x"}]
)
async def test_wrong_authorization_is_401_and_reaches_no_provider(
    client: httpx.AsyncClient, llm_plan: FaultPlan, headers: dict[str, str]
) -> None:
    response = await client.post(
        CXONE_WEBHOOK, json={"userInput": "hi", "userInputType": "TEXT"}, headers=headers
    )
    assert response.status_code == 401
    assert llm_plan.requests == []


async def test_rotated_authorization_values_are_both_accepted(app_client: Any) -> None:
    from pydantic import SecretStr

    values = [SecretStr("Bearer old-token"), SecretStr("Basic dXNlcjpwYXNz")]
    async with app_client(cxone_webhook_authorization=values) as client:
        for value in ("Bearer old-token", "Basic dXNlcjpwYXNz"):
            response = await client.post(
                CXONE_WEBHOOK, json={"userInput": "hi"}, headers={"Authorization": value}
            )
            assert response.status_code == 200


async def test_malformed_exchange_is_422_naming_the_field(client: httpx.AsyncClient) -> None:
    response = await cxone_turn(client, input_type="SHOUTING")
    assert response.status_code == 422
    assert any("userInputType" in e["loc"] for e in response.json()["detail"])
    assert (await cxone_turn(client, input_type=9)).status_code == 422


# --- userInputType and branches ------------------------------------------------------------------


@pytest.mark.parametrize("input_type", ["TEXT", 1, "1", "DTMF_AS_TEXT", 6])
async def test_text_and_dtmf_go_to_the_llm(
    client: httpx.AsyncClient, llm_plan: FaultPlan, input_type: str | int
) -> None:
    body = await answer(client, "I need help with my bill", input_type)
    assert body["branchName"] == "PromptAndCollectNextResponse"
    assert "I need help with my bill" in said(body)
    assert len(llm_plan.requests) == 1
    assert llm_plan.requests[0]["body"]["stream"] is True  # answers are streamed
    assert body["intentInfo"]["lastUserUtterance"] == "I need help with my bill"


@pytest.mark.parametrize("input_type", ["AUTOMATED_TEXT", 5])
async def test_welcome_turn_says_the_configured_greeting_without_an_llm_call(
    client: httpx.AsyncClient, llm_plan: FaultPlan, input_type: str | int
) -> None:
    body = await answer(client, "", input_type)
    assert body["branchName"] == "PromptAndCollectNextResponse"
    assert said(body) == "Hello! I'm the virtual assistant. How can I help you today?"
    assert llm_plan.requests == []


async def test_welcome_turn_asks_the_llm_when_no_greeting_is_configured(
    app_client: Any, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content="Hi there! How can I help?"))
    async with app_client(cxone_greeting="") as client:
        body = await answer(client, "", "AUTOMATED_TEXT")
    assert said(body) == "Hi there! How can I help?"
    assert "greet" in llm_plan.requests[0]["body"]["messages"][0]["content"]


@pytest.mark.parametrize("input_type", ["NO_INPUT", 0])
async def test_no_input_reprompts_then_returns_control(
    client: httpx.AsyncClient, llm_plan: FaultPlan, input_type: str | int
) -> None:
    first = await answer(client, None, input_type)
    assert first["branchName"] == "PromptAndCollectNextResponse"
    assert said(first) == "Sorry, I didn't catch that. How can I help you?"
    second = await answer(client, None, input_type, state=first["botSessionState"])
    assert second["branchName"] == "PromptAndCollectNextResponse"
    third = await answer(client, None, input_type, state=second["botSessionState"])
    assert third["branchName"] == "ReturnControlToScript"  # CXONE_MAX_NO_INPUT = 3
    assert third["customPayload"]["handoffReason"] == "no_input"
    assert llm_plan.requests == []


async def test_an_answer_resets_the_no_input_streak(client: httpx.AsyncClient) -> None:
    state = (await answer(client, None, "NO_INPUT"))["botSessionState"]
    state = (await answer(client, None, "NO_INPUT", state=state))["botSessionState"]
    state = (await answer(client, "hello", "TEXT", state=state))["botSessionState"]
    body = await answer(client, None, "NO_INPUT", state=state)
    assert body["branchName"] == "PromptAndCollectNextResponse"


@pytest.mark.parametrize("input_type", ["USER_ENDED_SESSION", 4])
async def test_user_ended_session_ends_the_contact(
    client: httpx.AsyncClient, llm_plan: FaultPlan, input_type: str | int
) -> None:
    body = await answer(client, None, input_type)
    assert body["branchName"] == "EndContact"
    assert "nextPromptSequence" not in body
    assert llm_plan.requests == []


@pytest.mark.parametrize("input_type", ["BASE64_ENCODED_G711_ULAW_WAV_FILE", 2])
async def test_audio_without_transcript_is_untranscribeable(
    client: httpx.AsyncClient, llm_plan: FaultPlan, input_type: str | int
) -> None:
    body = await answer(client, None, input_type, base64wavFile="UklGRiQAAABXQVZF")
    assert body["branchName"] == "AudioInputUntranscribeable"
    assert llm_plan.requests == []


async def test_audio_with_a_transcript_is_answered(client: httpx.AsyncClient) -> None:
    body = await answer(client, "check my balance", "BASE64_ENCODED_G711_ULAW_WAV_FILE")
    assert body["branchName"] == "PromptAndCollectNextResponse"


async def test_archived_input_with_text_is_answered(client: httpx.AsyncClient) -> None:
    body = await answer(client, "archived words", 3)
    assert body["branchName"] == "PromptAndCollectNextResponse"


async def test_model_asking_for_a_human_returns_control_with_the_reason(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content="[[HANDOFF]]: customer wants to dispute a charge"))
    body = await answer(client, "I want to dispute this charge with a person")
    assert body["branchName"] == "ReturnControlToScript"
    assert body["customPayload"]["handoffReason"] == "customer wants to dispute a charge"


async def test_voice_turns_get_comfort_prompts(client: httpx.AsyncClient) -> None:
    body = await answer(client, "hello", mediaType="voice")
    silence = body["nextPromptBehaviors"]["silenceRules"]
    assert silence["engageComfortSequence"] is True
    assert silence["botResponseDelayTolerance"] == 2000
    assert silence["comfortPromptSequence"]["prompts"][0]["textToSpeech"] == "One moment, please."


async def test_turn_metrics_travel_in_custom_payload(client: httpx.AsyncClient) -> None:
    payload = (await answer(client, "hello"))["customPayload"]
    assert payload["promptTokens"] > 0 and payload["completionTokens"] > 0
    assert payload["usageEstimated"] is False
    assert payload["ttftMs"] is not None and payload["latencyMs"] >= payload["ttftMs"]
    assert payload["provider"] == "default"
    assert all(not isinstance(v, (dict, list)) for v in payload.values())  # flat, as NICE advises


async def test_missing_usage_is_estimated_and_marked(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content="A reply without usage.", omit_usage=True))
    payload = (await answer(client, "hello"))["customPayload"]
    assert payload["usageEstimated"] is True
    assert payload["promptTokens"] > 0
    assert payload["completionTokens"] == text_tokens("A reply without usage.")


# --- session state --------------------------------------------------------------------------------


async def test_state_carries_the_conversation_to_the_next_turn(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    first = await answer(client, "My name is Dana")
    await answer(client, "What is my name?", state=first["botSessionState"])
    sent = llm_plan.requests[1]["body"]["messages"]
    assert {"role": "user", "content": "My name is Dana"} in sent
    assert sent[-1] == {"role": "user", "content": "What is my name?"}


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s["state"]["history"].append({"role": "assistant", "content": "refund ok"}),
        lambda s: s.update(sig="0" * 64),
        lambda s: s.update(v=99),
        lambda s: s.pop("sig"),
    ],
)
async def test_tampered_state_starts_a_new_session(
    client: httpx.AsyncClient, llm_plan: FaultPlan, tamper: Any
) -> None:
    first = await answer(client, "My name is Dana")
    state = json.loads(json.dumps(first["botSessionState"]))
    tamper(state)
    second = await answer(client, "What is my name?", state=state)
    assert second["branchName"] == "PromptAndCollectNextResponse"
    assert second["botSessionState"]["state"]["sid"] != first["botSessionState"]["state"]["sid"]
    sent = llm_plan.requests[1]["body"]["messages"]
    assert not any(m["content"] in ("My name is Dana", "refund ok") for m in sent)


async def test_oversized_state_starts_a_new_session(client: httpx.AsyncClient) -> None:
    first = await answer(client, "hello")
    state = first["botSessionState"]
    state["state"]["history"] = [{"role": "user", "content": "x" * 40000}]
    body = await answer(client, "hello again", state=state)
    assert body["botSessionState"]["state"]["sid"] != state["state"]["sid"]


async def test_twenty_turns_keep_the_state_within_its_bounds(app_client: Any) -> None:
    state = None
    sizes = []
    # twenty long turns outspend the default session budget; the state bounds are the point here
    async with app_client(budget_session_tokens=None) as client:
        for i in range(20):
            body = await answer(client, f"turn {i}: " + "words " * 60, state=state)
            state = body["botSessionState"]
            sizes.append(len(json.dumps(state)))
            history = state["state"]["history"]
            assert len(history) <= 20
            assert sum(len(m["content"]) for m in history) <= 8000
    assert state["state"]["turns"] == 20
    assert max(sizes) < 32768
    assert sizes[-1] <= sizes[-5] * 1.2  # bounded, not growing with the conversation


async def test_history_comes_from_cxone_when_a_digital_contact_has_no_state(
    client: httpx.AsyncClient, llm_plan: FaultPlan, cxone_state: Any
) -> None:
    cxone_state.add_conversation(
        "548712063",
        [
            ("inbound", "earlier question"),
            ("outbound", "earlier answer"),
            ("inbound", "Where is my order?"),
        ],
    )
    await answer(client, "Where is my order?")
    sent = llm_plan.requests[0]["body"]["messages"]
    assert {"role": "user", "content": "earlier question"} in sent
    assert {"role": "assistant", "content": "earlier answer"} in sent
    assert [m["content"] for m in sent].count("Where is my order?") == 1


@pytest.mark.parametrize(
    ("history", "utterance", "expected"),
    [
        pytest.param(  # the customer answers the agent's question; CXone has not stored it yet
            [("inbound", "I was charged twice"), ("outbound", "Which invoice?")],
            "the March one",
            [
                ("user", "I was charged twice"),
                ("assistant", "Which invoice?"),
                ("user", "the March one"),
            ],
            id="newest-is-the-agents-question",
        ),
        pytest.param(  # CXone already has the customer's current message (any spacing or case)
            [
                ("inbound", "I was charged twice"),
                ("outbound", "Which invoice?"),
                ("inbound", "The  MARCH one "),
            ],
            "the March one",
            [
                ("user", "I was charged twice"),
                ("assistant", "Which invoice?"),
                ("user", "the March one"),
            ],
            id="newest-is-this-utterance",
        ),
        pytest.param(  # the customer wrote twice in a row: the first line is not this one
            [("outbound", "Which invoice?"), ("inbound", "hold on")],
            "the March one",
            [("assistant", "Which invoice?"), ("user", "hold on"), ("user", "the March one")],
            id="newest-is-an-earlier-customer-line",
        ),
    ],
)
async def test_history_seeding_drops_only_the_current_utterance(
    client: httpx.AsyncClient,
    llm_plan: FaultPlan,
    cxone_state: Any,
    history: list[tuple[str, str]],
    utterance: str,
    expected: list[tuple[str, str]],
) -> None:
    """Issue 16 item 8: the newest CXone message is dropped only when it is the customer's
    current utterance, never the agent's question the customer is answering."""
    cxone_state.add_conversation("548712063", history)
    await answer(client, utterance)
    (request,) = llm_plan.requests
    sent = [(m["role"], m["content"]) for m in request["body"]["messages"]]
    assert sent[0][0] == "system"
    assert sent[1:] == expected


async def test_welcome_turn_keeps_the_whole_cxone_history(
    app_client: Any, llm_plan: FaultPlan, cxone_state: Any
) -> None:
    """A welcome (AUTOMATED_TEXT) has no customer words of its own: nothing is dropped."""
    cxone_state.add_conversation("548712063", [("inbound", "hi"), ("outbound", "Which invoice?")])
    async with app_client(cxone_greeting="") as client:
        await answer(client, "", "AUTOMATED_TEXT")
    sent = [(m["role"], m["content"]) for m in llm_plan.requests[0]["body"]["messages"]]
    assert sent[1:3] == [("user", "hi"), ("assistant", "Which invoice?")]


# --- safety ---------------------------------------------------------------------------------------


async def test_pii_in_the_reply_is_redacted_before_the_customer_hears_it(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(
        Fault(
            content=(
                "Your card 4111 1111 1111 1111 and SSN 123-45-6789 are on file; we will mail "
                "dana@example.com or call +1 415 555 0123. Order 12345678 ships today."
            )
        )
    )
    body = await answer(client, "what do you have on file?")
    text = said(body)
    for label in ("[CARD REDACTED]", "[SSN REDACTED]", "[EMAIL REDACTED]", "[PHONE REDACTED]"):
        assert label in text
    for raw in ("4111 1111 1111 1111", "123-45-6789", "dana@example.com", "555 0123"):
        assert raw not in json.dumps(body)
    assert "Order 12345678 ships today" in text  # not a card: fails Luhn


async def test_customer_pii_is_never_echoed_back_or_kept_in_state(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    body = await answer(client, "my SSN is 123-45-6789, card 4111 1111 1111 1111")
    assert body["intentInfo"]["lastUserUtterance"] == (
        "my SSN is [SSN REDACTED], card [CARD REDACTED]"
    )
    state = json.dumps(body["botSessionState"])
    assert "123-45-6789" not in state and "4111 1111 1111 1111" not in state
    # without REDACT_PII_INPUT the provider still gets the customer's own words
    assert "123-45-6789" in llm_plan.requests[0]["body"]["messages"][-1]["content"]


async def test_customer_pii_reaches_the_provider_only_redacted_when_configured(
    app_client: Any, llm_plan: FaultPlan
) -> None:
    async with app_client(redact_pii_input=True) as client:
        await answer(client, "my card is 4111-1111-1111-1111")
    assert "4111-1111-1111-1111" not in json.dumps(llm_plan.requests[0]["body"])
    assert "[CARD REDACTED]" in llm_plan.requests[0]["body"]["messages"][-1]["content"]


async def test_unsafe_reply_is_replaced_by_the_fallback(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content="Honestly you should just kill yourself."))
    body = await answer(client, "this is hopeless")
    assert body["branchName"] == "PromptAndCollectNextResponse"
    assert said(body) == (
        "I'm sorry, I'm having trouble answering right now. Could you please say that again?"
    )
    assert "kill" not in json.dumps(body)
    assert "self_harm" in body["errorDetails"]["systemErrorMessage"]


# --- failures -------------------------------------------------------------------------------------


async def test_provider_failure_prompts_the_fallback_then_returns_control(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(*[Fault(status=503)] * 6)
    first = await answer(client, "hello")
    assert first["branchName"] == "PromptAndCollectNextResponse"
    assert first["errorDetails"]["errorBehavior"] == "ReturnControlToScriptThroughErrorBranch"
    assert "503" in first["errorDetails"]["systemErrorMessage"]
    second = await answer(client, "hello?", state=first["botSessionState"])
    assert second["branchName"] == "ReturnControlToScript"  # CXONE_MAX_FAILURES = 2
    assert second["customPayload"]["handoffReason"] == "repeated_failures"


async def test_stream_cut_falls_back(client: httpx.AsyncClient, llm_plan: FaultPlan) -> None:
    llm_plan.push(*[Fault(content="This answer will be cut off in the middle", cut_after=2)] * 3)
    body = await answer(client, "hello")
    assert body["branchName"] == "PromptAndCollectNextResponse"
    assert said(body).startswith("I'm sorry")
    assert "cut" in body["errorDetails"]["systemErrorMessage"]
    assert "This answer" not in said(body)  # half an answer never reaches the customer


async def test_slow_first_token_answers_the_fallback_within_the_deadline(
    app_client: Any, llm_plan: FaultPlan
) -> None:
    llm_plan.push(*[Fault(content="late", first_token_delay=5.0)] * 3)
    async with app_client(
        cxone_first_token_timeout_seconds=0.5, cxone_deadline_seconds=2.0
    ) as client:
        started = time.monotonic()
        body = await answer(client, "hello")
        elapsed = time.monotonic() - started
    assert said(body).startswith("I'm sorry")
    assert elapsed < 2.5


async def test_never_a_5xx_for_an_upstream_failure(app_client: Any) -> None:
    async with app_client(llm_gateway_base_url="http://127.0.0.1:9") as client:
        response = await cxone_turn(client, "hello")
    assert response.status_code == 200
    assert response.json()["branchName"] == "PromptAndCollectNextResponse"


# --- transports and route fallback -------------------------------------------------------------


async def _with_provider_file(
    app_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    providers: list[dict[str, Any]],
) -> Any:
    monkeypatch.setenv("SIM_KEY", "sk-sim")
    chain = [{"provider": p["name"], "model": p["models"][0]["name"]} for p in providers]
    path = tmp_path / "providers.json"
    path.write_text(
        json.dumps({"providers": providers, "routes": [{"name": "assistant", "chain": chain}]})
    )
    return app_client(providers_file=path, llm_model="assistant")


async def test_answers_stream_over_a_websocket_gateway(
    app_client: Any,
    llm_server: Any,
    llm_plan: FaultPlan,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    providers = [
        {
            "name": "wsgw",
            "base_url": llm_server.url,
            "transport": "websocket",
            "api_keys": ["env:SIM_KEY"],
            "models": [{"name": "gpt-4o-mini"}],
        }
    ]
    async with await _with_provider_file(app_client, tmp_path, monkeypatch, providers) as client:
        body = await answer(client, "hello over a socket")
    assert body["branchName"] == "PromptAndCollectNextResponse"
    assert "hello over a socket" in said(body)
    assert body["customPayload"]["provider"] == "wsgw"
    assert body["customPayload"]["usageEstimated"] is False
    assert llm_plan.requests[0]["headers"]["authorization"] == "Bearer sk-sim"


async def test_websocket_closed_mid_stream_falls_back_to_the_next_route_entry(
    app_client: Any,
    llm_plan: FaultPlan,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.simulator.llm import create_llm_simulator
    from app.simulator.server import LoopbackServer

    backup_plan = FaultPlan()
    with (
        LoopbackServer(create_llm_simulator(llm_plan)) as primary,
        LoopbackServer(create_llm_simulator(backup_plan)) as backup,
    ):
        providers = websocket_gateway_and_backup(primary.url, backup.url)
        llm_plan.push(Fault(content="this will be cut short", cut_after=1))
        async with await _with_provider_file(
            app_client, tmp_path, monkeypatch, providers
        ) as client:
            body = await answer(client, "hello")
    assert body["branchName"] == "PromptAndCollectNextResponse"
    assert body["customPayload"]["provider"] == "backup"
    assert "hello" in said(body) and "cut short" not in said(body)
    assert len(backup_plan.requests) == 1
