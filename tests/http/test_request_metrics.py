"""cxrelay_requests_total on every surface: the webhooks' fallbacks (a 200), the refusals made
before any pipeline runs, the OpenAI surface's own error shapes, /ws/chat frame by frame, and
budget refusals by scope. Each request is counted exactly once (the deltas are compared whole)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from app.core.settings import Settings
from app.http.request_metrics import RequestMetricsMiddleware
from app.main import create_app
from app.simulator.faults import Fault, FaultPlan
from tests.helpers import API_KEY, WEBHOOK, cxone_turn, post_turn, trigger
from tests.metric_samples import changes, labels, snapshot

KEY = "request-metrics-key-01"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENTS = [SecretStr(f"{KEY}:acme")]


def requests(surface: str, outcome: str, reason: str = "") -> tuple[tuple[str, str], ...]:
    return labels(surface=surface, outcome=outcome, reason=reason)


async def test_cognigy_refusals_and_budget_fallback(app_client: Callable[..., Any]) -> None:
    async with app_client(budget_session_tokens=50, max_body_bytes=1024) as client:
        before = snapshot()
        assert (await post_turn(client, trigger(confidenceScore=0.99))).status_code == 400
        assert (await post_turn(client, b"{" + b" " * 2000 + b"}")).status_code == 413
        unsigned = await client.post(WEBHOOK, json=trigger())
        assert unsigned.status_code == 401
        keyed = await client.post(WEBHOOK, content=b"[]", headers={"X-API-Key": API_KEY})
        assert keyed.status_code == 422
        exhausted = await post_turn(client, trigger())
        delta = changes(before)
    assert exhausted.json()["status"] == "budget_exhausted"
    assert delta["cxrelay_requests_total"] == {
        requests("cognigy", "rejected", "400"): 1,
        requests("cognigy", "rejected", "413"): 1,
        requests("cognigy", "rejected", "401"): 1,
        requests("cognigy", "rejected", "422"): 1,
        requests("cognigy", "fallback", "budget_exhausted"): 1,
    }
    assert delta["cxrelay_budget_exhausted_total"] == {
        labels(surface="cognigy", scope="session"): 1
    }
    assert delta["cxrelay_request_latency_seconds_count"] == {labels(surface="cognigy"): 1}


async def test_cxone_turn_outcomes(app_client: Callable[..., Any], llm_plan: FaultPlan) -> None:
    async with app_client(llm_max_attempts=1) as client:
        before = snapshot()
        answered = await cxone_turn(client)
        llm_plan.push(Fault(status=500))
        failed = await cxone_turn(
            client, "And my refund?", state=answered.json()["botSessionState"]
        )
        wrong = await client.post("/webhook/cxone", json={}, headers={"Authorization": "Bearer x"})
        delta = changes(before)
    assert failed.json()["intentInfo"]["intent"] == "fallback"
    assert wrong.status_code == 401
    assert delta["cxrelay_requests_total"] == {
        requests("cxone", "success"): 1,
        requests("cxone", "fallback", "fallback"): 1,
        requests("cxone", "rejected", "401"): 1,
    }
    assert delta["cxrelay_turns_total"] == {
        labels(surface="cxone", outcome="answered"): 1,
        labels(surface="cxone", outcome="fallback"): 1,
    }
    assert delta["cxrelay_time_to_first_token_seconds_count"] == {
        labels(provider="default", model="gpt-4o-mini"): 1
    }


async def test_cxone_budget_exhaustion_is_a_fallback_by_scope(
    app_client: Callable[..., Any],
) -> None:
    async with app_client(budget_tenant_day_tokens=30) as client:
        before = snapshot()
        response = await cxone_turn(client)
        delta = changes(before)
    assert response.json()["intentInfo"]["intent"] == "budget_exhausted"
    assert delta["cxrelay_requests_total"] == {requests("cxone", "fallback", "budget_exhausted"): 1}
    assert delta["cxrelay_budget_exhausted_total"] == {
        labels(surface="cxone", scope="tenant_day"): 1
    }


async def test_openai_surface_counts_its_own_error_shapes(
    app_client: Callable[..., Any],
) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    url = "/v1/chat/completions"
    async with app_client(client_api_keys=CLIENTS) as client:
        before = snapshot()
        assert (await client.post(url, json=body, headers=AUTH)).status_code == 200
        streamed = await client.post(url, json={**body, "stream": True}, headers=AUTH)
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        assert (await client.post(url, json=body)).status_code == 401
        assert (await client.post(url, json={"model": "x"}, headers=AUTH)).status_code == 400
        unknown = {**body, "model": "no-such-model"}
        assert (await client.post(url, json=unknown, headers=AUTH)).status_code == 404
        assert (await client.get("/v1/models", headers=AUTH)).status_code == 200  # not a request
        delta = changes(before)
    assert delta["cxrelay_requests_total"] == {
        requests("openai", "success"): 2,
        requests("openai", "rejected", "401"): 1,
        requests("openai", "rejected", "400"): 1,
        requests("openai", "rejected", "404"): 1,
    }


async def test_chat_upstream_failure_is_an_error(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with app_client(client_api_keys=CLIENTS, llm_max_attempts=1) as client:
        before = snapshot()
        llm_plan.push(Fault(status=500))
        body = {"session_id": "s-1", "messages": [{"role": "user", "content": "hi"}]}
        assert (await client.post("/chat", json=body, headers=AUTH)).status_code == 502
        delta = changes(before)
    assert delta["cxrelay_requests_total"] == {requests("chat", "error", "502"): 1}
    assert delta["cxrelay_request_latency_seconds_count"] == {labels(surface="chat"): 1}


@pytest.fixture
def socket_app(make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    @contextmanager
    def run(**overrides: Any) -> Iterator[TestClient]:
        settings = make_settings(client_api_keys=CLIENTS, **overrides)
        with TestClient(create_app(settings)) as tc:
            yield tc

    return run


def test_ws_chat_counts_each_frame(socket_app: Callable[..., Any], llm_plan: FaultPlan) -> None:
    ask = {"session_id": "ws-1", "messages": [{"role": "user", "content": "hello there"}]}
    with socket_app(llm_max_attempts=1) as tc:
        before = snapshot()
        with tc.websocket_connect("/ws/chat", headers=AUTH) as ws:
            ws.send_json(ask)
            while ws.receive_json()["type"] == "content":
                pass
            ws.send_text("not json")
            assert ws.receive_json()["code"] == "invalid_request"
            llm_plan.push(Fault(status=500))
            ws.send_json({**ask, "messages": [{"role": "user", "content": "again"}]})
            assert ws.receive_json()["code"] == "upstream_unavailable"
        with tc.websocket_connect("/ws/chat", headers={"X-API-Key": "wrong"}) as ws:
            assert ws.receive_json()["code"] == "unauthorized"
        delta = changes(before)
    assert delta["cxrelay_requests_total"] == {
        requests("ws_chat", "success"): 1,
        requests("ws_chat", "rejected", "400"): 1,
        requests("ws_chat", "error", "502"): 1,
        requests("ws_chat", "rejected", "401"): 1,
    }
    assert delta["cxrelay_turns_total"] == {labels(surface="ws_chat", outcome="answered"): 1}


def test_ws_chat_client_leaving_mid_answer_is_499(
    socket_app: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    ask = {"session_id": "ws-2", "messages": [{"role": "user", "content": "slowly"}]}
    with socket_app() as tc:
        before = snapshot()
        llm_plan.push(Fault(first_token_delay=0.5))
        with tc.websocket_connect("/ws/chat", headers=AUTH) as ws:
            ws.send_text(json.dumps(ask))
        delta = changes(before)
    assert delta["cxrelay_requests_total"] == {requests("ws_chat", "rejected", "499"): 1}


async def test_a_crash_is_an_error_and_other_paths_are_not_counted() -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("bug")

    async def fine(request: Request) -> Response:
        return Response("ok")

    routes = [Route("/chat", boom, methods=["POST"]), Route("/health/live", fine)]
    app = RequestMetricsMiddleware(Starlette(routes=routes))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        before = snapshot()
        assert (await client.post("/chat")).status_code == 500
        assert (await client.get("/health/live")).status_code == 200
        delta = changes(before)
    assert delta["cxrelay_requests_total"] == {requests("chat", "error", "500"): 1}
