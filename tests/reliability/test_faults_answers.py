"""Bursts of turns whose answers break on the way: a stream that stops after its first chunk, a
WebSocket upstream closed mid-answer, a body that is not JSON, and model output that is not
JSON or breaks the schema. Half an answer must never reach a caller as if it were whole; every
turn gets its documented answer or fallback within its deadline, counted as the caller saw it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.simulator.faults import Fault, FaultPlan
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer
from tests.helpers import websocket_gateway_and_backup
from tests.reliability.conftest import (
    MetricWatch,
    Scenario,
    Turn,
    assert_well_formed,
    expected_requests,
    outcomes,
)

CUT = ["First sentence. ", "never ", "sent."]  # the provider stops after "First sentence. "


def said(turn: Turn) -> str:
    return " ".join(p["transcript"] for p in turn.body["nextPromptSequence"]["prompts"])


def streamed_text(turn: Turn) -> str:
    """What the caller received as text on /chat (frames) or /v1/chat/completions (chunks)."""
    if turn.surface == "chat":
        return "".join(f.get("delta", "") for f in turn.body if f["type"] == "content")
    return "".join(
        (choice["delta"].get("content") or "")
        for chunk in turn.body
        for choice in chunk.get("choices", [])
    )


async def test_stream_that_stops_after_the_first_chunk(
    relay: Any, llm_plan: FaultPlan, scenario: Scenario
) -> None:
    """CXone reassembles the stream before answering: a cut one is retried and never spoken.
    /chat and /v1/chat/completions stream to the caller: the text already sent stands, and an
    error event ends it (a broken stream is never completed by another attempt)."""
    watch = MetricWatch("cxrelay_llm_attempts_total")
    async with relay() as client:
        llm_plan.push(*[Fault(chunks=CUT, cut_after=1)] * 12)
        cxone = await scenario.burst("cxone", client, 12)
        assert {kind for kind, _ in outcomes(cxone)} == {"answered"}
        assert not [t for t in cxone if "First sentence" in said(t) or "never" in said(t)]
        assert len(llm_plan.requests) == 24  # each turn: the cut stream, then a whole one
        streamed: list[Turn] = []
        for surface in ("chat", "openai"):
            llm_plan.reset()
            llm_plan.push(*[Fault(chunks=CUT, cut_after=1)] * 12)
            streamed += await scenario.burst(surface, client, 12, stream=True)
            assert len(llm_plan.requests) == 12  # not retried: text had gone out
    turns = cxone + streamed
    assert_well_formed(turns)
    assert outcomes(streamed) == {("fallback", "upstream_unavailable"): 24}
    assert {streamed_text(t) for t in streamed} == {"First sentence. "}
    assert watch.total("cxrelay_llm_attempts_total", outcome="unavailable") == 12
    assert watch.total("cxrelay_llm_attempts_total", outcome="stream_broken") == 24
    assert watch.delta("cxrelay_requests_total") == expected_requests(turns)


@pytest.fixture
def backup_plan() -> FaultPlan:
    return FaultPlan()


async def test_websocket_upstream_closed_mid_stream_falls_back_to_the_next_provider(
    relay: Any,
    llm_plan: FaultPlan,
    backup_plan: FaultPlan,
    scenario: Scenario,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway streaming over a WebSocket closes each socket after one chunk: every turn moves
    to the route's next provider and is answered there, whole."""
    monkeypatch.setenv("SIM_KEY", "sk-sim")
    with (
        LoopbackServer(create_llm_simulator(llm_plan)) as primary,
        LoopbackServer(create_llm_simulator(backup_plan)) as backup,
    ):
        providers = websocket_gateway_and_backup(primary.url, backup.url)
        chain = [
            {"provider": "wsgw", "model": "gpt-4o-mini"},
            {"provider": "backup", "model": "gpt-4o"},
        ]
        path = tmp_path / "providers.json"
        path.write_text(
            json.dumps({"providers": providers, "routes": [{"name": "assistant", "chain": chain}]})
        )
        llm_plan.push(*[Fault(chunks=CUT, cut_after=1)] * 20)
        watch = MetricWatch("cxrelay_llm_attempts_total", "cxrelay_llm_fallbacks_total")
        async with relay(providers_file=path, llm_model="assistant") as client:
            cxone = await scenario.burst("cxone", client, 10)
            chat = await scenario.burst("chat", client, 10, extra={"model": "assistant"})
    turns = cxone + chat
    assert_well_formed(turns)
    assert {kind for kind, _ in outcomes(turns)} == {"answered"}
    assert {t.body["customPayload"]["provider"] for t in cxone} == {"backup"}
    assert {t.body["provider"] for t in chat} == {"backup"}
    assert not [t for t in cxone if "First sentence" in said(t)]
    assert not [t for t in chat if "First sentence" in t.body["response"]]
    assert len(backup_plan.requests) == 20
    assert watch.total("cxrelay_llm_attempts_total", provider="wsgw", outcome="unavailable") == 20
    assert watch.total("cxrelay_llm_attempts_total", provider="backup", outcome="ok") == 20
    assert watch.total("cxrelay_llm_fallbacks_total", route="assistant") == 20
    assert watch.delta("cxrelay_requests_total") == expected_requests(turns)


NOT_JSON = Fault(content="Sure! That sounds like a billing question to me.")
BREAKS_SCHEMA = Fault(content='{"classified_intent": "billing", "confidence": 7}')
SCHEMA = {
    "type": "object",
    "properties": {"intent": {"type": "string", "enum": ["billing", "orders"]}},
    "required": ["intent"],
    "additionalProperties": False,
}
JSON_SCHEMA = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "intent", "schema": SCHEMA}}
}


async def test_invalid_json_and_schema_breaking_output(
    relay: Any, llm_plan: FaultPlan, scenario: Scenario
) -> None:
    """Output that is not JSON or breaks the schema is repaired once; a repair that fails too is
    Cognigy's schema_validation_failed fallback and /chat's 422 output_invalid. A body that is
    not JSON at all (the wire format broken) is retried like an outage."""
    watch = MetricWatch("cxrelay_llm_attempts_total", "cxrelay_tokens_total")
    async with relay() as client:
        llm_plan.push(*[NOT_JSON] * 10, *[BREAKS_SCHEMA] * 10)
        unrepaired = await scenario.burst("cognigy", client, 10)
        assert outcomes(unrepaired) == {("fallback", "schema_validation_failed"): 10}
        assert len(llm_plan.requests) == 20  # each turn: its call and one repair, no more

        llm_plan.reset()
        llm_plan.push(*[NOT_JSON] * 5, *[BREAKS_SCHEMA] * 5)
        mixed = await scenario.burst("cognigy", client, 10)
        # Ten bad answers among the burst's calls, in whatever order the calls arrive: a turn
        # whose first answer was bad is repaired (two calls) unless its repair drew a bad one
        # too (then the fallback); a turn whose first answer was good needs one call.
        repaired = [t for t in mixed if t.detail == "success" and len(t.body["attempts"]) == 2]
        failed = [t for t in mixed if t.detail == "schema_validation_failed"]
        assert set(outcomes(mixed)) <= {
            ("answered", "success"),
            ("fallback", "schema_validation_failed"),
        }
        assert len(repaired) + 2 * len(failed) == 10
        assert len(llm_plan.requests) == 10 + len(repaired) + len(failed)
        assert len(repaired) >= 1

        llm_plan.reset()
        llm_plan.push(*[Fault(content='{"intent": "weather"}')] * 20)
        chat = await scenario.burst("chat", client, 10, extra=JSON_SCHEMA)
        assert outcomes(chat) == {("fallback", "output_invalid"): 10}
        assert len(llm_plan.requests) == 20

        llm_plan.reset()
        llm_plan.push(*[Fault(raw_body='{"id": "chatcmpl-1", "choices": [{"mess')] * 10)
        wire = await scenario.burst("openai", client, 10)
        assert outcomes(wire) == {("answered", "answered"): 10}
        assert len(llm_plan.requests) == 20
    turns = unrepaired + mixed + chat + wire
    assert_well_formed(turns)
    assert watch.total("cxrelay_llm_attempts_total", outcome="protocol_error") == 10
    # every call that reached the model is metered, repairs included
    calls = 20 + 10 + len(repaired) + len(failed) + 20 + 10
    assert watch.total("cxrelay_llm_attempts_total", outcome="ok") == calls
    prompts = watch.delta("cxrelay_tokens_total", kind="prompt")
    assert {dict(k)["surface"] for k in prompts} == {"cognigy", "chat", "openai"}
    assert watch.delta("cxrelay_requests_total") == expected_requests(turns)
