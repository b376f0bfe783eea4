"""The composition root: the only code that reads Settings to build the service's parts. The
lifespan (app.main) calls build_parts once; every part below takes its own small options or
plain values, never Settings. The simulators are not started here: `serve --simulate` starts them
and hands their URLs and credentials in as settings (app.serving)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import httpx

from app.accounting.budget import BudgetPolicy, BudgetService, PeriodLimits
from app.accounting.inbound_limits import InboundLimiter, Limits
from app.accounting.ledger import Ledger
from app.auth.clients import ClientAuthenticator
from app.auth.signatures import AuthorizationAuthenticator, ReplayGuard, WebhookAuthenticator
from app.cache.intent_cache import IntentCache
from app.cache.turn_cache import TurnCache
from app.core.credentials import split_tenant
from app.core.settings import (
    DEV_BOT_STATE_SECRET,
    DEV_CLIENT_API_KEY,
    DEV_CXONE_AUTHORIZATION,
    Settings,
)
from app.llm import tokens
from app.llm.base_config import BaseConfig, startup_provider_config
from app.llm.catalog import ModelSpec, ProviderConfig, ProviderSpec, RouteSpec, RouteTarget
from app.llm.provisioning import Provisioner
from app.llm.retry import RetryPolicy
from app.llm.router import LLMRouter, RouterOptions, RouterSlot
from app.metering.meter import Metering
from app.pipelines.chat import ChatPipeline
from app.pipelines.chat_call import ChatOptions
from app.prompts.caller_templates import CallerTemplates
from app.prompts.renderer import PromptRenderer
from app.safety.injection import InjectionRules
from app.safety.rules import RULES_DIR, SafetyRules
from app.safety.session_ids import SessionIds
from app.store import RedisStore, Store, open_store
from app.store.audit import AuditLog
from app.store.counters import LimitCounters, MemoryCounters, RedisCounters
from app.surfaces.cognigy.pipeline import CognigyOptions, CognigyPipeline
from app.surfaces.cxone.bot_state import StateCodec
from app.surfaces.cxone.pipeline import CXoneBotPipeline
from app.surfaces.cxone.reply import BotOptions
from app.surfaces.health.probes import ProviderProbes
from app.surfaces.health.report import HealthOptions
from app.surfaces.openai.embeddings_pipeline import EmbeddingsPipeline
from app.upstream.cxone_context import CXoneContextClient, Turn
from app.upstream.http_client import HttpClientOptions, build_http_client
from app.upstream.oauth import TokenCache, TokenRequest

log = logging.getLogger("cxrelay")

ENV_PROVIDER = "default"  # the name of the provider the LLM_GATEWAY_* settings describe


@dataclass(frozen=True)
class Parts:
    """Every shared part, built once per app by the lifespan; routes reach each one through its
    own dependency (app.deps), so a route's signature shows what it uses."""

    settings: Settings
    http: httpx.AsyncClient
    webhook_auth: WebhookAuthenticator
    llm: RouterSlot
    cognigy: CognigyPipeline
    cxone_bot: CXoneBotPipeline
    chat: ChatPipeline
    embeddings: EmbeddingsPipeline
    caller_templates: CallerTemplates
    metering: Metering
    cxone_authorizations: AuthorizationAuthenticator
    audit: AuditLog
    provisioner: Provisioner
    store: Store
    ledger: Ledger
    client_auth: ClientAuthenticator
    limits: InboundLimiter
    session_ids: SessionIds  # a caller's session id -> the stored one (a digest when it is PII)
    probes: ProviderProbes  # /health's provider probes, cached and single-flight
    health: HealthOptions


async def build_parts(settings: Settings, stack: AsyncExitStack) -> Parts:
    """Every part, in dependency order; `stack` closes them in reverse at shutdown."""
    _warn_about_development_settings(settings)
    audit, startup = await open_audit_log(settings, stack)
    # chat models' encodings now; an embedding model's when it is first used (tokens.ready)
    chat = [m for p in startup.config.providers for m in p.models if m.kind != "embedding"]
    models = [settings.llm_model, *(m.name for m in chat)]
    tokens.use_exact_counting(settings.token_counting == "exact")
    stack.callback(tokens.use_exact_counting, True)  # process-wide: back to the default
    await asyncio.to_thread(tokens.preload, models)  # never load an encoding per request
    store, ledger = await open_usage_ledger(settings, stack)
    parts = _build(settings, stack, audit, startup, store, ledger)
    reprobe = asyncio.create_task(
        _reprobe_keys(parts.llm, settings.key_reprobe_seconds), name="key-reprobe"
    )
    stack.callback(reprobe.cancel)
    return parts


# --- options from the settings ------------------------------------------------------------------


def provider_config_from_env(settings: Settings) -> ProviderConfig:
    """LLM_MODEL (a route of its own name) and the LLM_EMBEDDING_MODELS, which /v1/embeddings
    asks for by name (a model one provider serves is a one-step route); LLM_GATEWAY_API_KEY is
    its key pool."""
    model = settings.llm_model
    embedding_price = settings.llm_embedding_price_per_1k_input or 0.0
    return ProviderConfig(
        providers=[
            ProviderSpec(
                name=ENV_PROVIDER,
                base_url=settings.llm_gateway_base_url or "",
                api_keys=[f"literal:{k.get_secret_value()}" for k in settings.llm_gateway_api_key],
                timeout_seconds=settings.llm_timeout_seconds,
                structured_outputs=settings.llm_gateway_structured_outputs,
                models=[
                    ModelSpec(
                        name=model,
                        max_tokens=max(settings.llm_max_tokens, 4096),
                        max_context_tokens=settings.llm_context_tokens,
                        price_per_1k_prompt=settings.llm_price_per_1k_prompt or 0.0,
                        price_per_1k_completion=settings.llm_price_per_1k_completion or 0.0,
                        vision=settings.llm_vision,
                        audio=settings.llm_audio,
                    ),
                    *(
                        ModelSpec(name=name, kind="embedding", price_per_1k_prompt=embedding_price)
                        for name in settings.llm_embedding_models
                    ),
                ],
            )
        ],
        routes=[RouteSpec(name=model, chain=[RouteTarget(provider=ENV_PROVIDER, model=model)])],
        allow_literal_keys=True,  # these keys come from the environment, not from a file
    )


def base_config(settings: Settings) -> BaseConfig:
    """PROVIDERS_FILE when set, else the one provider of the LLM_GATEWAY_* settings."""
    return BaseConfig(
        default_model=settings.llm_model,
        providers_file=settings.providers_file,
        env_config=provider_config_from_env(settings) if settings.providers_file is None else None,
    )


def router_options(settings: Settings) -> RouterOptions:
    return RouterOptions(
        retry=RetryPolicy(
            max_attempts=settings.llm_max_attempts,
            initial_wait=settings.llm_retry_initial_seconds,
            max_wait=settings.llm_retry_max_seconds,
        ),
        failure_threshold=settings.circuit_failure_threshold,
        circuit_reset_seconds=settings.circuit_reset_seconds,
        key_cooldown_seconds=settings.key_cooldown_seconds,
    )


def http_client_options(settings: Settings) -> HttpClientOptions:
    return HttpClientOptions(
        timeout_seconds=settings.llm_timeout_seconds,
        connect_timeout_seconds=settings.http_connect_timeout_seconds,
        max_connections=settings.http_max_connections,
        max_keepalive_connections=settings.http_max_keepalive_connections,
        transport=settings.http_transport,
    )


def health_options(settings: Settings) -> HealthOptions:
    return HealthOptions(
        default_model=settings.llm_model,
        store_backend=settings.store_backend,
        store_timeout_seconds=settings.health_store_timeout_seconds,
        max_tokens=settings.llm_max_tokens,
        temperatures={
            "LLM_TEMPERATURE": settings.llm_temperature,
            "ROUTING_TEMPERATURE": settings.routing_temperature,
        },
        simulated=tuple(settings.simulated_upstreams),
    )


# --- the parts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartupConfig:
    """The provider configuration chosen at start-up, and where it came from."""

    config: ProviderConfig
    source: str
    sha256: str | None = None  # set when it is the one applied through the admin API


async def open_audit_log(
    settings: Settings, stack: AsyncExitStack
) -> tuple[AuditLog, StartupConfig]:
    """The embedded store first: a configuration applied through the admin API lives there."""
    audit = await AuditLog.open(settings.data_dir)
    stack.push_async_callback(audit.close)
    applied = await audit.load_applied()
    config, source = startup_provider_config(base_config(settings), applied)
    sha256 = applied["sha256"] if applied is not None and source == "applied" else None
    return audit, StartupConfig(config, source, sha256)


def _build(
    settings: Settings,
    stack: AsyncExitStack,
    audit: AuditLog,
    startup: StartupConfig,
    store: Store,
    ledger: Ledger,
) -> Parts:
    renderer = PromptRenderer()
    http = build_http_client(http_client_options(settings))
    stack.push_async_callback(http.aclose)
    llm = RouterSlot(LLMRouter(http, startup.config, router_options(settings)))
    provisioner = Provisioner(
        slot=llm,
        http=http,
        base=base_config(settings),
        router_options=router_options(settings),
        notify_urls=settings.admin_notify_urls,
        audit=audit,
        source=startup.source,
        sha256=startup.sha256,
    )
    stack.push_async_callback(provisioner.aclose)  # before http.aclose: notifications use it
    cxone_client = _cxone_client(settings, http)
    safety = load_safety_rules(settings)
    client_auth = ClientAuthenticator(
        [k.get_secret_value() for k in settings.client_api_keys],
        settings.admin_token.get_secret_value() if settings.admin_token else None,
    )
    budget = BudgetService(store, budget_policy(settings, client_auth.session_tokens_by_key))
    limits = build_inbound_limits(settings, store, llm)
    stack.push_async_callback(limits.aclose)  # leases still being given back, before the store
    metering = Metering(budget, ledger, llm, limits)
    injection = load_injection_rules(settings)  # one of each, shared by every surface
    intent_cache = build_intent_cache(settings)
    turn_cache = TurnCache(intent_cache, settings.intent_cache_enabled)
    authenticator = WebhookAuthenticator(
        # `value:tenant` (split_tenant): the verified credential's tenant is the turn's
        secrets=[split_tenant(s.get_secret_value()) for s in settings.cognigy_webhook_secret],
        api_keys=[split_tenant(k.get_secret_value()) for k in settings.cognigy_api_keys],
        schemes=settings.cognigy_auth_schemes,
        tolerance_seconds=settings.webhook_timestamp_tolerance_seconds,
        replay_guard=ReplayGuard(ttl_seconds=2 * settings.webhook_timestamp_tolerance_seconds),
        allow_unauthenticated=settings.allow_unauthenticated_webhooks,
    )
    return Parts(
        settings=settings,
        http=http,
        webhook_auth=authenticator,
        llm=llm,
        cognigy=build_cognigy(settings, metering, renderer, cxone_client, injection, turn_cache),
        cxone_bot=build_cxone_bot(
            settings, metering, renderer, cxone_client, safety, injection, turn_cache
        ),
        caller_templates=CallerTemplates(
            settings.chat_inline_template_max_chars, max_output_chars=settings.max_body_bytes
        ),
        chat=build_chat(settings, metering, renderer, safety, injection, turn_cache),
        embeddings=EmbeddingsPipeline(metering, settings.embeddings_deadline_seconds),
        metering=metering,
        cxone_authorizations=cxone_authorizations(settings),
        audit=audit,
        provisioner=provisioner,
        store=store,
        ledger=ledger,
        client_auth=client_auth,
        limits=limits,
        session_ids=SessionIds(safety, session_id_key(settings)),
        probes=ProviderProbes(settings.health_cache_seconds, settings.health_probe_timeout_seconds),
        health=health_options(settings),
    )


def _cxone_client(settings: Settings, http: httpx.AsyncClient) -> CXoneContextClient | None:
    if not settings.cxone_configured or settings.cxone_client_secret is None:
        return None
    basic = (settings.cxone_client_id or "", settings.cxone_client_secret.get_secret_value())
    if settings.cxone_grant_type == "password":
        form = {
            "grant_type": "password",
            "username": settings.cxone_access_key_id or "",
            "password": settings.cxone_access_key_secret.get_secret_value()
            if settings.cxone_access_key_secret
            else "",
        }
    else:
        form = {"grant_type": "client_credentials"}
    tokens = TokenCache(
        http,
        TokenRequest(settings.cxone_token_url, form, basic),
        margin_seconds=settings.cxone_token_refresh_margin_seconds,
        timeout_seconds=settings.cxone_timeout_seconds,
        upstream="cxone-auth",
    )
    return CXoneContextClient(
        http,
        tokens,
        api_base_url=settings.cxone_api_base_url,
        discovery_url=settings.cxone_discovery_url,
        tenant_id=settings.cxone_tenant_id,
        timeout_seconds=settings.cxone_timeout_seconds,
    )


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


def _warn_about_development_settings(settings: Settings) -> None:
    if settings.allow_unauthenticated_webhooks:
        log.warning(
            "ALLOW_UNAUTHENTICATED_WEBHOOKS=true: webhook requests WITHOUT a credential are "
            "accepted. Development only; never run like this in front of customers."
        )
    if any(
        v.get_secret_value() == DEV_CXONE_AUTHORIZATION
        for v in settings.cxone_webhook_authorization
    ):
        log.warning(
            "development CXone Authorization value %r accepted (simulated mode's, or compose's "
            "default); set your own CXONE_WEBHOOK_AUTHORIZATION before exposing this service",
            DEV_CXONE_AUTHORIZATION,
        )
    secret = settings.bot_state_secret
    if secret is not None and secret.get_secret_value() == DEV_BOT_STATE_SECRET:
        log.warning(
            "development BOT_STATE_SECRET in use (simulated mode's, or compose's default): "
            "anyone can forge CXone conversation state; set your own before exposing this "
            "service"
        )
    if any(k.get_secret_value() == DEV_CLIENT_API_KEY for k in settings.client_api_keys):
        log.warning(
            "development client API key %r accepted for the chat and /budget routes (simulated "
            "mode's, or compose's default); set your own CLIENT_API_KEYS before exposing this "
            "service",
            DEV_CLIENT_API_KEY,
        )
    if settings.using_dev_secret:
        log.warning(
            "development webhook secret %r in use (simulated mode's, or compose's default); set "
            "your own COGNIGY_WEBHOOK_SECRET before exposing this service",
            "cx-relay-dev-secret",
        )


async def _reprobe_keys(llm: RouterSlot, interval_seconds: float) -> None:
    """Set-aside keys are tried again on an interval, so a fixed key returns without a restart."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await llm.current.probe_unhealthy_keys()
        except Exception:  # a probe must never end the loop
            log.exception("key re-probe failed")
