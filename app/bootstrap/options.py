"""Settings turned into the small options and plain values the parts below take (none of them
reads Settings): the router's retry and circuit policy, the HTTP client, /health, budgets, and the
one-provider configuration the LLM_GATEWAY_* variables describe."""

from __future__ import annotations

from collections.abc import Mapping
from zoneinfo import ZoneInfo

from app.accounting.budget import BudgetPolicy, PeriodLimits
from app.core.settings import Settings
from app.llm.base_config import BaseConfig
from app.llm.catalog import ModelSpec, ProviderConfig, ProviderSpec, RouteSpec, RouteTarget
from app.llm.retry import RetryPolicy
from app.llm.router import RouterOptions
from app.surfaces.health.report import HealthOptions
from app.upstream.http_client import HttpClientOptions

ENV_PROVIDER = "default"  # the name of the provider the LLM_GATEWAY_* settings describe


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


def budget_policy(settings: Settings, key_limits: Mapping[str, int | None]) -> BudgetPolicy:
    """Session and tenant limits from BUDGET_*; a client key's own limit (CLIENT_API_KEYS
    `key:tenant:tokens`) beats its tenant's, which beats the default."""
    return BudgetPolicy(
        session_tokens=settings.budget_session_tokens,
        session_tokens_by_tenant=settings.budget_session_tokens_by_tenant,
        session_tokens_by_key=key_limits,  # read per call: keys created at run time
        tenant_limits=PeriodLimits(
            day_tokens=settings.budget_tenant_day_tokens,
            day_cost=settings.budget_tenant_day_cost,
            month_tokens=settings.budget_tenant_month_tokens,
            month_cost=settings.budget_tenant_month_cost,
        ),
        lightweight_threshold=settings.budget_lightweight_threshold,
        period_timezone=ZoneInfo(settings.budget_timezone),
    )
