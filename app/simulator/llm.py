"""A simulated LLM provider: the embedded default, the test fake, the bench upstream.

It speaks the real OpenAI `/v1/chat/completions` and Anthropic `/v1/messages` wire formats, both
driven by the same FaultPlan. Asked for JSON (`response_format: json_object`, or a system prompt
mentioning JSON on the Anthropic route) it answers a routing decision from keyword rules over the
customer's message; otherwise a short conversational reply. Everything it answers is marked as
simulated in the model name. `GET /v1/models` refuses keys starting with "revoked" so key probes
can be exercised.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

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


def _key_revoked(request: Request) -> bool:
    """A bearer token or x-api-key starting with "revoked" stands for a key the provider refuses."""
    authorization = request.headers.get("authorization", "")
    bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    presented = (bearer, request.headers.get("x-api-key", ""))
    return any(key.startswith(REVOKED_KEY_PREFIX) for key in presented)


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
        messages = body.get("messages") or []
        if fault.content is not None:
            content = fault.content
        elif (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
            content = json.dumps(routing_decision(_customer_text(messages)))
        else:
            content = f"(simulated) You said: {_customer_text(messages)[:200]}"
        model = str(body.get("model", "model")) + SIMULATED_MODEL_SUFFIX
        prompt_text = " ".join(str(m.get("content", "")) for m in messages)
        return JSONResponse(completion_body(model, content, prompt_text), headers=fault.headers)

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
        elif "JSON" in system:
            content = json.dumps(routing_decision(_customer_text(turns)))
        else:
            content = f"(simulated) You said: {_customer_text(turns)[:200]}"
        model = str(body.get("model", "model")) + SIMULATED_MODEL_SUFFIX
        prompt_text = " ".join([system, *(str(t["content"]) for t in turns)])
        return JSONResponse(message_body(model, content, prompt_text), headers=fault.headers)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if _key_revoked(request):
            if "x-api-key" in request.headers:
                return JSONResponse(anthropic_error_body(401, "invalid x-api-key"), 401)
            error = {"message": "Incorrect API key provided", "type": "invalid_request_error"}
            return JSONResponse({"error": {**error, "code": "invalid_api_key"}}, 401)
        return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    return app
