"""The surfaces' pipelines and what they share (PipelineParts: metering, the renderer, the safety
and injection rules, the intent cache, the CXone client), built from Settings; each template is
rendered once here with sample values, so a broken one stops start-up instead of a turn."""

from __future__ import annotations

from dataclasses import dataclass

from app.bootstrap.credentials import state_secret
from app.cache.intent_cache import IntentCache
from app.cache.turn_cache import TurnCache
from app.core.settings import Settings
from app.metering.meter import Metering
from app.pipelines.chat import ChatPipeline
from app.pipelines.chat_call import ChatOptions
from app.prompts.renderer import PromptRenderer
from app.safety.injection import InjectionRules
from app.safety.rules import RULES_DIR, SafetyRules
from app.surfaces.cognigy.pipeline import CognigyOptions, CognigyPipeline
from app.surfaces.cxone.bot_state import StateCodec
from app.surfaces.cxone.pipeline import CXoneBotPipeline
from app.surfaces.cxone.reply import BotOptions
from app.upstream.cxone_context import CXoneContextClient, Turn

# What the Cognigy templates are rendered with once at start-up, to fail early.
SAMPLE_PROMPT_VARIABLES = {
    "history": [Turn("customer", "Hello"), Turn("agent", "Hi, how can I help?")],
    "detected_intent": "billing",
    "confidence": 0.42,
    "last_message": "Why was I charged twice?",
    "metadata": {"channel": "chat"},
}


@dataclass(frozen=True)
class PipelineParts:
    """What the conversation pipelines (Cognigy, chat, CXone) are built from: one of each,
    shared by all three."""

    metering: Metering
    renderer: PromptRenderer
    safety: SafetyRules
    injection: InjectionRules
    cache: TurnCache  # one intent cache for every surface: keyed by tenant, model and input
    cxone: CXoneContextClient | None  # None when CXone is not configured (no history)


def pipeline_parts(
    settings: Settings, metering: Metering, cxone: CXoneContextClient | None
) -> PipelineParts:
    rules_dir = settings.safety_rules_dir or RULES_DIR
    safety = SafetyRules.load(rules_dir)
    safety.check_categories(settings.unsafe_output_categories)
    intents = IntentCache(
        max_entries=settings.intent_cache_max_entries,
        ttl_seconds=settings.intent_cache_ttl_seconds,
    )
    return PipelineParts(
        metering=metering,
        renderer=PromptRenderer(),
        safety=safety,
        injection=InjectionRules.load(rules_dir),
        cache=TurnCache(intents, settings.intent_cache_enabled),
        cxone=cxone,
    )


def build_cognigy(settings: Settings, parts: PipelineParts) -> CognigyPipeline:
    for template in (settings.cognigy_system_template, settings.cognigy_user_template):
        parts.renderer.check(template, SAMPLE_PROMPT_VARIABLES)
    return CognigyPipeline(
        metering=parts.metering,
        renderer=parts.renderer,
        cxone=parts.cxone,
        injection=parts.injection,
        cache=parts.cache,
        options=CognigyOptions(
            model=settings.llm_model,
            temperature=settings.routing_temperature,
            max_tokens=min(settings.routing_max_tokens, settings.llm_max_tokens),
            history_turns=settings.cxone_history_turns,
            repair_min_seconds=settings.cognigy_repair_min_seconds,
            fallback_response=settings.cognigy_fallback_response,
            system_template=settings.cognigy_system_template,
            user_template=settings.cognigy_user_template,
            injection_mode=settings.prompt_injection_mode,
        ),
    )


def build_chat(settings: Settings, parts: PipelineParts) -> ChatPipeline:
    for template in (settings.chat_system_template, settings.chat_lightweight_template):
        parts.renderer.check(template, {})
    return ChatPipeline(
        metering=parts.metering,
        renderer=parts.renderer,
        safety=parts.safety,
        injection=parts.injection,
        cache=parts.cache,
        options=ChatOptions(
            default_model=settings.llm_model,
            max_tokens=settings.llm_max_tokens,
            temperature=settings.llm_temperature,
            system_template=settings.chat_system_template,
            lightweight_template=settings.chat_lightweight_template,
            deadline_seconds=settings.chat_deadline_seconds,
            first_token_timeout=settings.chat_first_token_timeout_seconds,
            injection_mode=settings.prompt_injection_mode,
            unsafe_categories=tuple(settings.unsafe_output_categories),
            fallback_text=settings.chat_fallback_response,
        ),
    )


def build_cxone_bot(settings: Settings, parts: PipelineParts) -> CXoneBotPipeline:
    parts.renderer.check(
        settings.cxone_system_template,
        {"channel": "chat", "handoff_marker": "[[HANDOFF]]", "greeting": True},
    )
    return CXoneBotPipeline(
        metering=parts.metering,
        renderer=parts.renderer,
        safety=parts.safety,
        injection=parts.injection,
        cache=parts.cache,
        codec=StateCodec(state_secret(settings), settings.cxone_state_max_bytes),
        cxone=parts.cxone,
        options=BotOptions(
            model=settings.llm_model,
            temperature=settings.llm_temperature,
            max_tokens=settings.llm_max_tokens,
            first_token_timeout=settings.cxone_first_token_timeout_seconds,
            system_template=settings.cxone_system_template,
            greeting=settings.cxone_greeting,
            reprompt=settings.cxone_reprompt,
            fallback_text=settings.fallback_bot_response,
            comfort_prompt=settings.cxone_comfort_prompt,
            response_delay_tolerance_ms=settings.cxone_response_delay_tolerance_ms,
            wait_for_user_ms=settings.cxone_wait_for_user_ms,
            max_no_input=settings.cxone_max_no_input,
            max_failures=settings.cxone_max_failures,
            state_max_messages=settings.cxone_state_max_messages,
            state_max_chars=settings.cxone_state_max_chars,
            history_turns=settings.cxone_history_turns,
            metrics_in_payload=settings.cxone_metrics_in_payload,
            redact_input=settings.redact_pii_input,
            unsafe_categories=tuple(settings.unsafe_output_categories),
            injection_mode=settings.prompt_injection_mode,
        ),
    )
