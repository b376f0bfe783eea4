"""A simulated LLM provider: the embedded default, the test fake, the bench upstream.

It speaks the real OpenAI `/v1/chat/completions` and Anthropic `/v1/messages` wire formats, both
driven by the same FaultPlan. Asked for JSON (`response_format: json_object`, or a system prompt
mentioning JSON on the Anthropic route) it answers a routing decision from keyword rules over the
customer's message; otherwise a short conversational reply. Everything it answers is marked as
simulated in the model name. `GET /v1/models` refuses keys starting with "revoked" so key probes
can be exercised.

Asked to stream (`"stream": true`) both routes answer `text/event-stream` the way the real APIs
do: OpenAI `data: {chat.completion.chunk}` events (a role chunk, the content word by word, a
finish chunk, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`), Anthropic
`message_start` / `content_block_delta` ... `message_stop`. `/v1/chat/completions/ws` speaks the
WebSocket protocol of `app.services.llm.websocket` (it refuses the handshake with 401 for a
"revoked" key). The FaultPlan's streaming knobs slow the first token, pace the chunks, fix the
chunks or cut the stream without its end marker.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import HTTPConnection

from app.simulator.faults import Fault, FaultPlan

SIMULATED_MODEL_SUFFIX = "-simulated"

_RULES: list[tuple[re.Pattern[str], str, bool, str]] = [
    (
        re.compile(r"\b(agent|human|person|representative|operator)\b", re.I),
        "speak_to_agent",
        True,
        "Of course. I'm connecting you with a member of our team now.",
    ),
    (
        re.compile(r"\b(cancel|terminate|close my account)\b", re.I),
        "cancel_subscription",
        True,
        "I'm sorry to hear you want to cancel. Let me bring in a colleague who can help.",
    ),
    (
        re.compile(r"\b(refund|charge[ds]?|bill(ing|ed)?|invoice|payment)\b", re.I),
        "billing_question",
        False,
        "I can help with your bill. Which charge are you asking about?",
    ),
    (
        re.compile(r"\b(order|delivery|shipping|package|parcel)\b", re.I),
        "order_status",
        False,
        "Let me check on your order. One moment please.",
    ),
    (
        re.compile(r"\b(password|log ?in|error|not working|broken|crash)\b", re.I),
        "technical_support",
        False,
        "Sorry about the trouble. Let's get that fixed together.",
    ),
]
_ORDER_NUMBER = re.compile(r"\b\d{5,}\b")
_QUOTED = re.compile(r'"""\s*(.*?)\s*"""', re.DOTALL)


def _customer_text(messages: list[dict[str, Any]]) -> str:
    user_turns = [m for m in messages if m.get("role") == "user"]
    text = str(user_turns[-1].get("content", "")) if user_turns else ""
    quoted = _QUOTED.findall(text)
    return quoted[-1] if quoted else text


def routing_decision(text: str) -> dict[str, Any]:
    for pattern, intent, human, reply in _RULES:
        if pattern.search(text):
            params: dict[str, Any] = {}
            if intent == "order_status" and (number := _ORDER_NUMBER.search(text)):
                params["order_number"] = number.group(0)
            return {
                "classified_intent": intent,
                "confidence": 0.9,
                "extracted_parameters": params,
                "suggested_response": reply,
                "requires_human_agent": human,
            }
    return {
        "classified_intent": "other",
        "confidence": 0.4,
        "extracted_parameters": {},
        "suggested_response": "Could you tell me a little more about what you need?",
        "requires_human_agent": False,
    }


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def completion_body(model: str, content: str, prompt_text: str) -> dict[str, Any]:
    prompt_tokens, completion_tokens = _tokens(prompt_text), _tokens(content)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
REVOKED_KEY_PREFIX = "revoked"


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
        "usage": {"input_tokens": _tokens(prompt_text), "output_tokens": _tokens(content)},
    }


def _words(text: str) -> list[str]:
    """The content as streamed deltas: words with their trailing whitespace."""
    return re.findall(r"\S+\s*|\s+", text)


def _stream_deltas(fault: Fault, content: str) -> list[str]:
    deltas = list(fault.chunks) if fault.chunks is not None else _words(content)
    return deltas if fault.cut_after is None else deltas[: fault.cut_after]


async def _paced(
    fault: Fault, deltas: list[str], pause: Callable[[float], Awaitable[None]]
) -> AsyncIterator[str]:
    for index, delta in enumerate(deltas):
        seconds = fault.first_token_delay if index == 0 else fault.chunk_delay
        if seconds > 0:
            await pause(seconds)
        yield delta


async def openai_stream_frames(
    fault: Fault,
    model: str,
    content: str,
    prompt_text: str,
    include_usage: bool,
    pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[str]:
    """The payloads of one streamed chat completion, SSE and WebSocket alike: chunk JSONs, then
    "[DONE]" — unless the fault cuts the stream, which then just stops."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body: dict[str, Any] = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        return json.dumps(body)

    yield chunk({"role": "assistant", "content": ""})
    deltas = _stream_deltas(fault, content)
    async for delta in _paced(fault, deltas, pause):
        yield chunk({"content": delta})
    if fault.cut_after is not None:
        return
    yield chunk({}, "stop")
    if include_usage and not fault.omit_usage:
        prompt_tokens, completion_tokens = _tokens(prompt_text), _tokens("".join(deltas))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        yield json.dumps(
            {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
    yield "[DONE]"


async def _openai_sse(frames: AsyncIterator[str]) -> AsyncIterator[str]:
    async for frame in frames:
        yield f"data: {frame}\n\n"


async def anthropic_stream_events(
    fault: Fault, model: str, content: str, prompt_text: str
) -> AsyncIterator[str]:
    """A streamed Messages API answer as SSE text; a cut stream stops without message_stop."""

    def event(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"

    message = message_body(model, "", prompt_text)
    message.update(content=[], stop_reason=None)
    message["usage"] = {"input_tokens": _tokens(prompt_text), "output_tokens": 1}
    if fault.omit_usage:
        del message["usage"]
    yield event("message_start", {"message": message})
    yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    yield event("ping", {})
    deltas = _stream_deltas(fault, content)
    async for delta in _paced(fault, deltas, asyncio.sleep):
        yield event(
            "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": delta}}
        )
    if fault.cut_after is not None:
        return
    yield event("content_block_stop", {"index": 0})
    stop: dict[str, Any] = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    if not fault.omit_usage:
        stop["usage"] = {"output_tokens": _tokens("".join(deltas))}
    yield event("message_delta", stop)
    yield event("message_stop", {})


async def _pause_unless_gone(websocket: WebSocket, seconds: float) -> None:
    """Wait, but notice a client that goes away meanwhile (WebSocketDisconnect), as a real
    server would, instead of sleeping through it."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(websocket.receive(), remaining)
        except asyncio.TimeoutError:
            return
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(int(message.get("code", 1000)))


def _openai_error(status: int) -> dict[str, Any]:
    return {"error": {"message": f"simulated {status}", "type": "simulated_error"}}


def _retry_after(headers: dict[str, str]) -> float | None:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _key_revoked(request: HTTPConnection) -> bool:
    """A bearer token or x-api-key starting with "revoked" stands for a key the provider refuses."""
    authorization = request.headers.get("authorization", "")
    bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    presented = (bearer, request.headers.get("x-api-key", ""))
    return any(key.startswith(REVOKED_KEY_PREFIX) for key in presented)


def _openai_answer(body: dict[str, Any], fault: Fault) -> tuple[str, str, str]:
    """(model, content, prompt text) of the answer to an OpenAI chat completion request."""
    messages = body.get("messages") or []
    if fault.content is not None:
        content = fault.content
    elif fault.chunks is not None:
        content = "".join(fault.chunks)
    elif (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
        content = json.dumps(routing_decision(_customer_text(messages)))
    else:
        content = f"(simulated) You said: {_customer_text(messages)[:200]}"
    model = str(body.get("model", "model")) + SIMULATED_MODEL_SUFFIX
    prompt_text = " ".join(str(m.get("content", "")) for m in messages)
    return model, content, prompt_text


def create_llm_simulator(plan: FaultPlan | None = None) -> FastAPI:
    plan = plan or FaultPlan()
    app = FastAPI(title="cx-relay simulated LLM provider", openapi_url=None)
    app.state.plan = plan

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await request.json()
        plan.record({"body": body, "headers": dict(request.headers)})
        fault = plan.next() or Fault()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.raw_body is not None:
            return Response(fault.raw_body, fault.status, fault.headers, "application/json")
        if fault.json_body is not None or fault.status >= 400:
            error = fault.json_body or {
                "error": {"message": f"simulated {fault.status}", "type": "simulated_error"}
            }
            return JSONResponse(error, fault.status, fault.headers)
        model, content, prompt_text = _openai_answer(body, fault)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            frames = openai_stream_frames(fault, model, content, prompt_text, include_usage)
            return StreamingResponse(
                _openai_sse(frames), headers=fault.headers, media_type="text/event-stream"
            )
        whole = completion_body(model, content, prompt_text)
        if fault.omit_usage:
            del whole["usage"]
        return JSONResponse(whole, headers=fault.headers)

    @app.websocket("/v1/chat/completions/ws")
    async def chat_completions_ws(websocket: WebSocket) -> None:
        """The chat completion stream over a WebSocket (see app.services.llm.websocket)."""
        headers = dict(websocket.headers)
        if _key_revoked(websocket):
            refusal = {
                "error": {
                    "message": "Incorrect API key provided",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            }
            await websocket.send_denial_response(JSONResponse(refusal, 401))
            return
        fault = plan.next() or Fault()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.reject_handshake and fault.status >= 400:
            plan.record({"body": None, "headers": headers})
            error = fault.json_body or _openai_error(fault.status)
            await websocket.send_denial_response(JSONResponse(error, fault.status, fault.headers))
            return
        await websocket.accept()
        completed = False
        try:
            body = json.loads(await websocket.receive_text())
            plan.record({"body": body, "headers": headers})
            if fault.raw_body is not None:
                await websocket.send_text(fault.raw_body)
            elif fault.json_body is not None or fault.status >= 400:
                error = fault.json_body or _openai_error(fault.status)
                if fault.json_body is None:
                    error["error"]["code"] = fault.status
                    if (retry_after := _retry_after(fault.headers)) is not None:
                        error["error"]["retry_after"] = retry_after
                await websocket.send_text(json.dumps(error))
            else:
                model, content, prompt_text = _openai_answer(body, fault)
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                frames = openai_stream_frames(
                    fault,
                    model,
                    content,
                    prompt_text,
                    include_usage,
                    lambda seconds: _pause_unless_gone(websocket, seconds),
                )
                async for frame in frames:
                    await websocket.send_text(frame)
                if fault.cut_after is not None:
                    await websocket.close(1011)  # gone mid-answer, without [DONE]
                    return
            completed = True
            await websocket.close(1000)
        except WebSocketDisconnect:
            if not completed:
                plan.note("ws-disconnect")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
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
        elif "JSON" in system:
            content = json.dumps(routing_decision(_customer_text(turns)))
        else:
            content = f"(simulated) You said: {_customer_text(turns)[:200]}"
        model = str(body.get("model", "model")) + SIMULATED_MODEL_SUFFIX
        prompt_text = " ".join([system, *(str(t["content"]) for t in turns)])
        if body.get("stream"):
            events = anthropic_stream_events(fault, model, content, prompt_text)
            return StreamingResponse(events, headers=fault.headers, media_type="text/event-stream")
        whole = message_body(model, content, prompt_text)
        if fault.omit_usage:
            del whole["usage"]
        return JSONResponse(whole, headers=fault.headers)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if _key_revoked(request):
            if "x-api-key" in request.headers:
                return JSONResponse(anthropic_error_body(401, "invalid x-api-key"), 401)
            error = {"message": "Incorrect API key provided", "type": "invalid_request_error"}
            return JSONResponse({"error": {**error, "code": "invalid_api_key"}}, 401)
        return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    return app
