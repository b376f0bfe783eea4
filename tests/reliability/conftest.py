"""Fault-injection scenarios: bursts of turns through every surface, each answer judged, the
figures recorded.

`scenario.burst(surface, client, n)` sends n turns at once, times each from the request to the last
byte of its response, and judges it against what the docs (docs/cognigy.md, cxone.md, chat.md)
document for the surface:

- answered: a 200 in the surface's shape with a real answer;
- fallback: the documented degraded answer — Cognigy's 200 route-to-human (status names why),
  CXone's 200 fallback prompt or return to the script with `errorDetails`, and on /chat and
  /v1/chat/completions the documented error status and body (502, 503, 504, 429, 422) or, after
  text went out, the stream's error event;
- error: anything else (another status, a body that does not parse into the surface's schema,
  a stack trace in it).

A turn answered later than its deadline (plus SLACK for a loaded test machine) is `late`. Each
test's figures (per surface: turns sent, answered, fallbacks, errors, late, latencies) are kept;
when CXRELAY_RELIABILITY_REPORT names a file, the session writes them there as JSON at the end,
merged by (scenario, surface) with what the file already holds, for docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from pydantic import SecretStr

from app.core.settings import Settings
from app.surfaces.chat.schemas import ChatReply
from app.surfaces.cognigy.schemas import CognigyResponse
from tests.helpers import cxone_turn, post_turn, trigger
from tests.metric_samples import Labels, samples
from tests.surfaces.cxone.test_cxone_webhook import validate_against_spec

REPORT_ENV = "CXRELAY_RELIABILITY_REPORT"
CLIENT_KEY = "reliability-client-key-01"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
SLACK = 0.75  # seconds past a deadline still counted on time (two shared cores under load)

# Small deadlines and timeouts keep the suite fast; a scenario overrides what it is about.
FAST: dict[str, Any] = {
    "client_api_keys": [SecretStr(f"{CLIENT_KEY}:acme")],
    "cognigy_deadline_seconds": 2.0,
    "cxone_deadline_seconds": 2.0,
    "chat_deadline_seconds": 2.0,
    "cxone_first_token_timeout_seconds": 1.0,
    "chat_first_token_timeout_seconds": 1.0,
    "llm_timeout_seconds": 1.0,
    "cxone_timeout_seconds": 0.5,
    "cognigy_repair_min_seconds": 0.2,
    "circuit_failure_threshold": 1000,  # the circuit's own scenario sets it
}
DEADLINES = {"cognigy": 2.0, "cxone": 2.0, "chat": 2.0, "openai": 2.0}

COGNIGY_FALLBACK = Settings.model_fields["cognigy_fallback_response"].default
CXONE_FALLBACK = Settings.model_fields["fallback_bot_response"].default
CXONE_FALLBACKS = {"fallback", "fallback_escalated", "budget_exhausted"}
# The chat surfaces' documented refusals and failures: code -> status (docs/chat.md).
CHAT_FAILURES = {
    "upstream_unavailable": 502,
    "upstream_rejected": 502,
    "upstream_timeout": 504,
    "budget_unavailable": 503,
    "budget_exhausted": 429,
    "output_invalid": 422,
}

Kind = Literal["answered", "fallback", "error"]


@dataclass(frozen=True)
class Turn:
    surface: str
    kind: Kind
    detail: str  # Cognigy's status, CXone's outcome, a chat error code, or "answered"
    status: int
    latency_ms: float
    late: bool
    body: Any
    ended_at: float = 0.0  # time.perf_counter() at the last byte

    @property
    def request_metric(self) -> tuple[str, str, str]:
        """The cxrelay_requests_total labels this turn must have been counted under."""
        if self.kind == "answered":
            return self.surface, "success", ""
        if self.surface in ("cognigy", "cxone") or self.detail == "content_filter":  # a 200
            return self.surface, "fallback", self.detail
        status = CHAT_FAILURES.get(self.detail, self.status)
        return self.surface, "error" if status >= 500 else "rejected", str(status)


Judged = tuple[Kind, str, Any]


def _judge_cognigy(response: httpx.Response) -> Judged:
    if response.status_code != 200:
        return "error", f"HTTP {response.status_code}", response.text
    body = response.json()
    parsed = CognigyResponse.model_validate(body)
    if parsed.status == "success":
        return "answered", "success", body
    decision = parsed.routing_decision
    shaped = (
        parsed.fallback_action == "route_to_human"
        and decision.requires_human_agent
        and parsed.suggested_response == COGNIGY_FALLBACK
        and bool(parsed.reason)
    )
    return ("fallback" if shaped else "error"), parsed.status, body


def _judge_cxone(response: httpx.Response) -> Judged:
    if response.status_code != 200:
        return "error", f"HTTP {response.status_code}", response.text
    body = response.json()
    validate_against_spec(body, "BotExchangeResponse")  # NICE's own schema, every answer
    outcome = body["intentInfo"]["intent"]
    if outcome not in CXONE_FALLBACKS:
        return ("answered" if "errorDetails" not in body else "error"), outcome, body
    said = " ".join(
        p["transcript"] for p in (body.get("nextPromptSequence") or {}).get("prompts", [])
    )
    shaped = bool(body.get("errorDetails", {}).get("systemErrorMessage")) and (
        said == CXONE_FALLBACK
        if outcome == "fallback"
        else body["branchName"] == "ReturnControlToScript"
    )
    return ("fallback" if shaped else "error"), outcome, body


def _chat_failure(response: httpx.Response, openai_shape: bool) -> Judged:
    body = response.json()
    error = body.get("error")
    if openai_shape:
        code = error.get("code") if isinstance(error, dict) else None
        shaped = isinstance(error, dict) and bool(error.get("message")) and "type" in error
    else:
        code = error
        shaped = isinstance(body.get("message"), str)
    if shaped and code in CHAT_FAILURES and CHAT_FAILURES[code] == response.status_code:
        return "fallback", str(code), body
    return "error", f"HTTP {response.status_code} {code}", body


def _sse_events(response: httpx.Response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


def _judge_chat(response: httpx.Response, stream: bool = False) -> Judged:
    if response.status_code != 200:
        return _chat_failure(response, openai_shape=False)
    if not stream:
        body = response.json()
        reply = ChatReply.model_validate(body)
        return (
            ("fallback", "content_filter", body)
            if reply.blocked
            else ("answered", "answered", body)
        )
    frames = [json.loads(e) for e in _sse_events(response)]
    last = frames[-1]
    if last["type"] == "complete" and all(f["type"] == "content" for f in frames[:-1]):
        return "answered", "answered", frames
    if last["type"] == "error" and last["code"] in CHAT_FAILURES:
        return "fallback", last["code"], frames
    return "error", f"stream ended with {last}", frames


def _judge_openai(response: httpx.Response, stream: bool = False) -> Judged:
    if response.status_code != 200:
        return _chat_failure(response, openai_shape=True)
    if not stream:
        body = response.json()
        content = body["choices"][0]["message"]["content"]
        ok = body["object"] == "chat.completion" and isinstance(content, str) and content
        return ("answered" if ok else "error"), "answered", body
    events = _sse_events(response)
    done = events[-1] == "[DONE]"
    frames = [json.loads(e) for e in (events[:-1] if done else events)]
    chunks_ok = all(c["object"] == "chat.completion.chunk" for c in frames[:-1])
    if done:
        ok = chunks_ok and frames[-1]["object"] == "chat.completion.chunk"
        return ("answered" if ok else "error"), "answered", frames
    error = frames[-1].get("error") or {}
    if chunks_ok and error.get("code") in CHAT_FAILURES and error.get("message"):
        return "fallback", error["code"], frames
    return "error", f"stream ended with {frames[-1]}", frames


def _judge(surface: str, response: httpx.Response, stream: bool) -> Judged:
    if "Traceback" in response.text or 'File "/' in response.text:
        return "error", "stack trace in the body", response.text
    try:
        if surface == "cognigy":
            return _judge_cognigy(response)
        if surface == "cxone":
            return _judge_cxone(response)
        if surface == "chat":
            return _judge_chat(response, stream)
        return _judge_openai(response, stream)
    except Exception as problem:  # not the documented shape: that is the finding
        return "error", f"malformed answer: {problem!r}"[:300], response.text


def _request(
    surface: str, client: httpx.AsyncClient, tag: str, stream: bool, extra: dict[str, Any]
) -> Awaitable[httpx.Response]:
    """One turn of its own session, with words no other turn sends (no intent cache hit);
    `extra` joins a chat body (e.g. a response_format)."""
    text = f"Where is my parcel, reference {tag}?"
    if surface == "cognigy":
        return post_turn(client, trigger(conversationId=f"conv-{tag}", lastMessage=text))
    if surface == "cxone":
        info = {"contactId": int(tag[:8], 16), "busNo": 4599123, "requestId": 1}
        return cxone_turn(client, text, executionInfo=info)
    messages = [{"role": "user", "content": text}]
    if surface == "chat":
        body = {"session_id": f"chat-{tag}", "messages": messages, "stream": stream, **extra}
        return client.post("/chat", json=body, headers=AUTH)
    body = {"model": "gpt-4o-mini", "messages": messages, "user": f"oa-{tag}", "stream": stream}
    body.update(extra)
    return client.post("/v1/chat/completions", json=body, headers=AUTH)


class Scenario:
    """The turns one test sent, judged, and its figures per surface."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.turns: list[Turn] = []
        self._deadlines: dict[str, float] = {}

    async def turn(
        self,
        surface: str,
        client: httpx.AsyncClient,
        *,
        deadline: float | None = None,
        stream: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Turn:
        limit = DEADLINES[surface] if deadline is None else deadline
        self._deadlines[surface] = max(limit, self._deadlines.get(surface, 0.0))
        request = _request(surface, client, uuid.uuid4().hex, stream, extra or {})
        started = time.perf_counter()
        response = await request
        elapsed = time.perf_counter() - started  # the whole body is read: the last byte
        kind, detail, body = _judge(surface, response, stream)
        late = elapsed > limit + SLACK
        turn = Turn(
            surface,
            kind,
            detail,
            response.status_code,
            elapsed * 1000,
            late,
            body,
            started + elapsed,
        )
        self.turns.append(turn)
        return turn

    async def burst(
        self,
        surface: str,
        client: httpx.AsyncClient,
        n: int,
        *,
        deadline: float | None = None,
        stream: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> list[Turn]:
        """n turns at once."""
        turns = [
            self.turn(surface, client, deadline=deadline, stream=stream, extra=extra)
            for _ in range(n)
        ]
        return list(await asyncio.gather(*turns))

    def records(self) -> list[dict[str, Any]]:
        found = []
        for surface in sorted({t.surface for t in self.turns}):
            turns = [t for t in self.turns if t.surface == surface]
            latencies = [t.latency_ms for t in turns]
            found.append(
                {
                    "name": self.name,
                    "surface": surface,
                    "turns_sent": len(turns),
                    "answered": sum(t.kind == "answered" for t in turns),
                    "fallbacks": sum(t.kind == "fallback" for t in turns),
                    "errors": sum(t.kind == "error" for t in turns),
                    "late": sum(t.late for t in turns),
                    "deadline_ms": round(self._deadlines[surface] * 1000),
                    "max_latency_ms": round(max(latencies), 1),
                    "median_latency_ms": round(statistics.median(latencies), 1),
                    "outcomes": dict(Counter(f"{t.kind}:{t.detail}" for t in turns)),
                }
            )
        return found


def outcomes(turns: list[Turn]) -> Counter[tuple[str, str]]:
    """(kind, detail) -> how many turns ended that way."""
    return Counter((t.kind, t.detail) for t in turns)


def assert_well_formed(turns: list[Turn]) -> None:
    """Every turn got the documented answer (or fallback) within its deadline."""
    bad = [
        (t.kind, t.detail, t.status, round(t.latency_ms), t.body)
        for t in turns
        if t.kind == "error" or t.late
    ]
    assert not bad, bad[:3]


def expected_requests(turns: list[Turn]) -> dict[Labels, float]:
    """cxrelay_requests_total's change these turns must have caused, as metric_samples keys."""
    counted = Counter(t.request_metric for t in turns)
    return {
        (("outcome", outcome), ("reason", reason), ("surface", surface)): float(n)
        for (surface, outcome, reason), n in counted.items()
    }


class MetricWatch:
    """Snapshot of counters at the start; `delta(name)` is what changed since (zeros left out)."""

    def __init__(self, *names: str) -> None:
        self.names = ("cxrelay_requests_total", *names)
        self.before = {name: samples(name) for name in self.names}

    def delta(self, name: str, **only: str) -> dict[Labels, float]:
        moved = {}
        for key, value in samples(name).items():
            change = round(value - self.before[name].get(key, 0.0), 9)
            if change and all(dict(key).get(k) == v for k, v in only.items()):
                moved[key] = change
        return moved

    def total(self, name: str, **only: str) -> float:
        return sum(self.delta(name, **only).values())


@pytest.fixture
def relay(app_client: Callable[..., Any]) -> Callable[..., Any]:
    """`async with relay(**overrides) as client`: the app with FAST settings and a client key."""

    def start(**overrides: Any) -> Any:
        return app_client(**{**FAST, **overrides})

    return start


@pytest.fixture(scope="session")
def _reliability_records() -> Iterator[list[dict[str, Any]]]:
    target = os.environ.get(REPORT_ENV)
    path = Path(target).resolve() if target else None  # before any test changes directory
    records: list[dict[str, Any]] = []
    yield records
    if path is not None and records:
        write_report(path, records)


def write_report(path: Path, records: list[dict[str, Any]]) -> None:
    """This session's records replace the file's records of the same (scenario, surface)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    if path.exists():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            for old in json.loads(path.read_text()):
                merged[(old["name"], old["surface"])] = old
    for record in records:
        merged[(record["name"], record["surface"])] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = [merged[key] for key in sorted(merged)]
    path.write_text(json.dumps(ordered, indent=2) + "\n")


@pytest.fixture
def scenario(
    request: pytest.FixtureRequest, _reliability_records: list[dict[str, Any]]
) -> Iterator[Scenario]:
    """The test's turns and figures; the figures join the session's report at the end."""
    name = request.node.name.removeprefix("test_")
    run = Scenario(name)
    yield run
    _reliability_records.extend(run.records())
