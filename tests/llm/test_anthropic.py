"""AnthropicProvider against the simulator's `/v1/messages` on a real loopback socket.

The simulator speaks Anthropic's wire format and replays scripted faults, so these tests pin both
what we send (system lifted out, alternating turns, version header, key header) and how every
failure the real API produces maps onto the typed errors the router relies on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from app.core.errors import (
    ContextLengthExceeded,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.llm.anthropic_messages import LEADING_USER_TURN
from app.llm.anthropic_provider import (
    ANTHROPIC_VERSION,
    AnthropicProvider,
    messages_url,
)
from app.llm.openai_provider import OpenAICompatibleProvider
from app.llm.types import ChatRequest, ProviderClient
from app.llm.wire import JSON_INSTRUCTION
from app.simulator.answers import SIMULATED_MODEL_SUFFIX
from app.simulator.faults import Fault, FaultPlan
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer

KEY = "sk-ant-test-0123456789abcdef"
MODEL = "claude-3-5-haiku-latest"


@pytest.fixture
def plan() -> FaultPlan:
    return FaultPlan()


@pytest.fixture
def server(plan: FaultPlan) -> Iterator[LoopbackServer]:
    with LoopbackServer(create_llm_simulator(plan)) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def provider(server: LoopbackServer) -> AnthropicProvider:
    return AnthropicProvider("claude", server.url)


def chat(*messages: tuple[str, str], json_output: bool = False, **fields: Any) -> ChatRequest:
    values: dict[str, Any] = {"model": MODEL, "temperature": 0.2, "max_tokens": 256}
    values.update(fields)
    return ChatRequest(
        messages=[{"role": role, "content": content} for role, content in messages],
        json_output=json_output,
        **values,
    )


HELLO = chat(("system", "Be brief."), ("user", "hello there"))


def test_satisfies_the_provider_protocol() -> None:
    provider: ProviderClient = AnthropicProvider("claude", "https://api.anthropic.com")
    assert provider.kind == "anthropic"
    assert provider.name == "claude"


@pytest.mark.parametrize(
    "base",
    [
        "https://api.anthropic.com",
        "https://api.anthropic.com/",
        "https://api.anthropic.com/v1",
        "https://api.anthropic.com/v1/",
        "https://api.anthropic.com/v1/messages",
    ],
)
def test_base_url_with_or_without_v1(base: str) -> None:
    assert messages_url(base) == "https://api.anthropic.com/v1/messages"
    assert AnthropicProvider("c", base).models_url == "https://api.anthropic.com/v1/models"


async def test_request_body_and_headers(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    request = chat(
        ("system", "You are a support agent."),
        ("user", "first"),
        ("system", "Never promise refunds."),
        ("user", "second"),
        ("assistant", "reply one"),
        ("assistant", "reply two"),
        ("user", "third"),
        temperature=0.3,
        max_tokens=321,
    )
    await provider.complete(http, request, 2.0, KEY)

    [recorded] = plan.requests
    assert recorded["body"] == {
        "model": MODEL,
        "max_tokens": 321,
        "temperature": 0.3,
        "system": "You are a support agent.\n\nNever promise refunds.",
        "messages": [
            {"role": "user", "content": "first\n\nsecond"},
            {"role": "assistant", "content": "reply one\n\nreply two"},
            {"role": "user", "content": "third"},
        ],
    }
    headers = recorded["headers"]
    assert headers["x-api-key"] == KEY
    assert headers["anthropic-version"] == ANTHROPIC_VERSION == "2023-06-01"
    assert headers["content-type"] == "application/json"
    assert "authorization" not in headers


async def test_no_system_field_without_system_messages(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    await provider.complete(http, chat(("user", "hi")), 2.0, KEY)
    body = plan.requests[0]["body"]
    assert "system" not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}]


async def test_leading_assistant_turn_gets_a_user_turn_first(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    request = chat(("system", "s"), ("assistant", "Hi, how can I help?"), ("user", "my order"))
    await provider.complete(http, request, 2.0, KEY)
    assert plan.requests[0]["body"]["messages"] == [
        {"role": "user", "content": LEADING_USER_TURN},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "my order"},
    ]


async def test_json_output_appends_the_instruction_to_the_system_text(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    request = chat(
        ("system", "Classify the customer's message."),
        ("user", 'Customer said: """I want a refund for order 1234567"""'),
        json_output=True,
    )
    result = await provider.complete(http, request, 2.0, KEY)

    body = plan.requests[0]["body"]
    assert body["system"] == f"Classify the customer's message.\n\n{JSON_INSTRUCTION}"
    assert "response_format" not in body
    decision = json.loads(result.content)  # the simulator honours the JSON instruction
    assert decision["classified_intent"] == "billing_question"


async def test_json_output_without_system_messages(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    await provider.complete(http, chat(("user", "talk to a human"), json_output=True), 2.0, KEY)
    assert plan.requests[0]["body"]["system"] == JSON_INSTRUCTION


async def test_custom_auth_header_carries_the_bare_key(
    server: LoopbackServer, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    provider = AnthropicProvider("gateway", server.url + "/v1", auth_header="api-key")
    await provider.complete(http, HELLO, 2.0, KEY)
    headers = plan.requests[0]["headers"]
    assert headers["api-key"] == KEY
    assert "x-api-key" not in headers
    assert headers["anthropic-version"] == ANTHROPIC_VERSION


async def test_authorization_auth_header_uses_bearer(
    server: LoopbackServer, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    provider = AnthropicProvider("gateway", server.url, auth_header="Authorization")
    await provider.complete(http, HELLO, 2.0, KEY)
    assert plan.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"


async def test_success_parses_content_usage_and_model(
    provider: AnthropicProvider, http: httpx.AsyncClient
) -> None:
    result = await provider.complete(http, HELLO, 2.0, KEY)
    assert result.content == "(simulated) You said: hello there"
    assert result.model == MODEL + SIMULATED_MODEL_SUFFIX
    assert result.provider == "claude"
    assert result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens == len(result.content) // 4
    assert result.latency_ms > 0


async def test_text_blocks_are_concatenated_and_other_blocks_skipped(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    plan.push(
        Fault(
            json_body={
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-3-5-haiku-20241022",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {"type": "text", "text": "Hello, "},
                    {"type": "tool_use", "id": "t", "name": "n", "input": {}},
                    {"type": "text", "text": "world."},
                ],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 12, "output_tokens": 3},
            }
        )
    )
    result = await provider.complete(http, HELLO, 2.0, KEY)
    assert result.content == "Hello, world."
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (12, 3)
    assert result.model == "claude-3-5-haiku-20241022"


async def test_scripted_content(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    plan.push(Fault(content='{"ok": true}'))
    assert (await provider.complete(http, HELLO, 2.0, KEY)).content == '{"ok": true}'


def anthropic_error(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


async def test_429_carries_retry_after(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    plan.push(Fault(status=429, headers={"Retry-After": "7"}))
    with pytest.raises(UpstreamRateLimited) as caught:
        await provider.complete(http, HELLO, 2.0, KEY)
    assert caught.value.retry_after == 7.0
    assert caught.value.status == 429
    assert caught.value.retryable


async def test_429_without_retry_after(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    plan.push(Fault(status=429))
    with pytest.raises(UpstreamRateLimited) as caught:
        await provider.complete(http, HELLO, 2.0, KEY)
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [529, 500, 503, 408])
async def test_overload_server_errors_and_408_are_unavailable(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient, status: int
) -> None:
    plan.push(Fault(status=status))
    with pytest.raises(UpstreamUnavailable) as caught:
        await provider.complete(http, HELLO, 2.0, KEY)
    assert caught.value.status == status
    assert caught.value.upstream == "claude"


@pytest.mark.parametrize("status", [401, 403, 404, 413])
async def test_client_errors_are_rejected(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient, status: int
) -> None:
    plan.push(Fault(status=status))
    with pytest.raises(UpstreamRejected) as caught:
        await provider.complete(http, HELLO, 2.0, KEY)
    assert type(caught.value) is UpstreamRejected
    assert caught.value.status == status
    assert not caught.value.retryable


async def test_prompt_too_long_is_context_length_exceeded(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    body = anthropic_error("invalid_request_error", "prompt is too long: 208310 tokens > 200000")
    plan.push(Fault(status=400, json_body=body))
    with pytest.raises(ContextLengthExceeded) as caught:
        await provider.complete(http, HELLO, 2.0, KEY)
    assert caught.value.status == 400
    assert "prompt is too long" in str(caught.value)


async def test_other_400_is_rejected_not_context_length(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    body = anthropic_error("invalid_request_error", "max_tokens: Field required")
    plan.push(Fault(status=400, json_body=body))
    with pytest.raises(UpstreamRejected) as caught:
        await provider.complete(http, HELLO, 2.0, KEY)
    assert not isinstance(caught.value, ContextLengthExceeded)
    assert caught.value.status == 400
    assert "max_tokens: Field required" in str(caught.value)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(raw_body="this is not json"),
        Fault(json_body={"type": "message", "role": "assistant", "model": MODEL}),
        Fault(json_body={"type": "message", "content": "a string, not blocks"}),
        Fault(raw_body="[1, 2, 3]"),
    ],
    ids=["not-json", "no-content", "content-not-a-list", "not-an-object"],
)
async def test_malformed_2xx_is_a_protocol_error(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient, fault: Fault
) -> None:
    plan.push(fault)
    with pytest.raises(UpstreamProtocolError):
        await provider.complete(http, HELLO, 2.0, KEY)


async def test_delay_beyond_the_timeout_is_a_timeout(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    plan.push(Fault(delay=0.5))
    with pytest.raises(UpstreamTimeout) as caught:
        await provider.complete(http, HELLO, 0.1, KEY)
    assert caught.value.upstream == "claude"


async def test_connection_refused_is_unavailable(http: httpx.AsyncClient) -> None:
    provider = AnthropicProvider("claude", "http://127.0.0.1:9")
    with pytest.raises(UpstreamUnavailable):
        await provider.complete(http, HELLO, 2.0, KEY)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=401, json_body=anthropic_error("authentication_error", f"bad key {KEY}")),
        Fault(status=400, json_body=anthropic_error("invalid_request_error", f"{KEY} too long")),
        Fault(status=429, json_body=anthropic_error("rate_limit_error", f"key {KEY} throttled")),
        Fault(status=529, json_body=anthropic_error("overloaded_error", "Overloaded")),
        Fault(raw_body=f"oops {KEY}"),
        Fault(delay=0.5),
    ],
    ids=["401-echo", "400-echo", "429-echo", "529", "malformed", "timeout"],
)
async def test_error_messages_never_contain_the_key(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient, fault: Fault
) -> None:
    plan.push(fault)
    with pytest.raises(UpstreamError) as caught:
        await provider.complete(http, HELLO, 0.2, KEY)
    assert KEY not in str(caught.value)
    assert KEY not in repr(caught.value.args)


async def test_refused_key_message_is_quoted_with_the_key_redacted(
    provider: AnthropicProvider, plan: FaultPlan, http: httpx.AsyncClient
) -> None:
    plan.push(Fault(status=401, json_body=anthropic_error("authentication_error", f"bad {KEY}")))
    with pytest.raises(UpstreamRejected) as caught:
        await provider.complete(http, HELLO, 2.0, KEY)
    assert "bad [redacted]" in str(caught.value)


async def test_connection_error_message_never_contains_the_key(http: httpx.AsyncClient) -> None:
    provider = AnthropicProvider("claude", "http://127.0.0.1:9")
    with pytest.raises(UpstreamUnavailable) as caught:
        await provider.complete(http, HELLO, 2.0, KEY)
    assert KEY not in str(caught.value)


async def test_probe_good_and_revoked_keys(
    provider: AnthropicProvider, http: httpx.AsyncClient
) -> None:
    assert await provider.probe(http, KEY, 2.0) is True
    assert await provider.probe(http, "revoked-sk-ant-0001", 2.0) is False


async def test_probe_unreachable_is_false(http: httpx.AsyncClient) -> None:
    assert await AnthropicProvider("c", "http://127.0.0.1:9").probe(http, KEY, 2.0) is False


async def test_probe_sends_the_anthropic_headers(server: LoopbackServer) -> None:
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        seen.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as http:
        assert await AnthropicProvider("claude", server.url).probe(http, KEY, 2.0)
    [request] = seen
    assert request.method == "GET"
    assert str(request.url) == f"{server.url}/v1/models"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == ANTHROPIC_VERSION


async def test_openai_compatible_probe_against_the_simulator(
    server: LoopbackServer, http: httpx.AsyncClient
) -> None:
    provider = OpenAICompatibleProvider("openai", server.url)
    assert await provider.probe(http, "sk-good", 2.0) is True
    assert await provider.probe(http, "revoked-x", 2.0) is False
