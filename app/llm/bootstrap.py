"""The provider configuration the service starts with: PROVIDERS_FILE when set, else the one
OpenAI-compatible provider the LLM_GATEWAY_* variables describe (the foundation's settings keep
working as the one-provider case, with LLM_GATEWAY_API_KEY as its key pool)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from app.core.errors import ConfigError
from app.core.settings import Settings
from app.llm.catalog import (
    ModelSpec,
    Problem,
    ProviderConfig,
    ProviderConfigInvalid,
    ProviderSpec,
    RouteSpec,
    RouteTarget,
    load_provider_file,
    validate_provider_config,
)
from app.llm.retry import RetryPolicy
from app.llm.router import RouterOptions

ENV_PROVIDER = "default"

log = logging.getLogger("cxrelay.providers")


def provider_config_from_env(settings: Settings) -> ProviderConfig:
    """LLM_MODEL (a route of its own name) and the LLM_EMBEDDING_MODELS, which /v1/embeddings
    asks for by name (a model one provider serves is a one-step route)."""
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


def initial_provider_config(settings: Settings) -> ProviderConfig:
    if settings.providers_file is None:
        return provider_config_from_env(settings)
    try:
        config = load_provider_file(settings.providers_file)
    except ProviderConfigInvalid as error:
        raise ConfigError(f"PROVIDERS_FILE {error}") from error
    check_default_model(config, settings.llm_model)
    return config


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


def check_default_model(config: ProviderConfig, model: str) -> None:
    """LLM_MODEL is what webhooks ask for: it must be a route or a model of one provider, and
    answer chats (not an embedding model)."""
    serving = [m for p in config.providers for m in p.models if m.name == model]
    route = config.route(model)
    if route is None and len(serving) != 1:
        routes = ", ".join(r.name for r in config.routes) or "none"
        raise ConfigError(
            f"LLM_MODEL {model!r} is not a route in the provider configuration "
            f"(routes: {routes}) nor a model of exactly one provider"
        )
    if route is not None and route.chain:
        target = route.chain[0]
        provider = config.provider(target.provider)
        serving = [m for m in (provider.models if provider else []) if m.name == target.model]
    if serving and serving[0].kind != "chat":
        raise ConfigError(
            f"LLM_MODEL {model!r} is an embedding model: the webhooks and chat surfaces need a "
            "chat model"
        )


def validate_candidate(
    raw: object, settings: Settings
) -> tuple[ProviderConfig | None, list[Problem]]:
    """Every problem of a configuration offered at run time, LLM_MODEL included: webhooks ask
    for LLM_MODEL, so a configuration that does not serve it would break every turn."""
    config, problems = validate_provider_config(raw)
    if config is not None:
        try:
            check_default_model(config, settings.llm_model)
        except ConfigError as error:
            problems.append(Problem("routes", str(error)))
    return config, problems


def startup_provider_config(
    settings: Settings, applied: Mapping[str, str] | None
) -> tuple[ProviderConfig, str]:
    """The configuration to start with and where it came from ("applied", "providers_file" or
    "env"). One applied through the admin API wins over PROVIDERS_FILE/env while it still
    validates, so a restart does not silently undo an operator's change."""
    if applied is not None:
        config, problems = _stored_candidate(applied, settings)
        if config is not None and not problems:
            log.warning(
                "starting with the provider configuration applied through the admin API "
                "(sha256 %s, by %s at %s), NOT with %s; DELETE /admin/config/applied reverts "
                "to it",
                applied.get("sha256"),
                applied.get("actor"),
                applied.get("applied_at"),
                _base_source_name(settings),
                extra={"config_sha256": applied.get("sha256")},
            )
            return config, "applied"
        log.error(
            "the provider configuration applied through the admin API (sha256 %s) no longer "
            "validates; starting with %s instead: %s",
            applied.get("sha256"),
            _base_source_name(settings),
            "; ".join(str(p) for p in problems),
            extra={"config_sha256": applied.get("sha256")},
        )
    return initial_provider_config(settings), base_source(settings)


def _stored_candidate(
    applied: Mapping[str, str], settings: Settings
) -> tuple[ProviderConfig | None, list[Problem]]:
    try:
        raw = json.loads(applied["config_json"])
    except (KeyError, ValueError) as error:
        return None, [Problem("(stored)", f"unreadable: {error}")]
    return validate_candidate(raw, settings)


def base_source(settings: Settings) -> str:
    return "env" if settings.providers_file is None else "providers_file"


def _base_source_name(settings: Settings) -> str:
    if settings.providers_file is None:
        return "the LLM_GATEWAY_* settings"
    return f"PROVIDERS_FILE {settings.providers_file}"
