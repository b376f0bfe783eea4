"""/v1 as Cognigy's LLM connection and agent frameworks use it, through the official `openai`
client: tool calling (plain, streamed with the client's own stream helper, against an
OpenAI-compatible and an Anthropic provider, along a route's fallback), image parts, the request
fields passed on or mapped, finish reasons, and what the budget and the cache make of them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from pydantic import SecretStr

from app.simulator.faults import Fault, FaultPlan

KEY = "ck-tools"
ORDER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_order_status",
        "description": "Look an order up by its number.",
        "parameters": {
            "type": "object",
            "properties": {"order_number": {"type": "string"}},
            "required": ["order_number"],
        },
    },
}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Where is my order 123456?"}]
SHIPPED = '(simulated) The tool answered: {"status": "shipped"}'
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@asynccontextmanager
async def gateway(
    app_client: Callable[..., Any], **overrides: Any
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    overrides.setdefault("client_api_keys", [SecretStr(f"{KEY}:acme")])
    overrides.setdefault("intent_cache_enabled", False)
    async with app_client(**overrides) as raw:
        client = openai.AsyncOpenAI(
            api_key=KEY, base_url="http://cx-relay.test/v1", http_client=raw, max_retries=0
        )
        yield client, raw


@pytest.fixture
def provider_file(
    tmp_path: Path, servers: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Path]:
    """`write(first_kind, second_kind, **model_fields)`: route "assistant" over provider "a"
    (servers[0]) then "b" (servers[1]); a kind of None leaves that provider out."""

    def write(first: str | None = "openai", second: str | None = None, **fields: Any) -> Path:
        monkeypatch.setenv("SIM_KEY", "sk-sim")
        providers = [
            {
                "name": name,
                "kind": kind,
                "base_url": url,
                "api_keys": ["env:SIM_KEY"],
                "models": [{"name": f"{name}-model", **fields}],
            }
            for name, kind, url in (("a", first, servers[0]), ("b", second, servers[1]))
            if kind is not None
        ]
        chain = [{"provider": p["name"], "model": p["models"][0]["name"]} for p in providers]
        path = tmp_path / "providers.json"
        routes = [{"name": "assistant", "chain": chain}]
        path.write_text(json.dumps({"providers": providers, "routes": routes}))
        return path

    return write


def on_route(path: Path) -> dict[str, Any]:
    return {"providers_file": path, "llm_model": "assistant"}


async def tool_loop(client: openai.AsyncOpenAI, model: str) -> tuple[Any, Any]:
    """The two steps of a tool-calling turn: the model asks for the tool, then answers from its
    result (what every agent framework does)."""
    first = await client.chat.completions.create(model=model, messages=ASK, tools=[ORDER_TOOL])
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    followed: list[ChatCompletionMessageParam] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'},
    ]
    second = await client.chat.completions.create(
        model=model, messages=followed, tools=[ORDER_TOOL]
    )
    return first, second


async def test_a_tool_loop_completes_with_the_official_client(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with gateway(app_client) as (client, _):
        first, second = await tool_loop(client, "gpt-4o-mini")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_order_status"
    assert "order_number" in json.loads(call.function.arguments)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == SHIPPED
    sent_first, sent_second = (r["body"] for r in llm_plan.requests)
    assert sent_first["tools"] == [ORDER_TOOL]
    assert sent_second["messages"][-2]["tool_calls"][0]["id"] == call.id
    assert sent_second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": call.id,
        "content": '{"status": "shipped"}',
    }


async def test_a_streamed_tool_call_is_assembled_by_the_clients_stream_helper(
    app_client: Callable[..., Any],
) -> None:
    async with (
        gateway(app_client) as (client, _),
        client.chat.completions.stream(
            model="gpt-4o-mini",
            messages=ASK,
            tools=[ORDER_TOOL],
            stream_options={"include_usage": True},
        ) as stream,
    ):
        events = [event.type async for event in stream]
        final = await stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.function.name == "get_order_status"
    assert json.loads(call.function.arguments)["order_number"]
    assert final.usage is not None and final.usage.prompt_tokens > 0


async def test_an_anthropic_provider_runs_the_same_tool_loop(
    app_client: Callable[..., Any], provider_file: Callable[..., Path], plan_a: FaultPlan
) -> None:
    async with gateway(app_client, **on_route(provider_file("anthropic"))) as (client, _):
        first, second = await tool_loop(client, "assistant")
        async with client.chat.completions.stream(
            model="assistant", messages=ASK, tools=[ORDER_TOOL], tool_choice="required"
        ) as stream:
            streamed = await stream.get_final_completion()
    assert first.choices[0].finish_reason == "tool_calls"
    call = (first.choices[0].message.tool_calls or [])[0]
    assert json.loads(call.function.arguments)["order_number"]
    assert second.choices[0].message.content == SHIPPED
    assert (streamed.choices[0].message.tool_calls or [])[0].function.name == "get_order_status"
    # what Anthropic was sent: its own tool shape, the call and the result as blocks
    asked, answered, forced = (r["body"] for r in plan_a.requests)
    assert asked["tools"] == [
        {
            "name": "get_order_status",
            "description": "Look an order up by its number.",
            "input_schema": ORDER_TOOL["function"]["parameters"],
        }
    ]
    use, result = answered["messages"][-2:]
    assert use["role"] == "assistant" and use["content"][0]["type"] == "tool_use"
    assert use["content"][0]["id"] == call.id
    assert result["content"] == [
        {"type": "tool_result", "tool_use_id": call.id, "content": '{"status": "shipped"}'}
    ]
    assert forced["tool_choice"] == {"type": "any"}


async def test_fallback_along_the_route_keeps_the_tools(
    app_client: Callable[..., Any],
    provider_file: Callable[..., Path],
    plan_a: FaultPlan,
    plan_b: FaultPlan,
) -> None:
    plan_a.push(Fault(status=503), Fault(status=503), Fault(status=503))
    async with gateway(app_client, **on_route(provider_file("openai", "anthropic"))) as (
        client,
        _,
    ):
        answer = await client.chat.completions.create(
            model="assistant", messages=ASK, tools=[ORDER_TOOL]
        )
    assert (answer.model_extra or {})["cx_relay"]["provider"] == "b"
    assert answer.choices[0].finish_reason == "tool_calls"
    assert plan_b.requests[0]["body"]["tools"][0]["name"] == "get_order_status"


async def test_tool_definitions_count_in_the_budget(app_client: Callable[..., Any]) -> None:
    """The same question fits a small session budget alone, not with large tool definitions:
    they go to the model with every call and are charged as prompt."""
    big: ChatCompletionToolParam = {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look something up. " * 200,
            "parameters": {"type": "object", "properties": {}},
        },
    }
    async with gateway(app_client, budget_session_tokens=700) as (client, _):
        plain = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, user="a")
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=ASK, tools=[big], user="b"
            )
    assert plain.choices[0].message.content
    assert isinstance(refused.value.body, dict) and refused.value.code == "budget_exhausted"


async def test_arguments_holding_personal_data_are_redacted_unless_the_filter_is_off(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    calls = [
        {
            "id": "call_pii",
            "type": "function",
            "function": {
                "name": "get_order_status",
                "arguments": json.dumps({"order_number": "1", "email": "jane.doe@example.com"}),
            },
        }
    ]
    answer = {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    llm_plan.push(Fault(json_body=answer), Fault(json_body=answer))
    async with gateway(app_client) as (client, _):
        guarded = await client.chat.completions.create(
            model="gpt-4o-mini", messages=ASK, tools=[ORDER_TOOL]
        )
        raw = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=ASK,
            tools=[ORDER_TOOL],
            extra_body={"safety_filters": ["unsafe", "injection"]},
        )
    arguments = json.loads((guarded.choices[0].message.tool_calls or [])[0].function.arguments)
    assert arguments == {"order_number": "1", "email": "[EMAIL REDACTED]"}
    kept = json.loads((raw.choices[0].message.tool_calls or [])[0].function.arguments)
    assert kept["email"] == "jane.doe@example.com"


async def test_an_image_part_reaches_a_vision_model_and_is_refused_by_another(
    app_client: Callable[..., Any], provider_file: Callable[..., Path], llm_plan: FaultPlan
) -> None:
    image: list[ChatCompletionMessageParam] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is on this picture?"},
                {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}},
            ],
        }
    ]
    async with gateway(app_client) as (client, _):  # LLM_VISION: the default model takes images
        seen = await client.chat.completions.create(model="gpt-4o-mini", messages=image)
    assert "(and 1 attachment)" in (seen.choices[0].message.content or "")
    assert llm_plan.requests[-1]["body"]["messages"][-1]["content"][1]["type"] == "image_url"
    assert (seen.usage is not None) and seen.usage.prompt_tokens > 0
    async with gateway(app_client, **on_route(provider_file("openai"))) as (client, _):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="assistant", messages=image)
    assert refused.value.param == "messages"
    assert "vision" in refused.value.message and "a/a-model" in refused.value.message


async def test_request_fields_are_passed_on_or_mapped_per_provider_kind(
    app_client: Callable[..., Any],
    provider_file: Callable[..., Path],
    llm_plan: FaultPlan,
    plan_a: FaultPlan,
) -> None:
    fields: dict[str, Any] = {
        "stop": ["END"],
        "seed": 7,
        "top_p": 0.9,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.1,
        "logit_bias": {"50256": -100},
        "metadata": {"team": "care"},
        "store": False,
        "service_tier": "auto",
    }
    async with gateway(app_client) as (client, _):
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=ASK,
            extra_body={"reasoning_effort": "low"},  # a field newer than cx-relay: passed on
            **fields,
        )
    sent = llm_plan.requests[-1]["body"]
    assert {name: sent[name] for name in fields} == fields
    assert sent["reasoning_effort"] == "low"
    async with gateway(app_client, **on_route(provider_file("anthropic"))) as (client, _):
        await client.chat.completions.create(
            model="assistant", messages=ASK, stop=["END"], top_p=0.9
        )
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="assistant", messages=ASK, seed=7)
    mapped = plan_a.requests[-1]["body"]
    assert mapped["stop_sequences"] == ["END"] and mapped["top_p"] == 0.9
    assert "stop" not in mapped and "seed" not in mapped
    assert refused.value.param == "seed" and "Anthropic" in refused.value.message
    assert len(plan_a.requests) == 1  # refused before anything went upstream


async def test_a_cut_answer_maps_to_length_and_is_never_cached(
    app_client: Callable[..., Any],
    provider_file: Callable[..., Path],
    llm_plan: FaultPlan,
    plan_a: FaultPlan,
) -> None:
    llm_plan.push(Fault(content="The parcel", finish_reason="length"))
    async with gateway(app_client, intent_cache_enabled=True) as (client, _):
        cut = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=3)
        whole = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
        again = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
    assert cut.choices[0].finish_reason == "length"
    assert whole.choices[0].message.content != "The parcel"  # not served the cut one
    assert (again.model_extra or {})["cx_relay"]["cached"] is True  # a whole one is cached
    plan_a.push(Fault(content="The parcel", finish_reason="max_tokens"))
    async with gateway(app_client, **on_route(provider_file("anthropic"))) as (client, _):
        anthropic_cut = await client.chat.completions.create(model="assistant", messages=ASK)
    assert anthropic_cut.choices[0].finish_reason == "length"


async def test_the_cache_key_covers_what_changes_the_answer(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with gateway(app_client, intent_cache_enabled=True) as (client, _):
        for kwargs in (
            {},
            {"stop": ["."]},
            {"temperature": 1.5},
            {"response_format": {"type": "json_object"}},
            {"tools": [ORDER_TOOL], "tool_choice": "none"},
        ):
            await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, **kwargs)
        repeat = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
    assert len(llm_plan.requests) == 5  # each variant asked the model once; the repeat did not
    assert (repeat.model_extra or {})["cx_relay"]["cached"] is True
