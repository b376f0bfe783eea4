"""/ws/chat: the chat surface over one WebSocket, end to end.

The app runs its real lifespan in Starlette's TestClient against the simulated LLM on loopback, so
answers are really streamed, budgets really reserved and released, and faults really injected.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from app.config import Settings
from app.main import create_app
from app.routers import ws_chat
from app.services.store import ScopeUsage
from app.simulator.faults import Fault, FaultPlan

KEY = "ws-client-key-0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}
ANSWER = "(simulated) You said: hello there"
SENTENCES = ["One. ", "Two. ", "Three. ", "Four. ", "Five."]
SCHEMA = {
    "type": "object",
    "properties": {"classified_intent": {"type": "string"}},
    "required": ["classified_intent"],
}

Running = Callable[..., Any]


@pytest.fixture
def running(make_settings: Callable[..., Settings]) -> Running:
    """`with running(**settings) as tc:` a TestClient over the app's real lifespan."""

    @contextmanager
    def run(**overrides: Any) -> Iterator[TestClient]:
        priced = {"llm_price_per_1k_prompt": 0.5, "llm_price_per_1k_completion": 1.5}
        settings = make_settings(
            client_api_keys=[SecretStr(f"{KEY}:acme")], **{**priced, **overrides}
        )
        with TestClient(create_app(settings)) as tc:
            yield tc

    return run


def ask(content: str = "hello there", session: str = "conv-1", **fields: Any) -> dict[str, Any]:
    return {"session_id": session, "messages": [{"role": "user", "content": content}], **fields}


def answer(ws: WebSocketTestSession) -> tuple[str, dict[str, Any]]:
    """The joined content deltas and the frame that ended the answer (complete or error)."""
    deltas: list[str] = []
    while True:
        frame = ws.receive_json()
        if frame["type"] != "content":
            return "".join(deltas), frame
        deltas.append(frame["delta"])


def session_usage(tc: TestClient, session: str) -> ScopeUsage:
    services = tc.app.state.services  # type: ignore[attr-defined]
    principal = services.client_auth.authenticate({"x-api-key": KEY})
    assert tc.portal is not None
    usage: ScopeUsage = tc.portal.call(services.metering.budget.session_budget, principal, session)
    return usage


def closed_with(ws: WebSocketTestSession) -> int:
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    return closed.value.code


# --- authentication -------------------------------------------------------------------------------


def test_header_key_streams_content_then_a_complete_frame(
    running: Running, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(chunks=SENTENCES))
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_json(ask())
        deltas = []
        while (frame := ws.receive_json())["type"] == "content":
            deltas.append(frame["delta"])
    assert len(deltas) > 1  # streamed, not sent whole
    assert "".join(deltas) == "".join(SENTENCES)
    assert frame["type"] == "complete"
    assert frame["session_id"] == "conv-1"
    assert frame["model"].endswith("-simulated")
    assert frame["usage"]["completion_tokens"] > 0
    assert frame["usage"]["total_tokens"] == (
        frame["usage"]["prompt_tokens"] + frame["usage"]["completion_tokens"]
    )
    assert frame["cost"] > 0 and frame["cached"] is False
    assert "response" not in frame


def test_an_ssn_in_three_chunks_never_reaches_a_frame(
    running: Running, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(chunks=["Hello there, your SSN is 123", "-45-", "6789, noted."]))
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_json(ask())
        deltas = []
        while (frame := ws.receive_json())["type"] == "content":
            deltas.append(frame["delta"])
    assert deltas[0] == "Hello there, your SSN is "  # ordinary text is not held back
    assert "".join(deltas) == "Hello there, your SSN is [SSN REDACTED], noted."
    assert not any(digit in delta for delta in deltas for digit in "123456789")
    assert frame["type"] == "complete"


def test_first_frame_auth_for_browsers(running: Running) -> None:
    with running() as tc, tc.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "auth", "api_key": KEY})
        ws.send_json(ask())
        text, end = answer(ws)
    assert text == ANSWER and end["type"] == "complete"


def test_x_api_key_header_is_accepted(running: Running) -> None:
    with running() as tc, tc.websocket_connect("/ws/chat", headers={"X-API-Key": KEY}) as ws:
        ws.send_json(ask())
        assert answer(ws)[1]["type"] == "complete"


@pytest.mark.parametrize(
    ("headers", "first"),
    [
        ({"Authorization": "Bearer wrong-key"}, None),
        ({}, '{"type": "auth", "api_key": "wrong-key"}'),
        ({}, json.dumps(ask())),  # a request before any credential
        ({}, "not json"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, json.dumps(ask())),  # Basic is not a key
    ],
)
def test_unauthenticated_gets_an_error_frame_then_1008(
    running: Running, llm_plan: FaultPlan, headers: dict[str, str], first: str | None
) -> None:
    with running() as tc, tc.websocket_connect("/ws/chat", headers=headers) as ws:
        if first is not None:
            ws.send_text(first)
        frame = ws.receive_json()
        assert frame["type"] == "error" and frame["code"] == "unauthorized"
        assert KEY not in frame["message"]
        assert closed_with(ws) == 1008
    assert llm_plan.requests == []


def test_no_auth_frame_in_time_closes_1008(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ws_chat, "AUTH_FRAME_SECONDS", 0.1)
    with running() as tc, tc.websocket_connect("/ws/chat") as ws:
        frame = ws.receive_json()
        assert frame["code"] == "unauthorized" and "auth frame" in frame["message"]
        assert closed_with(ws) == 1008


# --- one socket, many requests ----------------------------------------------------------------


def test_requests_in_sequence_and_a_cached_repeat(running: Running) -> None:
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_json(ask("hello there", stream=False))  # `stream` is ignored
        first_text, first = answer(ws)
        ws.send_json(ask("where is my parcel", session="conv-2"))
        other_text, other = answer(ws)
        ws.send_json({"type": "request", **ask("hello there")})
        again_text, again = answer(ws)
    assert first_text == again_text == ANSWER
    assert other_text == "(simulated) You said: where is my parcel"
    assert other["session_id"] == "conv-2"
    assert first["cached"] is False and first["cost"] > 0
    assert again["cached"] is True and again["cost"] == 0


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "ping"}', "unknown frame type"),
        ('{"type": "auth", "api_key": "again"}', "already authenticated"),
        (
            '{"session_id": "conv-1", "messages": [{"role": "robot", "content": "hi"}]}',
            "messages.0.role",
        ),
        ('{"session_id": "conv-1", "messages": [], "surprise": 1}', "surprise"),
    ],
)
def test_bad_frames_are_refused_and_the_socket_stays_usable(
    running: Running, raw: str, says: str
) -> None:
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_text(raw)
        frame = ws.receive_json()
        assert frame["type"] == "error" and frame["code"] == "invalid_request"
        assert says in frame["message"]
        ws.send_json(ask())
        text, end = answer(ws)
    assert text == ANSWER and end["type"] == "complete"


def test_binary_frame_is_refused(running: Running) -> None:
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_bytes(b'{"session_id": "conv-1"}')
        assert "not binary" in ws.receive_json()["message"]
        ws.send_json(ask())
        assert answer(ws)[1]["type"] == "complete"


def test_oversize_frame_closes_1009(running: Running, llm_plan: FaultPlan) -> None:
    with running(max_body_bytes=1024) as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_json(ask("x" * 2000))
        frame = ws.receive_json()
        assert frame["code"] == "request_too_large" and "1024" in frame["message"]
        assert closed_with(ws) == 1009
    assert llm_plan.requests == []


def test_a_frame_sent_mid_answer_is_refused_busy(running: Running, llm_plan: FaultPlan) -> None:
    llm_plan.push(Fault(chunks=SENTENCES, chunk_delay=0.2))
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_json(ask())
        assert ws.receive_json()["type"] == "content"
        ws.send_json(ask("where is my parcel"))
        frames = []
        while (frame := ws.receive_json())["type"] != "complete":
            frames.append(frame)
        busy = [f for f in frames if f["type"] == "error"]
        assert [f["code"] for f in busy] == ["busy"]
        rest = "".join(f["delta"] for f in frames if f["type"] == "content")
        assert rest and "".join(SENTENCES).endswith(rest)
        ws.send_json(ask("where is my parcel"))  # free again once the answer ended
        assert answer(ws)[0] == "(simulated) You said: where is my parcel"
    assert len(llm_plan.requests) == 2


def test_templates_render_as_the_user_message(running: Running) -> None:
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_json({"session_id": "conv-1", "template": "missing.j2"})
        refused = ws.receive_json()
        assert refused["code"] == "invalid_request" and "missing.j2" in refused["message"]
        ws.send_json(
            {"session_id": "conv-1", "template": "About {{ topic }}", "variables": {"topic": "tea"}}
        )
        assert answer(ws)[0] == "(simulated) You said: About tea"


# --- refused and failed calls -----------------------------------------------------------------


def test_budget_exhausted_is_an_error_frame_with_the_refusal(running: Running) -> None:
    with running(budget_session_tokens=50) as tc:
        with tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
            ws.send_json(ask("please tell me about my order " * 12))
            text, end = answer(ws)
            assert text == ""
            assert end["type"] == "error" and end["code"] == "budget_exhausted"
            assert "session token budget exhausted" in end["message"]
            assert end["detail"]["scope"] == "session"
            assert end["detail"]["requested_tokens"] > 50
            ws.send_json(ask("hi", session="conv-2"))  # the socket is still open
            assert answer(ws)[1]["type"] == "complete"
        assert session_usage(tc, "conv-1").reserved_tokens == 0


def test_upstream_failure_is_an_error_frame(running: Running, llm_plan: FaultPlan) -> None:
    llm_plan.push(*[Fault(status=500)] * 3)
    with running(llm_max_attempts=1) as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_json(ask())
        text, end = answer(ws)
        assert text == ""
        assert end == {"type": "error", "code": "upstream_unavailable", "message": end["message"]}
        llm_plan.reset()
        ws.send_json(ask())
        assert answer(ws)[0] == ANSWER


def test_unknown_model_is_an_error_frame(running: Running, llm_plan: FaultPlan) -> None:
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_json(ask(model="no-such-model"))
        end = answer(ws)[1]
        assert end["type"] == "error" and end["code"] == "model_not_found"
    assert llm_plan.requests == []


def test_json_schema_answer_is_one_validated_content_frame(running: Running) -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "route", "schema": SCHEMA}}
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_json(ask("I want a refund", stream=True, response_format=schema_format))
        content = ws.receive_json()
        end = ws.receive_json()
    assert content["type"] == "content"
    assert end["type"] == "complete"
    assert end["output"]["classified_intent"] == "billing_question"
    assert '"classified_intent": "billing_question"' in content["delta"]


# --- the client leaving -----------------------------------------------------------------------


def test_disconnect_mid_answer_cancels_the_call_and_charges_only_what_was_streamed(
    running: Running, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(chunks=SENTENCES, chunk_delay=0.5))  # about two seconds in all
    with running() as tc:
        with tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
            ws.send_json(ask())
            assert ws.receive_json()["type"] == "content"
            reserved = session_usage(tc, "conv-1").reserved_tokens
            assert reserved > 0
            ws.close()
            deadline = time.monotonic() + 1.0
            while (usage := session_usage(tc, "conv-1")).reserved_tokens and (
                time.monotonic() < deadline
            ):
                time.sleep(0.02)
        assert usage.reserved_tokens == 0
        # the prompt and what was streamed before the client left are counted (leaving is not
        # free); the rest of the answer, never produced, is not
        assert 0 < usage.used_tokens < reserved
