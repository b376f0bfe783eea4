"""A gateway's payload (the provisioning tutorial's, seed 002) and what it becomes: the providers
and routes it adds to the provider configuration, every problem with its path in the payload,
and the provider matrix of GET /api/v2/providers.

One gateway becomes one provider per distinct endpoint URL (a provider has one base URL):
named after the gateway (`<name>-1`, `<name>-2`, ... when it has several), of the referenced
provider's kind, with its models' prices and abilities, `max_tokens` from the route,
`max_context_tokens` and `rpm` from the gateway, the longest `timeout_ms` as its timeout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.llm.catalog import Problem, ProviderConfig, ProviderSpec, loc_path
from app.llm.notifications import public_url
from app.llm.wire import v1_url

_RESOURCE = {"openai": "chat/completions", "anthropic": "messages"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRouteIn(_Strict):
    endpoint_url: str = Field(min_length=1)
    max_tokens: int = Field(gt=0)
    timeout_ms: int = Field(gt=0, le=600_000)


class GatewayIn(_Strict):
    """The tutorial's create payload."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    provider_id: str = Field(min_length=1)
    api_key_directive: str = Field(min_length=1)
    model_routing: dict[str, ModelRouteIn] = Field(min_length=1)
    max_context_tokens: int = Field(gt=0)
    rate_limit_rpm: int = Field(gt=0)


class GatewayInvalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


# --- the provider matrix (GET /api/v2/providers) ------------------------------------------------


def provider_matrix(config: ProviderConfig) -> list[dict[str, Any]]:
    """Each provider in service, its engine (kind) and its chat models with their limits."""
    return [
        {
            "id": spec.name,
            "name": spec.name,
            "engine": spec.kind,
            "rate_limit_per_minute": spec.rpm or 0,
            "models": [
                {
                    "model_id": model.name,
                    "endpoint_url": public_url(v1_url(spec.base_url, _RESOURCE[spec.kind])),
                    "max_tokens": model.max_tokens,
                    "max_context_tokens": model.max_context_tokens,
                }
                for model in spec.models
                if model.kind == "chat"
            ],
        }
        for spec in config.providers
    ]


# --- from the payload to providers and routes ---------------------------------------------------


@dataclass(frozen=True)
class Plan:
    providers: list[dict[str, Any]]
    routes: list[dict[str, Any]]
    first_model: dict[str, str]  # provider name -> its first model (where its problems point)

    @property
    def route_names(self) -> list[str]:
        return [str(r["name"]) for r in self.routes]


def _by_url(gateway: GatewayIn) -> dict[str, list[str]]:
    """The gateway's models by endpoint URL, in the payload's order: one provider each."""
    by_url: dict[str, list[str]] = {}
    for model, route in gateway.model_routing.items():
        by_url.setdefault(route.endpoint_url, []).append(model)
    return by_url


def _names(gateway: GatewayIn) -> tuple[list[str], list[str]]:
    """The names the gateway takes in the configuration: its providers' and its routes'."""
    count = len(_by_url(gateway))
    providers = (
        [gateway.name] if count == 1 else [f"{gateway.name}-{i}" for i in range(1, count + 1)]
    )
    return providers, [f"{gateway.name}/{model}" for model in gateway.model_routing]


def plan_providers(gateway: GatewayIn, reference: ProviderSpec) -> Plan:
    by_url = _by_url(gateway)
    names = _names(gateway)[0]
    models = {m.name: m for m in reference.models}
    providers: list[dict[str, Any]] = []
    routes: list[dict[str, Any]] = []
    first: dict[str, str] = {}
    for name, (url, served) in zip(names, by_url.items(), strict=True):
        entries = []
        for model in served:
            route = gateway.model_routing[model]
            entry = models[model].model_dump(mode="json", exclude_unset=True)
            entry |= {
                "name": model,
                "max_tokens": route.max_tokens,
                "max_context_tokens": gateway.max_context_tokens,
            }
            entries.append(entry)
            routes.append(
                {
                    "name": f"{gateway.name}/{model}",
                    "chain": [{"provider": name, "model": model}],
                    "context_tokens": gateway.max_context_tokens,
                }
            )
        provider: dict[str, Any] = {
            "name": name,
            "kind": reference.kind,
            "base_url": url,
            "api_keys": [gateway.api_key_directive],
            "timeout_seconds": max(gateway.model_routing[m].timeout_ms for m in served) / 1000,
            "rpm": gateway.rate_limit_rpm,
            "models": entries,
        }
        for inherited in ("auth_header", "structured_outputs"):
            if getattr(reference, inherited) is not None:
                provider[inherited] = getattr(reference, inherited)
        providers.append(provider)
        first[name] = served[0]
    return Plan(providers, routes, first)


def candidate_config(current: ProviderConfig, plan: Plan) -> dict[str, Any]:
    """The configuration in service as it was given, plus the gateway's providers and routes."""
    raw = current.model_dump(mode="json", exclude_unset=True)
    raw["providers"] = [*raw.get("providers", []), *plan.providers]
    raw["routes"] = [*raw.get("routes", []), *plan.routes]
    return raw


def semantic_problems(gateway: GatewayIn, current: ProviderConfig) -> list[Problem]:
    """What the payload asks that the configuration in service cannot give."""
    reference = current.provider(gateway.provider_id)
    if reference is None:
        known = ", ".join(p.name for p in current.providers)
        return [
            Problem(
                "provider_id",
                f"unknown provider {gateway.provider_id!r} (GET /api/v2/providers lists: {known})",
            )
        ]
    problems: list[Problem] = []
    if any(
        isinstance(d, str) and d.startswith("literal:")
        for p in current.providers
        for d in p.api_keys
    ):
        problems.append(
            Problem(
                "(service)",
                "the configuration in service holds literal keys (the LLM_GATEWAY_* provider); "
                "a gateway is added to it and the result is stored: serve a PROVIDERS_FILE with "
                "env:/file: key directives to add gateways",
            )
        )
    providers, routes = _names(gateway)
    taken = [n for n in providers if current.provider(n) is not None]
    taken += [n for n in routes if current.route(n) is not None]
    if taken:
        problems.append(Problem("name", f"already in the configuration: {', '.join(taken)}"))
    chat = {m.name: m for m in reference.models if m.kind == "chat"}
    wrong_kind = _RESOURCE["anthropic" if reference.kind == "openai" else "openai"]
    for model, route in gateway.model_routing.items():
        at = f"model_routing.{model}"
        spec = chat.get(model)
        if spec is None:
            problems.append(
                Problem(
                    at,
                    f"provider {reference.name!r} has no chat model {model!r} "
                    f"(it has: {', '.join(chat) or 'none'})",
                )
            )
            continue
        named = f"{reference.name}/{model}"
        if route.max_tokens > spec.max_tokens:
            problems.append(
                Problem(
                    f"{at}.max_tokens",
                    f"{route.max_tokens} is above {named}'s max_tokens {spec.max_tokens}",
                )
            )
        elif route.max_tokens > gateway.max_context_tokens:
            problems.append(
                Problem(
                    f"{at}.max_tokens",
                    f"{route.max_tokens} is above the gateway's max_context_tokens "
                    f"{gateway.max_context_tokens}",
                )
            )
        if gateway.max_context_tokens > spec.max_context_tokens and not any(
            p.path == "max_context_tokens" for p in problems
        ):  # once, for the first model whose window is too small
            problems.append(
                Problem(
                    "max_context_tokens",
                    f"{gateway.max_context_tokens} is above {named}'s context window "
                    f"{spec.max_context_tokens}",
                )
            )
        url = route.endpoint_url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            problems.append(Problem(f"{at}.endpoint_url", "must be an http:// or https:// URL"))
        elif url.endswith(f"/{wrong_kind}"):
            problems.append(
                Problem(
                    f"{at}.endpoint_url",
                    f"is a /{wrong_kind} endpoint, but {reference.name!r} speaks the "
                    f"{reference.kind} wire format (/{_RESOURCE[reference.kind]})",
                )
            )
    return problems


_PROVIDER_PATH = re.compile(r"providers\[(\d+)\](.*)")


def payload_problems(problems: list[Problem], plan: Plan, first_new: int) -> list[Problem]:
    """Problems of the composed configuration, pointed back at the payload where they come from
    (a refused directive is the payload's `api_key_directive`)."""
    mapped = []
    for problem in problems:
        match = _PROVIDER_PATH.fullmatch(problem.path)
        index = int(match[1]) - first_new if match else -1
        if match is None or not 0 <= index < len(plan.providers):
            mapped.append(Problem(f"(configuration in service) {problem.path}", problem.message))
            continue
        name = str(plan.providers[index]["name"])
        rest = match[2]
        if rest.startswith(".api_keys"):
            path = "api_key_directive"
        elif rest in ("", ".base_url"):
            path = f"model_routing.{plan.first_model[name]}.endpoint_url"
        else:
            path = f"(gateway provider {name}){rest}"
        mapped.append(Problem(path, problem.message))
    return mapped


def under(path: str, prefix: str) -> bool:
    """`model_routing.gpt-4.max_tokens` is under `model_routing.gpt-4`; `…gpt-4o` is not."""
    return path == prefix or path.startswith(f"{prefix}.")


def parse_gateway(raw: object) -> GatewayIn:
    try:
        return GatewayIn.model_validate(raw)
    except ValidationError as error:
        raise GatewayInvalid(
            [Problem(loc_path(e["loc"]) or "(root)", str(e["msg"])) for e in error.errors()]
        ) from None


def served_already(gateway: GatewayIn, current: ProviderConfig) -> list[str] | None:
    """The gateway's routes when `current` already serves it (each of its providers by name
    at its endpoint, each of its routes), else None."""
    providers, routes = _names(gateway)
    for name, url in zip(providers, _by_url(gateway), strict=True):
        spec = current.provider(name)
        if spec is None or spec.base_url.rstrip("/") != url.rstrip("/"):
            return None
    if any(current.route(route) is None for route in routes):
        return None
    return list(routes)
