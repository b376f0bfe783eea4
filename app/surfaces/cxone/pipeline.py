"""One CXone bot turn: decide by `userInputType`, ask the LLM when the turn needs it, make the
reply safe, and answer in the branch CXone Studio acts on.

The customer's words pass the prompt-injection sanitiser first; a turn whose whole conversation
was answered before is served from the intent cache at no cost; otherwise the call is metered
like every other surface: the oldest history is dropped until it fits what the session may still
spend (and the context window), reserved, then settled into the budget and the ledger.

Failures never become an HTTP error for CXone: the configured fallback is prompted, and after
`CXONE_MAX_FAILURES` in a row control returns to the script with the reason in `errorDetails`.
An exhausted budget or an inbound limit returns control at once (`handoffReason:
"budget_exhausted"` or `"rate_limited"`, before any upstream is asked): asking again cannot help.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from app.accounting.budget import BudgetExhausted, BudgetUnavailable, HistoryTooLong
from app.cache.intent_cache import CachedAnswer
from app.cache.turn_cache import TurnCache
from app.core.deadline import Deadline
from app.core.errors import RateLimited, UnknownModel, UpstreamError
from app.core.principal import Principal
from app.llm.types import ChatRequest, ChatResult
from app.metering.context import CallContext
from app.metering.meter import Metering
from app.observability import tracing
from app.observability.metrics import BUDGET_EXHAUSTED, SAFETY_EVENTS
from app.prompts.renderer import PromptRenderer
from app.safety.injection import InjectionRules
from app.safety.rules import SafetyRules
from app.surfaces.cxone.bot_state import BotSession, StateCodec
from app.surfaces.cxone.reply import BotOptions, BotTurn, Replier
from app.surfaces.cxone.schemas import (
    BotErrorDetails,
    BotExchangeBranch,
    BotExchangeResponse,
    BotLoopErrorBehavior,
    ExternalIntegrationBotExchangeRequest,
    UserInputType,
)
from app.upstream.cxone_context import CXoneContextClient, Turn

log = logging.getLogger("cxrelay.cxone")

HANDOFF_MARKER = "[[HANDOFF]]"
_HANDOFF = re.compile(r"\[\[HANDOFF\]\]\s*:?\s*(.*)", re.DOTALL)
_VOICE = re.compile(r"voice|phone|audio|call", re.IGNORECASE)
SURFACE = "cxone"


@dataclass
class CXoneBotPipeline:
    metering: Metering
    renderer: PromptRenderer
    safety: SafetyRules
    injection: InjectionRules
    cache: TurnCache
    codec: StateCodec
    cxone: CXoneContextClient | None
    options: BotOptions
    respond: Replier = field(init=False)

    def __post_init__(self) -> None:
        self.respond = Replier(self.options, self.codec)

    async def exchange(
        self,
        request: ExternalIntegrationBotExchangeRequest,
        session: BotSession,
        principal: Principal,
        deadline: Deadline,
        turn: BotTurn,
    ) -> BotExchangeResponse:
        # the router in service now answers the whole turn, whatever is applied meanwhile
        context = self.metering.context(
            principal, session.session_id, surface=SURFACE, deadline=deadline
        )
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
            return self.respond(session, turn, BotExchangeBranch.EndContact)
        if kind is UserInputType.NO_INPUT:
            return self._no_input(session, turn)
        if kind is UserInputType.BASE64_ENCODED_G711_ULAW_WAV_FILE and not text:
            turn.outcome = "untranscribeable"
            return self.respond(
                session,
                turn,
                BotExchangeBranch.AudioInputUntranscribeable,
                say=self.options.reprompt,
            )
        if kind is UserInputType.AUTOMATED_TEXT and self.options.greeting:
            session.turns += 1
            turn.outcome = "greeted"
            session.add_exchange("", self.options.greeting, **self._bounds())
            return self.respond(
                session,
                turn,
                BotExchangeBranch.PromptAndCollectNextResponse,
                say=self.options.greeting,
            )
        if not text and kind is not UserInputType.AUTOMATED_TEXT:
            return self._no_input(session, turn)
        return await self._answer(request, session, context, turn)

    async def _answer(
        self,
        request: ExternalIntegrationBotExchangeRequest,
        session: BotSession,
        context: CallContext,
        turn: BotTurn,
    ) -> BotExchangeResponse:
        greeting = request.input_type is UserInputType.AUTOMATED_TEXT
        user_text = self._sanitise("" if greeting else (request.userInput or "").strip(), turn)
        # What is kept in botSessionState and echoed in intentInfo is always redacted: CXone
        # stores both in script variables and logs. The provider sees the raw text unless
        # REDACT_PII_INPUT is on.
        with tracing.span("safety.pii_redaction", {"cxrelay.safety.direction": "input"}):
            stored = self.safety.redact(user_text)
            tracing.annotate({"cxrelay.safety.redactions": sum(stored.counts.values())})
        if stored.changed and self.options.redact_input:
            user_text = stored.text
            _count(turn.redactions, stored.counts, "input")
        try:
            await self.metering.admit(context)  # before anything reaches an upstream
        except RateLimited as limited:
            return self._handback(session, turn, stored.text, "rate_limited", str(limited))
        if session.is_new and not session.history:
            await self._seed_history(request, session, context.deadline, turn)
        messages = self._messages(request, session, user_text, greeting)
        cached = self.cache.get(context, self.options.model, messages)
        if cached is not None:
            return await self._from_cache(session, context, turn, stored.text, cached)
        try:
            result = await self._complete(context, messages, turn)
        except BudgetExhausted as exhausted:
            BUDGET_EXHAUSTED.labels(SURFACE, exhausted.refusal.scope.kind).inc()
            return self._handback(session, turn, stored.text, "budget_exhausted", str(exhausted))
        except RateLimited as limited:  # the key's or tenant's tokens per minute
            return self._handback(session, turn, stored.text, "rate_limited", str(limited))
        except BudgetUnavailable as down:
            return self.failure(session, turn, f"the budget store cannot be asked: {down}")
        except (HistoryTooLong, UnknownModel) as error:
            return self.failure(session, turn, str(error))
        except UpstreamError as error:
            return self.failure(session, turn, f"LLM unavailable: {error}")
        text = result.content.strip()
        handoff = _HANDOFF.search(text)
        if handoff:
            session.failure_streak = 0
            turn.outcome = "handoff"
            turn.reason = handoff.group(1).strip()[:200] or "the assistant asked for an agent"
            session.add_exchange(stored.text, "", **self._bounds())
            return self._return_to_script(session, turn, turn.reason)
        with tracing.span("safety.output_guard"):
            redaction = self.safety.redact(text)
            category = self.safety.unsafe_category(redaction.text, self.options.unsafe_categories)
            tracing.annotate({"cxrelay.safety.redactions": sum(redaction.counts.values())})
            if category is not None:
                tracing.annotate({"cxrelay.safety.blocked": category})
        _count(turn.redactions, redaction.counts, "output")
        if category is not None:
            SAFETY_EVENTS.labels("cxone", f"unsafe_{category}").inc()
            return self.failure(session, turn, f"reply blocked by the {category} filter")
        if not redaction.text:
            return self.failure(session, turn, "the model answered with nothing")
        answer = CachedAnswer(
            redaction.text,
            result.provider,
            result.model,
            turn.usage.prompt_tokens,
            turn.usage.completion_tokens,
        )
        self.cache.put(context, self.options.model, messages, answer)  # safe ones only
        return self._answered(session, turn, stored.text, redaction.text)

    def _answered(
        self, session: BotSession, turn: BotTurn, utterance: str, text: str
    ) -> BotExchangeResponse:
        session.turns += 1
        session.no_input_streak = session.failure_streak = 0
        session.add_exchange(utterance, text, **self._bounds())
        return self.respond(
            session,
            turn,
            BotExchangeBranch.PromptAndCollectNextResponse,
            say=text,
            utterance=utterance,
        )

    async def _from_cache(
        self,
        session: BotSession,
        context: CallContext,
        turn: BotTurn,
        utterance: str,
        cached: CachedAnswer,
    ) -> BotExchangeResponse:
        """An answer given to exactly this conversation before: no call, no tokens, no cost."""
        turn.cached = True
        turn.provider, turn.model = cached.provider, cached.model
        await self.metering.record_cached(
            context,
            provider=cached.provider,
            model=cached.model,
            latency_ms=turn.elapsed_ms(),
        )
        return self._answered(session, turn, utterance, cached.content)

    def _handback(
        self, session: BotSession, turn: BotTurn, utterance: str, why: str, reason: str
    ) -> BotExchangeResponse:
        """The budget or an inbound limit refuses the call: the script takes over, told why."""
        turn.outcome = why
        turn.reason = reason[:300]
        session.add_exchange(utterance, "", **self._bounds())
        error = BotErrorDetails(
            errorBehavior=BotLoopErrorBehavior.ReturnControlToScriptThroughErrorBranch,
            systemErrorMessage=f"{why}: {turn.reason}",
        )
        return self._return_to_script(session, turn, why, error)

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
            return self._return_to_script(session, turn, "repeated_failures", error)
        turn.outcome = "fallback"
        return self.respond(
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
            return self._return_to_script(session, turn, "no_input")
        turn.outcome = "reprompted"
        return self.respond(
            session, turn, BotExchangeBranch.PromptAndCollectNextResponse, say=self.options.reprompt
        )

    def _return_to_script(
        self,
        session: BotSession,
        turn: BotTurn,
        handoff_reason: str,
        error: BotErrorDetails | None = None,
    ) -> BotExchangeResponse:
        """Control back to the CXone script, which reads why from customPayload's handoffReason
        (and an error branch's reason from errorDetails)."""
        payload = {"handoffReason": handoff_reason}
        branch = BotExchangeBranch.ReturnControlToScript
        return self.respond(session, turn, branch, error=error, payload=payload)

    async def _seed_history(
        self,
        request: ExternalIntegrationBotExchangeRequest,
        session: BotSession,
        deadline: Deadline,
        turn: BotTurn,
    ) -> None:
        """A digital contact without state (a new replica, a lost state) reads its history; the
        customer's lines pass the injection check once here, as they then live in the state."""
        contact = request.contact_id
        if self.cxone is None or contact is None or _VOICE.search(request.mediaType or ""):
            return
        try:
            turns = await self.cxone.fetch_history(contact, self.options.history_turns, deadline)
        except UpstreamError as error:
            log.info("no CXone history for a new bot session", extra={"error": str(error)})
            return
        greeting = request.input_type is UserInputType.AUTOMATED_TEXT  # no customer words yet
        utterance = "" if greeting else request.userInput or ""
        for t in _without_current_utterance(turns, utterance):
            if t.role == "customer":
                session.history.append({"role": "user", "content": self._sanitise(t.text, turn)})
            else:
                session.history.append({"role": "assistant", "content": t.text})

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

    def _sanitise(self, text: str, turn: BotTurn) -> str:
        """Prompt-injection check (flag: reported only; redact: the phrase is cut out, also from
        what is kept in the state, so it never reaches a later turn's prompt either)."""
        if not text:
            return text
        checked = self.injection.sanitise(text, self.options.injection_mode)
        turn.injection += tuple(n for n in checked.matches if n not in turn.injection)
        return checked.text

    async def _complete(
        self, context: CallContext, messages: list[dict[str, str]], turn: BotTurn
    ) -> ChatResult:
        """Plan (drop the oldest turns to fit, reserve), stream the answer, settle or release."""
        headroom = await self.metering.headroom(context)
        plan = await self.metering.plan(
            context,
            messages,
            route_name=self.options.model,
            max_tokens=self.options.max_tokens,
            remaining_tokens=headroom.remaining_tokens,
        )
        turn.dropped = plan.dropped
        request = ChatRequest(
            messages=plan.messages,
            model=plan.route,
            temperature=self.options.temperature,
            max_tokens=plan.max_tokens,
        )
        first_token_timeout = self.options.first_token_timeout
        result, spent = await self.metering.run(
            plan, lambda: context.complete_streamed(request, first_token_timeout)
        )
        turn.result, turn.provider, turn.model = result, result.provider, result.model
        turn.usage, turn.usage_estimated, turn.cost = spent.usage, spent.estimated, spent.cost
        return result

    def _bounds(self) -> dict[str, int]:
        return {
            "max_messages": self.options.state_max_messages,
            "max_chars": self.options.state_max_chars,
        }


def _without_current_utterance(turns: list[Turn], utterance: str) -> list[Turn]:
    """The history without this turn's own userInput, which is appended after it.

    CXone may or may not have stored the customer's current message by the time the bot is
    asked, so the newest message is dropped only when it is that message (a customer turn with
    the same words); an agent's question the customer is answering right now must stay, or the
    model hears "the March one" without "which invoice?"."""
    if turns and turns[-1].role == "customer" and _same_words(turns[-1].text, utterance):
        return turns[:-1]
    return turns


def _same_words(a: str, b: str) -> bool:
    """Equal but for case and whitespace (CXone's stored copy may be trimmed differently)."""
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def _count(into: dict[str, int], counts: dict[str, int], direction: str) -> None:
    for name, n in counts.items():
        if n:
            into[f"{direction}_{name}"] = into.get(f"{direction}_{name}", 0) + n
            SAFETY_EVENTS.labels("cxone", f"redacted_{name}").inc(n)
