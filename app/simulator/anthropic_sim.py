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
    content_text,
    paced,
    stream_deltas,
    token_count,
)
from app.simulator.faults import Fault, FaultPlan, fault_response, recorded_json
from app.simulator.schema_answers import schema_in_text
from app.simulator.tool_answers import SimulatedCall, simulated_answer, tool_call

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str | None = None) -> dict[str, Any]:
    error_type = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return {
        "type": "error",
        "error": {"type": error_type, "message": message or f"simulated {status}"},
    }


def message_body(
    model: str, content: str, prompt_text: str, call: SimulatedCall | None = None
) -> dict[str, Any]:
    """An Anthropic Messages API response carrying `content` as one text block, or a call."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": content}]
    if call is not None:
        blocks = [_tool_use(call)]
        content = call.name + call.arguments
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": "end_turn" if call is None else "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": token_count(prompt_text), "output_tokens": token_count(content)},
    }


def _tool_use(call: SimulatedCall) -> dict[str, Any]:
    input_ = json.loads(call.arguments)
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": input_}


async def anthropic_stream_events(
    fault: Fault, model: str, content: str, prompt_text: str, call: SimulatedCall | None = None
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
    if call is not None:  # a tool_use block: its id and name, then its input in JSON pieces
        block = {**_tool_use(call), "input": {}}
        yield event("content_block_start", {"index": 0, "content_block": block})
        half = len(call.arguments) // 2
        for piece in (call.arguments[:half], call.arguments[half:]):
            fragment = {"type": "input_json_delta", "partial_json": piece}
            yield event("content_block_delta", {"index": 0, "delta": fragment})
        yield event("content_block_stop", {"index": 0})
        end: dict[str, Any] = {"delta": {"stop_reason": "tool_use", "stop_sequence": None}}
        end["usage"] = {"output_tokens": token_count(call.name + call.arguments)}
        yield event("message_delta", end)
        yield event("message_stop", {})
        return
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
    body = await recorded_json(plan, request)
    fault = plan.next() or Fault()
    if (scripted := await fault_response(fault, anthropic_error_body)) is not None:
        return scripted
    raw = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    turns: list[dict[str, Any]] = [
        {"role": m.get("role"), "content": content_text(m.get("content"))} for m in raw
    ]
    results = _tool_results(raw[-1].get("content")) if raw else []
    system = content_text(body.get("system"))
    content, call = simulated_answer(
        fault,
        raw,
        schema=schema_in_text(system),
        wants_json="JSON" in system,
        tool_result=results[-1] if results else None,
        call_for=lambda customer: tool_call(_tools(body), _choice(body), False, customer),
    )
    model = str(body.get("model", "model")) + SIMULATED_MODEL_SUFFIX
    prompt_text = " ".join([system, *(str(t["content"]) for t in turns)])
    if body.get("stream"):
        events = anthropic_stream_events(fault, model, content, prompt_text, call)
        return StreamingResponse(events, headers=fault.headers, media_type="text/event-stream")
    whole = message_body(model, content, prompt_text, call)
    if fault.finish_reason is not None:  # Anthropic's own words: "max_tokens", "tool_use" ...
        whole["stop_reason"] = fault.finish_reason
    if fault.omit_usage:
        del whole["usage"]
    return JSONResponse(whole, headers=fault.headers)


def _tool_results(content: Any) -> list[str]:
    """The texts of a user turn's `tool_result` blocks."""
    if not isinstance(content, list):
        return []
    return [
        content_text(block.get("content"))
        for block in content
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]


def _tools(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("name")]
    return [(str(t["name"]), t.get("input_schema") or {}) for t in tools]


def _choice(body: dict[str, Any]) -> str | None:
    choice = body.get("tool_choice") or {}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        return str(choice.get("name"))
    return "none" if kind == "none" else None
