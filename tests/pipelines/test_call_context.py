"""One context per call: a provider configuration applied while a call is in flight is the next
call's, never the one under way's. That call finishes on the router it started with: its
provider answers it, its ledger record is priced at that router's prices (although the new
configuration reprices the very same provider and model), and its answer is cached under that
router's answering chain, so it is not served once the chain has changed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.simulator.faults import Fault, FaultPlan
from tests.helpers import post_turn, trigger

ROUTE = "support"  # LLM_MODEL: what the webhook asks for, and the /chat calls here
MODEL = "gpt-4o-mini"
ADMIN = {"Authorization": "Bearer admin-token-for-call-context-tests"}
CLIENT_KEY = "ck-call-context"
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
IN_FLIGHT_SECONDS = 2.5  # how long the first call's provider takes: time for the swap to land
ANSWER = "Your parcel left the depot. It arrives tomorrow."

# (price per 1k prompt tokens, per 1k completion tokens)
ALPHA_BEFORE = (1.0, 2.0)
ALPHA_AFTER = (50.0, 70.0)  # the new configuration reprices alpha ...
BETA = (3.0, 5.0)  # ... and routes to beta


def provider(name: str, url: str, prices: tuple[float, float]) -> dict[str, Any]:
    model = {"name": MODEL, "price_per_1k_prompt": prices[0], "price_per_1k_completion": prices[1]}
    return {
        "name": name,
        "base_url": url,
        "api_keys": ["env:CXR_PROVIDER_KEY_CALL_CONTEXT"],
        "models": [model],
    }


def config(providers: list[dict[str, Any]], serving: str) -> dict[str, Any]:
    route = {"name": ROUTE, "chain": [{"provider": serving, "model": MODEL}]}
    return {"providers": providers, "routes": [route]}


def cost(prices: tuple[float, float], usage: dict[str, Any]) -> float:
    return usage["prompt_tokens"] / 1000 * prices[0] + usage["completion_tokens"] / 1000 * prices[1]


async def cognigy_turn(
    client: httpx.AsyncClient, session: str, text: str
) -> tuple[str, dict[str, Any]]:
    """(the provider that answered, the usage) of one Cognigy turn."""
    response = await post_turn(client, trigger(conversationId=session, lastMessage=text))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    return str(body["provider"]), body["usage"]


async def chat_stream(
    client: httpx.AsyncClient, session: str, text: str
) -> tuple[str, dict[str, Any]]:
    """(the model that answered, the usage) of one streamed /chat call (its last frame)."""
    body = {
        "session_id": session,
        "model": ROUTE,
        "stream": True,
        "messages": [{"role": "user", "content": text}],
    }
    response = await client.post("/chat", json=body, headers=CLIENT)
    assert response.status_code == 200, response.text
    frames = [
        json.loads(block.removeprefix("data: "))
        for block in response.text.split("\n\n")
        if block.strip()
    ]
    complete = frames[-1]
    assert complete["type"] == "complete", frames
    return str(complete["model"]), complete["usage"]


Call = Callable[[httpx.AsyncClient, str, str], Awaitable[tuple[str, dict[str, Any]]]]
FIRST = "Where is my parcel?"
SECOND = "Can I change the delivery address?"


def answered(plan: FaultPlan) -> int:
    """Calls the provider answered (its key probes carry no body)."""
    return len([r for r in plan.requests if r.get("body")])


async def usage_record(client: httpx.AsyncClient, session: str) -> dict[str, Any]:
    response = await client.get("/budget/usage", params={"session": session}, headers=CLIENT)
    assert response.status_code == 200, response.text
    records = response.json()["records"]
    assert len(records) == 1, records
    return dict(records[0])


async def arrived(plan: FaultPlan, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(plan.requests) < count:
        assert time.monotonic() < deadline, "the provider never received the call"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("call", "slow"),
    [
        (cognigy_turn, Fault(delay=IN_FLIGHT_SECONDS)),  # the simulator answers a decision
        (chat_stream, Fault(first_token_delay=IN_FLIGHT_SECONDS, content=ANSWER)),
    ],
    ids=["cognigy", "chat-stream"],
)
async def test_a_config_applied_mid_call_changes_the_next_call_only(
    app_client: Callable[..., Any],
    servers: tuple[str, str],
    plan_a: FaultPlan,
    plan_b: FaultPlan,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    call: Call,
    slow: Fault,
) -> None:
    alpha_url, beta_url = servers
    monkeypatch.setenv("CXR_PROVIDER_KEY_CALL_CONTEXT", "sk-call-context")
    path = tmp_path / "providers.json"
    path.write_text(json.dumps(config([provider("alpha", alpha_url, ALPHA_BEFORE)], "alpha")))
    swapped = config(
        [provider("alpha", alpha_url, ALPHA_AFTER), provider("beta", beta_url, BETA)], "beta"
    )
    running = app_client(
        providers_file=str(path),
        admin_token=SecretStr(ADMIN["Authorization"].removeprefix("Bearer ")),
        llm_model=ROUTE,
        client_api_keys=[SecretStr(CLIENT_KEY)],
        data_dir=str(tmp_path / "data"),
    )
    async with running as client:
        plan_a.push(slow)
        first = asyncio.create_task(call(client, "before-the-swap", FIRST))
        await arrived(plan_a, 1)  # the call is at alpha now, waiting for its answer
        applied = await client.put("/admin/config", json=swapped, headers=ADMIN)
        assert applied.status_code == 200, applied.text
        assert not first.done(), "the swap must land while the first call is in flight"
        first_by, first_usage = await first
        second_by, second_usage = await call(client, "after-the-swap", SECOND)
        # the first call's words again: alpha's answer was cached under alpha's chain, which
        # no longer answers the route, so beta is asked
        again_by, _ = await call(client, "the-same-words-again", FIRST)
        before = await usage_record(client, "before-the-swap")
        after = await usage_record(client, "after-the-swap")
        repeated = await usage_record(client, "the-same-words-again")

    # each call's ledger record: its own provider, at the prices of the router it started on
    assert (before["provider"], after["provider"]) == ("alpha", "beta")
    assert before["cost"] == pytest.approx(cost(ALPHA_BEFORE, first_usage), abs=1e-6)
    assert before["cost"] != pytest.approx(cost(ALPHA_AFTER, first_usage), abs=1e-6)
    assert after["cost"] == pytest.approx(cost(BETA, second_usage), abs=1e-6)
    assert (before["prompt_tokens"], after["prompt_tokens"]) == (
        first_usage["prompt_tokens"],
        second_usage["prompt_tokens"],
    )
    # and the repeated words were not answered from what alpha said under beta's chain
    assert (answered(plan_a), answered(plan_b)) == (1, 2)
    if call is cognigy_turn:
        assert (first_by, second_by, again_by) == ("alpha", "beta", "beta")
    assert not repeated["cached"]
