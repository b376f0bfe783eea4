"""/chat takes the Cognigy gateway tutorial's inference payload as the tutorial writes it
(camelCase names, the flat `responseFormat.schema`, its safety filter names) next to the
snake_case ones, and answers with `model_used` and `latency_ms`; the statuses a caller of the
structured form sees: 400 for a schema that is not JSON Schema (nothing spent), 422 with each
problem for an answer that broke the schema after the repair.

The app runs its real lifespan against the simulated OpenAI-compatible upstream on loopback,
configured (PROVIDERS_FILE) with the tutorial's two models on two providers.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from app.core.settings import Settings
from app.llm.catalog import canonical_json
from app.main import create_app
from app.simulator.faults import Fault, FaultPlan
from app.simulator.server import LoopbackServer

KEY = "ck-tutorial"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEAD = "http://127.0.0.1:9"  # nothing listens: every call to it fails at once
FALLBACK = "I'm sorry, I can't help with that right now."

# The tutorial's inference request, as an integrator copies it.
TUTORIAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "intent": {"type": "string", "enum": ["billing", "orders", "other"]},
        "reply": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["intent", "reply"],
    "additionalProperties": False,
}
TUTORIAL_PAYLOAD: dict[str, Any] = {
    "sessionId": "cognigy-7f3c2a",
    "template": (
        "Classify the customer's message and draft a short reply.\n"
        "Customer: {{ customer_message }}\nChannel: {{ channel }}"
    ),
    "variables": {"customer_message": "I was charged twice for order 1234", "channel": "chat"},
    "modelId": "gpt-4o",
    "streaming": False,
    "fallbackModels": ["gpt-4o-mini"],
    "safetyFilters": ["profanity", "pii"],
    "responseFormat": {"type": "json_schema", "schema": TUTORIAL_SCHEMA},
}
GOOD_ANSWER = '{"intent":"billing","reply":"Sorry about the double charge.","confidence":0.9}'

Running = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def tutorial(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(TUTORIAL_PAYLOAD)
    body.update(changes)
    return body


def plain(**changes: Any) -> dict[str, Any]:
    """The tutorial's payload without a schema: the answer is free text (and may stream)."""
    body = tutorial(**changes)
    del body["responseFormat"]
    return body


@pytest.fixture
def providers_file(
    tmp_path: Path, llm_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Path]:
    """The tutorial's two models, each on its own provider (`primary_url` can be a dead one)."""
    monkeypatch.setenv("TUTORIAL_TEST_KEY", "sk-tutorial")

    def write(primary_url: str | None = None) -> Path:
        providers = [("primary", primary_url or llm_server.url, "gpt-4o")]
        providers.append(("backup", llm_server.url, "gpt-4o-mini"))
        raw = {
            "providers": [
                {"name": name, "base_url": url, "api_keys": ["env:TUTORIAL_TEST_KEY"]}
                | {"timeout_seconds": 2, "models": [{"name": model}]}
                for name, url, model in providers
            ]
        }
        path = tmp_path / "providers.json"
        path.write_text(canonical_json(raw))
        return path

    return write


@pytest.fixture
def configured(providers_file: Callable[..., Path]) -> Callable[..., dict[str, Any]]:
    def settings(primary_url: str | None = None) -> dict[str, Any]:
        path = providers_file(primary_url)
        keys = [SecretStr(f"{KEY}:acme")]
        return {"client_api_keys": keys, "providers_file": path, "llm_model": "gpt-4o"}

    return settings


@pytest.fixture
def running(app_client: Any, configured: Callable[..., dict[str, Any]]) -> Running:
    def run(primary_url: str | None = None, **overrides: Any) -> Any:
        return app_client(**configured(primary_url), **overrides)

    return run


@pytest.fixture
async def chat(running: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with running() as client:
        yield client


async def post(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await client.post("/chat", json=body, headers=AUTH)


def sse_frames(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [json.loads(b.removeprefix("data: ")) for b in blocks]


# --- the tutorial's payload, verbatim ----------------------------------------------------------


async def test_the_tutorials_payload_gets_schema_valid_json(
    chat: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content=GOOD_ANSWER))
    response = await post(chat, TUTORIAL_PAYLOAD)
    assert response.status_code == 200, response.text
    body = response.json()
    jsonschema.validate(body["output"], TUTORIAL_SCHEMA)
    assert body["output"] == json.loads(GOOD_ANSWER)
    assert body["session_id"] == "cognigy-7f3c2a"
    assert (body["provider"], body["model_used"]) == ("primary", "gpt-4o")
    assert body["model"] == "gpt-4o-simulated"  # what the provider itself called it
    assert isinstance(body["latency_ms"], float) and body["latency_ms"] > 0
    # one upstream call, to the asked-for model, with the rendered template as the user turn
    # and a JSON answer requested
    assert len(llm_plan.requests) == 1
    sent = llm_plan.requests[0]["body"]
    assert sent["model"] == "gpt-4o"
    assert sent["messages"][-1] == {
        "role": "user",
        "content": "Classify the customer's message and draft a short reply.\n"
        "Customer: I was charged twice for order 1234\nChannel: chat",
    }
    assert sent["response_format"]["type"] in ("json_object", "json_schema")


async def test_model_used_names_the_fallback_that_answered(
    running: Running, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content=GOOD_ANSWER))
    async with running(primary_url=DEAD) as client:
        response = await post(client, TUTORIAL_PAYLOAD)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["provider"], body["model_used"]) == ("backup", "gpt-4o-mini")
    assert body["model"] == "gpt-4o-mini-simulated"
    assert [r["body"]["model"] for r in llm_plan.requests] == ["gpt-4o-mini"]


async def test_snake_case_and_openais_nested_schema_still_work(
    chat: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content=GOOD_ANSWER))
    nested = {"type": "json_schema", "json_schema": {"name": "triage", "schema": TUTORIAL_SCHEMA}}
    body = {"session_id": "snake-1", "model": "gpt-4o", "stream": False, "response_format": nested}
    body |= {"fallback_models": ["gpt-4o-mini"], "safety_filters": ["pii"]}
    body |= {"template": TUTORIAL_PAYLOAD["template"], "variables": TUTORIAL_PAYLOAD["variables"]}
    response = await post(chat, body)
    assert response.status_code == 200, response.text
    assert response.json()["output"] == json.loads(GOOD_ANSWER)
    assert response.json()["model_used"] == "gpt-4o"


async def test_streaming_true_answers_as_server_sent_events(
    chat: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(chunks=["Sorry about ", "the double ", "charge."]))
    frames = sse_frames(await post(chat, plain(streaming=True)))
    deltas = [f["delta"] for f in frames if f["type"] == "content"]
    assert "".join(deltas) == "Sorry about the double charge."
    complete = frames[-1]
    assert complete["type"] == "complete"
    assert complete["session_id"] == "cognigy-7f3c2a"
    assert complete["model_used"] == "gpt-4o"
    assert isinstance(complete["latency_ms"], float) and complete["latency_ms"] > 0
    assert llm_plan.requests[0]["body"]["stream"] is True


def test_a_websocket_request_frame_takes_the_tutorials_payload(
    make_settings: Callable[..., Settings],
    configured: Callable[..., dict[str, Any]],
    llm_plan: FaultPlan,
) -> None:
    settings = make_settings(**configured())
    llm_plan.push(Fault(content=GOOD_ANSWER))
    frame = {"type": "request", **tutorial(streaming=True)}
    with (
        TestClient(create_app(settings)) as tc,
        tc.websocket_connect("/ws/chat", headers=AUTH) as ws,
    ):
        ws.send_json(frame)
        content, complete = ws.receive_json(), ws.receive_json()
    assert content == {"type": "content", "delta": GOOD_ANSWER}
    assert complete["type"] == "complete", complete
    assert complete["output"] == json.loads(GOOD_ANSWER)
    assert complete["model_used"] == "gpt-4o" and complete["latency_ms"] > 0


# --- refused before any upstream call ----------------------------------------------------------


@pytest.mark.parametrize(
    ("snake", "camel", "value"),
    [
        ("session_id", "sessionId", "other-session"),
        ("model", "modelId", "gpt-4o"),
        ("stream", "streaming", False),
        ("fallback_models", "fallbackModels", []),
        ("safety_filters", "safetyFilters", ["pii"]),
        ("response_format", "responseFormat", {"type": "json_object"}),
    ],
)
async def test_both_names_for_one_field_is_422_naming_both(
    chat: httpx.AsyncClient, llm_plan: FaultPlan, snake: str, camel: str, value: Any
) -> None:
    response = await post(chat, tutorial(**{snake: value}))
    assert response.status_code == 422, response.text
    message = json.dumps(response.json()["detail"])
    assert f"{snake} and {camel}" in message
    assert llm_plan.requests == []


async def test_a_schema_given_both_flat_and_nested_is_422(
    chat: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    both = {
        "type": "json_schema",
        "schema": TUTORIAL_SCHEMA,
        "json_schema": {"name": "triage", "schema": TUTORIAL_SCHEMA},
    }
    response = await post(chat, tutorial(responseFormat=both))
    assert response.status_code == 422
    assert "schema or json_schema.schema, not both" in response.text
    assert llm_plan.requests == []


async def test_an_unknown_safety_filter_is_422_listing_the_known_ones(
    chat: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    response = await post(chat, tutorial(safetyFilters=["profanity", "toxicity"]))
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["safetyFilters", 1]  # the name the caller used
    for name in ("pii", "unsafe", "injection", "profanity", "self_harm"):
        assert f"'{name}'" in error["msg"]
    assert llm_plan.requests == []


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "schema": {"type": "objekt"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"required": "intent"}}},
    ],
    ids=["flat", "nested"],
)
async def test_a_schema_that_is_not_json_schema_is_400_before_any_upstream_call(
    chat: httpx.AsyncClient, llm_plan: FaultPlan, response_format: dict[str, Any]
) -> None:
    response = await post(chat, tutorial(responseFormat=response_format))
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid_response_format"
    assert body["message"].startswith("response_format schema is not a valid JSON Schema")
    assert llm_plan.requests == []


async def test_v1_refuses_a_schema_that_is_not_json_schema_as_openai_does(
    chat: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    not_a_schema = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "objekt"}},
    }
    messages = [{"role": "user", "content": "Classify: charged twice"}]
    request = {"model": "gpt-4o", "messages": messages, "response_format": not_a_schema}
    response = await chat.post("/v1/chat/completions", json=request, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "not a valid JSON Schema" in error["message"]
    assert llm_plan.requests == []


# --- an answer that still breaks the schema after the repair ------------------------------------

BROKEN_FIRST = '{"intent":"weather","reply":"It is sunny."}'
BROKEN_AGAIN = '{"intent":"billing","confidence":7}'


async def test_still_broken_after_the_repair_is_422_with_each_problem(
    chat: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content=BROKEN_FIRST), Fault(content=BROKEN_AGAIN))
    response = await post(chat, TUTORIAL_PAYLOAD)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "output_invalid"
    assert body["errors"] == [
        {"path": "$", "message": "'reply' is a required property"},
        {"path": "$.confidence", "message": "7 is greater than the maximum of 1"},
    ]
    assert "raw_output" not in body  # DEBUG_FAILED_OUTPUT is off by default
    assert len(llm_plan.requests) == 2  # the answer and one repair, nothing more


async def test_debug_failed_output_adds_the_models_text(
    running: Running, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content=BROKEN_FIRST), Fault(content=BROKEN_AGAIN))
    async with running(debug_failed_output=True) as client:
        response = await post(client, TUTORIAL_PAYLOAD)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["raw_output"] == BROKEN_AGAIN
    assert [e["path"] for e in body["errors"]] == ["$", "$.confidence"]


async def test_an_answer_that_is_not_json_at_all_is_one_problem_at_the_root(
    chat: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content="Sure! Billing."), Fault(content="Billing, I think."))
    response = await post(chat, TUTORIAL_PAYLOAD)
    assert response.status_code == 422
    (problem,) = response.json()["errors"]
    assert problem["path"] == "$" and problem["message"].startswith("not JSON")


# --- the tutorial's safety filter names --------------------------------------------------------

PROFANE = "That charge is bullshit, I'll refund it."
SELF_HARM = "Honestly, you should kill yourself."


async def test_profanity_filter_blocks_a_profane_answer_self_harm_alone_does_not(
    running: Running, llm_plan: FaultPlan
) -> None:
    # configured without profanity: the request's filter names alone decide
    async with running(unsafe_output_categories=["self_harm", "violence"]) as client:
        llm_plan.push(Fault(content=PROFANE), Fault(content=PROFANE), Fault(content=PROFANE))
        profanity = (await post(client, plain(safetyFilters=["profanity", "pii"]))).json()
        self_harm = (await post(client, plain(safetyFilters=["self_harm"]))).json()
        unsafe = (await post(client, plain(safetyFilters=["unsafe"]))).json()
    assert profanity["blocked"] == "profanity"
    assert profanity["finish_reason"] == "content_filter"
    assert profanity["response"] == FALLBACK
    assert self_harm["blocked"] is None and self_harm["response"] == PROFANE
    assert unsafe["blocked"] is None  # `unsafe` is the configured categories, as before
    assert len(llm_plan.requests) == 3  # each filter set is its own cache entry


async def test_self_harm_filter_blocks_self_harm_and_streams_stop_before_it(
    chat: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content=SELF_HARM))
    whole = (await post(chat, plain(safetyFilters=["self_harm"]))).json()
    assert (whole["blocked"], whole["response"]) == ("self_harm", FALLBACK)
    llm_plan.push(Fault(chunks=["Honestly, ", "you should kill ", "yourself."]))
    streamed = plain(sessionId="s-2", safetyFilters=["self_harm"], streaming=True)
    frames = sse_frames(await post(chat, streamed))
    assert "kill" not in "".join(f.get("delta", "") for f in frames)
    assert frames[-1]["type"] == "complete" and frames[-1]["blocked"] == "self_harm"
