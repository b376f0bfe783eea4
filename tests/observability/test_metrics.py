"""The metrics as an operator scraping /metrics sees them: router outcomes, and every request
counted once with its spend, refusals and latency."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.simulator.faults import Fault, FaultPlan
from tests.helpers import cxone_turn, post_turn, trigger
from tests.metric_samples import Labels, changes, label_values, labels, snapshot


def _value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_attempt_outcomes_and_key_health_are_exported(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    before = (await client.get("/metrics")).text
    llm_plan.push(Fault(status=503))
    await post_turn(client, trigger())
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    labels = {"provider": "default", "model": "gpt-4o-mini"}
    for outcome in ("unavailable", "ok"):
        delta = _value(after, "cxrelay_llm_attempts_total", outcome=outcome, **labels) - _value(
            before, "cxrelay_llm_attempts_total", outcome=outcome, **labels
        )
        assert delta == 1, outcome
    assert _value(after, "cxrelay_provider_keys_healthy", provider="default") == 1
    assert _value(after, "cxrelay_llm_retries_total", route="gpt-4o-mini") >= 1


async def test_no_secret_or_customer_text_in_metrics(client: httpx.AsyncClient) -> None:
    await post_turn(client, trigger(lastMessage="my card is 4111 1111 1111 1111"))
    text = (await client.get("/metrics")).text
    assert "4111 1111" not in text
    assert "sk-test-provider-key" not in text
    assert not re.search(r"session|conversation", text.split("# HELP")[0])


# --- the request, spend and latency metrics, as deltas of the process-global collectors ----------

KEY, TINY_KEY = "metrics-key-0123", "metrics-tiny-4567"
CHAT_AUTH = {"Authorization": f"Bearer {KEY}"}
PRICES = {"llm_price_per_1k_prompt": 0.5, "llm_price_per_1k_completion": 1.5}
DEFAULT_MODEL = {"provider": "default", "model": "gpt-4o-mini"}


def chat_body(session_id: str, text: str, **fields: Any) -> dict[str, Any]:
    return {"session_id": session_id, "messages": [{"role": "user", "content": text}], **fields}


def metered(app_client: Callable[..., Any], **overrides: Any) -> Any:
    """A tenant "acme" with a normal key and one whose sessions may spend 10 tokens."""
    return app_client(
        client_api_keys=[SecretStr(f"{KEY}:acme"), SecretStr(f"{TINY_KEY}:acme:10")],
        budget_lightweight_threshold=0,  # one instruction, so one cache lookup per chat call
        **PRICES,
        **overrides,
    )


async def test_a_scripted_sequence_counts_each_request_once(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with metered(app_client) as client:
        before = snapshot()
        ok = await post_turn(client, trigger(lastMessage="Please move my delivery date"))
        llm_plan.push(*[Fault(status=500)] * 3)  # every pass of LLM_MAX_ATTEMPTS fails
        down = await post_turn(client, trigger(lastMessage="Cancel my order, please"))
        question = "What are your opening hours on Sundays?"
        chat = await client.post("/chat", json=chat_body("s-one", question), headers=CHAT_AUTH)
        hit = await client.post("/chat", json=chat_body("s-two", question), headers=CHAT_AUTH)
        tiny = {"Authorization": f"Bearer {TINY_KEY}"}
        refused = await client.post("/chat", json=chat_body("s-three", "Hi"), headers=tiny)
        wrong = {"Authorization": "Bearer not-a-key"}
        unknown = await client.post("/chat", json=chat_body("s-four", "Hi"), headers=wrong)
        delta = changes(before)

    assert ok.json()["status"] == "success"
    assert down.json()["status"] == "llm_unavailable"
    assert (chat.status_code, hit.json()["cached"]) == (200, True)
    assert (refused.status_code, unknown.status_code) == (429, 401)
    assert delta["cxrelay_requests_total"] == {
        labels(surface="cognigy", outcome="success", reason=""): 1,
        labels(surface="cognigy", outcome="fallback", reason="llm_unavailable"): 1,
        labels(surface="chat", outcome="success", reason=""): 2,
        labels(surface="chat", outcome="rejected", reason="429"): 1,
        labels(surface="chat", outcome="rejected", reason="401"): 1,
    }
    assert delta["cxrelay_turns_total"] == {
        labels(surface="cognigy", outcome="answered"): 1,
        labels(surface="cognigy", outcome="llm_unavailable"): 1,
        labels(surface="chat", outcome="answered"): 1,
        labels(surface="chat", outcome="cached"): 1,
    }
    assert delta["cxrelay_budget_exhausted_total"] == {labels(surface="chat", scope="session"): 1}
    # answered and fallback requests are timed; refusals are not
    assert delta["cxrelay_request_latency_seconds_count"] == {
        labels(surface="cognigy"): 2,
        labels(surface="chat"): 2,
    }
    # a lookup per call that got past authentication: the cognigy pair, the chat miss, the
    # refused call (looked up before its budget was asked) and the hit
    assert delta["cxrelay_cache_lookups_total"] == {
        labels(result="miss"): 4,
        labels(result="hit"): 1,
    }
    assert delta["cxrelay_upstream_latency_seconds_count"] == {
        labels(**DEFAULT_MODEL, outcome="ok"): 2,
        labels(**DEFAULT_MODEL, outcome="unavailable"): 3,
    }
    assert delta["cxrelay_llm_retries_total"] == {labels(route="gpt-4o-mini"): 2}
    assert delta["cxrelay_time_to_first_token_seconds_count"] == {}  # nothing was streamed

    # spend: exactly what each answer reports, under its surface and tenant (the cached answer
    # and the refusals spent nothing)
    cognigy, answer = ok.json()["usage"], chat.json()
    spent = {
        ("cognigy", "default"): (cognigy["prompt_tokens"], cognigy["completion_tokens"]),
        ("chat", "acme"): (answer["prompt_tokens"], answer["completion_tokens"]),
    }
    expected_tokens: dict[Labels, float] = {}
    expected_cost: dict[Labels, float] = {}
    for (surface, tenant), (prompt, completion) in spent.items():
        where = {"surface": surface, "tenant": tenant, **DEFAULT_MODEL}
        expected_tokens[labels(**where, kind="prompt")] = prompt
        expected_tokens[labels(**where, kind="completion")] = completion
        expected_cost[labels(**where)] = round(prompt / 1000 * 0.5 + completion / 1000 * 1.5, 9)
    assert all(n > 0 for pair in spent.values() for n in pair)
    assert delta["cxrelay_tokens_total"] == expected_tokens
    assert delta["cxrelay_cost_usd_total"] == pytest.approx(expected_cost)
    chat_cost = expected_cost[labels(surface="chat", tenant="acme", **DEFAULT_MODEL)]
    assert answer["cost"] == pytest.approx(chat_cost)


async def test_streamed_chat_observes_ttft_and_counts_a_cut_stream_as_an_error(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    """A stream that breaks after its 200 is not a success: the error event's status counts."""
    async with metered(app_client) as client:
        before = snapshot()
        body = chat_body("s-stream", "Tell me about my parcel", stream=True)
        whole = await client.post("/chat", json=body, headers=CHAT_AUTH)
        llm_plan.push(Fault(chunks=["It left. ", "It is ", "on the van."], cut_after=1))
        body = chat_body("s-cut", "And the other parcel?", stream=True)
        cut = await client.post("/chat", json=body, headers=CHAT_AUTH)
        delta = changes(before)
    assert (whole.status_code, cut.status_code) == (200, 200)
    assert '"type": "complete"' in whole.text
    assert '"upstream_unavailable"' in cut.text
    assert delta["cxrelay_requests_total"] == {
        labels(surface="chat", outcome="success", reason=""): 1,
        labels(surface="chat", outcome="error", reason="502"): 1,
    }
    assert delta["cxrelay_time_to_first_token_seconds_count"] == {labels(**DEFAULT_MODEL): 1}


async def test_no_label_is_a_session_id_or_the_callers_text(
    app_client: Callable[..., Any],
) -> None:
    sessions = ["sess-label-check-1", "sess-label-check-2", "conv-label-check-3"]
    texts = ["Zanzibar parcel tracking number", "quokka refund request", "ocelot invoice"]
    async with metered(app_client) as client:
        await post_turn(client, trigger(conversationId=sessions[2], lastMessage=texts[0]))
        body = chat_body(sessions[0], texts[1])
        await client.post("/chat", json=body, headers=CHAT_AUTH)
        await client.post("/chat", json={**body, "stream": True}, headers=CHAT_AUTH)
        openai = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": texts[2]}]}
        headers = {**CHAT_AUTH, "X-Session-Id": sessions[1]}
        assert (await client.post("/v1/chat/completions", json=openai, headers=headers)).is_success
        exchange = await cxone_turn(client, user_input=texts[0])
        sessions.append(exchange.json()["customPayload"]["sessionId"])
        await client.post(
            "/chat", json=chat_body(sessions[0], texts[1]), headers={"X-API-Key": "x"}
        )
    values = label_values()
    words = {w.lower() for text in texts for w in text.split()}
    assert "acme" in values and "chat" in values  # the walk does see the labels
    for value in values:
        assert value not in sessions
        assert not any(session in value for session in sessions)
        assert not words & set(value.lower().replace("_", " ").split()), value
