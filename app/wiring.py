"""Builders that turn Settings into the pipelines' options and parts (called by the lifespan)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from contextlib import AsyncExitStack
from zoneinfo import ZoneInfo

from app.accounting.budget import BudgetPolicy, PeriodLimits
from app.accounting.inbound_limits import InboundLimiter, Limits
from app.accounting.ledger import Ledger
from app.accounting.metering import Metering
from app.auth.signatures import AuthorizationAuthenticator
from app.cache.intent_cache import IntentCache
from app.cache.turn_cache import TurnCache
from app.core.credentials import split_tenant
from app.core.settings import Settings
from app.llm.router import RouterSlot
from app.pipelines.chat import ChatPipeline
from app.pipelines.chat_call import ChatOptions
from app.prompts.renderer import PromptRenderer
from app.safety.injection import InjectionRules
from app.safety.rules import RULES_DIR, SafetyRules
from app.store import RedisStore, Store, open_store
from app.store.counters import LimitCounters, MemoryCounters, RedisCounters
from app.surfaces.cognigy.pipeline import CognigyOptions, CognigyPipeline
from app.surfaces.cxone.bot_state import StateCodec
from app.surfaces.cxone.pipeline import CXoneBotPipeline
from app.surfaces.cxone.reply import BotOptions
from app.upstream.cxone_context import CXoneContextClient, Turn

log = logging.getLogger("cxrelay")

# What the Cognigy templates are rendered with once at start-up, to fail early.
SAMPLE_PROMPT_VARIABLES = {
    "history": [Turn("customer", "Hello"), Turn("agent", "Hi, how can I help?")],
    "detected_intent": "billing",
    "confidence": 0.42,
    "last_message": "Why was I charged twice?",
    "metadata": {"channel": "chat"},
}


async def open_usage_ledger(settings: Settings, stack: AsyncExitStack) -> tuple[Store, Ledger]:
    """The store (SQLite under DATA_DIR, or Redis for several replicas) and the ledger that
    writes each call's record with its budget settlement; on shutdown the ledger finishes its
    writes (and any backlog of a store outage) before the store closes."""
    store = await open_store(
        settings.store_backend,
        data_dir=settings.data_dir,
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_key_prefix,
        reservation_ttl_seconds=settings.budget_reservation_ttl_seconds,
        sqlite_synchronous="FULL" if settings.sqlite_synchronous == "full" else "NORMAL",
        # statements on the event loop only when commits do not fsync and no other worker
        # contends for the write lock (measured faster; see docs/PERFORMANCE.md)
        sqlite_inline=settings.sqlite_synchronous == "normal" and settings.workers == 1,
    )
    stack.push_async_callback(store.close)
    ledger = Ledger(store)
    stack.push_async_callback(ledger.close)
    return store, ledger


def budget_policy(settings: Settings, key_limits: Mapping[str, int | None]) -> BudgetPolicy:
    """Session and tenant limits from BUDGET_*; a client key's own limit (CLIENT_API_KEYS
    `key:tenant:tokens`) beats its tenant's, which beats the default."""
    return BudgetPolicy(
        session_tokens=settings.budget_session_tokens,
        session_tokens_by_tenant=settings.budget_session_tokens_by_tenant,
        session_tokens_by_key=dict(key_limits),
        tenant_limits=PeriodLimits(
            day_tokens=settings.budget_tenant_day_tokens,
            day_cost=settings.budget_tenant_day_cost,
            month_tokens=settings.budget_tenant_month_tokens,
            month_cost=settings.budget_tenant_month_cost,
        ),
        lightweight_threshold=settings.budget_lightweight_threshold,
        period_timezone=ZoneInfo(settings.budget_timezone),
    )


def load_injection_rules(settings: Settings) -> InjectionRules:
    """Loaded once and shared by every surface (chat, Cognigy, CXone)."""
    return InjectionRules.load(settings.safety_rules_dir or RULES_DIR)


def build_intent_cache(settings: Settings) -> IntentCache:
    """One cache for every surface: entries are keyed by tenant, model and the whole input."""
    return IntentCache(
        max_entries=settings.intent_cache_max_entries,
        ttl_seconds=settings.intent_cache_ttl_seconds,
    )


def build_cognigy(
    settings: Settings,
    metering: Metering,
    renderer: PromptRenderer,
    cxone: CXoneContextClient | None,
    injection: InjectionRules,
    cache: TurnCache,
) -> CognigyPipeline:
    for template in (settings.cognigy_system_template, settings.cognigy_user_template):
        renderer.check(template, SAMPLE_PROMPT_VARIABLES)
    return CognigyPipeline(
        metering=metering,
        renderer=renderer,
        cxone=cxone,
        injection=injection,
        cache=cache,
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


def build_chat(
    settings: Settings,
    metering: Metering,
    renderer: PromptRenderer,
    safety: SafetyRules,
    injection: InjectionRules,
    cache: TurnCache,
) -> ChatPipeline:
    for template in (settings.chat_system_template, settings.chat_lightweight_template):
        renderer.check(template, {})
    return ChatPipeline(
        metering=metering,
        renderer=renderer,
        safety=safety,
        injection=injection,
        cache=cache,
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


def state_secret(settings: Settings) -> bytes:
    if settings.bot_state_secret is not None:
        return settings.bot_state_secret.get_secret_value().encode()
    log.warning(
        "BOT_STATE_SECRET is not set: botSessionState is signed with a key of this process "
        "only, so another replica (or a restart) starts CXone conversations afresh"
    )
    return secrets.token_bytes(32)


SESSION_ID_KEY_LABEL = b"cx-relay session id digests"


def session_id_key(settings: Settings) -> bytes:
    """SESSION_ID_SECRET; else a key derived from BOT_STATE_SECRET (a shared secret already, and
    never the same key as the state signature's; simulated mode has a development one); else
    one of this process only (settings refuse that with several workers or replicas)."""
    if settings.session_id_secret is not None:
        return settings.session_id_secret.get_secret_value().encode()
    if settings.bot_state_secret is not None:
        secret = settings.bot_state_secret.get_secret_value().encode()
        return hmac.new(secret, SESSION_ID_KEY_LABEL, hashlib.sha256).digest()
    log.warning(
        "SESSION_ID_SECRET is not set (nor BOT_STATE_SECRET): session ids holding personal data "
        "are digested with a key of this process only, so after a restart such a session starts "
        "afresh (its budget too) and its earlier records are found only by the digest shown"
    )
    return secrets.token_bytes(32)


def cxone_authorizations(settings: Settings) -> AuthorizationAuthenticator:
    """The accepted Authorization values (`value:tenant`, as every credential setting), held as
    SHA-256 digests: no raw credential kept around."""
    return AuthorizationAuthenticator(
        [split_tenant(v.get_secret_value().strip()) for v in settings.cxone_webhook_authorization]
    )


def load_safety_rules(settings: Settings) -> SafetyRules:
    safety = SafetyRules.load(settings.safety_rules_dir or RULES_DIR)
    safety.check_categories(settings.unsafe_output_categories)
    return safety


def build_cxone_bot(
    settings: Settings,
    metering: Metering,
    renderer: PromptRenderer,
    cxone: CXoneContextClient | None,
    safety: SafetyRules,
    injection: InjectionRules,
    cache: TurnCache,
) -> CXoneBotPipeline:
    renderer.check(
        settings.cxone_system_template,
        {"channel": "chat", "handoff_marker": "[[HANDOFF]]", "greeting": True},
    )
    return CXoneBotPipeline(
        metering=metering,
        renderer=renderer,
        safety=safety,
        injection=injection,
        cache=cache,
        codec=StateCodec(state_secret(settings), settings.cxone_state_max_bytes),
        cxone=cxone,
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


def build_inbound_limits(settings: Settings, store: Store, llm: RouterSlot) -> InboundLimiter:
    """Counted in Redis when the store is Redis (every replica sees the same counts), else in
    this process (per worker). The per-tenant and per-key overrides are the provider
    configuration in service, read per request."""
    counters: LimitCounters = (
        RedisCounters(store.client, prefix=store.prefix)
        if isinstance(store, RedisStore)
        else MemoryCounters()
    )
    defaults = Limits(
        rpm=settings.client_rate_limit_rpm,
        tpm=settings.client_rate_limit_tpm,
        streams=settings.client_max_concurrent_streams,
    )
    return InboundLimiter(counters, defaults, lambda: llm.current.config.limits)
