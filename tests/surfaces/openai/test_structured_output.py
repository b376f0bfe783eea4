"""The caller's JSON Schema reaches the model on the FIRST call (issue 16, item 7).

Before, a structured call sent the provider only `response_format: json_object` and the prompt;
the schema first appeared in the repair prompt, so a structured answer cost two calls or ended in
422. Now: OpenAI's `json_schema` response format for a provider that takes it (`strict` as the
caller gave it, else false), the schema in the system instruction otherwise (Anthropic, or an
OpenAI-compatible provider with `structured_outputs: false`).

Every test runs the app's real lifespan against the simulated provider on loopback, which
records each request and (like a model shown the schema) answers with an object built from it,
so one call is enough exactly when the schema was sent with the first one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from app.core.settings import Settings
from app.llm.anthropic_provider import AnthropicProvider
from app.llm.catalog import canonical_json, validate_provider_config
from app.llm.openai_provider import OpenAICompatibleProvider
from app.llm.streaming import collect_stream
from app.llm.types import ChatRequest, OutputSchema, StreamingProviderClient
from app.llm.websocket_provider import OpenAIWebSocketProvider
from app.main import create_app
from app.simulator.answers import token_count
from app.simulator.faults import FaultPlan
from app.simulator.schema_answers import schema_answer, schema_in_text, strict_mode_problem
from app.simulator.server import LoopbackServer
from tests.helpers import parts
from tests.surfaces.chat.test_chat_tutorial_payload import TUTORIAL_SCHEMA

KEY = "ck-structured"
AUTH = {"Authorization": f"Bearer {KEY}"}

# The gateway tutorial's schema (TUTORIAL_SCHEMA): not in OpenAI's strict subset ("confidence" is
# optional), and with additionalProperties false, so the routing decision a json_object call
# gets breaks it.
SCHEMA: dict[str, Any] = TUTORIAL_SCHEMA
# The same, in strict mode's subset: every property required, no others.
STRICT_SCHEMA: dict[str, Any] = {**SCHEMA, "required": ["intent", "reply", "confidence"]}
COMPACT = json.dumps(SCHEMA, separators=(",", ":"))
CUSTOMER = "I was charged twice for order 1234"
TUTORIAL: dict[str, Any] = {
    "sessionId": "structured-1",
    "template": "Classify the customer's message and draft a short reply.\n"
    "Customer: {{ customer_message }}",
    "variables": {"customer_message": CUSTOMER},
    "streaming": False,
    "responseFormat": {"type": "json_schema", "schema": SCHEMA},
}

Running = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def provider_file(tmp_path: Path, url: str, **provider: Any) -> Path:
    """One provider serving gpt-4o-mini (the default LLM_MODEL), with `provider`'s fields."""
    raw = {
        "allow_literal_keys": True,
        "providers": [
            {"name": "p", "base_url": url, "api_keys": ["literal:sk-test"]}
            | {"timeout_seconds": 2, "models": [{"name": "gpt-4o-mini"}]}
            | provider
        ],
    }
    path = tmp_path / "providers.json"
    path.write_text(canonical_json(raw))
    return path


@pytest.fixture
def running(app_client: Any) -> Running:
    def run(**overrides: Any) -> Any:
        return app_client(client_api_keys=[SecretStr(f"{KEY}:acme")], **overrides)

    return run


async def usage_records(client: httpx.AsyncClient, app: Any, session: str) -> list[Any]:
    """The session's ledger rows: one per metered provider call."""
    await parts(app).ledger.flush()
    response = await client.get(f"/budget/usage?session={session}", headers=AUTH)
    assert response.status_code == 200, response.text
    records: list[Any] = response.json()["records"]
    return records


def one_call_usage(request: dict[str, Any], content: str) -> tuple[int, int]:
    """The usage the simulator reports for one OpenAI-wire call that answered `content`."""
    prompt = " ".join(str(m.get("content", "")) for m in request["body"]["messages"])
    return token_count(prompt), token_count(content)


# --- /chat, the tutorial's payload ---------------------------------------------------------------


async def test_chat_sends_the_schema_with_the_first_call_and_needs_one(
    running: Running, llm_plan: FaultPlan
) -> None:
    context = running()
    async with context as client:
        response = await client.post("/chat", json=TUTORIAL, headers=AUTH)
        records = await usage_records(client, context.app, "structured-1")  # type: ignore[attr-defined]
    assert response.status_code == 200, response.text
    body = response.json()
    jsonschema.validate(body["output"], SCHEMA)
    assert body["output"]["intent"] == "billing"
    assert len(llm_plan.requests) == 1  # no repair call
    first = llm_plan.requests[0]["body"]
    assert first["response_format"] == {
        "type": "json_schema",
        # the flat form has no name: "response"; strict was not asked for: false, so a schema
        # outside strict mode's subset (this one) is not refused
        "json_schema": {"name": "response", "schema": SCHEMA, "strict": False},
    }
    assert COMPACT not in json.dumps(first["messages"])  # not sent twice
    # the usage and the ledger show that one call
    prompt, completion = one_call_usage(llm_plan.requests[0], body["response"])
    assert (body["prompt_tokens"], body["completion_tokens"]) == (prompt, completion)
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in records] == [(prompt, completion)]


async def test_chat_passes_the_flat_forms_name_and_strict(
    running: Running, llm_plan: FaultPlan
) -> None:
    flat = {"type": "json_schema", "schema": STRICT_SCHEMA, "name": "triage", "strict": True}
    async with running() as client:
        response = await client.post(
            "/chat", json={**TUTORIAL, "responseFormat": flat}, headers=AUTH
        )
    assert response.status_code == 200, response.text
    sent = llm_plan.requests[0]["body"]["response_format"]["json_schema"]
    assert (sent["name"], sent["strict"], sent["schema"]) == ("triage", True, STRICT_SCHEMA)
    assert len(llm_plan.requests) == 1


async def test_chat_refuses_flat_name_or_strict_beside_a_nested_schema(
    running: Running, llm_plan: FaultPlan
) -> None:
    nested = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}, "strict": True}
    async with running() as client:
        response = await client.post(
            "/chat", json={**TUTORIAL, "responseFormat": nested}, headers=AUTH
        )
    assert response.status_code == 422, response.text
    assert "name and strict go beside a flat schema" in response.text
    assert llm_plan.requests == []


async def test_chat_without_structured_outputs_puts_the_schema_in_the_instruction(
    running: Running, llm_plan: FaultPlan
) -> None:
    """A gateway that refuses `json_schema` (LLM_GATEWAY_STRUCTURED_OUTPUTS=false): a
    json_object call whose system instruction carries the schema — still one call."""
    async with running(llm_gateway_structured_outputs=False) as client:
        response = await client.post("/chat", json=TUTORIAL, headers=AUTH)
    assert response.status_code == 200, response.text
    jsonschema.validate(response.json()["output"], SCHEMA)
    assert len(llm_plan.requests) == 1
    first = llm_plan.requests[0]["body"]
    assert first["response_format"] == {"type": "json_object"}
    system = first["messages"][0]
    assert system["role"] == "system" and system["content"].endswith(COMPACT)
    assert [m["role"] for m in first["messages"]].count("system") == 1  # added to ours


async def test_provider_file_turns_json_schema_off_for_one_model(
    running: Running, llm_plan: FaultPlan, llm_server: LoopbackServer, tmp_path: Path
) -> None:
    models = [{"name": "gpt-4o-mini", "structured_outputs": False}, {"name": "gpt-4o"}]
    path = provider_file(tmp_path, llm_server.url, models=models)
    async with running(providers_file=path) as client:
        for model in ("gpt-4o-mini", "gpt-4o"):
            response = await client.post("/chat", json={**TUTORIAL, "modelId": model}, headers=AUTH)
            assert response.status_code == 200, response.text
    formats = [r["body"]["response_format"]["type"] for r in llm_plan.requests]
    assert formats == ["json_object", "json_schema"]


async def test_anthropic_gets_the_schema_in_its_system_text_on_the_first_call(
    running: Running, llm_plan: FaultPlan, llm_server: LoopbackServer, tmp_path: Path
) -> None:
    path = provider_file(tmp_path, llm_server.url, kind="anthropic")
    async with running(providers_file=path) as client:
        response = await client.post("/chat", json=TUTORIAL, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    jsonschema.validate(body["output"], SCHEMA)
    assert len(llm_plan.requests) == 1
    first = llm_plan.requests[0]["body"]
    assert "response_format" not in first
    assert first["system"].endswith(f"JSON Schema:\n{COMPACT}")
    assert "one JSON object" in first["system"]


def test_ws_chat_with_a_schema_sends_it_with_the_first_call(
    make_settings: Callable[..., Settings], llm_plan: FaultPlan
) -> None:
    """/ws/chat, the streamed chat surface: a schema answer is one validated content frame,
    from one call that carried the schema."""
    settings = make_settings(client_api_keys=[SecretStr(f"{KEY}:acme")])
    frame = {"type": "request", **TUTORIAL, "streaming": True}
    with (
        TestClient(create_app(settings)) as tc,
        tc.websocket_connect("/ws/chat", headers=AUTH) as ws,
    ):
        ws.send_json(frame)
        content, complete = ws.receive_json(), ws.receive_json()
    assert content["type"] == "content" and complete["type"] == "complete", complete
    jsonschema.validate(complete["output"], SCHEMA)
    assert json.loads(content["delta"]) == complete["output"]
    assert len(llm_plan.requests) == 1
    assert llm_plan.requests[0]["body"]["response_format"]["json_schema"]["schema"] == SCHEMA


async def test_a_websocket_transport_provider_gets_the_schema_too(
    running: Running, llm_plan: FaultPlan, llm_server: LoopbackServer, tmp_path: Path
) -> None:
    path = provider_file(tmp_path, llm_server.url, transport="websocket")
    async with running(providers_file=path) as client:
        response = await client.post("/chat", json=TUTORIAL, headers=AUTH)
    assert response.status_code == 200, response.text
    assert len(llm_plan.requests) == 1
    sent = llm_plan.requests[0]["body"]
    assert sent["stream"] is True
    assert sent["response_format"]["json_schema"]["schema"] == SCHEMA


# --- /v1 with the official openai client ---------------------------------------------------------


@asynccontextmanager
async def openai_client(
    running: Running, **overrides: Any
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient, Any]]:
    context = running(**overrides)
    async with context as raw:
        client = openai.AsyncOpenAI(
            api_key=KEY, base_url="http://cx-relay.test/v1", http_client=raw, max_retries=0
        )
        yield client, raw, context.app  # type: ignore[attr-defined]


async def test_v1_sends_the_callers_response_format_with_the_first_call(
    running: Running, llm_plan: FaultPlan
) -> None:
    async with openai_client(running) as (client, raw, app):
        completion = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": CUSTOMER}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "triage", "schema": SCHEMA},
            },
            user="structured-v1",
        )
        records = await usage_records(raw, app, "structured-v1")
    content = completion.choices[0].message.content or ""
    jsonschema.validate(json.loads(content), SCHEMA)
    assert (completion.model_extra or {})["cx_relay"]["output"] == json.loads(content)
    assert len(llm_plan.requests) == 1
    assert llm_plan.requests[0]["body"]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "triage", "schema": SCHEMA, "strict": False},
    }
    prompt, answer = one_call_usage(llm_plan.requests[0], content)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt, answer)
    assert len(records) == 1


async def test_v1_passes_strict_as_the_caller_set_it(running: Running, llm_plan: FaultPlan) -> None:
    """strict: true goes through (and OpenAI, like the simulator, then refuses a schema outside
    its subset: 502 upstream_rejected quoting the provider)."""
    async with openai_client(running) as (client, _, _):
        spec = {"name": "triage", "schema": STRICT_SCHEMA, "strict": True}
        completion = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": CUSTOMER}],
            response_format={"type": "json_schema", "json_schema": spec},
        )
        jsonschema.validate(json.loads(completion.choices[0].message.content or ""), STRICT_SCHEMA)
        assert llm_plan.requests[-1]["body"]["response_format"]["json_schema"]["strict"] is True
        with pytest.raises(openai.InternalServerError) as refused:
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": CUSTOMER}],
                response_format={"type": "json_schema", "json_schema": {**spec, "schema": SCHEMA}},
            )
    assert refused.value.status_code == 502
    assert "'required' is required" in str(refused.value)


# --- the provider wires, streamed and whole ------------------------------------------------------


def structured_request(**fields: Any) -> ChatRequest:
    values: dict[str, Any] = {"model": "gpt-4o-mini", "temperature": 0.2, "max_tokens": 256}
    return ChatRequest(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": CUSTOMER},
        ],
        json_output=True,
        output_schema=OutputSchema(SCHEMA, name="a name with spaces"),
        **(values | fields),
    )


@pytest.mark.parametrize("wire", ["sse", "websocket", "anthropic"])
async def test_a_streamed_attempt_carries_the_schema(
    wire: str, llm_server: LoopbackServer, llm_plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    clients: dict[str, StreamingProviderClient] = {
        "sse": OpenAICompatibleProvider("p", llm_server.url),
        "websocket": OpenAIWebSocketProvider("p", llm_server.url),
        "anthropic": AnthropicProvider("p", llm_server.url),
    }
    provider = clients[wire]
    result = await collect_stream(
        provider.stream(http, structured_request(), 5.0, "sk-test"),
        provider="p",
        model="gpt-4o-mini",
        first_token_timeout=5.0,
        total_timeout=5.0,
    )
    jsonschema.validate(json.loads(result.content), SCHEMA)
    sent = llm_plan.requests[0]["body"]
    assert sent["stream"] is True
    if wire == "anthropic":
        assert sent["system"].startswith("Be brief.\n\n") and sent["system"].endswith(COMPACT)
    else:
        assert sent["response_format"] == {
            "type": "json_schema",
            # OpenAI takes only letters, digits, _ and - in the name
            "json_schema": {"name": "a_name_with_spaces", "schema": SCHEMA, "strict": False},
        }


def test_structured_outputs_true_is_refused_for_the_anthropic_kind() -> None:
    def provider(**fields: Any) -> dict[str, Any]:
        spec = {"name": "c", "kind": "anthropic", "base_url": "https://api.anthropic.com"}
        return {"providers": [spec | {"models": [{"name": "haiku"}]} | fields]}

    _, problems = validate_provider_config(provider(structured_outputs=True), env={})
    assert [p.path for p in problems] == ["providers[0].structured_outputs"]
    models = [{"name": "haiku", "structured_outputs": True}]
    _, problems = validate_provider_config(provider(models=models), env={})
    assert [p.path for p in problems] == ["providers[0].models[0].structured_outputs"]
    _, problems = validate_provider_config(provider(structured_outputs=False), env={})
    assert problems == []


# --- the simulated model's answer to a schema ----------------------------------------------------


def test_the_simulator_answers_a_schema_with_references_arrays_and_formats() -> None:
    """Simulated mode (`make run`) answers a structured call at once, beyond flat schemas."""
    schema: dict[str, Any] = {
        "$defs": {
            "line": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "format": "uuid"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "quantity"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "classified_intent": {"type": "string"},
            "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}, "minItems": 2},
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 12}]},
            "escalate_to_human": {"type": "boolean"},
            "score": {"type": "number", "exclusiveMinimum": 1, "maximum": 5},
        },
        "required": ["classified_intent", "lines", "note", "escalate_to_human", "score"],
        "additionalProperties": False,
    }
    answer = schema_answer(schema, "I want to talk to a human about order 123456")
    jsonschema.validate(answer, schema)
    assert answer["classified_intent"] == "speak_to_agent"  # the routing rules still decide
    assert answer["escalate_to_human"] is True
    assert strict_mode_problem(schema) is None
    assert strict_mode_problem(SCHEMA) is not None  # "confidence" is not required
    assert schema_in_text(f"Be brief.\n\nMatch this JSON Schema:\n{COMPACT}") == SCHEMA
