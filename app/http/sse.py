"""Server-Sent Events for the streaming surfaces (/chat and /v1/chat/completions): the frame
format, the response headers, and a response that closes its TextStream however it ends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.pipelines.text_stream import TextStream

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(frame: dict[str, Any]) -> str:
    return f"data: {json.dumps(frame, ensure_ascii=False)}\n\n"


def injection_header(found: tuple[str, ...]) -> dict[str, str]:
    """Flag mode's signal to the caller: the pattern names, never the matched text."""
    return {"X-Prompt-Injection": ",".join(found)} if found else {}


class ClosingStreamingResponse(StreamingResponse):
    """A streamed response that closes its TextStream however the response ends: the body
    sent, the client gone (its task cancelled, the generator maybe never started), an error."""

    def __init__(self, content: AsyncIterator[str], stream: TextStream[Any], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.close()


def event_stream(
    events: AsyncIterator[str], stream: TextStream[Any], injection: tuple[str, ...]
) -> StreamingResponse:
    """The text/event-stream response; the input was checked before the first text, so flag
    mode's X-Prompt-Injection header (`injection`) goes out with it."""
    headers = {**SSE_HEADERS, **injection_header(injection)}
    return ClosingStreamingResponse(events, stream, media_type="text/event-stream", headers=headers)
