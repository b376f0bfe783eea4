"""Traces through the real app and its simulated upstreams, into the SDK's in-memory exporter:
the span tree of a Cognigy turn, a CXone bot turn and a /v1 call, the caller's `traceparent`
honoured and passed on to the provider and to CXone, and nothing secret in any attribute."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import SecretStr

from app.auth.signatures import fingerprint
from app.core.settings import Settings
from app.main import create_app
from app.observability import tracing
from app.simulator.cxone import CXoneSimulatorState, message
from app.simulator.faults import Fault, FaultPlan
from tests.helpers import API_KEY, CXONE_AUTH, SECRET, TEST_BASE_URL, cxone_turn, post_turn, trigger

PROVIDER_KEY = "sk-test-provider-key"  # conftest's make_settings
CLIENT_KEY = "ck-trace-0123456789"
DECISION = {
    "classified_intent": "billing_question",
    "confidence": 0.83,
    "extracted_parameters": {"charge": "duplicate"},
    "suggested_response": "I can look into that double charge for you.",
    "requires_human_agent": False,
}
# the caller's trace (W3C Trace Context): its trace id and the caller's own span id
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.shutdown()


@pytest.fixture
def traced(
    make_settings: Callable[..., Settings], exporter: InMemorySpanExporter
) -> Callable[..., Any]:
    """`async with traced(**setting_overrides) as (client, app):` the app with its real
    lifespan, tracing into `exporter` (each span as it ends)."""

    @asynccontextmanager
    async def running(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        app = create_app(make_settings(**overrides), tracer_provider=provider)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url=TEST_BASE_URL
            ) as client,
        ):
            yield client, app
        assert not tracing.enabled()  # the lifespan's end turned it off again

    return running


def server_span(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [s for s in spans if s.kind is SpanKind.SERVER]
    assert [s.name for s in found] == [name], [s.name for s in spans]
    return found[0]


def under(spans: tuple[ReadableSpan, ...], root: ReadableSpan) -> list[ReadableSpan]:
    """Every span below `root` (children, grandchildren ...), in the order they ended."""
    ids = {root.context.span_id}
    below: list[ReadableSpan] = []
    grew = True
    while grew:
        grew = False
        for span in spans:
            if span.parent is not None and span.parent.span_id in ids and span not in below:
                below.append(span)
                ids.add(span.context.span_id)
                grew = True
    return below


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def traceparent_parts(header: str) -> tuple[str, str]:
    """(trace id, parent span id) of a `traceparent` header."""
    version, trace_id, parent, flags = header.split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    return trace_id, parent


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


async def test_a_cognigy_turn_is_one_trace_below_the_callers(
    traced: Callable[..., Any],
    exporter: InMemorySpanExporter,
    llm_plan: FaultPlan,
    cxone_state: CXoneSimulatorState,
) -> None:
    llm_plan.push(Fault(content=json.dumps(DECISION)))
    async with traced() as (client, _):
        response = await post_turn(client, trigger(), traceparent=TRACEPARENT)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "success"
    spans = exporter.get_finished_spans()

    request = server_span(spans, "POST /webhook/cognigy/fallback")
    assert hex_id(request.context.trace_id, 32) == TRACE_ID  # the caller's trace ...
    assert request.parent is not None and hex_id(request.parent.span_id, 16) == CALLER_SPAN
    assert request.parent.is_remote  # ... continued from its header
    assert request.attributes is not None
    assert request.attributes["http.route"] == "/webhook/cognigy/fallback"
    assert request.attributes["http.request.method"] == "POST"
    assert request.attributes["http.response.status_code"] == 200
    assert request.status.status_code is StatusCode.UNSET

    steps = under(spans, request)
    names = {s.name for s in steps}
    assert {"safety.injection", "cxone.history", "budget.reserve", "llm.attempt"} <= names
    assert {"safety.validation", "ledger.commit"} <= names
    (validation,) = named(steps, "safety.validation")
    assert validation.attributes == {"cxrelay.safety.schema": "RoutingDecision"}
    assert validation.status.status_code is StatusCode.UNSET
    (attempt,) = named(steps, "llm.attempt")
    assert dict(attempt.attributes or {}) == {
        "gen_ai.provider.name": "default",
        "gen_ai.request.model": "gpt-4o-mini",
        "cxrelay.llm.key_fingerprint": fingerprint(PROVIDER_KEY),
        "cxrelay.llm.attempt": 1,
        "gen_ai.usage.input_tokens": attempt.attributes["gen_ai.usage.input_tokens"],  # type: ignore[index]
        "gen_ai.usage.output_tokens": attempt.attributes["gen_ai.usage.output_tokens"],  # type: ignore[index]
        "cxrelay.llm.outcome": "ok",
    }
    assert int(attempt.attributes["gen_ai.usage.input_tokens"]) > 0  # type: ignore[arg-type,index]
    (history,) = named(steps, "cxone.history")
    assert history.attributes is not None and history.attributes["cxone.history.turns"] > 0  # type: ignore[operator]
    (ledger,) = named(steps, "ledger.commit")
    assert ledger.attributes is not None and ledger.attributes["cxrelay.ledger.stored"] is True

    # passed upstream: each call's traceparent names the span that made it
    sent = llm_plan.requests[0]["headers"]["traceparent"]
    assert traceparent_parts(sent) == (TRACE_ID, hex_id(attempt.context.span_id, 16))
    fetched = cxone_state.message_faults.requests[0]["headers"]["traceparent"]
    assert traceparent_parts(fetched) == (TRACE_ID, hex_id(history.context.span_id, 16))


async def test_a_turn_without_a_callers_trace_starts_its_own(
    traced: Callable[..., Any], exporter: InMemorySpanExporter, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content=json.dumps(DECISION)))
    async with traced() as (client, _):
        assert (await post_turn(client, trigger())).status_code == 200
    request = server_span(exporter.get_finished_spans(), "POST /webhook/cognigy/fallback")
    assert request.parent is None
    sent = llm_plan.requests[0]["headers"]["traceparent"]
    assert traceparent_parts(sent)[0] == hex_id(request.context.trace_id, 32)


async def test_each_llm_attempt_is_a_span_with_its_outcome(
    traced: Callable[..., Any], exporter: InMemorySpanExporter, llm_plan: FaultPlan
) -> None:
    """A 429 then an answer: two attempts on the same key pool, the first failed with the
    provider's status, the second ok (the trail the response reports)."""
    second_key = "sk-test-second-key"
    llm_plan.push(Fault(status=429, headers={"Retry-After": "0"}))
    llm_plan.push(Fault(content=json.dumps(DECISION)))
    keys = [SecretStr(PROVIDER_KEY), SecretStr(second_key)]
    async with traced(llm_gateway_api_key=keys) as (client, _):
        response = await post_turn(client, trigger())
    assert response.json()["status"] == "success", response.text
    attempts = named(list(exporter.get_finished_spans()), "llm.attempt")
    assert [a.attributes["cxrelay.llm.attempt"] for a in attempts] == [1, 2]  # type: ignore[index]
    first, second = attempts
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["cxrelay.llm.outcome"] == "rate_limited"
    assert first.attributes["http.response.status_code"] == 429
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes["cxrelay.llm.outcome"] == "ok"
    assert {first.attributes["cxrelay.llm.key_fingerprint"]} | {
        second.attributes["cxrelay.llm.key_fingerprint"]
    } == {fingerprint(PROVIDER_KEY), fingerprint(second_key)}
    # each attempt's call carried its own span as the parent
    parents = [traceparent_parts(r["headers"]["traceparent"])[1] for r in llm_plan.requests]
    assert parents == [hex_id(a.context.span_id, 16) for a in attempts]


async def test_a_provider_that_fails_is_an_error_on_the_attempt_and_the_turn_falls_back(
    traced: Callable[..., Any], exporter: InMemorySpanExporter, llm_plan: FaultPlan
) -> None:
    for _ in range(5):
        llm_plan.push(Fault(status=503))
    async with traced(llm_max_retries=0) as (client, _):
        response = await post_turn(client, trigger())
    assert response.json()["status"] != "success"
    spans = exporter.get_finished_spans()
    attempts = named(list(spans), "llm.attempt")
    assert attempts and all(a.status.status_code is StatusCode.ERROR for a in attempts)
    assert attempts[0].attributes is not None
    assert attempts[0].attributes["http.response.status_code"] == 503
    # a description names what failed, never a message (it can quote the provider's answer)
    assert all(a.status.description in ("unavailable", "UpstreamUnavailable") for a in attempts)
    request = server_span(spans, "POST /webhook/cognigy/fallback")
    assert request.status.status_code is StatusCode.UNSET  # answered (its fallback), 200


async def test_an_answer_that_breaks_the_schema_is_a_failed_validation_then_a_repair(
    traced: Callable[..., Any], exporter: InMemorySpanExporter, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content=json.dumps({**DECISION, "confidence": "very"})))
    llm_plan.push(Fault(content=json.dumps(DECISION)))
    async with traced() as (client, _):
        response = await post_turn(client, trigger())
    assert response.json()["status"] == "success", response.text
    spans = list(exporter.get_finished_spans())
    first, second = named(spans, "safety.validation")
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "OutputInvalid"  # the kind, not the answer's text
    assert second.status.status_code is StatusCode.UNSET
    assert len(named(spans, "llm.attempt")) == 2  # the answer, then its repair


async def test_a_cxone_bot_turn(
    traced: Callable[..., Any],
    exporter: InMemorySpanExporter,
    llm_plan: FaultPlan,
) -> None:
    llm_plan.push(Fault(content="Your order ships tomorrow."))
    async with traced() as (client, _):
        response = await client.post(
            "/webhook/cxone",
            json={
                "virtualAgentId": "test-bot",
                "userInput": "Where is my order?",
                "userInputType": "TEXT",
                "executionInfo": {"contactId": 548712063, "busNo": 4599123, "requestId": 1},
                "botSessionState": None,
                "mediaType": "chat",
            },
            headers={"Authorization": CXONE_AUTH, "traceparent": TRACEPARENT},
        )
    assert response.status_code == 200, response.text
    spans = exporter.get_finished_spans()
    request = server_span(spans, "POST /webhook/cxone")
    assert hex_id(request.context.trace_id, 32) == TRACE_ID
    names = [s.name for s in under(spans, request)]
    for step in (
        "safety.injection",
        "safety.pii_redaction",
        "cxone.history",
        "budget.reserve",
        "llm.attempt",
        "safety.output_guard",
        "ledger.commit",
    ):
        assert step in names, names


async def test_a_v1_call_from_the_openai_client(
    traced: Callable[..., Any], exporter: InMemorySpanExporter, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content="Hello there."))
    async with traced(client_api_keys=[SecretStr(f"{CLIENT_KEY}:acme")]) as (raw, _):
        client = openai.AsyncOpenAI(
            api_key=CLIENT_KEY,
            base_url=f"{TEST_BASE_URL}/v1",
            http_client=raw,
            max_retries=0,
            default_headers={"traceparent": TRACEPARENT},
        )
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
        )
    assert completion.choices[0].message.content == "Hello there."
    spans = exporter.get_finished_spans()
    request = server_span(spans, "POST /v1/chat/completions")
    assert hex_id(request.context.trace_id, 32) == TRACE_ID
    steps = under(spans, request)
    assert {"budget.reserve", "llm.attempt", "safety.output_guard", "ledger.commit"} <= {
        s.name for s in steps
    }
    (attempt,) = named(steps, "llm.attempt")
    sent = llm_plan.requests[0]["headers"]["traceparent"]
    assert traceparent_parts(sent) == (TRACE_ID, hex_id(attempt.context.span_id, 16))


async def test_a_websocket_providers_handshake_carries_the_attempts_trace(
    traced: Callable[..., Any],
    exporter: InMemorySpanExporter,
    llm_server: Any,
    llm_plan: FaultPlan,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIM_KEY", "sk-sim-websocket-key")
    provider = {
        "name": "wsgw",
        "base_url": llm_server.url,
        "transport": "websocket",
        "api_keys": ["env:SIM_KEY"],
        "models": [{"name": "gpt-4o-mini"}],
    }
    chain = [{"provider": "wsgw", "model": "gpt-4o-mini"}]
    path = tmp_path / "providers.json"
    routes = [{"name": "r", "chain": chain}]
    path.write_text(json.dumps({"providers": [provider], "routes": routes}))
    llm_plan.push(Fault(content="Your order ships tomorrow."))
    async with traced(providers_file=path, llm_model="r") as (client, _):
        response = await cxone_turn(client)
    assert response.status_code == 200, response.text
    (attempt,) = named(list(exporter.get_finished_spans()), "llm.attempt")
    assert attempt.attributes is not None
    assert attempt.attributes["gen_ai.provider.name"] == "wsgw"
    assert attempt.attributes["cxrelay.llm.key_fingerprint"] == fingerprint("sk-sim-websocket-key")
    sent = llm_plan.requests[0]["headers"]["traceparent"]
    assert traceparent_parts(sent) == (
        hex_id(attempt.context.trace_id, 32),
        hex_id(attempt.context.span_id, 16),
    )


async def test_a_refused_request_is_traced_with_its_status(
    traced: Callable[..., Any], exporter: InMemorySpanExporter
) -> None:
    async with traced() as (client, _):
        response = await client.post(
            "/webhook/cognigy/fallback",
            content=b"{}",
            headers={"X-Webhook-Signature": "sha256=00"},
        )
    assert response.status_code == 401
    request = server_span(exporter.get_finished_spans(), "POST /webhook/cognigy/fallback")
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 401
    assert request.status.status_code is StatusCode.UNSET  # the caller's mistake, not ours


# --- nothing secret in a span -----------------------------------------------------------------

CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe@example.com"
PHONE = "+1 415 555 0134"
IBAN = "DE89370400440532013000"
PROMPT = "please refund the double charge on my account"
SECRETS_IN_PLAY = (PROVIDER_KEY, SECRET, API_KEY, CXONE_AUTH.removeprefix("Bearer "), CLIENT_KEY)


def every_value(span: ReadableSpan) -> Iterator[str]:
    """Every string a span carries to a collector: name, attributes, status, events, links,
    and its resource."""
    yield span.name
    yield span.status.description or ""
    for attributes in (span.attributes, span.resource.attributes):
        for key, value in (attributes or {}).items():
            yield key
            yield str(value)
    for event in span.events:
        yield event.name
        yield from (str(v) for v in (event.attributes or {}).values())
    for link in span.links:
        yield from (str(v) for v in (link.attributes or {}).values())


async def test_no_prompt_text_pii_or_key_is_in_any_span(
    traced: Callable[..., Any],
    exporter: InMemorySpanExporter,
    llm_plan: FaultPlan,
    cxone_state: CXoneSimulatorState,
) -> None:
    """Real turns on every surface, with PII in the caller's text, in CXone's history and in
    the model's answers, a provider error that quotes the prompt, and every kind of secret."""
    pii = f"{PROMPT}: card {CARD}, mail {EMAIL}, phone {PHONE}, iban {IBAN}"
    cxone_state.conversations["contact-42"] = [
        message("inbound", f"earlier I said my card is {CARD} and mail {EMAIL}", datetime.now(UTC))
    ]
    llm_plan.push(
        Fault(status=400, json_body={"error": {"message": f"bad request: {pii} {PROVIDER_KEY}"}})
    )
    llm_plan.push(Fault(content=json.dumps({**DECISION, "suggested_response": pii})))
    llm_plan.push(Fault(content=f"Noted {CARD} and {EMAIL}, {PHONE}."))
    llm_plan.push(Fault(content=f"Sure: {pii}"))
    llm_plan.push(Fault(content=f"Sure: {pii}"))
    async with traced(client_api_keys=[SecretStr(f"{CLIENT_KEY}:acme")]) as (client, _):
        await post_turn(client, trigger(lastMessage=pii, userId=EMAIL, conversationId="c-1"))
        await post_turn(client, trigger(lastMessage=pii))
        await cxone_turn(client, user_input=pii)
        v1 = {"Authorization": f"Bearer {CLIENT_KEY}"}
        asked = [{"role": "user", "content": pii}]
        for body in (
            {"model": "gpt-4o-mini", "messages": asked},
            {"model": "gpt-4o-mini", "stream": True, "messages": asked},
        ):
            answer = await client.post("/v1/chat/completions", json=body, headers=v1)
            assert answer.status_code == 200, answer.text
    spans = exporter.get_finished_spans()
    assert len({s.name for s in spans}) >= 8  # the turns were traced at all
    assert {s.name for s in spans if s.kind is SpanKind.SERVER} == {
        "POST /webhook/cognigy/fallback",
        "POST /webhook/cxone",
        "POST /v1/chat/completions",
    }
    forbidden = (PROMPT, CARD, CARD.replace(" ", ""), EMAIL, PHONE, IBAN, *SECRETS_IN_PLAY)
    for span in spans:
        for value in every_value(span):
            leaked = [f for f in forbidden if f in value]
            assert not leaked, f"{span.name}: {value!r} holds {leaked}"


# --- off ----------------------------------------------------------------------------------------


async def test_off_by_default_no_layer_no_spans_no_header(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(content=json.dumps(DECISION)))
    running = app_client()
    assert not any(m.cls.__name__ == "TracingMiddleware" for m in running.app.user_middleware)
    async with running as client:
        assert not tracing.enabled()
        headers = {"a": "b"}
        assert tracing.with_trace_headers(headers) is headers
        response = await post_turn(client, trigger(), traceparent=TRACEPARENT)
    assert response.json()["status"] == "success"
    assert "traceparent" not in llm_plan.requests[0]["headers"]  # not passed on: not ours
    assert running.app.state.parts.health.startup["tracing"] == {"on": False}


async def test_probes_and_scrapes_are_not_traced_unless_asked(
    traced: Callable[..., Any], exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default the liveness and readiness probes and /metrics go untraced (every few seconds,
    they would be most of the traces); the full /health report is traced. OpenTelemetry's own
    OTEL_PYTHON_EXCLUDED_URLS replaces that list, and set empty traces everything."""
    async with traced() as (client, _):
        for path in ("/health/live", "/health/ready", "/metrics", "/health"):
            await client.get(path)
    assert [s.name for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER] == [
        "GET /health"
    ]

    exporter.clear()
    monkeypatch.setenv("OTEL_PYTHON_EXCLUDED_URLS", "")
    async with traced() as (client, _):
        assert (await client.get("/health/live")).status_code == 200
    assert [s.name for s in exporter.get_finished_spans()] == ["GET /health/live"]

    exporter.clear()
    monkeypatch.setenv("OTEL_PYTHON_EXCLUDED_URLS", "/chat$, ^http://[^/]*/v1/models$")
    async with traced(client_api_keys=[SecretStr(CLIENT_KEY)]) as (client, _):
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        chat = {"session_id": "s-1", "messages": [{"role": "user", "content": "Hello"}]}
        assert (await client.post("/chat", json=chat, headers=auth)).status_code == 200
        assert (await client.get("/v1/models", headers=auth)).status_code == 200
        assert (await client.get("/health/live")).status_code == 200
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans if s.kind is SpanKind.SERVER] == ["GET /health/live"]
    assert not [s for s in spans if s.name == "llm.attempt"]  # the untraced call's steps too
