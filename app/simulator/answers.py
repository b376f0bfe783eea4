"""What the simulated LLM answers, whichever wire format it speaks.

The OpenAI route (`llm.py`) and the Anthropic route (`anthropic_sim.py`) give the same answers
to the same conversation and stream them the same way under a FaultPlan, so the routing-decision
rules, the token estimate and the chunking and pacing of a streamed answer live here, once.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from app.simulator.faults import Fault

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


def content_text(content: Any) -> str:
    """A content's words: the string, or its text parts (OpenAI's and Anthropic's blocks)."""
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return "" if content is None else str(content)


def media_count(content: Any) -> int:
    """Image and audio parts (OpenAI's image_url / input_audio, Anthropic's image blocks)."""
    kinds = ("image_url", "input_audio", "image")
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") in kinds)


def _last_user_content(messages: list[dict[str, Any]]) -> Any:
    user_turns = [m for m in messages if m.get("role") == "user"]
    return user_turns[-1].get("content") if user_turns else None


def customer_text(messages: list[dict[str, Any]]) -> str:
    """The last user turn, or the last triple-quoted part of it (how prompts quote customers)."""
    text = content_text(_last_user_content(messages))
    quoted = _QUOTED.findall(text)
    return quoted[-1] if quoted else text


def conversational_reply(messages: list[dict[str, Any]]) -> str:
    """The plain answer: what the customer said, and how many images or recordings came."""
    media = media_count(_last_user_content(messages))
    seen = f" (and {media} attachment{'s' if media != 1 else ''})" if media else ""
    return f"(simulated) You said: {customer_text(messages)[:200]}{seen}"


def routing_decision(text: str) -> dict[str, Any]:
    """The JSON answer to a routing prompt, from the first keyword rule the customer matches."""
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


def token_count(text: str) -> int:
    """A rough token count (four characters a token), for the usage the simulator reports."""
    return max(1, len(text) // 4)


def _words(text: str) -> list[str]:
    """The content as streamed deltas: words with their trailing whitespace."""
    return re.findall(r"\S+\s*|\s+", text)


def stream_deltas(fault: Fault, content: str) -> list[str]:
    """The deltas a streamed answer sends: the fault's own chunks or the words, maybe cut."""
    deltas = list(fault.chunks) if fault.chunks is not None else _words(content)
    return deltas if fault.cut_after is None else deltas[: fault.cut_after]


async def paced(
    fault: Fault, deltas: list[str], pause: Callable[[float], Awaitable[None]]
) -> AsyncIterator[str]:
    """The deltas, after the fault's first-token delay and then its delay between chunks."""
    for index, delta in enumerate(deltas):
        seconds = fault.first_token_delay if index == 0 else fault.chunk_delay
        if seconds > 0:
            await pause(seconds)
        yield delta
