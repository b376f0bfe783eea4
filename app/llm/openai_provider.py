"""One request to an OpenAI-compatible `/v1/chat/completions`, mapped to typed errors.

This module makes exactly one attempt; retries, backoff and deadlines live in `retry.py`, so the
same attempt can later be driven by provider routing and fallback chains.

`stream` sends the same request with `stream: true` and reads the Server-Sent Events answer:
`data: {chat.completion.chunk}` events, the usage in a last chunk with no choices (asked for with
`stream_options.include_usage`), then `data: [DONE]`. The HTTP plumbing is `http_provider`'s; the
chunk reading and the in-stream error mapping are shared with the WebSocket transport
(`websocket_provider.py`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from app.core.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamUnavailable,
)
from app.llm.embeddings import (
    EmbeddingRequest,
    EmbeddingResult,
    embeddings_payload,
    parse_embeddings,
)
from app.llm.http_provider import HTTPProvider
from app.llm.streaming import SSEEvent, stream_cut
from app.llm.types import ChatRequest, ChatResult, StreamChunk, ToolCallDelta, Usage
from app.llm.wire import (
    json_instruction,
    json_schema_format,
    quote_provider_message,
    raise_for_status,
    v1_url,
    with_system_text,
)

DONE = "[DONE]"

# Which models of a provider take OpenAI's `json_schema` response format: all (True), none
# (False: the schema goes in the system instruction), or the ones named.
StructuredOutputs = bool | frozenset[str]

# OpenAI's string error codes that stand for an HTTP status when an error arrives in a stream.
_ERROR_CODE_STATUS = {
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "invalid_api_key": 401,
    "context_length_exceeded": 400,
    "server_error": 500,
    "service_unavailable": 503,
}


def chat_completions_url(base_url: str) -> str:
    """`https://host` and `https://host/v1` both mean `https://host/v1/chat/completions`."""
    return v1_url(base_url, "chat/completions")


def auth_headers(
    api_key: str | None, auth_header: str | None, scheme: str = "Bearer"
) -> dict[str, str]:
    """`Authorization: Bearer <key>` by default; a gateway's own header carries the bare key."""
    if not api_key:
        return {}
    if auth_header is None or auth_header.lower() == "authorization":
        return {"Authorization": f"{scheme} {api_key}"}
    return {auth_header: api_key}


class OpenAICompatibleProvider(HTTPProvider):
    """A provider reached over the OpenAI chat completions wire format (OpenAI, Azure OpenAI v1,
    vLLM, LiteLLM and most gateways)."""

    kind = "openai"

    def __init__(
        self,
        name: str,
        base_url: str,
        auth_header: str | None = None,
        structured_outputs: StructuredOutputs = True,
    ) -> None:
        self.name = name
        self.url = chat_completions_url(base_url)
        self.models_url = self.url.removesuffix("/chat/completions") + "/models"
        self.embeddings_url = self.url.removesuffix("/chat/completions") + "/embeddings"
        self._auth_header = auth_header
        self._structured_outputs = structured_outputs

    def headers(self, api_key: str | None) -> dict[str, str]:
        return auth_headers(api_key, self._auth_header)

    def payload(self, request: ChatRequest, *, stream: bool = False) -> dict[str, Any]:
        return chat_payload(
            request,
            stream=stream,
            json_schema=takes_json_schema(self._structured_outputs, request.model),
        )

    def raise_for_error(self, response: httpx.Response, api_key: str | None) -> None:
        raise_for_error(self.name, response, api_key)

    def read_events(
        self, events: AsyncIterator[SSEEvent], api_key: str | None
    ) -> AsyncIterator[StreamChunk]:
        return chunks_until_done(
            self.name, (event.data async for event in events), api_key, "the event stream ended"
        )

    async def embed(
        self,
        http: httpx.AsyncClient,
        request: EmbeddingRequest,
        timeout: float,
        api_key: str | None,
    ) -> EmbeddingResult:
        """One `POST /v1/embeddings` attempt (app.llm.embeddings)."""
        body = embeddings_payload(request)
        response, latency_ms = await self.post(http, self.embeddings_url, body, timeout, api_key)
        return parse_embeddings(self.name, response, request, latency_ms)

    def result(
        self, response: httpx.Response, request: ChatRequest, latency_ms: float
    ) -> ChatResult:
        try:
            body = response.json()
            choice = body["choices"][0]
            content = choice["message"].get("content") or ""
            tool_calls = whole_tool_calls(choice["message"].get("tool_calls"))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UpstreamProtocolError(
                f"{self.name} answered 2xx without a chat completion", upstream=self.name
            ) from exc
        usage = body.get("usage") or {}
        reported = isinstance(body.get("usage"), dict)
        return ChatResult(
            content=content,
            model=str(body.get("model") or request.model),
            provider=self.name,
            usage=Usage(
                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            ),
            latency_ms=latency_ms,
            usage_reported=reported,
            finish_reason=str(choice.get("finish_reason") or "") or None,
            tool_calls=tool_calls,
        )


def raise_for_error(provider: str, response: httpx.Response, api_key: str | None) -> None:
    """Nothing for a success; else the typed error of `wire.raise_for_status`, quoting the
    provider's own message (OpenAI's error shape) and spotting a context-length refusal."""
    if response.status_code < 400:
        return
    detail = _error_message(response, api_key)
    raise_for_status(
        provider, response, detail, context_length=_is_context_length_error(response, detail)
    )


def takes_json_schema(structured_outputs: StructuredOutputs, model: str) -> bool:
    """Does `model` take OpenAI's `json_schema` response format: True/False for every model of
    the provider, or the names of the models that do."""
    if isinstance(structured_outputs, bool):
        return structured_outputs
    return model in structured_outputs


def chat_payload(
    request: ChatRequest, *, stream: bool = False, json_schema: bool = True
) -> dict[str, Any]:
    """The chat completion request body; streamed, it asks for the usage in a last chunk.

    A caller's schema goes as the `json_schema` response format when the model takes it
    (`json_schema`); otherwise the answer is asked for as a `json_object` and the schema is
    added to the system instruction, so the model sees it on the first call either way.
    """
    messages = request.messages
    schema = request.output_schema
    if schema is not None and not json_schema:
        messages = with_system_text(messages, json_instruction(schema))
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }
    if schema is not None and json_schema:
        body["response_format"] = json_schema_format(schema)
    elif request.json_output or schema is not None:
        body["response_format"] = {"type": "json_object"}
    if request.tools:
        body["tools"] = request.tools
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
    body.update(request.options)
    if stream:
        options = body.get("stream_options")
        body["stream"] = True
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return body


def decode_event(provider: str, data: str) -> Any:
    """One event's JSON payload (an SSE `data:` or a WebSocket text frame)."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise UpstreamProtocolError(
            f"{provider} streamed an event that is not JSON", upstream=provider
        ) from exc


async def chunks_until_done(
    provider: str, payloads: AsyncIterator[str], api_key: str | None, ended: str
) -> AsyncIterator[StreamChunk]:
    """The chunks of a stream's event payloads (SSE `data:` or WebSocket text frames) up to
    `[DONE]`; payloads that run out before it and before a finish_reason are a cut stream
    (`ended` says how they ran out)."""
    finished = False
    async for data in payloads:
        if data.strip() == DONE:
            return
        chunk = parse_chunk(provider, decode_event(provider, data), api_key)
        if chunk is None:
            continue
        finished = finished or chunk.finish_reason is not None
        yield chunk
    if not finished:
        raise stream_cut(provider, f"{ended} before [DONE]")


def parse_chunk(provider: str, payload: Any, api_key: str | None) -> StreamChunk | None:
    """A `chat.completion.chunk` as a StreamChunk; None when it carries nothing (the leading
    role-only chunk, keep-alives). An `{"error": ...}` payload raises its typed error."""
    if not isinstance(payload, dict):
        raise UpstreamProtocolError(
            f"{provider} streamed a chunk that is not an object", upstream=provider
        )
    if payload.get("error"):
        raise stream_error(provider, payload["error"], api_key)
    try:
        choices = payload.get("choices") or []
        if not isinstance(choices, list):
            raise TypeError("choices is not a list")
        delta, finish_reason = "", None
        calls: tuple[ToolCallDelta, ...] = ()
        if choices:
            choice = choices[0]
            content = (choice.get("delta") or {}).get("content")
            if content is not None and not isinstance(content, str):
                raise TypeError("delta.content is not a string")
            delta = content or ""
            calls = tool_call_deltas((choice.get("delta") or {}).get("tool_calls"))
            finish_reason = choice.get("finish_reason")
        raw_usage = payload.get("usage")
        usage = (
            Usage(
                int(raw_usage.get("prompt_tokens") or 0),
                int(raw_usage.get("completion_tokens") or 0),
            )
            if isinstance(raw_usage, dict)
            else None
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise UpstreamProtocolError(
            f"{provider} streamed a malformed chat completion chunk", upstream=provider
        ) from exc
    if not delta and usage is None and not finish_reason and not calls:
        return None
    model = payload.get("model")
    return StreamChunk(
        delta=delta,
        usage=usage,
        model=str(model) if model else None,
        finish_reason=str(finish_reason) if finish_reason else None,
        tool_calls=calls,
    )


def whole_tool_calls(raw: Any) -> tuple[dict[str, Any], ...]:
    """A whole answer's `message.tool_calls`, checked and in OpenAI's shape (TypeError when a
    call is malformed: the caller maps it to a protocol error)."""
    calls = []
    for call in _listed(raw, "tool_calls"):
        function = call["function"]
        name, arguments = function["name"], function.get("arguments") or "{}"
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise TypeError("a tool call's name and arguments are strings")
        calls.append(
            {
                "id": str(call.get("id") or ""),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return tuple(calls)


def tool_call_deltas(raw: Any) -> tuple[ToolCallDelta, ...]:
    """A chunk's `delta.tool_calls` pieces (TypeError when malformed)."""
    pieces = []
    for piece in _listed(raw, "delta.tool_calls"):
        function = piece.get("function") or {}
        arguments = function.get("arguments") or ""
        if not isinstance(arguments, str):
            raise TypeError("tool call arguments are a string")
        name = function.get("name")
        pieces.append(
            ToolCallDelta(
                index=int(piece.get("index") or 0),
                id=str(piece["id"]) if piece.get("id") else None,
                name=str(name) if name else None,
                arguments=arguments,
            )
        )
    return tuple(pieces)


def stream_error(provider: str, error: Any, api_key: str | None) -> UpstreamError:
    """An error object received inside a stream, typed like the same status before it.

    `code` is the HTTP-equivalent status (an int, or one of OpenAI's string codes); an optional
    `retry_after` (seconds) becomes UpstreamRateLimited.retry_after. An error without a known
    status is UpstreamUnavailable: the provider failed mid-answer, another try may pass.
    """
    fields = error if isinstance(error, dict) else {"message": str(error)}
    code = fields.get("code")
    status = _as_status(code) or _as_status(fields.get("status"))
    if status is None:
        status = _ERROR_CODE_STATUS.get(str(code)) or _ERROR_CODE_STATUS.get(
            str(fields.get("type"))
        )
    message = quote_provider_message(str(fields.get("message") or "error"), api_key)
    if status is None or status < 400:
        return UpstreamUnavailable(f"{provider} failed mid-stream: {message}", upstream=provider)
    headers = {}
    if fields.get("retry_after") is not None:
        headers["retry-after"] = str(fields["retry_after"])
    context_length = code == "context_length_exceeded" or "maximum context length" in (
        message.lower()
    )
    try:
        raise_for_status(
            provider,
            httpx.Response(status, headers=headers),
            message,
            context_length=context_length,
        )
    except UpstreamError as typed:
        return typed
    raise AssertionError("unreachable: status >= 400 always raises")  # pragma: no cover


def _listed(raw: Any, what: str) -> list[Any]:
    """A tool calls field: [] when absent, TypeError when not a list."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise TypeError(f"{what} is not a list")
    return raw


def _as_status(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 100 <= value <= 599 else None
    if isinstance(value, str) and value.isdigit():
        return _as_status(int(value))
    return None


def _is_context_length_error(response: httpx.Response, detail: str) -> bool:
    try:
        body = response.json()
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
    except ValueError:
        code = None
    return code == "context_length_exceeded" or "maximum context length" in detail.lower()


def _error_message(response: httpx.Response, api_key: str | None) -> str:
    """The provider's own error message when it sends OpenAI's error shape, key redacted."""
    try:
        body = response.json()
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except ValueError:
        message = None
    if not message:
        return response.reason_phrase or "error"
    return quote_provider_message(str(message), api_key)
