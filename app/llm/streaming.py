"""Streamed answers: the Server-Sent Events reader both HTTP wires share (httpx-sse parses), and
`collect_stream`, which turns a provider's stream into one ChatResult under a time-to-first-token
and a total limit.

Why stream at all: the CXone bot webhook has a hard answer budget. Streaming lets it give up on a
provider that has not produced its first token in time (and fall back) instead of waiting for a
whole completion, and an explicit end marker lets it tell a complete answer from a cut one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import EventSource

from app.core.errors import StreamBroken, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from app.llm.types import ChatResult, StreamChunk, ToolCallDelta, Usage
from app.llm.wire import transport_failure

OnDelta = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched Server-Sent Event: its `event:` name ("message" by default) and its data
    (several `data:` lines joined with newlines)."""

    data: str
    event: str = "message"


async def iter_sse(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    """The events of a `text/event-stream` response, parsed by httpx-sse (WHATWG rules: lines
    split across reads, CRLF/LF/CR, comments as keep-alives, multi-line data).

    Two choices are ours. A body whose last line ended but whose blank line never came still
    dispatches its last event (a `data: [DONE]\n` at the very end is the end marker), while a
    line cut mid-way is dropped, so a cut stream stays a cut. And an event without data (only an
    `event:`, `id:` or `retry:` field) is not passed on: the wires carry everything in `data`.
    Raises httpx_sse.SSEError when the response is not an event stream.
    """
    content_type = response.headers.get("content-type", "")
    body = httpx.Response(
        response.status_code,
        headers={"content-type": content_type},
        content=_last_line_dispatched(response.aiter_bytes()),
    )
    async for sse in EventSource(body).aiter_sse():
        if sse.data:
            yield SSEEvent(sse.data, sse.event)


async def _last_line_dispatched(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The body, plus a blank line when it ended right after a complete line: that dispatches
    a pending last event, which a spec parser would drop at the end of the stream."""
    last = b""
    async for chunk in chunks:
        if chunk:
            last = chunk[-1:]
            yield chunk
    if last in (b"\n", b"\r"):
        yield b"\r\n"  # after CR: CR ended the line, CRLF is the blank one; after LF: blank


def stream_transport_error(provider: str, exc: httpx.HTTPError, timeout: float) -> UpstreamError:
    """Transport failures of a stream, mapped like `wire.post_json` maps them: before the
    headers or mid-body (ReadError, RemoteProtocolError ...) alike."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(
            f"{provider} did not answer within {timeout:.2f}s ({type(exc).__name__})",
            upstream=provider,
        )
    return UpstreamUnavailable(
        f"{provider} stream failed: {type(exc).__name__}",
        upstream=provider,
        detail=transport_failure(exc),
    )


def stream_cut(provider: str, detail: str) -> UpstreamUnavailable:
    """A stream that ended before its end marker: retryable, and never a complete answer."""
    return UpstreamUnavailable(f"{provider} stream cut: {detail}", upstream=provider)


def whole_as_chunk(result: ChatResult, default_finish: str) -> StreamChunk:
    """A whole answer to a streamed request (a gateway that ignored `stream: true`) as the one
    chunk of its stream; `default_finish` is the wire's own stop reason when none was given."""
    calls = tuple(
        ToolCallDelta(i, call["id"], call["function"]["name"], call["function"]["arguments"])
        for i, call in enumerate(result.tool_calls)
    )
    return StreamChunk(
        delta=result.content,
        usage=result.usage if result.usage_reported else None,
        model=result.model,
        finish_reason=result.finish_reason or default_finish,
        tool_calls=calls,
    )


async def collect_stream(
    chunks: AsyncIterator[StreamChunk],
    *,
    provider: str,
    model: str,
    first_token_timeout: float,
    total_timeout: float,
    on_delta: OnDelta | None = None,
) -> ChatResult:
    """Consume a provider stream into one ChatResult.

    `on_delta`, when given, is awaited with each content delta as it arrives (a client-facing
    stream passes them on). Once one delta has gone out, a failure of the stream is raised as
    StreamBroken with the text passed on: the caller already holds half an answer, so it may
    only be continued, never answered afresh.

    Raises UpstreamTimeout when no content delta arrived within `first_token_timeout` of this
    call (chunks without content, such as a role or usage chunk, are not a token) or when the
    whole stream took longer than `total_timeout`; the provider's own typed errors (a cut stream
    included) pass through. The iterator is always closed, so the HTTP stream or WebSocket is
    released on every path. `usage_reported` is False when the provider sent no usage (usage is
    then 0/0 and the caller may estimate it).
    """
    started = time.perf_counter()
    first_token_deadline = started + first_token_timeout
    total_deadline = started + total_timeout
    parts: list[str] = []
    usage: Usage | None = None
    answered_model: str | None = None
    finish_reason: str | None = None
    ttft_ms: float | None = None
    calls = ToolCallAssembly()
    try:
        try:
            while True:
                waiting_for_first = ttft_ms is None and first_token_deadline < total_deadline
                deadline = first_token_deadline if waiting_for_first else total_deadline
                remaining = deadline - time.perf_counter()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    chunk = await asyncio.wait_for(anext(chunks), remaining)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if waiting_for_first:
                        raise UpstreamTimeout(
                            f"{provider}: no first token within {first_token_timeout:.2f}s",
                            upstream=provider,
                        ) from None
                    raise UpstreamTimeout(
                        f"{provider}: stream not complete within {total_timeout:.2f}s",
                        upstream=provider,
                    ) from None
                if (chunk.delta or chunk.tool_calls) and ttft_ms is None:
                    ttft_ms = (time.perf_counter() - started) * 1000
                if chunk.delta:
                    parts.append(chunk.delta)
                    if on_delta is not None:
                        await on_delta(chunk.delta)
                calls.add(chunk.tool_calls)
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.model:
                    answered_model = chunk.model
                if chunk.finish_reason:
                    finish_reason = chunk.finish_reason
        except UpstreamError as error:
            if on_delta is None or not parts:
                raise
            raise StreamBroken(
                f"{provider}: stream failed after part of the answer was sent: {error}",
                upstream=provider,
                partial="".join(parts),
            ) from error
    finally:
        await close_stream(chunks)
    return ChatResult(
        content="".join(parts),
        model=answered_model or model,
        provider=provider,
        usage=usage or Usage(0, 0),
        latency_ms=(time.perf_counter() - started) * 1000,
        usage_reported=usage is not None,
        ttft_ms=ttft_ms,
        finish_reason=finish_reason,
        tool_calls=calls.whole(),
    )


class ToolCallAssembly:
    """Streamed tool call pieces put back together, by their index (the id and name come with
    a call's first piece, its arguments in fragments), as OpenAI's whole `tool_calls`."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, pieces: tuple[ToolCallDelta, ...]) -> None:
        for piece in pieces:
            call = self._calls.setdefault(
                piece.index,
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if piece.id:
                call["id"] = piece.id
            if piece.name:
                call["function"]["name"] += piece.name
            call["function"]["arguments"] += piece.arguments

    def whole(self) -> tuple[dict[str, Any], ...]:
        return tuple(self._calls[i] for i in sorted(self._calls))


async def close_stream(chunks: AsyncIterator[StreamChunk]) -> None:
    """Close a stream we stop reading, when it can be closed (an async generator can)."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
