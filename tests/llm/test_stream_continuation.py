"""A stream that breaks after part of the answer went out is continued by the route's next entry,
as the callers see it: the official openai client, /chat's Server-Sent Events, /ws/chat.

Before, a primary that stopped after one chunk cost the caller its answer ("Hello! " and then an
error event) on every turn until its circuit opened, although a healthy fallback was configured.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from app.llm.continuation import CONTINUE_INSTRUCTION
from app.main import create_app
from app.simulator.faults import Fault, FaultPlan

KEY = "continuation-key"
PRIMARY_PRICES = {"price_per_1k_prompt": 1.0, "price_per_1k_completion": 2.0}
BACKUP_PRICES = {"price_per_1k_prompt": 0.1, "price_per_1k_completion": 0.2}
BREAKS = Fault(chunks=["Hello! ", "Your ", "parcel ", "left."], cut_after=1)
GOES_ON = Fault(chunks=["Your parcel ", "left today."])


@pytest.fixture
def provider_file(
    tmp_path: Path, servers: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Path]:
    def write(*names: str) -> Path:
        monkeypatch.setenv("SIM_KEY", "sk-sim")
        providers = [
            {
                "name": "primary",
                "base_url": servers[0],
                "api_keys": ["env:SIM_KEY"],
                "models": [{"name": "gpt-4o-mini", **PRIMARY_PRICES}],
            },
            {
                "name": "backup",
                "base_url": servers[1],
                "api_keys": ["env:SIM_KEY"],
                "models": [{"name": "gpt-4o", **BACKUP_PRICES}],
            },
        ]
        models = {"primary": "gpt-4o-mini", "backup": "gpt-4o"}
        chain = [{"provider": n, "model": models[n]} for n in names]
        path = tmp_path / "providers.json"
        path.write_text(
            json.dumps({"providers": providers, "routes": [{"name": "assistant", "chain": chain}]})
        )
        return path

    return write


def settings_for(path: Path) -> dict[str, Any]:
    return {
        "providers_file": path,
        "llm_model": "assistant",
        "client_api_keys": [SecretStr(f"{KEY}:acme")],
        "circuit_failure_threshold": 100,  # every turn meets the broken primary
        "intent_cache_enabled": False,
        "budget_session_tokens": None,
    }


@asynccontextmanager
async def official_client(
    app_client: Callable[..., Any], path: Path
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    async with app_client(**settings_for(path)) as raw:
        client = openai.AsyncOpenAI(
            api_key=KEY, base_url="http://cx-relay.test/v1", http_client=raw, max_retries=0
        )
        yield client, raw


def continued_requests(plan: FaultPlan) -> list[list[dict[str, Any]]]:
    return [r["body"]["messages"] for r in plan.requests]


async def test_ten_of_ten_streams_cut_after_the_first_chunk_are_answered_whole(
    app_client: Callable[..., Any],
    provider_file: Callable[..., Path],
    plan_a: FaultPlan,
    plan_b: FaultPlan,
) -> None:
    plan_a.push(*[BREAKS] * 10)
    plan_b.push(*[GOES_ON] * 10)
    async with official_client(app_client, provider_file("primary", "backup")) as (client, raw):
        answers, usages, costs = [], [], []
        for turn in range(10):
            stream = await client.chat.completions.create(
                model="assistant",
                messages=[{"role": "user", "content": f"Where is parcel {turn}?"}],
                stream=True,
                stream_options={"include_usage": True},
                user=f"parcel-{turn}",
            )
            text = ""
            async for chunk in stream:  # an error event would raise openai.APIError here
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                extras = (chunk.model_extra or {}).get("cx_relay")
                if extras:
                    costs.append(extras["cost"])
                if chunk.usage is not None:
                    usages.append(chunk.usage)
            answers.append(text)
        ledger = await raw.get("/budget/sessions/parcel-0", headers={"X-API-Key": KEY})
    assert answers == ["Hello! Your parcel left today."] * 10
    for messages in continued_requests(plan_b):
        assert messages[-2:] == [
            {"role": "assistant", "content": "Hello! "},
            {"role": "user", "content": CONTINUE_INSTRUCTION},
        ]
    # both providers are paid: the primary's part at its prices, the rest at the backup's
    usage = usages[0]
    backup_alone = (
        usage.prompt_tokens / 1000 * BACKUP_PRICES["price_per_1k_prompt"]
        + usage.completion_tokens / 1000 * BACKUP_PRICES["price_per_1k_completion"]
    )
    assert costs[0] > backup_alone * 2  # the dearer primary's share is in it
    assert usage.completion_tokens >= 6  # "Hello! " and "Your parcel left today."
    summary = ledger.json()
    assert summary["cost"] == pytest.approx(costs[0])
    assert summary["total_tokens"] == usage.total_tokens


async def test_chat_sse_continues_in_the_same_answer(
    app_client: Callable[..., Any],
    provider_file: Callable[..., Path],
    plan_a: FaultPlan,
    plan_b: FaultPlan,
) -> None:
    plan_a.push(BREAKS)
    plan_b.push(GOES_ON)
    body = {"session_id": "sse-1", "messages": [{"role": "user", "content": "Where?"}]}
    stream = {"json": {**body, "stream": True}, "headers": {"X-API-Key": KEY}}
    async with (
        app_client(**settings_for(provider_file("primary", "backup"))) as client,
        client.stream("POST", "/chat", **stream) as response,
    ):
        frames = [
            json.loads(line[6:])
            async for line in response.aiter_lines()
            if line.startswith("data: ")
        ]
    kinds = [f["type"] for f in frames]
    assert kinds[-1] == "complete" and "error" not in kinds
    text = "".join(f["delta"] for f in frames if f["type"] == "content")
    assert text == "Hello! Your parcel left today."
    assert frames[-1]["provider"] == "backup"


def test_ws_chat_continues_in_the_same_answer(
    make_settings: Callable[..., Any],
    provider_file: Callable[..., Path],
    plan_a: FaultPlan,
    plan_b: FaultPlan,
) -> None:
    plan_a.push(BREAKS)
    plan_b.push(GOES_ON)
    app = create_app(make_settings(**settings_for(provider_file("primary", "backup"))))
    with TestClient(app) as tc, tc.websocket_connect("/ws/chat", headers={"X-API-Key": KEY}) as ws:
        ws.send_json({"session_id": "ws-1", "messages": [{"role": "user", "content": "Where?"}]})
        text = ""
        while (frame := ws.receive_json())["type"] == "content":
            text += frame["delta"]
    assert frame["type"] == "complete", frame
    assert text == "Hello! Your parcel left today."


async def test_with_no_entry_left_the_caller_gets_the_error_event_and_both_parts_are_charged(
    app_client: Callable[..., Any],
    provider_file: Callable[..., Path],
    plan_a: FaultPlan,
    plan_b: FaultPlan,
) -> None:
    """The continuation breaks too, and nothing is left to continue it: what went out stands,
    the stream ends with its error event, and what both providers streamed is charged."""
    plan_a.push(BREAKS)
    plan_b.push(Fault(chunks=["Your parcel ", "left today."], cut_after=1))
    async with official_client(app_client, provider_file("primary", "backup")) as (client, raw):
        text = ""
        with pytest.raises(openai.APIError):
            stream = await client.chat.completions.create(
                model="assistant",
                messages=[{"role": "user", "content": "Where is it?"}],
                stream=True,
                user="cut-twice",
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
        ledger = await raw.get("/budget/sessions/cut-twice", headers={"X-API-Key": KEY})
    assert text == "Hello! Your parcel "
    assert ledger.json()["completion_tokens"] >= 4


async def test_a_route_without_a_next_entry_still_ends_with_the_error_event(
    app_client: Callable[..., Any], provider_file: Callable[..., Path], plan_a: FaultPlan
) -> None:
    plan_a.push(BREAKS)
    async with official_client(app_client, provider_file("primary")) as (client, _):
        text = ""
        with pytest.raises(openai.APIError):
            stream = await client.chat.completions.create(
                model="assistant", messages=[{"role": "user", "content": "Where?"}], stream=True
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
    assert text == "Hello! "
    assert len(plan_a.requests) == 1  # never answered afresh: nothing glued onto the half
