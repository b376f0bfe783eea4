"""One Cognigy fallback turn, as one straight line of service calls.

sanitise → context → prompt → intent cache → plan (reserve) → LLM (retries inside the deadline)
→ settle → validate (repair once, metered the same way) → response. Any step that fails degrades
the answer instead of failing the webhook: no history means `context: "unavailable"`; no valid
decision, an exhausted budget, an inbound limit (`rate_limited`) or a budget store that cannot
be asked (nothing is spent unmetered) means the deterministic route-to-human fallback. The
router bounds the whole of `decide` by the deadline, so even a step that hangs cannot keep
Cognigy waiting.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Literal

from app.accounting.budget import BudgetExhausted, BudgetUnavailable, HistoryTooLong
from app.cache.intent_cache import CachedAnswer
from app.cache.turn_cache import TurnCache
from app.core.deadline import Deadline
from app.core.errors import OutputInvalid, RateLimited, UnknownModel, UpstreamError, UpstreamTimeout
from app.core.principal import Principal
from app.llm.attempts import Attempt
from app.llm.retry import DEADLINE_MARGIN_SECONDS
from app.llm.types import ChatRequest, ChatResult, Usage
from app.metering.context import CallContext
from app.metering.meter import Metering, Spend
from app.observability.metrics import BUDGET_EXHAUSTED
from app.prompts.renderer import PromptRenderer
from app.safety.injection import InjectionMode, InjectionRules, redacts
from app.safety.validation import parse_output, repair_messages
from app.surfaces.cognigy.decision import RoutingDecision
from app.surfaces.cognigy.schemas import (
    CognigyResponse,
    CognigyTrigger,
    ContextState,
    FallbackStatus,
    UsageOut,
)
from app.upstream.cxone_context import CXoneContextClient, Turn

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
    injection_mode: InjectionMode = "flag"


SURFACE = "cognigy"
# The shortest answer that can hold a routing decision: a budget running low squeezes the call
# down to this, never below (a cut decision would only fail validation).
DECISION_MIN_TOKENS = 64


@dataclass
class CognigyPipeline:
    metering: Metering
    renderer: PromptRenderer
    cxone: CXoneContextClient | None
    injection: InjectionRules
    cache: TurnCache
    options: CognigyOptions

    async def decide(
        self, trigger: CognigyTrigger, principal: Principal, deadline: Deadline, turn: TurnRecord
    ) -> CognigyResponse:
        # the router in service now answers the whole turn, whatever is applied meanwhile
        context = self.metering.context(
            principal, turn.session_id, surface=SURFACE, deadline=deadline
        )
        try:
            await self.metering.admit(context)  # before anything reaches an upstream
        except RateLimited as limited:
            return self.fallback(trigger, turn, "rate_limited", str(limited))
        last_message = self._sanitise(trigger.last_message, turn)
        history, turn.context = await self._history(trigger, deadline, turn)
        history = self._clean_history(history, trigger.last_message, last_message, turn)
        messages = self._messages(trigger, last_message, history)
        cached = self.cache.get(context, self.options.model, messages)
        if cached is not None:
            return await self._from_cache(trigger, context, turn, cached)
        try:
            return await self._decide(trigger, context, messages, turn)
        except BudgetExhausted as exhausted:
            BUDGET_EXHAUSTED.labels(SURFACE, exhausted.refusal.scope.kind).inc()
            return self.fallback(trigger, turn, "budget_exhausted", str(exhausted))
        except RateLimited as limited:  # the key's or tenant's tokens per minute
            return self.fallback(trigger, turn, "rate_limited", str(limited))
        except BudgetUnavailable as down:
            return self.fallback(
                trigger, turn, "budget_unavailable", f"the budget store cannot be asked: {down}"
            )
        except (HistoryTooLong, UnknownModel) as error:
            return self.fallback(trigger, turn, "llm_unavailable", str(error))

    async def _decide(
        self,
        trigger: CognigyTrigger,
        context: CallContext,
        messages: list[dict[str, str]],
        turn: TurnRecord,
    ) -> CognigyResponse:
        deadline = context.deadline
        try:
            result = await self._complete(context, messages, turn)
        except UpstreamError as error:
            return self.fallback(trigger, turn, _unavailable(error, deadline), str(error))
        try:
            decision = parse_output(result.content, RoutingDecision)
        except OutputInvalid as invalid:
            if deadline.remaining() < self.options.repair_min_seconds:
                return self.fallback(trigger, turn, "schema_validation_failed", _why(invalid))
            turn.repaired = True
            repair = repair_messages(messages, invalid, RoutingDecision)
            try:
                result = await self._complete(context, repair, turn)
                decision = parse_output(result.content, RoutingDecision)
            except OutputInvalid as still_invalid:
                return self.fallback(trigger, turn, "schema_validation_failed", _why(still_invalid))
            except UpstreamError as error:
                return self.fallback(trigger, turn, "schema_validation_failed", str(error))
        answer = CachedAnswer(
            decision.model_dump_json(),
            result.provider,
            result.model,
            turn.usage.prompt_tokens,
            turn.usage.completion_tokens,
        )
        self.cache.put(context, self.options.model, messages, answer)  # validated only
        return _response(trigger, turn, "success", decision)

    async def _from_cache(
        self, trigger: CognigyTrigger, context: CallContext, turn: TurnRecord, cached: CachedAnswer
    ) -> CognigyResponse:
        """A decision validated for exactly this input before: no call, no tokens, no cost."""
        turn.cached = True
        turn.provider, turn.model = cached.provider, cached.model
        decision = parse_output(cached.content, RoutingDecision)
        await self.metering.record_cached(
            context,
            provider=cached.provider,
            model=cached.model,
            latency_ms=turn.elapsed_ms(),
        )
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
            error=reason[:500],
        )

    async def _history(
        self, trigger: CognigyTrigger, deadline: Deadline, turn: TurnRecord
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
                extra={"session_id": turn.session_id, "error": str(error)},
            )
            return [], "unavailable"
        return history, "available"

    def _sanitise(self, text: str, turn: TurnRecord) -> str:
        """Prompt-injection check (flag: reported only; redact: the phrase is cut out)."""
        checked = self.injection.sanitise(text, self.options.injection_mode)
        turn.injection += tuple(n for n in checked.matches if n not in turn.injection)
        return checked.text

    def _clean_history(
        self, history: list[Turn], original: str, cleaned: str, turn: TurnRecord
    ) -> list[Turn]:
        """In redact mode the customer's history lines are cleaned too (the newest is usually
        this very message, so the phrase must not slip in through it). In flag mode they pass
        as they are and are not checked: an old line would be reported again on every turn."""
        if not redacts(self.options.injection_mode):
            return history
        seen = {original: cleaned}
        kept: list[Turn] = []
        for line in history:
            if line.role == "customer":
                if line.text not in seen:
                    seen[line.text] = self._sanitise(line.text, turn)
                line = replace(line, text=seen[line.text])
            kept.append(line)
        return kept

    def _messages(
        self, trigger: CognigyTrigger, last_message: str, history: list[Turn]
    ) -> list[dict[str, str]]:
        variables = {
            "history": history,
            "detected_intent": trigger.detected_intent,
            "confidence": trigger.confidence_score,
            "last_message": last_message,
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

    async def _complete(
        self, context: CallContext, messages: list[dict[str, str]], turn: TurnRecord
    ) -> ChatResult:
        """One metered call: reserved before it goes out, settled (and recorded in the ledger)
        after, released when it fails. A budget running low shortens the decision's max_tokens
        (down to what a decision needs at least) before it refuses the call."""
        plan = await self.metering.plan(
            context,
            messages,
            route_name=self.options.model,
            max_tokens=self.options.max_tokens,
            remaining_tokens=None,
            min_tokens=DECISION_MIN_TOKENS,
        )
        request = ChatRequest(
            messages=plan.messages,
            model=plan.route,
            temperature=self.options.temperature,
            max_tokens=plan.max_tokens,
            json_output=True,
        )
        # the trail is the turn's, so the attempts are reported even when the deadline cuts in
        result, spent = await self.metering.run(plan, lambda: context.complete(request, turn.trail))
        turn.record(result, spent)
        return result


@dataclass
class TurnRecord:
    """What one turn did so far; read by the fallback and the log line even after a timeout.

    `session_id` is the conversation id as stored (app.safety.session_ids: a digest when it
    holds personal data): the budget, the ledger and the logs use it, never the raw id."""

    request_id: str
    session_id: str
    started: float
    context: ContextState = "not_configured"
    provider: str | None = None
    model: str | None = None
    usage: Usage = field(default_factory=Usage)
    trail: list[Attempt] = field(default_factory=list)  # the router appends as it goes
    repaired: bool = False
    cached: bool = False
    cost: float = 0.0
    injection: tuple[str, ...] = ()  # prompt-injection pattern names found in the input

    @classmethod
    def start(cls, request_id: str, session_id: str) -> TurnRecord:
        return cls(request_id=request_id, session_id=session_id, started=time.perf_counter())

    def record(self, result: ChatResult, spent: Spend) -> None:
        self.provider, self.model = result.provider, result.model
        self.usage = self.usage + spent.usage
        self.cost = round(self.cost + spent.cost, 8)

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
        cached=turn.cached,
        **fallback_fields,
    )


def _unavailable(error: UpstreamError, deadline: Deadline) -> FallbackStatus:
    """A provider that timed out as the deadline ran out (the router ends its attempts just
    before it, so a hang is recorded) is the deadline's fallback; anything else the provider's."""
    if isinstance(error, UpstreamTimeout) and deadline.remaining() < 2 * DEADLINE_MARGIN_SECONDS:
        return "deadline_exceeded"
    return "llm_unavailable"


def _why(invalid: OutputInvalid) -> str:
    return "model output invalid: " + "; ".join(invalid.errors[:5])
