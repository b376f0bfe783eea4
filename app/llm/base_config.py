"""The provider configuration the service starts with and falls back to: PROVIDERS_FILE when set,
else the one OpenAI-compatible provider the LLM_GATEWAY_* variables describe (built from the
settings by app.bootstrap). One applied through the admin API beats both while it validates."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import ConfigError
from app.llm.catalog import (
    KeyResolver,
    Problem,
    ProviderConfig,
    ProviderConfigInvalid,
    load_provider_file,
    validate_provider_config,
)

log = logging.getLogger("cxrelay.providers")


@dataclass(frozen=True)
class BaseConfig:
    """Where the configuration comes from when none is applied: read again on a revert, so an
    edited PROVIDERS_FILE is picked up without a restart."""

    default_model: str  # LLM_MODEL: what webhooks ask for, so every configuration must serve it
    providers_file: Path | None
    env_config: ProviderConfig | None  # the LLM_GATEWAY_* provider, when there is no file

    @property
    def source(self) -> str:
        return "env" if self.providers_file is None else "providers_file"

    @property
    def description(self) -> str:
        if self.providers_file is None:
            return "the LLM_GATEWAY_* settings"
        return f"PROVIDERS_FILE {self.providers_file}"

    def load(self) -> ProviderConfig:
        if self.providers_file is None:
            if self.env_config is None:
                raise ConfigError("neither PROVIDERS_FILE nor the LLM_GATEWAY_* provider is set")
            return self.env_config
        try:
            config = load_provider_file(self.providers_file)
        except ProviderConfigInvalid as error:
            raise ConfigError(f"PROVIDERS_FILE {error}") from error
        check_default_model(config, self.default_model)
        return config


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
    raw: object, default_model: str, resolver: KeyResolver | None = None
) -> tuple[ProviderConfig | None, list[Problem]]:
    """Every problem of a configuration offered at run time, LLM_MODEL included: webhooks ask
    for LLM_MODEL, so a configuration that does not serve it would break every turn. `resolver`
    resolves its key directives (default: the provider file's rules)."""
    config, problems = validate_provider_config(raw, resolver=resolver)
    if config is not None:
        try:
            check_default_model(config, default_model)
        except ConfigError as error:
            problems.append(Problem("routes", str(error)))
    return config, problems


def startup_provider_config(
    base: BaseConfig, applied: Mapping[str, str] | None
) -> tuple[ProviderConfig, str]:
    """The configuration to start with and where it came from ("applied", "providers_file" or
    "env"). One applied through the admin API wins over PROVIDERS_FILE/env while it still
    validates, so a restart does not silently undo an operator's change."""
    if applied is not None:
        config, problems = stored_candidate(applied, base.default_model)
        if config is not None and not problems:
            log.warning(
                "starting with the provider configuration applied through the admin API "
                "(sha256 %s, by %s at %s), NOT with %s; DELETE /admin/config/applied reverts "
                "to it",
                applied.get("sha256"),
                applied.get("actor"),
                applied.get("applied_at"),
                base.description,
                extra={"config_sha256": applied.get("sha256")},
            )
            return config, "applied"
        log.error(
            "the provider configuration applied through the admin API (sha256 %s) no longer "
            "validates; starting with %s instead: %s",
            applied.get("sha256"),
            base.description,
            "; ".join(str(p) for p in problems),
            extra={"config_sha256": applied.get("sha256")},
        )
    return base.load(), base.source


def stored_candidate(
    applied: Mapping[str, str], default_model: str
) -> tuple[ProviderConfig | None, list[Problem]]:
    try:
        raw = json.loads(applied["config_json"])
    except (KeyError, ValueError) as error:
        return None, [Problem("(stored)", f"unreadable: {error}")]
    return validate_candidate(raw, default_model)
