"""The shape of a CXone bot answer, built in one place so every branch is spec-valid: what to
say, the silence rules, the flat customPayload a script reads, and the signed session state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from app.llm.types import ChatResult, Usage
from app.safety.injection import InjectionMode
from app.surfaces.cxone.bot_state import BotSession, StateCodec
from app.surfaces.cxone.schemas import (
    BotErrorDetails,
    BotExchangeBranch,
    BotExchangeResponse,
    IntentInfo,
    PromptBehaviors,
    PromptSequence,
    SilenceRules,
)


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
    injection_mode: InjectionMode = "flag"


@dataclass
class BotTurn:
    """What one turn did, for the response's customPayload, the log line and the metrics."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    outcome: str = "answered"
    result: ChatResult | None = None
    provider: str | None = None  # who answered (also on a cache hit, which has no result)
    model: str | None = None
    usage: Usage = field(default_factory=Usage)
    usage_estimated: bool = False
    cost: float = 0.0
    cached: bool = False
    dropped: int = 0  # history turns left out so the call fits the budget and the window
    injection: tuple[str, ...] = ()  # prompt-injection pattern names found in the input
    redactions: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)


@dataclass(frozen=True)
class Replier:
    """Every branch's answer, from the options (silence rules, metrics in the payload) and the
    codec that signs the session state."""

    options: BotOptions
    codec: StateCodec

    def __call__(
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
        if turn.cached:
            custom["cached"] = True  # even without the metrics: a script may want to know
        if self.options.metrics_in_payload:
            custom.update(_metrics(session, turn))
        return BotExchangeResponse(
            branchName=branch,
            nextPromptSequence=PromptSequence.say(say) if say else None,
            intentInfo=IntentInfo(
                intent=turn.outcome,
                context=session.session_id,
                intentConfidence=1.0,
                lastUserUtterance=utterance,
            ),
            nextPromptBehaviors=_behaviors(self.options) if say else None,
            customPayload=custom or None,
            errorDetails=error,
            botSessionState=self.codec.encode(session),
        )


def _behaviors(options: BotOptions) -> PromptBehaviors:
    """Comfort prompt after the delay tolerance, so a voice caller is not left in silence."""
    return PromptBehaviors(
        silenceRules=SilenceRules(
            engageComfortSequence=bool(options.comfort_prompt),
            botResponseDelayTolerance=options.response_delay_tolerance_ms,
            comfortPromptSequence=PromptSequence.say(options.comfort_prompt)
            if options.comfort_prompt
            else None,
            millisecondsToWaitForUserResponse=options.wait_for_user_ms,
        )
    )


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
        "provider": turn.provider,
        "model": turn.model,
    }
