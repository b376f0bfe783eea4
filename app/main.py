"""create_app(settings) and the lifespan that builds, and closes, the shared parts."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import SecretStr

from app import __version__
from app.accounting.budget import BudgetService
from app.accounting.ledger import Ledger
from app.accounting.metering import Metering
from app.auth.clients import ClientAuthenticator
from app.auth.signatures import ReplayGuard, WebhookAuthenticator
from app.cache.turn_cache import TurnCache
from app.core.credentials import split_tenant
from app.core.settings import (
    DEV_BOT_STATE_SECRET,
    DEV_CLIENT_API_KEY,
    DEV_CXONE_AUTHORIZATION,
    Settings,
)
from app.core.settings_loading import load_settings
from app.dependencies import Services
from app.http.request_ids import RequestIdMiddleware
from app.http.request_metrics import RequestMetricsMiddleware
from app.llm import tokens
from app.llm.bootstrap import router_options, startup_provider_config
from app.llm.catalog import ProviderConfig
from app.llm.provisioning import Provisioner
from app.llm.router import LLMRouter, RouterSlot
from app.prompts.caller_templates import CallerTemplates
from app.prompts.renderer import PromptRenderer
from app.safety.session_ids import SessionIds
from app.simulator.cxone import CXoneSimulatorState, create_cxone_simulator
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer
from app.store import Store
from app.store.audit import AuditLog
from app.surfaces.admin import router as admin
from app.surfaces.budget import router as budget
from app.surfaces.chat import router as chat
from app.surfaces.chat import websocket as ws_chat
from app.surfaces.cognigy import router as cognigy
from app.surfaces.cxone import router as cxone
from app.surfaces.health import router as health
from app.surfaces.metrics import router as metrics
from app.surfaces.openai import embeddings_router as embeddings
from app.surfaces.openai import router as openai_compat
from app.surfaces.openai.embeddings_pipeline import EmbeddingsPipeline
from app.upstream.cxone_context import CXoneContextClient
from app.upstream.http_client import build_http_client
from app.upstream.oauth import TokenCache, TokenRequest
from app.wiring import (
    budget_policy,
    build_chat,
    build_cognigy,
    build_cxone_bot,
    build_inbound_limits,
    build_intent_cache,
    cxone_authorizations,
    load_injection_rules,
    load_safety_rules,
    open_usage_ledger,
    session_id_key,
)

log = logging.getLogger("cxrelay")


# gpt-4o-mini's list prices (USD per 1,000 tokens), charged for the simulated model unless set.
SIMULATED_PRICES = {"llm_price_per_1k_prompt": 0.00015, "llm_price_per_1k_completion": 0.0006}
# text-embedding-3-small's, for the simulated embedding models.
SIMULATED_EMBEDDING_PRICE = {"llm_embedding_price_per_1k_input": 0.00002}


def _start_simulators(
    settings: Settings, stack: AsyncExitStack
) -> tuple[Settings, dict[str, bool]]:
    """In simulated mode, serve the upstreams that are not configured from loopback servers."""
    overrides: dict[str, object] = {}
    simulated = {"llm": False, "cxone": False}
    if settings.simulate and not settings.llm_gateway_base_url:
        llm = stack.enter_context(LoopbackServer(create_llm_simulator()))
        overrides["llm_gateway_base_url"] = llm.url
        simulated["llm"] = True
        if (
            settings.llm_price_per_1k_prompt is None
            and settings.llm_price_per_1k_completion is None
        ):
            overrides.update(SIMULATED_PRICES)  # so /budget/status shows costs in a demo
        if settings.llm_embedding_price_per_1k_input is None:
            overrides.update(SIMULATED_EMBEDDING_PRICE)
    if settings.simulate and not settings.cxone_configured:
        state = CXoneSimulatorState()
        cxone = stack.enter_context(LoopbackServer(create_cxone_simulator(state)))
        overrides.update(
            cxone_client_id=state.client_id,
            cxone_client_secret=SecretStr(state.client_secret),
            cxone_access_key_id=state.access_key_id,
            cxone_access_key_secret=SecretStr(state.access_key_secret),
            cxone_token_url=f"{cxone.url}/auth/token",
            cxone_discovery_url=f"{cxone.url}/.well-known/cxone-configuration",
            cxone_api_base_url=None,
            cxone_tenant_id=None,
        )
        simulated["cxone"] = True
    for name, on in simulated.items():
        if on:
            log.warning(
                "SIMULATED %s upstream in use: answers do not come from a real service",
                name,
                extra={"simulated": name},
            )
    return settings.model_copy(update=overrides), simulated


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
    config, source = startup_provider_config(settings, applied)
    sha256 = applied["sha256"] if applied is not None and source == "applied" else None
    return audit, StartupConfig(config, source, sha256)


def build_services(
    settings: Settings,
    simulated: dict[str, bool],
    stack: AsyncExitStack,
    audit: AuditLog,
    startup: StartupConfig,
    store: Store,
    ledger: Ledger,
) -> Services:
    renderer = PromptRenderer()
    http = build_http_client(settings)
    stack.push_async_callback(http.aclose)
    llm = RouterSlot(LLMRouter(http, startup.config, router_options(settings)))
    provisioner = Provisioner(
        slot=llm,
        http=http,
        settings=settings,
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
    turn_cache = TurnCache(intent_cache, metering, settings.intent_cache_enabled)
    authenticator = WebhookAuthenticator(
        # `value:tenant` (split_tenant): the verified credential's tenant is the turn's
        secrets=[split_tenant(s.get_secret_value()) for s in settings.cognigy_webhook_secret],
        api_keys=[split_tenant(k.get_secret_value()) for k in settings.cognigy_api_keys],
        schemes=settings.cognigy_auth_schemes,
        tolerance_seconds=settings.webhook_timestamp_tolerance_seconds,
        replay_guard=ReplayGuard(ttl_seconds=2 * settings.webhook_timestamp_tolerance_seconds),
        allow_unauthenticated=settings.allow_unauthenticated_webhooks,
    )
    return Services(
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
        simulated=simulated,
    )


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


async def _reprobe_keys(services: Services) -> None:
    """Set-aside keys are tried again on an interval, so a fixed key returns without a restart."""
    while True:
        await asyncio.sleep(services.settings.key_reprobe_seconds)
        try:
            await services.llm.current.probe_unhealthy_keys()
        except Exception:  # a probe must never end the loop
            log.exception("key re-probe failed")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        settings, simulated = _start_simulators(app.state.settings, stack)
        _warn_about_development_settings(settings)
        audit, startup = await open_audit_log(settings, stack)
        # chat models' encodings now; an embedding model's when it is first used (tokens.ready)
        chat = [m for p in startup.config.providers for m in p.models if m.kind != "embedding"]
        models = [settings.llm_model, *(m.name for m in chat)]
        tokens.use_exact_counting(settings.token_counting == "exact")
        stack.callback(tokens.use_exact_counting, True)  # process-wide: back to the default
        await asyncio.to_thread(tokens.preload, models)  # never load an encoding per request
        store, ledger = await open_usage_ledger(settings, stack)
        services = build_services(settings, simulated, stack, audit, startup, store, ledger)
        app.state.services = services
        reprobe = asyncio.create_task(_reprobe_keys(services), name="key-reprobe")
        stack.callback(reprobe.cancel)
        log.info(
            "cx-relay started",
            extra={"version": __version__, "started_at": datetime.now().isoformat()},
        )
        yield
        log.info("cx-relay stopping")


def _without_native_telemetry() -> dict[str, Any]:
    """FastAPI's built-in OpenTelemetry hooks (newer releases) look up the global providers on
    every request (~5% of a request's CPU, measured); the service has its own Prometheus metrics
    and JSON logs and configures no OpenTelemetry, so they are switched off where they exist."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="cx-relay",
        version=__version__,
        description="LLM webhook gateway for NICE Cognigy.AI and NICE CXone virtual agents",
        lifespan=lifespan,
        **_without_native_telemetry(),
    )
    app.state.settings = settings or load_settings()
    app.add_middleware(RequestMetricsMiddleware)  # inner: the request id is set when it counts
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health.router)
    app.include_router(cognigy.router)
    app.include_router(cxone.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    app.include_router(budget.router)
    app.include_router(chat.router)
    app.include_router(openai_compat.router)
    app.include_router(embeddings.router)
    app.include_router(ws_chat.router)
    return app
