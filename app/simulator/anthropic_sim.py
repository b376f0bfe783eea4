"""The simulated LLM's Anthropic side: the Messages API (`/v1/messages`) wire format.

Anthropic's wire differs from OpenAI's in the details the relay's Anthropic provider must get
right: a top-level system prompt, content as a string or a list of blocks, its own error body
and error types (529 overloaded), a `message` answer with `stop_reason`, and named stream events
(`message_start`, `content_block_delta` ... `message_stop`). Kept apart from `llm.py`, which
speaks the OpenAI wire and builds the app that registers this route. A system prompt mentioning
JSON asks for a routing decision, as `response_format` does on the OpenAI route; one carrying a
JSON Schema gets an object built from that schema.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.simulator.answers import (
    SIMULATED_MODEL_SUFFIX,
    customer_text,
    paced,
    routing_decision,
    stream_deltas,
    token_count,
)
from app.simulator.faults import Fault, FaultPlan
from app.simulator.schema_answers import schema_answer, schema_in_text

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _block_text(content: Any) -> str:
    """Anthropic content is a string or a list of blocks; only text blocks matter here."""
    if isinstance(content, list):
        return "\n".join(
            str(block.get("text", ""))
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
    return "" if content is None else str(content)


def anthropic_error_body(status: int, message: str | None = None) -> dict[str, Any]:
    error_type = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return {
        "type": "error",
        "error": {"type": error_type, "message": message or f"simulated {status}"},
    }


def message_body(model: str, content: str, prompt_text: str) -> dict[str, Any]:
    """An Anthropic Messages API response carrying `content` as one text block."""
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": content}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": token_count(prompt_text), "output_tokens": token_count(content)},
    }


async def anthropic_stream_events(
    fault: Fault, model: str, content: str, prompt_text: str
) -> AsyncIterator[str]:
    """A streamed Messages API answer as SSE text; a cut stream stops without message_stop."""

    def event(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"

    message = message_body(model, "", prompt_text)
    message.update(content=[], stop_reason=None)
    message["usage"] = {"input_tokens": token_count(prompt_text), "output_tokens": 1}
    if fault.omit_usage:
        del message["usage"]
    yield event("message_start", {"message": message})
    yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    yield event("ping", {})
    deltas = stream_deltas(fault, content)
    async for delta in paced(fault, deltas, asyncio.sleep):
        yield event(
            "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": delta}}
        )
    if fault.cut_after is not None:
        return
    yield event("content_block_stop", {"index": 0})
    stop: dict[str, Any] = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    if not fault.omit_usage:
        stop["usage"] = {"output_tokens": token_count("".join(deltas))}
    yield event("message_delta", stop)
    yield event("message_stop", {})


async def messages(plan: FaultPlan, request: Request) -> Response:
    """`POST /v1/messages`: record the request, play the plan's next fault, answer as Anthropic."""
    body = await request.json()
    plan.record({"body": body, "headers": dict(request.headers)})
    fault = plan.next() or Fault()
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.raw_body is not None:
        return Response(fault.raw_body, fault.status, fault.headers, "application/json")
    if fault.json_body is not None or fault.status >= 400:
        error = fault.json_body or anthropic_error_body(fault.status)
        return JSONResponse(error, fault.status, fault.headers)
    turns: list[dict[str, Any]] = [
        {"role": m.get("role"), "content": _block_text(m.get("content"))}
        for m in body.get("messages") or []
        if isinstance(m, dict)
    ]
    system = _block_text(body.get("system"))
    if fault.content is not None:
        content = fault.content
    elif fault.chunks is not None:
        content = "".join(fault.chunks)
    elif (schema := schema_in_text(system)) is not None:
        content = json.dumps(schema_answer(schema, customer_text(turns)))
    elif "JSON" in system:
        content = json.dumps(routing_decision(customer_text(turns)))
    else:
        content = f"(simulated) You said: {customer_text(turns)[:200]}"
    model = str(body.get("model", "model")) + SIMULATED_MODEL_SUFFIX
    prompt_text = " ".join([system, *(str(t["content"]) for t in turns)])
    if body.get("stream"):
        events = anthropic_stream_events(fault, model, content, prompt_text)
        return StreamingResponse(events, headers=fault.headers, media_type="text/event-stream")
    whole = message_body(model, content, prompt_text)
    if fault.omit_usage:
        del whole["usage"]
    return JSONResponse(whole, headers=fault.headers)
