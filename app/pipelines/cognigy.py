"""One Cognigy fallback turn, as one straight line of service calls.

context → prompt → LLM (retries inside the deadline) → validate (repair once) → response.
Any step that fails degrades the answer instead of failing the webhook: no history means
`context: "unavailable"`; no valid decision means the deterministic route-to-human fallback.
The router bounds the whole of `decide` by the deadline, so even a step that hangs cannot
keep Cognigy waiting.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from app.deadline import Deadline
from app.errors import OutputInvalid, UpstreamError
from app.schemas.cognigy import (
    CognigyResponse,
    CognigyTrigger,
    ContextState,
    FallbackStatus,
    UsageOut,
)
from app.schemas.routing import RoutingDecision
from app.services.cxone import CXoneContextClient, Turn
from app.services.llm.router import RouterSlot
from app.services.llm.types import ChatRequest, ChatResult, Usage
from app.services.prompts import PromptRenderer
from app.services.validation import parse_output, repair_messages

log = logging.getLogger("cxrelay.cognigy")


@dataclass(frozen=True)
class CognigyOptions:
    model: str
    temperature: float
    max_tokens: int
    history_turns: int
    repair_min_seconds: float
    fallback_response: str
    system_template: str
    user_template: str


@dataclass
class CognigyPipeline:
    llm: RouterSlot
    renderer: PromptRenderer
    cxone: CXoneContextClient | None
    options: CognigyOptions

    async def decide(
        self, trigger: CognigyTrigger, deadline: Deadline, turn: TurnRecord
    ) -> CognigyResponse:
        history, turn.context = await self._history(trigger, deadline)
        messages = self._messages(trigger, history)
        request = self._request(messages)
        try:
            result = await self._complete(request, deadline, turn)
        except UpstreamError as error:
            return self.fallback(trigger, turn, "llm_unavailable", str(error))
        try:
            decision = parse_output(result.content, RoutingDecision)
        except OutputInvalid as invalid:
            if deadline.remaining() < self.options.repair_min_seconds:
                return self.fallback(trigger, turn, "schema_validation_failed", _why(invalid))
            turn.repaired = True
            repair = self._request(repair_messages(messages, invalid, RoutingDecision))
            try:
                result = await self._complete(repair, deadline, turn)
                decision = parse_output(result.content, RoutingDecision)
            except OutputInvalid as still_invalid:
                return self.fallback(trigger, turn, "schema_validation_failed", _why(still_invalid))
            except UpstreamError as error:
                return self.fallback(trigger, turn, "schema_validation_failed", str(error))
        return _response(trigger, turn, "success", decision)

    def fallback(
        self, trigger: CognigyTrigger, turn: TurnRecord, status: FallbackStatus, reason: str
    ) -> CognigyResponse:
        """The deterministic safe answer: hand the customer to a person."""
        text = self.options.fallback_response
        safe_decision = RoutingDecision(
            classified_intent=trigger.detected_intent or "unknown",
            confidence=0.0,
            extracted_parameters={},
            suggested_response=text,
            requires_human_agent=True,
        )
        return _response(
            trigger,
            turn,
            status,
            safe_decision,
            fallback_action="route_to_human",
            suggested_response=text,
            reason=reason[:500],
        )

    async def _history(
        self, trigger: CognigyTrigger, deadline: Deadline
    ) -> tuple[list[Turn], ContextState]:
        if self.cxone is None:
            return [], "not_configured"
        try:
            history = await self.cxone.fetch_history(
                trigger.cxone_contact_id, self.options.history_turns, deadline
            )
        except UpstreamError as error:
            log.warning(
                "cxone context unavailable, continuing without history",
                extra={"session_id": trigger.conversation_id, "error": str(error)},
            )
            return [], "unavailable"
        return history, "available"

    def _messages(self, trigger: CognigyTrigger, history: list[Turn]) -> list[dict[str, str]]:
        variables = {
            "history": history,
            "detected_intent": trigger.detected_intent,
            "confidence": trigger.confidence_score,
            "last_message": trigger.last_message,
            "metadata": trigger.metadata,
        }
        return [
            {
                "role": "system",
                "content": self.renderer.render(self.options.system_template, variables),
            },
            {
                "role": "user",
                "content": self.renderer.render(self.options.user_template, variables),
            },
        ]

    def _request(self, messages: list[dict[str, str]]) -> ChatRequest:
        return ChatRequest(
            messages=messages,
            model=self.options.model,
            temperature=self.options.temperature,
            max_tokens=self.options.max_tokens,
            json_output=True,
        )

    async def _complete(
        self, request: ChatRequest, deadline: Deadline, turn: TurnRecord
    ) -> ChatResult:
        try:
            result = await self.llm.current.complete(request, deadline)
        except UpstreamError as error:
            turn.trail += error.trail
            raise
        turn.record(result)
        return result


@dataclass
class TurnRecord:
    """What one turn did so far; read by the fallback and the log line even after a timeout."""

    request_id: str
    started: float
    context: ContextState = "not_configured"
    provider: str | None = None
    model: str | None = None
    usage: Usage = field(default_factory=Usage)
    trail: tuple[Any, ...] = ()
    repaired: bool = False

    @classmethod
    def start(cls, request_id: str) -> TurnRecord:
        return cls(request_id=request_id, started=time.perf_counter())

    def record(self, result: ChatResult) -> None:
        self.provider, self.model = result.provider, result.model
        self.usage = self.usage + result.usage
        self.trail += result.trail

    @property
    def attempts(self) -> int:
        return len(self.trail)

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)


def _response(
    trigger: CognigyTrigger,
    turn: TurnRecord,
    status: Literal["success"] | FallbackStatus,
    decision: RoutingDecision,
    **fallback_fields: str,
) -> CognigyResponse:
    return CognigyResponse(
        status=status,
        conversationId=trigger.conversation_id,
        routing_decision=decision,
        context=turn.context,
        provider=turn.provider,
        model=turn.model,
        usage=UsageOut(**turn.usage.as_dict()),
        latency_ms=turn.elapsed_ms(),
        request_id=turn.request_id,
        attempts=[a.public() for a in turn.trail],
        **fallback_fields,
    )


def _why(invalid: OutputInvalid) -> str:
    return "model output invalid: " + "; ".join(invalid.errors[:5])
