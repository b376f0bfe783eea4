"""One request to Anthropic's Messages API (`/v1/messages`), mapped to the same typed errors.

Anthropic differs from the OpenAI wire in ways the pipeline must not see: the system prompt is a
top-level field, turns must alternate user/assistant starting with a user turn, tools and their
calls and results are content blocks, `max_tokens` is mandatory, there is no `response_format`,
and overload is its own status (529). This module hides those differences behind the
`ProviderClient` protocol (the request and answer translation: anthropic_messages); retries and
fallbacks stay in the router.

`stream` sends `stream: true` and reads Anthropic's named events: `message_start` (model, input
tokens), `content_block_start` (a `tool_use` block's id and name), `content_block_delta`
(`text_delta` pieces, a tool's `input_json_delta` fragments; other delta types such as thinking
are skipped), `message_delta` (stop reason, output tokens), `message_stop` (the end); `ping` is a
keep-alive and `error` an error that arrived mid-stream (e.g. overloaded).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from app.core.errors import (
    UpstreamError,
    UpstreamProtocolError,
)
from app.llm.anthropic_messages import (
    answer_tool_calls,
    finish_reason,
    options_payload,
    split_messages,
    tools_payload,
)
from app.llm.http_provider import HTTPProvider
from app.llm.streaming import SSEEvent, stream_cut
from app.llm.types import ChatRequest, ChatResult, StreamChunk, ToolCallDelta, Usage
from app.llm.wire import (
    json_instruction,
    quote_provider_message,
    raise_for_status,
    v1_url,
)

ANTHROPIC_VERSION = "2023-06-01"

# The status each error type of an in-stream `error` event stands for; other types are a
# protocol error (nothing the router could retry into a different outcome it understands).
_STREAM_ERROR_STATUS = {
    "overloaded_error": 529,
    "api_error": 500,
    "rate_limit_error": 429,
    "timeout_error": 504,
}


def messages_url(base_url: str) -> str:
    """`https://host` and `https://host/v1` both mean `https://host/v1/messages`."""
    return v1_url(base_url, "messages")


def anthropic_headers(api_key: str | None, auth_header: str | None) -> dict[str, str]:
    """`x-api-key` by default; a gateway's own header carries the bare key (Authorization: Bearer).

    The version header is always sent: Anthropic refuses requests without it.
    """
    headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
    if not api_key:
        return headers
    if auth_header is None:
        headers["x-api-key"] = api_key
    elif auth_header.lower() == "authorization":
        headers["Authorization"] = f"Bearer {api_key}"  # a bare key there is never valid HTTP auth
    else:
        headers[auth_header] = api_key
    return headers


class AnthropicProvider(HTTPProvider):
    """A provider reached over Anthropic's Messages API (api.anthropic.com or a gateway)."""

    kind = "anthropic"

    def __init__(self, name: str, base_url: str, auth_header: str | None = None) -> None:
        self.name = name
        self.url = messages_url(base_url)
        self.models_url = self.url.removesuffix("/messages") + "/models"
        self._auth_header = auth_header

    def headers(self, api_key: str | None) -> dict[str, str]:
        return anthropic_headers(api_key, self._auth_header)

    def payload(self, request: ChatRequest, *, stream: bool = False) -> dict[str, Any]:
        system, turns = split_messages(request.messages)
        if request.json_output or request.output_schema is not None:
            # No response_format on this wire: the instruction (with the caller's schema, when
            # there is one) is the only lever.
            instruction = json_instruction(request.output_schema)
            system = f"{system}\n\n{instruction}" if system else instruction
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            # Anthropic accepts 0..1 where OpenAI accepts 0..2: clamp rather than get a 400.
            "temperature": min(max(request.temperature, 0.0), 1.0),
            "messages": turns,
            **tools_payload(request.tools, request.tool_choice, request.parallel_tool_calls),
            **options_payload(request.options),
        }
        if system:
            body["system"] = system
        if stream:
            body["stream"] = True
        return body

    def raise_for_error(self, response: httpx.Response, api_key: str | None) -> None:
        """Quotes Anthropic's own message and spots a prompt too long for the context window."""
        if response.status_code < 400:
            return
        error_type, detail = _error_detail(response, api_key)
        raise_for_status(
            self.name, response, detail, context_length=_is_prompt_too_long(error_type, detail)
        )

    async def read_events(
        self, events: AsyncIterator[SSEEvent], api_key: str | None
    ) -> AsyncIterator[StreamChunk]:
        model: str | None = None
        input_tokens = 0
        stopped = False
        tools: dict[int, int] = {}  # a tool_use block's index -> its tool call's index
        async for event in events:
            payload = self._decode(event.data)
            kind = payload.get("type") or event.event
            if kind == "message_stop":
                return
            if kind == "error":
                raise self._stream_error(payload.get("error"), api_key)
            if kind == "message_start":
                model, input_tokens = self._message_start(payload)
            elif kind == "content_block_start":
                call = self._tool_use_start(payload, tools)
                if call is not None:
                    yield StreamChunk(model=model, tool_calls=(call,))
            elif kind == "content_block_delta":
                delta = payload.get("delta")
                if isinstance(delta, dict) and delta.get("type") == "text_delta":
                    text = delta.get("text")
                    if not isinstance(text, str):
                        raise self._malformed("content_block_delta")
                    if text:
                        yield StreamChunk(delta=text, model=model)
                elif isinstance(delta, dict) and delta.get("type") == "input_json_delta":
                    piece = self._tool_input(payload, delta, tools)
                    if piece is not None:
                        yield StreamChunk(model=model, tool_calls=(piece,))
            elif kind == "message_delta":
                chunk = self._message_delta(payload, model, input_tokens)
                stopped = stopped or chunk.finish_reason is not None
                yield chunk
        if not stopped:
            raise stream_cut(self.name, "the event stream ended before message_stop")

    def _decode(self, data: str) -> dict[str, Any]:
        try:
            payload = json.loads(data)
        except ValueError as exc:
            raise UpstreamProtocolError(
                f"{self.name} streamed an event that is not JSON", upstream=self.name
            ) from exc
        if not isinstance(payload, dict):
            raise self._malformed("event")
        return payload

    def _malformed(self, what: str) -> UpstreamProtocolError:
        return UpstreamProtocolError(f"{self.name} streamed a malformed {what}", upstream=self.name)

    def _message_start(self, payload: dict[str, Any]) -> tuple[str | None, int]:
        try:
            message = payload["message"]
            usage = message.get("usage") or {}
            model = message.get("model")
            return (str(model) if model else None), int(usage.get("input_tokens") or 0)
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise self._malformed("message_start") from exc

    def _tool_use_start(
        self, payload: dict[str, Any], tools: dict[int, int]
    ) -> ToolCallDelta | None:
        """A `tool_use` block opening: its call's id and name (its input follows in pieces)."""
        block = payload.get("content_block")
        if not isinstance(block, dict) or block.get("type") != "tool_use":
            return None
        try:
            position = int(payload["index"])
            name = block["name"]
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed("content_block_start") from exc
        if not isinstance(name, str):
            raise self._malformed("content_block_start")
        tools[position] = len(tools)
        return ToolCallDelta(index=tools[position], id=str(block.get("id") or ""), name=name)

    def _tool_input(
        self, payload: dict[str, Any], delta: dict[str, Any], tools: dict[int, int]
    ) -> ToolCallDelta | None:
        fragment = delta.get("partial_json")
        if not isinstance(fragment, str):
            raise self._malformed("input_json_delta")
        index = (
            tools.get(payload.get("index", -1)) if isinstance(payload.get("index"), int) else None
        )
        if index is None or not fragment:
            return None
        return ToolCallDelta(index=index, arguments=fragment)

    def _message_delta(
        self, payload: dict[str, Any], model: str | None, input_tokens: int
    ) -> StreamChunk:
        """The stop reason and the usage (output tokens are cumulative; newer API versions may
        repeat the input tokens here too)."""
        try:
            delta = payload.get("delta") or {}
            usage = payload.get("usage")
            stop_reason = delta.get("stop_reason")
            parsed = (
                Usage(
                    int(usage.get("input_tokens") or input_tokens),
                    int(usage.get("output_tokens") or 0),
                )
                if isinstance(usage, dict)
                else None
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise self._malformed("message_delta") from exc
        return StreamChunk(usage=parsed, model=model, finish_reason=finish_reason(stop_reason))

    def _stream_error(self, error: Any, api_key: str | None) -> UpstreamError:
        fields = error if isinstance(error, dict) else {}
        error_type = str(fields.get("type") or "")
        message = quote_provider_message(
            str(fields.get("message") or error_type or "error"), api_key
        )
        status = _STREAM_ERROR_STATUS.get(error_type)
        if status is None:
            return UpstreamProtocolError(
                f"{self.name} failed mid-stream ({error_type or 'unknown error'}): {message[:200]}",
                upstream=self.name,
            )
        try:
            raise_for_status(self.name, httpx.Response(status), message[:200], context_length=False)
        except UpstreamError as typed:
            return typed
        raise AssertionError("unreachable: status >= 400 always raises")  # pragma: no cover

    def result(
        self, response: httpx.Response, request: ChatRequest, latency_ms: float
    ) -> ChatResult:
        try:
            body = response.json()
            blocks = body["content"]
            if not isinstance(blocks, list):
                raise TypeError("content is not a list")
            content = "".join(
                str(block.get("text") or "")
                for block in blocks
                if isinstance(block, dict) and block.get("type") == "text"
            )
            tool_calls = answer_tool_calls(blocks)
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamProtocolError(
                f"{self.name} answered 2xx without a Messages API message", upstream=self.name
            ) from exc
        usage = body.get("usage") or {}
        try:
            parsed_usage = Usage(
                int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise UpstreamProtocolError(
                f"{self.name} answered 2xx with malformed usage", upstream=self.name
            ) from exc
        return ChatResult(
            content=content,
            model=str(body.get("model") or request.model),
            provider=self.name,
            usage=parsed_usage,
            latency_ms=latency_ms,
            usage_reported=isinstance(body.get("usage"), dict),
            finish_reason=finish_reason(body.get("stop_reason")),
            tool_calls=tool_calls,
        )


def _is_prompt_too_long(error_type: str | None, detail: str) -> bool:
    return error_type in (None, "invalid_request_error") and "prompt is too long" in detail.lower()


def _error_detail(response: httpx.Response, api_key: str | None) -> tuple[str | None, str]:
    """Anthropic's `{"type": "error", "error": {"type", "message"}}`, else the reason phrase.

    Only the provider's own message is quoted, truncated, and with the key redacted in case a
    gateway echoes the key it refused: error messages end up in logs and answers.
    """
    fallback = response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        return None, fallback
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, fallback
    error_type = error.get("type")
    message = quote_provider_message(str(error.get("message") or ""), api_key)
    return (str(error_type) if error_type else None), (message or fallback)
