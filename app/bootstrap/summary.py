"""The start-up summary: what this process serves, where it sends requests and what it keeps its
state in, read off the parts once they are built. The lifespan logs it as the "cx-relay started"
line (each worker process its own, `pid` telling them apart) and `/health` shows it as `startup`.

Every value is safe to show unauthenticated: URLs with their userinfo and query values masked,
credentials only counted, never a key, a secret or a fingerprint of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from app.llm.router import LLMRouter
from app.llm.routes import ProviderRuntime
from app.observability import tracing
from app.observability.tracing_setup import tracing_config
from app.store.audit import DB_FILENAME
from app.surfaces.health.report import addressable_routes

if TYPE_CHECKING:
    from app.bootstrap.parts import Parts

MASK = "***"

# The tutorials' gateway endpoints (client credentials, as the chat surfaces)
GATEWAY_PATHS = (
    "/api/v1/llm-gateway",
    "/api/v1/llm/gateway/chat",
    "/api/v1/llm/gateway/metrics",
    "/api/v2",
    "/ws/v1/llm-gateway/stream",
)


def masked_url(url: str) -> str:
    """`url` with its user name, password and every query value replaced by `***` (the names
    stay, so an operator sees that a `?key=` is there), and no fragment. The scheme, host, port
    and path are what an operator checks against the provider's documentation."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(not a URL)"
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if port is not None:
        host = f"{host}:{port}"
    if "@" in parts.netloc:
        user = MASK if parts.username else ""
        password = f":{MASK}" if parts.password is not None else ""
        host = f"{user}{password}@{host}"
    query = "&".join(
        f"{name}={MASK if value else ''}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def startup_summary(parts: Parts) -> dict[str, Any]:
    """The summary of a freshly built service (the parts decide what is on, as they decide it
    for each request: the authenticators, the admin token, the router in service)."""
    settings = parts.settings
    webhook_schemes = parts.webhook_auth.accepted_schemes
    clients = parts.client_auth.credentials
    client_routes = any(clients.values())
    client_auth = [name for name, count in clients.items() if count]
    cxone_on = parts.cxone_authorizations.configured or settings.allow_unauthenticated_webhooks
    unauthenticated = settings.allow_unauthenticated_webhooks
    router = parts.llm.current
    return {
        "pid": os.getpid(),
        "workers": settings.workers,
        "surfaces": {
            "cognigy_webhook": {
                "on": parts.webhook_auth.enabled,
                "path": "/webhook/cognigy/fallback",
                "auth": webhook_schemes + (["none"] if unauthenticated else []),
            },
            "cxone_webhook": {
                "on": cxone_on,
                "path": "/webhook/cxone",
                "auth": (["authorization"] if parts.cxone_authorizations.configured else [])
                + (["none"] if unauthenticated else []),
            },
            "chat": {"on": client_routes, "path": "/chat", "auth": client_auth},
            "openai": {"on": client_routes, "path": "/v1", "auth": client_auth},
            "ws_chat": {"on": client_routes, "path": "/ws/chat", "auth": client_auth},
            "budget_reads": {"on": client_routes, "path": "/budget", "auth": client_auth},
            "gateway": {"on": client_routes, "paths": list(GATEWAY_PATHS), "auth": client_auth},
            "oauth_tokens": {"on": clients["oauth_clients"] > 0, "path": "/api/v1/auth/token"},
            "admin": {"on": settings.admin_token is not None, "path": "/admin"},
            "metrics": {
                "on": True,
                "path": "/metrics",
                "auth": ["bearer"] if settings.metrics_token is not None else ["none"],
            },
        },
        "credentials": clients,  # counts only
        "budgets": _budgets(parts),
        "provider_config": parts.provisioner.source,
        "default_model": settings.llm_model,
        "providers": {name: _provider(runtime) for name, runtime in router.providers.items()},
        "routes": _routes(router),
        "cxone_context": _cxone_context(parts),
        "store": _store(parts),
        "audit_log": str(Path(settings.data_dir, DB_FILENAME).resolve()),
        "simulated": list(settings.simulated_upstreams),
        "token_counting": settings.token_counting,
        "http_transport": settings.http_transport,
        "tracing": _tracing(),
    }


def _tracing() -> dict[str, Any]:
    """Whether this process sends traces, and where (the OTEL_* variables, docs/tracing.md)."""
    if not tracing.enabled():
        return {"on": False}
    config = tracing_config()
    if config is None:  # a tracer provider handed to create_app (tests)
        return {"on": True}
    detail: dict[str, Any] = {"on": True, "exporters": list(config.exporters)}
    if config.endpoint is not None:
        detail["endpoint"] = masked_url(config.endpoint)
    return detail


def _provider(runtime: ProviderRuntime) -> dict[str, Any]:
    spec = runtime.spec
    detail: dict[str, Any] = {"kind": spec.kind, "base_url": masked_url(spec.base_url)}
    if spec.transport != "http":
        detail["transport"] = spec.transport
        if spec.ws_url is not None:
            detail["ws_url"] = masked_url(spec.ws_url)
    if spec.oauth is not None:
        detail["auth"] = "oauth2"
        detail["token_url"] = masked_url(spec.oauth.token_url)
    else:
        keys = sum(k.secret is not None for k in runtime.keys.keys)
        detail["auth"] = f"{keys} key{'s' if keys != 1 else ''}" if keys else "none"
    detail["models"] = [m.name for m in spec.models]
    return detail


def _routes(router: LLMRouter) -> dict[str, list[str]]:
    return {
        name: [f"{t.provider.spec.name}/{t.model.name}" for t in route.targets]
        for name, route in addressable_routes(router).items()
    }


def _store(parts: Parts) -> dict[str, Any]:
    settings = parts.settings
    if settings.store_backend == "redis" and settings.redis_url:
        return {
            "backend": "redis",
            "url": masked_url(settings.redis_url),
            "key_prefix": settings.redis_key_prefix,
        }
    return {
        "backend": settings.store_backend,
        "path": str(Path(settings.data_dir, DB_FILENAME).resolve()),
        "synchronous": settings.sqlite_synchronous,
    }


def _cxone_context(parts: Parts) -> dict[str, Any]:
    """Where the webhooks fetch conversation history from (off: turns go without it)."""
    settings = parts.settings
    if not settings.cxone_configured:
        return {"on": False}
    detail: dict[str, Any] = {"on": True, "token_url": masked_url(settings.cxone_token_url)}
    if settings.cxone_api_base_url:
        detail["api_base_url"] = masked_url(settings.cxone_api_base_url)
    else:
        detail["discovery_url"] = masked_url(settings.cxone_discovery_url)
    return detail


def _budgets(parts: Parts) -> dict[str, Any]:
    """The limits in force for every surface (none set: nothing is refused for its cost)."""
    settings = parts.settings
    limits: dict[str, Any] = {
        "session_tokens": settings.budget_session_tokens,
        "session_tokens_by_tenant": dict(settings.budget_session_tokens_by_tenant),
        "session_tokens_by_key": len(parts.client_auth.session_tokens_by_key),
        "tenant_day_tokens": settings.budget_tenant_day_tokens,
        "tenant_month_tokens": settings.budget_tenant_month_tokens,
        "tenant_day_cost": settings.budget_tenant_day_cost,
        "tenant_month_cost": settings.budget_tenant_month_cost,
    }
    return {"on": any(limits.values()), **limits}  # None, 0 and {} limit nothing
