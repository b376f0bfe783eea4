"""/ws/chat: the chat surface over one WebSocket, end to end.

The app runs its real lifespan in Starlette's TestClient against the simulated LLM on loopback, so
answers are really streamed, budgets really reserved and released, and faults really injected.
Pings are uvicorn's (ASGI has no ping message), so those tests run the real service
(`python -m app serve --simulate`, a subprocess) and talk to it over a plain socket.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocketDisconnect
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from app.core.settings import Settings
from app.main import create_app
from app.simulator.faults import Fault, FaultPlan
from app.store import ScopeUsage
from app.surfaces.chat import websocket as ws_chat
from tests.helpers import REPO_ROOT, parts, running_service

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
    services = parts(tc.app)
    principal = services.client_auth.authenticate({"x-api-key": KEY})
    assert tc.portal is not None
    usage: ScopeUsage = tc.portal.call(services.metering.budget.session_budget, principal, session)
    return usage


def closed_with(ws: WebSocketTestSession, reason: str | None = None) -> int:
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    if reason is not None:
        assert closed.value.reason == reason
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
def test_unauthenticated_gets_an_error_frame_then_4401(
    running: Running, llm_plan: FaultPlan, headers: dict[str, str], first: str | None
) -> None:
    with running() as tc, tc.websocket_connect("/ws/chat", headers=headers) as ws:
        if first is not None:
            ws.send_text(first)
        frame = ws.receive_json()
        assert frame["type"] == "error" and frame["code"] == "unauthorized"
        assert KEY not in frame["message"]
        assert closed_with(ws, "unauthenticated") == 4401
    assert llm_plan.requests == []


def test_no_auth_frame_in_time_closes_4401(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ws_chat, "AUTH_FRAME_SECONDS", 0.1)
    with running() as tc, tc.websocket_connect("/ws/chat") as ws:
        frame = ws.receive_json()
        assert frame["code"] == "unauthorized" and "auth frame" in frame["message"]
        assert closed_with(ws) == 4401


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
        assert closed_with(ws, "frame too large") == 1009
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


# --- the complete frame -----------------------------------------------------------------------


def test_complete_frame_carries_the_calls_latency_ms(running: Running, llm_plan: FaultPlan) -> None:
    llm_plan.push(Fault(chunks=["One. ", "Two. ", "Three."], chunk_delay=0.15))
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        sent = time.monotonic()
        ws.send_json(ask())
        end = answer(ws)[1]
        elapsed_ms = (time.monotonic() - sent) * 1000
        ws.send_json(ask("where is my parcel", session="conv-2"))
        second = answer(ws)[1]
    assert end["type"] == second["type"] == "complete"
    latency = end["latency_ms"]
    assert isinstance(latency, float)
    assert 300 <= latency <= elapsed_ms  # the two pauses between chunks are in it
    assert isinstance(second["latency_ms"], float) and second["latency_ms"] > 0


# --- liveness: idle sockets (the route's clock) -----------------------------------------------


def test_an_idle_socket_is_closed_4408(running: Running) -> None:
    with (
        running(ws_idle_timeout_seconds=0.3) as tc,
        tc.websocket_connect("/ws/chat", headers=BEARER) as ws,
    ):
        opened = time.monotonic()
        assert closed_with(ws, "idle timeout") == 4408
        waited = time.monotonic() - opened
    assert 0.25 <= waited < 2.0


def test_the_idle_clock_counts_from_auth_frame_and_pauses_while_an_answer_runs(
    running: Running, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(chunks=SENTENCES, chunk_delay=0.25))  # about 1 s: over the idle timeout
    with running(ws_idle_timeout_seconds=0.6) as tc, tc.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "auth", "api_key": KEY})
        ws.send_json(ask())
        text, end = answer(ws)
        assert text == "".join(SENTENCES) and end["type"] == "complete"  # not cut
        time.sleep(0.3)  # under the timeout since the answer ended, over it since the request
        ws.send_json(ask("where is my parcel"))
        assert answer(ws)[1]["type"] == "complete"
        answered = time.monotonic()
        assert closed_with(ws, "idle timeout") == 4408
        assert time.monotonic() - answered >= 0.5


def test_refused_frames_do_not_keep_an_idle_socket_open(running: Running) -> None:
    refused = 0
    with (
        running(ws_idle_timeout_seconds=0.5) as tc,
        tc.websocket_connect("/ws/chat", headers=BEARER) as ws,
    ):
        opened = time.monotonic()
        with pytest.raises(WebSocketDisconnect) as closed:
            while time.monotonic() - opened < 3.0:
                ws.send_text("not json")
                assert ws.receive_json()["code"] == "invalid_request"
                refused += 1
                time.sleep(0.1)
    assert closed.value.code == 4408
    assert refused >= 2  # answered all along, and closed all the same


# --- internal errors --------------------------------------------------------------------------


def test_an_unexpected_failure_is_an_internal_error_frame_then_1011(
    running: Running, monkeypatch: pytest.MonkeyPatch, llm_plan: FaultPlan
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug, not a refusal")

    monkeypatch.setattr(ws_chat, "build_call", broken)  # no request path fails like this today
    with running() as tc, tc.websocket_connect("/ws/chat", headers=BEARER) as ws:
        ws.send_json(ask())
        frame = ws.receive_json()
        assert frame == {"type": "error", "code": "internal_error", "message": "internal error"}
        assert closed_with(ws, "internal error") == 1011
    assert llm_plan.requests == []


def test_the_docs_list_every_close_code() -> None:
    readme = (REPO_ROOT / "docs" / "chat.md").read_text()
    section = readme.split("### WebSocket: `/ws/chat`", 1)[1].split("\n## ", 1)[0]
    codes = [
        ws_chat.MESSAGE_TOO_BIG,
        ws_chat.INTERNAL_ERROR,
        ws_chat.UNAUTHENTICATED,
        ws_chat.IDLE_TIMEOUT,
        ws_chat.LIMITED,
    ]
    for code in codes:
        assert f"| `{code}` |" in section, code
    assert "1008" not in section


# --- liveness: pings (uvicorn's, through the real service) ------------------------------------

PING_INTERVAL = 0.2
PONG_TIMEOUT = 0.4
SERVICE_IDLE = 1.5


@pytest.fixture(scope="module")
def service_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`python -m app serve --simulate` with short liveness settings: app/serving.py hands them to
    uvicorn, whose default WebSocket implementation (websockets, sans-I/O) sends the pings."""
    with running_service(
        tmp_path_factory.mktemp("ws-service"),
        "--simulate",
        CLIENT_API_KEYS=f"{KEY}:acme",
        WS_PING_INTERVAL_SECONDS=str(PING_INTERVAL),
        WS_PONG_TIMEOUT_SECONDS=str(PONG_TIMEOUT),
        WS_IDLE_TIMEOUT_SECONDS=str(SERVICE_IDLE),
    ) as service:
        yield service.port


class RawSocket:
    """A /ws/chat client on a plain socket, speaking through websockets' sans-I/O protocol so that
    the test decides whether pongs go out: websockets' own clients answer every ping (RFC 6455
    5.5.2 makes it a MUST) and have no setting to stop. Pings are recorded, not returned."""

    def __init__(self, port: int, *, answer_pings: bool) -> None:
        self.answer_pings = answer_pings
        self.pings: list[float] = []
        self.frames: deque[Frame] = deque()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/ws/chat"))
        request = self.protocol.connect()
        request.headers["Authorization"] = f"Bearer {KEY}"
        self.protocol.send_request(request)
        self._write(self.protocol.data_to_send())
        deadline = time.monotonic() + 5
        while self.protocol.state is State.CONNECTING:
            self._read(deadline)
        assert self.protocol.state is State.OPEN, self.protocol.handshake_exc
        self.opened = time.monotonic()

    def _write(self, chunks: list[bytes]) -> None:
        with contextlib.suppress(OSError):  # the server may have closed already
            for chunk in chunks:
                if chunk:
                    self.sock.sendall(chunk)

    def _read(self, deadline: float) -> None:
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        data = self.sock.recv(65536)  # TimeoutError when nothing comes by the deadline
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.PING:
                self.pings.append(time.monotonic())
            elif isinstance(event, Frame) and event.opcode is not Opcode.PONG:
                self.frames.append(event)
        outgoing = self.protocol.data_to_send()  # pongs, and the close's echo
        if self.answer_pings:
            self._write(outgoing)
        if not data and not self.frames:
            raise AssertionError("the connection was cut without a close frame")

    def send_json(self, frame: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(frame).encode())
        self._write(self.protocol.data_to_send())

    def next_frame(self, timeout: float) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.frames:
            self._read(deadline)
        return self.frames.popleft()

    def next_json(self, timeout: float) -> Any:
        frame = self.next_frame(timeout)
        assert frame.opcode is Opcode.TEXT, frame
        return json.loads(bytes(frame.data))

    def stays_quiet(self, seconds: float) -> bool:
        """True when no frame (pings aside) comes for this long."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while not self.frames:
                self._read(deadline)
        return not self.frames

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
def test_service_closes_a_socket_that_stops_answering_pings_1011(service_port: int) -> None:
    client = RawSocket(service_port, answer_pings=False)
    try:
        frame = client.next_frame(timeout=PING_INTERVAL + PONG_TIMEOUT + 3)
        closed = time.monotonic()
    finally:
        client.close()
    assert frame.opcode is Opcode.CLOSE
    assert client.protocol.close_rcvd is not None
    assert client.protocol.close_rcvd.code == 1011
    assert client.protocol.close_rcvd.reason == "keepalive ping timeout"
    assert len(client.pings) == 1  # one ping, never answered, then the close
    assert client.pings[0] - client.opened < PING_INTERVAL + 0.5
    assert PONG_TIMEOUT - 0.05 <= closed - client.pings[0] < PONG_TIMEOUT + 1.0


@pytest.mark.slow
def test_service_keeps_a_socket_that_answers_pings_until_it_idles_4408(
    service_port: int,
) -> None:
    client = RawSocket(service_port, answer_pings=True)
    try:
        # silent for several ping intervals, each far past the pong timeout: the pongs keep it open
        assert client.stays_quiet(2 * PING_INTERVAL + PONG_TIMEOUT + 0.1)
        assert len(client.pings) >= 3
        client.send_json(ask())
        while (complete := client.next_json(timeout=5))["type"] == "content":
            pass
        answered = time.monotonic()
        assert complete["type"] == "complete" and complete["latency_ms"] > 0
        close = client.next_frame(timeout=SERVICE_IDLE + 3)  # answering pings is not activity
        idled = time.monotonic() - answered
    finally:
        client.close()
    assert close.opcode is Opcode.CLOSE
    assert client.protocol.close_rcvd is not None
    assert client.protocol.close_rcvd.code == 4408
    assert client.protocol.close_rcvd.reason == "idle timeout"
    assert SERVICE_IDLE - 0.1 <= idled < SERVICE_IDLE + 1.5
