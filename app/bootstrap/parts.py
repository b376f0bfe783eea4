"""The composition root: the only code that reads Settings to build the service's parts. The
lifespan (app.main) calls build_parts once; every part takes its own small options or plain
values, never Settings. The simulators are not started here: `serve --simulate` starts them and
hands their URLs and credentials in as settings (app.serving)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace

import httpx

from app.accounting.budget import BudgetService
from app.accounting.inbound_limits import AttemptLimits, InboundLimiter, Limits
from app.accounting.ledger import Ledger
from app.auth.clients import ClientAuthenticator
from app.auth.signatures import AuthorizationAuthenticator, ReplayGuard, WebhookAuthenticator
from app.bootstrap.credentials import (
    access_tokens,
    cxone_authorizations,
    directive_policy,
    session_id_key,
    warn_about_development_settings,
)
from app.bootstrap.options import (
    base_config,
    budget_policy,
    health_options,
    http_client_options,
    router_options,
)
from app.bootstrap.pipelines import build_chat, build_cognigy, build_cxone_bot, pipeline_parts
from app.bootstrap.summary import startup_summary
from app.core.credentials import parse_basic_credential, split_tenant
from app.core.settings import Settings
from app.keys.directory import KeyDirectory, KeySessionTokens
from app.keys.service import ClientKeyService
from app.llm import tokens
from app.llm.base_config import startup_provider_config
from app.llm.catalog import ProviderConfig
from app.llm.gateways import GatewayService
from app.llm.provisioning import Provisioner
from app.llm.router import LLMRouter, RouterSlot
from app.metering.meter import Metering
from app.pipelines.chat import ChatPipeline
from app.prompts.caller_templates import CallerTemplates
from app.safety.session_ids import SessionIds
from app.store import Store, open_store
from app.store.audit import AuditLog
from app.store.client_keys import ClientKeyRegistry, SQLiteClientKeys
from app.store.gateways import GatewayRegistry, SQLiteGateways
from app.surfaces.cognigy.pipeline import CognigyPipeline
from app.surfaces.cxone.pipeline import CXoneBotPipeline
from app.surfaces.health.probes import ProviderProbes
from app.surfaces.health.report import HealthOptions
from app.surfaces.openai.embeddings_pipeline import EmbeddingsPipeline
from app.upstream.cxone_context import CXoneContextClient
from app.upstream.http_client import build_http_client
from app.upstream.oauth import TokenCache, TokenRequest

log = logging.getLogger("cxrelay")


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
    gateways: GatewayService  # /api/v2/gateways: records in the store, applied by the provisioner
    store: Store
    ledger: Ledger
    client_auth: ClientAuthenticator
    keys: ClientKeyService  # /admin/keys: client keys created at run time
    limits: InboundLimiter
    session_ids: SessionIds  # a caller's session id -> the stored one (a digest when it is PII)
    probes: ProviderProbes  # /health's provider probes, cached and single-flight
    health: HealthOptions  # with the start-up summary (app.bootstrap.summary)


async def build_parts(settings: Settings, stack: AsyncExitStack) -> Parts:
    """Every part, in dependency order; `stack` closes them in reverse at shutdown."""
    warn_about_development_settings(settings)
    audit, startup = await open_audit_log(settings, stack)
    # chat models' encodings now; an embedding model's when it is first used (tokens.ready)
    chat = [m for p in startup.config.providers for m in p.models if m.kind != "embedding"]
    models = [settings.llm_model, *(m.name for m in chat)]
    tokens.use_exact_counting(settings.token_counting == "exact")
    stack.callback(tokens.use_exact_counting, True)  # process-wide: back to the default
    await asyncio.to_thread(tokens.preload, models)  # never load an encoding per request
    store, ledger = await open_usage_ledger(settings, stack)
    registry = await open_gateway_registry(settings, store, stack)
    directory = await open_key_directory(settings, store, stack)
    parts = _build(settings, stack, audit, startup, store, ledger, registry, directory)
    # read off the built parts (what they accept is what is on), logged by the lifespan
    parts = replace(parts, health=replace(parts.health, startup=startup_summary(parts)))
    reprobe = asyncio.create_task(
        _reprobe_keys(parts.llm, settings.key_reprobe_seconds), name="key-reprobe"
    )
    stack.callback(reprobe.cancel)
    return parts


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
    registry: GatewayRegistry,
    directory: KeyDirectory,
) -> Parts:
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
        directives=directive_policy(settings),
    )
    stack.push_async_callback(provisioner.aclose)  # before http.aclose: notifications use it
    tokens = access_tokens(settings)
    client_auth = ClientAuthenticator(
        [k.get_secret_value() for k in settings.client_api_keys],
        settings.admin_token.get_secret_value() if settings.admin_token else None,
        tokens,
        lambda: llm.current.config.client_keys,  # the scopes in service decide, per request
        directory,
    )
    key_budgets = KeySessionTokens(client_auth.session_tokens_by_key, directory)
    budget = BudgetService(store, budget_policy(settings, key_budgets))
    limits = build_inbound_limits(settings, store, llm)
    stack.push_async_callback(limits.aclose)  # leases still being given back, before the store
    metering = Metering(budget, ledger, llm, limits)
    shared = pipeline_parts(settings, metering, _cxone_client(settings, http))
    authenticator = WebhookAuthenticator(
        # `value:tenant` (split_tenant): the verified credential's tenant is the turn's
        secrets=[split_tenant(s.get_secret_value()) for s in settings.cognigy_webhook_secret],
        api_keys=[split_tenant(k.get_secret_value()) for k in settings.cognigy_api_keys],
        basic=[parse_basic_credential(b.get_secret_value()) for b in settings.cognigy_basic_auth],
        tokens=tokens,
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
        cognigy=build_cognigy(settings, shared),
        cxone_bot=build_cxone_bot(settings, shared),
        caller_templates=CallerTemplates(
            settings.chat_inline_template_max_chars, max_output_chars=settings.max_body_bytes
        ),
        chat=build_chat(settings, shared),
        embeddings=EmbeddingsPipeline(metering, settings.embeddings_deadline_seconds),
        metering=metering,
        cxone_authorizations=cxone_authorizations(settings),
        audit=audit,
        provisioner=provisioner,
        gateways=GatewayService(provisioner, registry),
        store=store,
        ledger=ledger,
        client_auth=client_auth,
        keys=ClientKeyService(
            directory.registry,
            audit,
            client_auth.environment_keys,
            client_auth.session_tokens_by_key,
            changed=directory.refresh,
        ),
        limits=limits,
        session_ids=SessionIds(shared.safety, session_id_key(settings)),
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


async def open_gateway_registry(
    settings: Settings, store: Store, stack: AsyncExitStack
) -> GatewayRegistry:
    """Where /api/v2/gateways keeps its records: beside the ledger, so every worker (SQLite: on
    this host) or replica (Redis) answers a gateway's status."""
    shared = store.gateway_registry()
    if shared is not None:
        return shared
    registry = await SQLiteGateways.open(settings.data_dir)
    stack.push_async_callback(registry.close)
    return registry


async def open_client_key_registry(
    settings: Settings, store: Store, stack: AsyncExitStack
) -> ClientKeyRegistry:
    """Where the client keys created at run time are kept: beside the ledger (SQLite: every
    worker on this host; Redis: every replica)."""
    shared = store.client_key_registry()
    if shared is not None:
        return shared
    registry = await SQLiteClientKeys.open(settings.data_dir)
    stack.push_async_callback(registry.close)
    return registry


async def open_key_directory(
    settings: Settings, store: Store, stack: AsyncExitStack
) -> KeyDirectory:
    """This worker's copy of the client keys, loaded now and kept current by a task; on
    shutdown the task stops and the last-used times gathered are written."""
    registry = await open_client_key_registry(settings, store, stack)
    directory = KeyDirectory(registry, refresh_seconds=settings.client_keys_refresh_seconds)
    await directory.load()
    stack.push_async_callback(directory.flush)
    task = asyncio.create_task(directory.run(), name="client-key-refresh")
    stack.callback(task.cancel)
    return directory


def build_inbound_limits(settings: Settings, store: Store, llm: RouterSlot) -> InboundLimiter:
    """Counted in Redis when the store is Redis (every replica sees the same counts), else in
    this process (per worker). The per-tenant and per-key overrides are the provider
    configuration in service, read per request."""
    defaults = Limits(
        rpm=settings.client_rate_limit_rpm,
        tpm=settings.client_rate_limit_tpm,
        streams=settings.client_max_concurrent_streams,
    )
    attempts = AttemptLimits(
        per_client=settings.oauth_max_failures_per_client,
        per_address=settings.oauth_max_failures_per_address,
        admin_per_address=settings.admin_max_failures_per_address,
    )
    return InboundLimiter(
        store.limit_counters(), defaults, lambda: llm.current.config.limits, attempts=attempts
    )


async def _reprobe_keys(llm: RouterSlot, interval_seconds: float) -> None:
    """Set-aside keys are tried again on an interval, so a fixed key returns without a restart."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await llm.current.probe_unhealthy_keys()
        except Exception:  # a probe must never end the loop
            log.exception("key re-probe failed")
