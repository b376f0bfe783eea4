"""One CXone bot turn: decide by `userInputType`, ask the LLM when the turn needs it, make the
reply safe, and answer in the branch CXone Studio acts on.

Failures never become an HTTP error for CXone: the configured fallback is prompted, and after
`CXONE_MAX_FAILURES` in a row control returns to the script with the reason in `errorDetails`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from app.deadline import Deadline
from app.errors import UpstreamError
from app.schemas.cxone import (
    BotErrorDetails,
    BotExchangeBranch,
    BotExchangeResponse,
    BotLoopErrorBehavior,
    ExternalIntegrationBotExchangeRequest,
    IntentInfo,
    PromptBehaviors,
    PromptSequence,
    SilenceRules,
    UserInputType,
)
from app.services.bot_state import BotSession, StateCodec
from app.services.cxone import CXoneContextClient
from app.services.llm.router import RouterSlot
from app.services.llm.types import ChatRequest, ChatResult, Usage
from app.services.metrics import SAFETY_EVENTS
from app.services.prompts import PromptRenderer
from app.services.safety import SafetyRules
from app.services.tokens import estimate_tokens, text_tokens

log = logging.getLogger("cxrelay.cxone")

HANDOFF_MARKER = "[[HANDOFF]]"
_HANDOFF = re.compile(r"\[\[HANDOFF\]\]\s*:?\s*(.*)", re.DOTALL)
_VOICE = re.compile(r"voice|phone|audio|call", re.IGNORECASE)


@dataclass(frozen=True)
class BotOptions:
    model: str
    temperature: float
    max_tokens: int
    first_token_timeout: float
    system_template: str
    greeting: str
    reprompt: str
    fallback_text: str
    comfort_prompt: str
    response_delay_tolerance_ms: int
    wait_for_user_ms: int
    max_no_input: int
    max_failures: int
    state_max_messages: int
    state_max_chars: int
    history_turns: int
    metrics_in_payload: bool
    redact_input: bool
    unsafe_categories: tuple[str, ...]


@dataclass
class BotTurn:
    """What one turn did, for the response's customPayload, the log line and the metrics."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    outcome: str = "answered"
    result: ChatResult | None = None
    usage: Usage = field(default_factory=Usage)
    usage_estimated: bool = False
    cost: float = 0.0
    redactions: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)


@dataclass
class CXoneBotPipeline:
    llm: RouterSlot
    renderer: PromptRenderer
    safety: SafetyRules
    codec: StateCodec
    cxone: CXoneContextClient | None
    options: BotOptions

    async def exchange(
        self,
        request: ExternalIntegrationBotExchangeRequest,
        session: BotSession,
        deadline: Deadline,
        turn: BotTurn,
    ) -> BotExchangeResponse:
        kind = request.input_type
        text = (request.userInput or "").strip()
        if kind is UserInputType.USER_ENDED_SESSION:
            turn.outcome = "ended"
            log.info(
                "cxone session closed",
                extra={
                    "session_id": session.session_id,
                    "turns": session.turns,
                    "session_prompt_tokens": session.prompt_tokens,
                    "session_completion_tokens": session.completion_tokens,
                    "duration_s": round(time.time() - session.started_at, 1),
                },
            )
            return self._respond(session, turn, BotExchangeBranch.EndContact)
        if kind is UserInputType.NO_INPUT:
            return self._no_input(session, turn)
        if kind is UserInputType.BASE64_ENCODED_G711_ULAW_WAV_FILE and not text:
            turn.outcome = "untranscribeable"
            return self._respond(
                session,
                turn,
                BotExchangeBranch.AudioInputUntranscribeable,
                say=self.options.reprompt,
            )
        if kind is UserInputType.AUTOMATED_TEXT and self.options.greeting:
            session.turns += 1
            turn.outcome = "greeted"
            session.add_exchange("", self.options.greeting, **self._bounds())
            return self._respond(
                session,
                turn,
                BotExchangeBranch.PromptAndCollectNextResponse,
                say=self.options.greeting,
            )
        if not text and kind is not UserInputType.AUTOMATED_TEXT:
            return self._no_input(session, turn)
        return await self._answer(request, session, deadline, turn)

    async def _answer(
        self,
        request: ExternalIntegrationBotExchangeRequest,
        session: BotSession,
        deadline: Deadline,
        turn: BotTurn,
    ) -> BotExchangeResponse:
        greeting = request.input_type is UserInputType.AUTOMATED_TEXT
        user_text = "" if greeting else (request.userInput or "").strip()
        # What is kept in botSessionState and echoed in intentInfo is always redacted: CXone
        # stores both in script variables and logs. The provider sees the raw text unless
        # REDACT_PII_INPUT is on.
        stored = self.safety.redact(user_text)
        if stored.changed and self.options.redact_input:
            user_text = stored.text
            _count(turn.redactions, stored.counts, "input")
        if session.is_new and not session.history:
            await self._seed_history(request, session, deadline)
        messages = self._messages(request, session, user_text, greeting)
        try:
            result = await self.llm.current.complete_streamed(
                ChatRequest(
                    messages=messages,
                    model=self.options.model,
                    temperature=self.options.temperature,
                    max_tokens=self.options.max_tokens,
                ),
                deadline,
                self.options.first_token_timeout,
            )
        except UpstreamError as error:
            return self.failure(session, turn, f"LLM unavailable: {error}")
        self._account(turn, messages, result)
        reply = result.content.strip()
        handoff = _HANDOFF.search(reply)
        if handoff:
            session.failure_streak = 0
            turn.outcome = "handoff"
            turn.reason = handoff.group(1).strip()[:200] or "the assistant asked for an agent"
            session.add_exchange(stored.text, "", **self._bounds())
            return self._respond(
                session,
                turn,
                BotExchangeBranch.ReturnControlToScript,
                payload={"handoffReason": turn.reason},
            )
        redaction = self.safety.redact(reply)
        _count(turn.redactions, redaction.counts, "output")
        category = self.safety.unsafe_category(redaction.text, self.options.unsafe_categories)
        if category is not None:
            SAFETY_EVENTS.labels("cxone", f"unsafe_{category}").inc()
            return self.failure(session, turn, f"reply blocked by the {category} filter")
        if not redaction.text:
            return self.failure(session, turn, "the model answered with nothing")
        session.turns += 1
        session.no_input_streak = session.failure_streak = 0
        session.add_exchange(stored.text, redaction.text, **self._bounds())
        return self._respond(
            session,
            turn,
            BotExchangeBranch.PromptAndCollectNextResponse,
            say=redaction.text,
            utterance=stored.text,
        )

    def failure(self, session: BotSession, turn: BotTurn, reason: str) -> BotExchangeResponse:
        """The fallback prompt, or back to the script once failures repeat."""
        session.failure_streak += 1
        turn.reason = reason[:300]
        error = BotErrorDetails(
            errorBehavior=BotLoopErrorBehavior.ReturnControlToScriptThroughErrorBranch,
            systemErrorMessage=turn.reason,
        )
        if session.failure_streak >= self.options.max_failures:
            turn.outcome = "fallback_escalated"
            return self._respond(
                session,
                turn,
                BotExchangeBranch.ReturnControlToScript,
                error=error,
                payload={"handoffReason": "repeated_failures"},
            )
        turn.outcome = "fallback"
        return self._respond(
            session,
            turn,
            BotExchangeBranch.PromptAndCollectNextResponse,
            say=self.options.fallback_text,
            error=error,
        )

    def _no_input(self, session: BotSession, turn: BotTurn) -> BotExchangeResponse:
        session.no_input_streak += 1
        if session.no_input_streak >= self.options.max_no_input:
            turn.outcome = "no_input_escalated"
            return self._respond(
                session,
                turn,
                BotExchangeBranch.ReturnControlToScript,
                payload={"handoffReason": "no_input"},
            )
        turn.outcome = "reprompted"
        return self._respond(
            session, turn, BotExchangeBranch.PromptAndCollectNextResponse, say=self.options.reprompt
        )

    async def _seed_history(
        self,
        request: ExternalIntegrationBotExchangeRequest,
        session: BotSession,
        deadline: Deadline,
    ) -> None:
        """A digital contact without state (a new replica, a lost state) reads its history."""
        contact = request.contact_id
        if self.cxone is None or contact is None or _VOICE.search(request.mediaType or ""):
            return
        try:
            turns = await self.cxone.fetch_history(contact, self.options.history_turns, deadline)
        except UpstreamError as error:
            log.info("no CXone history for a new bot session", extra={"error": str(error)})
            return
        for t in turns[:-1] if turns else []:  # the last inbound turn is this one's userInput
            role = "user" if t.role == "customer" else "assistant"
            session.history.append({"role": role, "content": t.text})

    def _messages(
        self,
        request: ExternalIntegrationBotExchangeRequest,
        session: BotSession,
        user_text: str,
        greeting: bool,
    ) -> list[dict[str, str]]:
        channel = "a voice call" if _VOICE.search(request.mediaType or "") else "chat"
        system = self.renderer.render(
            self.options.system_template,
            {"channel": channel, "handoff_marker": HANDOFF_MARKER, "greeting": greeting},
        )
        messages = [{"role": "system", "content": system}, *session.history]
        if user_text:
            messages.append({"role": "user", "content": user_text})
        elif greeting:
            messages.append({"role": "user", "content": "(the customer has just connected)"})
        return messages

    def _account(self, turn: BotTurn, messages: list[dict[str, str]], result: ChatResult) -> None:
        turn.result = result
        usage = result.usage
        if not result.usage_reported:
            model = result.trail[-1].model if result.trail else self.options.model
            usage = Usage(
                estimate_tokens(messages, model=model), text_tokens(result.content, model=model)
            )
            turn.usage_estimated = True
        turn.usage = usage
        turn.cost = self.llm.current.cost(result.trail, usage)

    def _bounds(self) -> dict[str, int]:
        return {
            "max_messages": self.options.state_max_messages,
            "max_chars": self.options.state_max_chars,
        }

    def _respond(
        self,
        session: BotSession,
        turn: BotTurn,
        branch: BotExchangeBranch,
        *,
        say: str | None = None,
        utterance: str | None = None,
        error: BotErrorDetails | None = None,
        payload: dict[str, Any] | None = None,
    ) -> BotExchangeResponse:
        session.prompt_tokens += turn.usage.prompt_tokens
        session.completion_tokens += turn.usage.completion_tokens
        custom = dict(payload or {})
        if self.options.metrics_in_payload:
            custom.update(self._metrics(session, turn))
        return BotExchangeResponse(
            branchName=branch,
            nextPromptSequence=PromptSequence.say(say) if say else None,
            intentInfo=IntentInfo(
                intent=turn.outcome,
                context=session.session_id,
                intentConfidence=1.0,
                lastUserUtterance=utterance,
            ),
            nextPromptBehaviors=self._behaviors() if say else None,
            customPayload=custom or None,
            errorDetails=error,
            botSessionState=self.codec.encode(session),
        )

    def _behaviors(self) -> PromptBehaviors:
        """Comfort prompt after the delay tolerance, so a voice caller is not left in silence."""
        return PromptBehaviors(
            silenceRules=SilenceRules(
                engageComfortSequence=bool(self.options.comfort_prompt),
                botResponseDelayTolerance=self.options.response_delay_tolerance_ms,
                comfortPromptSequence=PromptSequence.say(self.options.comfort_prompt)
                if self.options.comfort_prompt
                else None,
                millisecondsToWaitForUserResponse=self.options.wait_for_user_ms,
            )
        )

    @staticmethod
    def _metrics(session: BotSession, turn: BotTurn) -> dict[str, Any]:
        """Flat script variables (NICE recommends against nesting in customPayload)."""
        result = turn.result
        return {
            "sessionId": session.session_id,
            "outcome": turn.outcome,
            "promptTokens": turn.usage.prompt_tokens,
            "completionTokens": turn.usage.completion_tokens,
            "usageEstimated": turn.usage_estimated,
            "costUsd": turn.cost,
            "latencyMs": turn.elapsed_ms(),
            "ttftMs": round(result.ttft_ms, 1) if result and result.ttft_ms is not None else None,
            "provider": result.provider if result else None,
            "model": result.model if result else None,
        }


def _count(into: dict[str, int], counts: dict[str, int], direction: str) -> None:
    for name, n in counts.items():
        if n:
            into[f"{direction}_{name}"] = into.get(f"{direction}_{name}", 0) + n
            SAFETY_EVENTS.labels("cxone", f"redacted_{name}").inc(n)
