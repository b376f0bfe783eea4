"""Readiness and health, computed from the router in service and the store.

Readiness (`/health/ready`) reads local state only (a store ping, circuits, key pools): every
replica's orchestrator polls it every few seconds, so it must never cost an upstream call. The
detail (`/health`) probes each provider for real (app.surfaces.health.probes: cached, single
flight).
Neither ever names a key or a fingerprint of one: both are served without authentication.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from app import __version__
from app.core.errors import UnknownModel
from app.llm.router import LLMRouter
from app.llm.routes import ProviderRuntime, Route
from app.llm.wire import shown_url
from app.store import Store
from app.surfaces.health.probes import Probe, ProviderProbes

# What each provider kind takes; the Anthropic client clamps anything above 1 to 1.
TEMPERATURE_BOUNDS = {"openai": (0.0, 2.0), "anthropic": (0.0, 1.0)}
MIN_KEY_LENGTH = 8
NO_USABLE_ROUTE = "no route has a provider with its circuit not open and a key not set aside"


@dataclass(frozen=True)
class HealthOptions:
    """What the checks hold the configuration in service against (the settings every provider
    must accommodate), and which upstreams the serving command simulates (data, not an import
    of the simulator)."""

    default_model: str  # LLM_MODEL
    store_backend: str
    store_timeout_seconds: float
    max_tokens: int  # LLM_MAX_TOKENS
    temperatures: Mapping[str, float] = field(default_factory=dict)  # setting name -> value
    simulated: tuple[str, ...] = ()
    # what the service started with (app.bootstrap.summary): surfaces on and off, provider URLs
    # masked, the store, workers; as of start-up (`providers` above is the configuration now)
    startup: Mapping[str, Any] = field(default_factory=dict)


def provider_usable(runtime: ProviderRuntime) -> bool:
    """Would the router send to it now? A keyless provider's pool holds one placeholder key, so
    "a key not set aside" covers it too."""
    return runtime.breaker.state != "open" and runtime.keys.healthy_count > 0


def addressable_routes(router: LLMRouter) -> dict[str, Route]:
    """Every name a request may ask for: the routes, and the models one provider alone serves."""
    routes: dict[str, Route] = {}
    for name in router.model_names():
        try:
            routes[name] = router.route(name, kind=None)  # chat and embedding routes
        except UnknownModel:
            continue  # served by several providers without a route: nobody can ask for it
    return routes


def plausible_key(secret: str) -> bool:
    """Catches a paste gone wrong (blank, quotes with a newline, a truncated value) without
    assuming a vendor's prefix: OpenAI-compatible gateways issue keys of any shape."""
    return (
        len(secret) >= MIN_KEY_LENGTH
        and secret.isprintable()
        and not any(c.isspace() for c in secret)
    )


async def check_store(store: Store, backend: str, timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(store.ping(), timeout)
    except TimeoutError:
        return {"ok": False, "backend": backend, "error": f"no answer within {timeout:g}s"}
    except Exception as exc:  # a probe reports every failure; it never raises one
        return {"ok": False, "backend": backend, "error": str(exc) or type(exc).__name__}
    return {"ok": True, "backend": backend, "latency_ms": _ms(started)}


def check_config(router: LLMRouter, default_model: str, source: str) -> dict[str, Any]:
    """The configuration validated at start-up (and on every apply); LLM_MODEL must resolve."""
    check: dict[str, Any] = {"ok": True, "source": source, "default_model": default_model}
    try:
        router.route(default_model)
    except UnknownModel as exc:
        check.update(ok=False, error=str(exc))
    return check


def config_checks(
    config: dict[str, Any], providers: dict[str, Any], default_reachable: bool
) -> dict[str, Any]:
    """The integration tutorial's `config_checks`: the start-up validation plus, over every
    provider, whether the configured temperature, max_tokens and key format are within bounds.

    With the CXone tutorial's `valid` and `checks` in its terms: `endpoint_reachable` (this
    round's probe reached a provider of LLM_MODEL's route), `temperature_valid` (every
    configured temperature within each provider's bounds) and `model_format_valid` (LLM_MODEL
    names a route or model the configuration serves: a stricter test than the tutorial's
    pattern match, which a model name with a dot or a slash would fail)."""
    checks = {
        name: all(p[name] for p in providers.values())
        for name in ("temperature_ok", "max_tokens_ok", "key_format_ok")
    }
    tutorial = {
        "endpoint_reachable": config["ok"] and default_reachable,
        "temperature_valid": checks["temperature_ok"],
        "model_format_valid": config["ok"],
    }
    return {
        **config,
        **checks,
        "ok": config["ok"] and all(checks.values()),
        "valid": all(tutorial.values()),
        "checks": tutorial,
    }


def reaches_default_route(router: LLMRouter, default_model: str, reachable: set[str]) -> bool:
    """Whether a provider of LLM_MODEL's route (the webhooks' model) answered this probe round."""
    try:
        route = router.route(default_model)
    except UnknownModel:
        return False
    return any(target.provider.spec.name in reachable for target in route.targets)


def check_providers(router: LLMRouter) -> dict[str, Any]:
    routes = {
        name: any(provider_usable(t.provider) for t in route.targets)
        for name, route in addressable_routes(router).items()
    }
    providers = {
        name: {"usable": provider_usable(runtime), **_state(runtime)}
        for name, runtime in router.providers.items()
    }
    check: dict[str, Any] = {"ok": any(routes.values()), "routes": routes, "providers": providers}
    if not check["ok"]:
        check["error"] = NO_USABLE_ROUTE
    return check


async def readiness(
    router: LLMRouter, store: Store, options: HealthOptions, source: str
) -> tuple[bool, dict[str, Any]]:
    """(ready, body): ready when every check passes; otherwise the body names each failing one."""
    checks = {
        "config": check_config(router, options.default_model, source),
        "store": await check_store(store, options.store_backend, options.store_timeout_seconds),
        "providers": check_providers(router),
    }
    failing = [name for name, check in checks.items() if not check["ok"]]
    if failing:
        return False, {"status": "not_ready", "checks": checks, "failing": failing}
    return True, {"status": "ready", "checks": checks}


def provider_report(
    runtime: ProviderRuntime,
    probe: Probe,
    routes: dict[str, Route],
    usable: dict[str, bool],
    options: HealthOptions,
) -> tuple[dict[str, Any], list[str]]:
    """One provider's detail and the warnings it raises (no key material, only counts)."""
    spec, name = runtime.spec, runtime.spec.name
    usable_now = provider_usable(runtime) and probe.reachable
    warnings: list[str] = []
    low, high = TEMPERATURE_BOUNDS[spec.kind]
    temperatures = dict(options.temperatures)
    for route in routes.values():
        if route.temperature is not None and any(t.provider is runtime for t in route.targets):
            temperatures[f"route {route.name!r} temperature"] = route.temperature
    for label, value in temperatures.items():
        if not low <= value <= high:
            warnings.append(f"{name}: {label} {value:g} is outside {spec.kind}'s {low:g}-{high:g}")
    models = []
    for model in spec.models:
        # an embedding model answers no text: LLM_MAX_TOKENS is not asked of it
        max_tokens_ok = model.kind != "chat" or options.max_tokens <= model.max_tokens
        if not max_tokens_ok:
            warnings.append(
                f"{name}/{model.name}: LLM_MAX_TOKENS {options.max_tokens} is above the "
                f"model's max_tokens {model.max_tokens} (answers are capped at it)"
            )
        referencing = {
            route.name: usable[route.name]
            for route in routes.values()
            if any(t.provider is runtime and t.model.name == model.name for t in route.targets)
        }
        models.append(
            {
                "name": model.name,
                "kind": model.kind,
                "max_tokens": model.max_tokens,
                "max_context_tokens": model.max_context_tokens,
                "max_tokens_ok": max_tokens_ok,
                "routes": referencing,
            }
        )
    secrets = [k.secret for k in runtime.keys.keys if k.secret is not None]
    key_format_ok = all(plausible_key(s) for s in secrets)
    if not key_format_ok:
        warnings.append(f"{name}: a key does not look like an API key (blank, short or spaces)")
    url = shown_url(spec.base_url)
    breaker = runtime.breaker
    if not probe.reachable:
        warnings.append(f"{name}: unreachable at {url} ({probe.error})")
    if breaker.state != "closed":
        last = f"; last: {breaker.last_failure}" if breaker.last_failure else ""
        warnings.append(f"{name}: circuit {breaker.state} after repeated failures{last}")
    if runtime.keys.healthy_count < len(runtime.keys.keys):
        what = "requests without a key were refused" if not secrets else "keys set aside"
        warnings.append(f"{name}: {what} (401/403); they are re-probed every KEY_REPROBE_SECONDS")
    detail: dict[str, Any] = {
        "kind": spec.kind,
        "base_url": url,
        "usable": usable_now,
        "reachable": probe.reachable,
        "probe_latency_ms": probe.latency_ms,
        **_state(runtime),
        "keyless": not secrets,
        "key_format_ok": key_format_ok,
        "temperature_ok": all(low <= v <= high for v in temperatures.values()),
        "max_tokens_ok": all(m["max_tokens_ok"] for m in models),
        "models": models,
    }
    if probe.error is not None:
        detail["probe_error"] = probe.error
    if breaker.last_failure_at is not None:  # the cause an open circuit would otherwise hide
        detail["last_failure"] = {
            "error": breaker.last_failure,
            "at": datetime.fromtimestamp(breaker.last_failure_at, UTC).isoformat(
                timespec="seconds"
            ),
        }
    return detail, warnings


async def health_report(
    router: LLMRouter,
    store: Store,
    options: HealthOptions,
    source: str,
    http: httpx.AsyncClient,
    probes: ProviderProbes,
) -> dict[str, Any]:
    """The operator's view: `healthy`, `degraded` (something is wrong but a route works) or
    `unhealthy` (the store is down or no route can answer), with the detail that says why."""
    probe_round, store_check = await asyncio.gather(
        probes.results(router, http),
        check_store(store, options.store_backend, options.store_timeout_seconds),
    )
    config = check_config(router, options.default_model, source)
    routes = addressable_routes(router)
    live = {
        name: provider_usable(runtime) and probe_round.results[name].reachable
        for name, runtime in router.providers.items()
    }
    usable = {
        name: any(live[t.provider.spec.name] for t in route.targets)
        for name, route in routes.items()
    }
    warnings = [
        f"the {name} upstream is SIMULATED: answers are not from a real service"
        for name in options.simulated
    ]
    if not store_check["ok"]:
        warnings.append(f"store unavailable: {store_check['error']}")
    warnings += [
        f"route {n!r}: no provider of its chain can answer now"
        for n, ok in usable.items()
        if not ok
    ]
    providers: dict[str, Any] = {}
    for name, runtime in router.providers.items():
        detail, found = provider_report(runtime, probe_round.results[name], routes, usable, options)
        providers[name], warnings = detail, warnings + found
    reached = {name for name, probe in probe_round.results.items() if probe.reachable}
    default_reachable = reaches_default_route(router, options.default_model, reached)
    return {
        "status": _status(store_check["ok"] and config["ok"], usable, providers),
        "version": __version__,
        "simulated": {name: True for name in options.simulated},
        "warnings": warnings,
        "store": store_check,
        "config_checks": config_checks(config, providers, default_reachable),
        "routes": {
            name: {
                "usable": usable[name],
                "chain": [f"{t.provider.spec.name}/{t.model.name}" for t in route.targets],
            }
            for name, route in routes.items()
        },
        "providers": providers,
        "probes": {"age_seconds": probes.age(probe_round), "cache_seconds": probes.cache_seconds},
        "startup": dict(options.startup),
    }


def _status(essentials_ok: bool, usable: dict[str, bool], providers: dict[str, Any]) -> str:
    if not essentials_ok or not any(usable.values()):
        return "unhealthy"
    flawless = all(usable.values()) and all(
        p["usable"]
        and p["circuit"] == "closed"
        and p["keys_healthy"] == p["keys_total"]
        and p["key_format_ok"]
        and p["temperature_ok"]
        and p["max_tokens_ok"]
        for p in providers.values()
    )
    return "healthy" if flawless else "degraded"


def _state(runtime: ProviderRuntime) -> dict[str, Any]:
    """Counts of real keys only (a keyless provider shows 0 of 0): never a key, nor its id."""
    keys = [k for k in runtime.keys.keys if k.secret is not None]
    return {
        "circuit": runtime.breaker.state,
        "keys_healthy": sum(k.healthy for k in keys),
        "keys_total": len(keys),
    }


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
