"""A failed call is described once (app.pipelines.failures): the pipeline's failure line, the
wire's answer and the request metric all come from one reading of the table, on every chat
surface (/chat, its stream, /v1/chat/completions, its stream, /ws/chat)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from app.core.errors import RateLimited, UpstreamTimeout, UpstreamUnavailable
from app.core.settings import Settings
from app.main import create_app
from app.pipelines import failures
from app.simulator.faults import Fault, FaultPlan
from tests.helpers import Captured
from tests.metric_samples import changes, labels, snapshot

KEY = "failures-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
DOWN = [Fault(status=500)] * 3  # every pass of LLM_MAX_ATTEMPTS fails: upstream_unavailable
CUT = [Fault(chunks=["It left. ", "It is ", "on the van."], cut_after=1)]


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[Exception]:
    """Every error the table is read for."""
    seen: list[Exception] = []
    look_up = failures.look_up

    def counting(error: Exception) -> failures.Failure | None:
        seen.append(error)
        return look_up(error)

    monkeypatch.setattr(failures, "look_up", counting)
    return seen


def test_describe_reads_the_table_once_per_error(lookups: list[Exception]) -> None:
    error = UpstreamTimeout("slow")
    first = failures.describe(error)
    assert first is not None and (first.status, first.code) == (504, "upstream_timeout")
    assert failures.describe(error) is first
    assert lookups == [error]
    assert failures.describe(TimeoutError()) == failures.Failure(
        504, "upstream_timeout", "no answer in time: "
    )


def test_the_first_matching_row_wins_and_unexpected_errors_are_none() -> None:
    unavailable = failures.describe(UpstreamUnavailable("down"))
    assert unavailable is not None and unavailable.code == "upstream_unavailable"
    limited = RateLimited("slow down", scope="key", limit="requests", allowed=1, retry_after=0.2)
    refusal = failures.describe(limited)
    assert refusal is not None and refusal.headers == {"Retry-After": "1"}
    assert failures.describe(ValueError("a bug")) is None
    assert failures.describe(KeyboardInterrupt()) is None


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"session_id": "s-fail", "messages": [{"role": "user", "content": "Hi"}], **fields}


def openai_body(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], **fields}


@pytest.mark.parametrize(
    ("path", "body", "faults", "surface", "status", "says"),
    [
        ("/chat", chat_body(), DOWN, "chat", 502, '"upstream_unavailable"'),
        ("/chat", chat_body(stream=True), DOWN, "chat", 502, '"upstream_unavailable"'),
        ("/chat", chat_body(stream=True), CUT, "chat", 200, '"type": "error"'),
        ("/v1/chat/completions", openai_body(), DOWN, "openai", 502, '"upstream_unavailable"'),
        ("/v1/chat/completions", openai_body(stream=True), CUT, "openai", 200, '{"error": {'),
    ],
    ids=["chat", "chat-stream-refused", "chat-stream-cut", "openai", "openai-stream-cut"],
)
def test_a_failed_http_call_is_described_counted_and_logged_once(
    make_settings: Callable[..., Settings],
    llm_plan: FaultPlan,
    lookups: list[Exception],
    captured: Captured,
    path: str,
    body: dict[str, Any],
    faults: list[Fault],
    surface: str,
    status: int,
    says: str,
) -> None:
    settings = make_settings(client_api_keys=[SecretStr(f"{KEY}:acme")])
    with TestClient(create_app(settings)) as tc:
        before = snapshot()
        llm_plan.push(*faults)
        response = tc.post(path, json=body, headers=AUTH)
        delta = changes(before)
    assert response.status_code == status
    assert says in response.text
    assert delta["cxrelay_requests_total"] == {
        labels(surface=surface, outcome="error", reason="502"): 1
    }
    assert len(captured.with_message("chat turn failed")) == 1
    assert len(lookups) == 1


def test_a_failed_socket_call_is_described_counted_and_logged_once(
    make_settings: Callable[..., Settings],
    llm_plan: FaultPlan,
    lookups: list[Exception],
    captured: Captured,
) -> None:
    settings = make_settings(client_api_keys=[SecretStr(f"{KEY}:acme")])
    with TestClient(create_app(settings)) as tc:
        before = snapshot()
        llm_plan.push(*DOWN)
        with tc.websocket_connect("/ws/chat", headers=AUTH) as ws:
            ws.send_json(chat_body())
            frame = ws.receive_json()
        delta = changes(before)  # the socket is closed: its request was counted
    assert frame["type"] == "error" and frame["code"] == "upstream_unavailable"
    assert delta["cxrelay_requests_total"] == {
        labels(surface="ws_chat", outcome="error", reason="502"): 1
    }
    assert len(captured.with_message("chat turn failed")) == 1
    assert len(lookups) == 1
