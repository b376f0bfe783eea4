"""A simulated OpenAI-compatible provider: the embedded default, the test fake, the bench upstream.

It speaks the real `/v1/chat/completions` wire format. With `response_format: json_object` it
answers a routing decision from keyword rules over the customer's message; otherwise a short
conversational reply. Everything it answers is marked as simulated in the model name.
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

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}

    return app
