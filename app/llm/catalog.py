"""The provider file: providers, their keys and models, and routes from a logical model name to an
ordered chain of (provider, model). Validated as a whole so every problem is reported at once.

Keys are directives, never pasted into the file: `env:VAR` (read from the environment) or
`file:/run/secrets/x` (read from a mounted secret). A literal key is accepted only when the file
says `allow_literal_keys: true` (development).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.accounting.inbound_limits import LimitsSpec
from app.auth.clients import ClientKeySpec
from app.core.credentials import key_ids
from app.core.documents import DocumentInvalid, load_yaml
from app.llm.keys import KeyRotation

ProviderKind = Literal["openai", "anthropic"]
# What a model does: answer chats (/chat, /v1/chat/completions, the webhooks) or turn text into
# vectors (/v1/embeddings). A route serves one kind, and a call of the other kind is refused.
ModelKind = Literal["chat", "embedding"]

# An embedding model's longest input when the file does not say (OpenAI's embedding models).
EMBEDDING_CONTEXT_TOKENS = 8192

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """A model of a provider. An embedding model's `max_context_tokens` is its longest single
    input (EMBEDDING_CONTEXT_TOKENS unless given) and `price_per_1k_prompt` its input price: it
    answers no text, so it has no completion price, answer limit, structured outputs or parts
    beside text."""

    name: str = Field(min_length=1)
    kind: ModelKind = "chat"
    max_tokens: int = 4096
    max_context_tokens: int = 128_000
    price_per_1k_prompt: float = 0.0
    price_per_1k_completion: float = 0.0
    structured_outputs: bool | None = None  # None: the provider's setting
    # What the model takes beside text (a request that needs what no model of its route takes
    # is refused with a 400 naming them): image parts, input_audio parts, tool definitions.
    vision: bool = False
    audio: bool = False
    tools: bool = True

    def price(self, prompt_tokens: int, completion_tokens: int = 0) -> float:
        """What that many tokens cost at this model's prices: the one cost formula, used for
        the ledger's cost and for the reservation a call holds before it is answered."""
        return round(
            prompt_tokens / 1000 * self.price_per_1k_prompt
            + completion_tokens / 1000 * self.price_per_1k_completion,
            8,
        )

    @model_validator(mode="after")
    def _embedding_window(self) -> ModelSpec:
        if self.kind == "embedding" and "max_context_tokens" not in self.model_fields_set:
            self.max_context_tokens = EMBEDDING_CONTEXT_TOKENS
        return self


class OAuthSpec(_Strict):
    """OAuth2 client credentials (RFC 6749 4.4) instead of static keys: a token from `token_url`,
    cached, sent as `Authorization: Bearer`. `client_secret` is a key directive, as api_keys."""

    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: Any  # env:VAR or file:/path; checked like api_keys
    scope: str | list[str] | None = None  # a list is sent space-separated (RFC 6749 section 3.3)
    audience: str | None = None
    client_auth: Literal["basic", "body"] = "basic"  # HTTP Basic (the RFC's default) or the form
    refresh_margin_seconds: float = Field(default=60.0, ge=0)  # refresh before expires_in ends
    timeout_seconds: float = Field(default=10.0, gt=0)  # the token request's own limit


class ProviderSpec(_Strict):
    name: str = Field(min_length=1)
    kind: ProviderKind = "openai"
    base_url: str
    api_keys: list[Any] = Field(default_factory=list)  # directives; checked one by one
    oauth: OAuthSpec | None = None  # client credentials instead of api_keys
    timeout_seconds: float = 30.0
    rpm: int | None = None  # outgoing requests per minute
    tpm: int | None = None  # outgoing tokens per minute (estimated, settled to the usage)
    max_concurrent: int | None = None  # requests in flight at once
    auth_header: str | None = None
    # round_robin: every call the next usable key; on_failure: one key until it fails (app.llm.keys)
    key_rotation: KeyRotation = "round_robin"
    transport: Literal["http", "websocket"] = "http"  # how answers are streamed (OpenAI kind)
    ws_url: str | None = None  # websocket transport: default derived from base_url
    # Does the provider take OpenAI's `response_format: {"type": "json_schema", ...}`? None: the
    # kind's default (openai: yes; anthropic: no, the schema goes in the system instruction).
    structured_outputs: bool | None = None
    models: list[ModelSpec] = Field(min_length=1)

    def json_schema_models(self) -> frozenset[str]:
        """The models a caller's JSON Schema is sent to as the `json_schema` response format
        (each model's own `structured_outputs`, else the provider's, else the kind's default);
        the others get it in the system instruction."""
        default = self.structured_outputs
        if default is None:
            default = self.kind == "openai"
        return frozenset(
            m.name
            for m in self.models
            if m.kind == "chat"
            and (default if m.structured_outputs is None else m.structured_outputs)
        )


class RouteTarget(_Strict):
    provider: str
    model: str


class RouteSpec(_Strict):
    name: str = Field(min_length=1)
    chain: list[RouteTarget]
    max_tokens: int | None = None
    context_tokens: int | None = None
    temperature: float | None = None


class ProviderConfig(_Strict):
    providers: list[ProviderSpec]
    routes: list[RouteSpec] = Field(default_factory=list)
    allow_literal_keys: bool = False
    limits: LimitsSpec | None = None  # inbound limits per tenant and per key
    # per client key, by its id: a scope list replacing its CLIENT_API_KEYS one (app.auth.clients)
    client_keys: dict[str, ClientKeySpec] = Field(default_factory=dict)

    _key_ids = field_validator("client_keys", mode="before")(key_ids)

    def provider(self, name: str) -> ProviderSpec | None:
        return next((p for p in self.providers if p.name == name), None)

    def route(self, name: str) -> RouteSpec | None:
        return next((r for r in self.routes if r.name == name), None)


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ProviderConfigInvalid(Exception):
    def __init__(self, problems: list[Problem], source: str = "provider configuration") -> None:
        self.problems = problems
        lines = "\n  ".join(str(p) for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n  {lines}")


def resolve_key(directive: str, *, allow_literal: bool, env: Mapping[str, str]) -> str:
    """The key a directive points at; ValueError with a reason a person can act on."""
    kind, sep, rest = directive.partition(":")
    if sep and kind == "env":
        if not _ENV_NAME.fullmatch(rest):
            raise ValueError(f"malformed key directive {directive!r}: env: needs a variable name")
        value = env.get(rest, "").strip()
        if not value:
            raise ValueError(f"environment variable {rest} is not set")
        return value
    if sep and kind == "file":
        if not rest.startswith("/"):
            raise ValueError(f"malformed key directive {directive!r}: file: needs an absolute path")
        try:
            value = Path(rest).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"key file {rest} cannot be read ({exc.strerror})") from None
        if not value:
            raise ValueError(f"key file {rest} is empty")
        return value
    if sep and kind == "literal":
        if not allow_literal:
            raise ValueError("literal keys are not allowed (set allow_literal_keys: true for dev)")
        if not rest:
            raise ValueError("malformed key directive 'literal:': no key after it")
        return rest
    raise ValueError(
        "malformed key directive: use env:VAR or file:/path (a bare key is never accepted)"
    )


# How validation resolves a provider's key directive: (provider, directive, allow_literal_keys) ->
# the key, or ValueError with the reason. The provider file's is resolve_key over the
# environment; a configuration sent through the API gets a stricter one (app.llm.directives).
KeyResolver = Callable[["ProviderSpec", str, bool], str]


def env_resolver(env: Mapping[str, str]) -> KeyResolver:
    def resolve(_provider: ProviderSpec, directive: str, allow_literal: bool) -> str:
        return resolve_key(directive, allow_literal=allow_literal, env=env)

    return resolve


def _not_a_directive(value: object) -> str:
    if isinstance(value, dict):
        return 'not a key directive: YAML read it as a mapping (quote it, e.g. "env:VAR")'
    return f"not a key directive: expected a string like env:VAR, got {type(value).__name__}"


def _directive_problem(
    provider: ProviderSpec, directive: object, allow_literal: bool, resolver: KeyResolver
) -> str:
    """Why a key directive cannot be used ("" when it can)."""
    if not isinstance(directive, str):
        return _not_a_directive(directive)
    try:
        resolver(provider, directive, allow_literal)
    except ValueError as error:
        return str(error)
    return ""


def _oauth_problems(
    at: str, provider: ProviderSpec, oauth: OAuthSpec, literal: bool, resolver: KeyResolver
) -> list[Problem]:
    problems: list[Problem] = []
    if provider.api_keys:
        problems.append(Problem(f"{at}.oauth", "use api_keys or oauth, not both"))
    if provider.auth_header is not None and provider.auth_header.lower() != "authorization":
        problems.append(Problem(f"{at}.auth_header", "oauth sends Authorization: Bearer <token>"))
    if not oauth.token_url.startswith(("http://", "https://")):
        problems.append(Problem(f"{at}.oauth.token_url", "must be an http:// or https:// URL"))
    if reason := _directive_problem(provider, oauth.client_secret, literal, resolver):
        problems.append(Problem(f"{at}.oauth.client_secret", reason))
    return problems


def _anthropic_structured_outputs(at: str, provider: ProviderSpec) -> list[Problem]:
    """`structured_outputs: true` means OpenAI's `json_schema` response format, which the
    Messages API does not have: said, rather than silently sending the schema another way."""
    because = (
        "the anthropic kind has no response_format: a caller's schema goes in its system "
        "instruction (leave structured_outputs unset)"
    )
    found = [Problem(f"{at}.structured_outputs", because)] if provider.structured_outputs else []
    for m, model in enumerate(provider.models):
        if model.structured_outputs:
            found.append(Problem(f"{at}.models[{m}].structured_outputs", because))
    return found


def _embedding_model_problems(at: str, provider: ProviderSpec, model: ModelSpec) -> list[Problem]:
    """An embedding model is called on OpenAI's `POST /v1/embeddings` and answers no text."""
    found: list[Problem] = []
    if provider.kind == "anthropic":
        found.append(
            Problem(
                f"{at}.kind",
                "the anthropic kind has no embeddings endpoint: an embedding model needs an "
                "openai-kind provider",
            )
        )
    no_text = "an embedding model answers no text"
    if model.price_per_1k_completion:
        found.append(
            Problem(
                f"{at}.price_per_1k_completion",
                f"{no_text}: its input tokens are priced by price_per_1k_prompt",
            )
        )
    if "max_tokens" in model.model_fields_set:
        found.append(
            Problem(f"{at}.max_tokens", f"{no_text}; max_context_tokens is its longest input")
        )
    if model.structured_outputs is not None:
        found.append(Problem(f"{at}.structured_outputs", f"{no_text}: leave it unset"))
    for part in ("vision", "audio", "tools"):
        if part in model.model_fields_set:
            found.append(
                Problem(f"{at}.{part}", "/v1/embeddings takes text (or token ids): leave it unset")
            )
    return found


def _embedding_route_problems(at: str, route: RouteSpec) -> list[Problem]:
    return [
        Problem(f"{at}.{name}", "a route of embedding models answers no text: leave it unset")
        for name in ("max_tokens", "temperature")
        if getattr(route, name) is not None
    ]


def _a(kind: str) -> str:
    return "an embedding" if kind == "embedding" else "a chat"


def _duplicates(names: list[str]) -> set[str]:
    return {name for name in names if names.count(name) > 1}


def _semantic_problems(
    config: ProviderConfig,
    resolver: KeyResolver,
    malformed: frozenset[str] | set[str] = frozenset(),
    positions: tuple[list[int], list[int]] | None = None,
) -> list[Problem]:
    """Problems a schema cannot see. `positions` maps kept entries back to their file index
    when malformed entries were left out."""
    provider_at, route_at = positions or (
        list(range(len(config.providers))),
        list(range(len(config.routes))),
    )
    problems: list[Problem] = []
    for name in sorted(_duplicates([p.name for p in config.providers])):
        problems.append(Problem("providers", f"duplicate provider name {name!r}"))
    for name in sorted(_duplicates([r.name for r in config.routes])):
        problems.append(Problem("routes", f"duplicate route name {name!r}"))
    for i, provider in zip(provider_at, config.providers, strict=True):
        at = f"providers[{i}]"
        if not provider.base_url.startswith(("http://", "https://")):
            problems.append(Problem(f"{at}.base_url", "must be an http:// or https:// URL"))
        if provider.transport == "websocket" and provider.kind != "openai":
            problems.append(
                Problem(f"{at}.transport", "the websocket transport is for the openai kind")
            )
        if provider.ws_url is not None and not provider.ws_url.startswith(("ws://", "wss://")):
            problems.append(Problem(f"{at}.ws_url", "must be a ws:// or wss:// URL"))
        if provider.kind == "anthropic":
            problems += _anthropic_structured_outputs(at, provider)
        for limit in ("rpm", "tpm", "max_concurrent"):
            if (value := getattr(provider, limit)) is not None and value <= 0:
                problems.append(Problem(f"{at}.{limit}", f"must be above 0 (got {value})"))
        if provider.timeout_seconds <= 0:
            problems.append(Problem(f"{at}.timeout_seconds", "must be above 0"))
        for k, directive in enumerate(provider.api_keys):
            if reason := _directive_problem(
                provider, directive, config.allow_literal_keys, resolver
            ):
                problems.append(Problem(f"{at}.api_keys[{k}]", reason))
        if (oauth := provider.oauth) is not None:
            problems += _oauth_problems(at, provider, oauth, config.allow_literal_keys, resolver)
        for name in sorted(_duplicates([m.name for m in provider.models])):
            problems.append(Problem(f"{at}.models", f"duplicate model name {name!r}"))
        for m, model in enumerate(provider.models):
            if model.max_tokens <= 0 or model.max_context_tokens <= 0:
                problems.append(Problem(f"{at}.models[{m}]", "token limits must be above 0"))
            elif model.kind == "chat" and model.max_tokens > model.max_context_tokens:
                problems.append(
                    Problem(f"{at}.models[{m}].max_tokens", "is above max_context_tokens")
                )
            if model.price_per_1k_prompt < 0 or model.price_per_1k_completion < 0:
                problems.append(Problem(f"{at}.models[{m}]", "prices cannot be negative"))
            if model.audio and provider.kind == "anthropic":
                problems.append(
                    Problem(f"{at}.models[{m}].audio", "Anthropic's Messages API takes no audio")
                )
            if model.kind == "embedding":
                problems += _embedding_model_problems(f"{at}.models[{m}]", provider, model)
    for r, route in zip(route_at, config.routes, strict=True):
        at = f"routes[{r}]"
        if not route.chain:
            problems.append(Problem(f"{at}.chain", "needs at least one (provider, model)"))
        if route.temperature is not None and not 0 <= route.temperature <= 2:
            problems.append(Problem(f"{at}.temperature", "must be between 0 and 2"))
        first: tuple[str, ModelSpec] | None = None  # the chain's first model: the route's kind
        for t, target in enumerate(route.chain):
            where = f"{at}.chain[{t}]"
            provider_spec = config.provider(target.provider)
            if provider_spec is None and target.provider in malformed:
                continue  # its own problems are already listed
            if provider_spec is None:
                problems.append(
                    Problem(f"{where}.provider", f"unknown provider {target.provider!r}")
                )
                continue
            target_model = next((m for m in provider_spec.models if m.name == target.model), None)
            if target_model is None:
                problems.append(
                    Problem(
                        f"{where}.model",
                        f"provider {target.provider!r} has no model {target.model!r}",
                    )
                )
                continue
            model = target_model
            named = f"{target.provider}/{target.model}"
            if first is None:
                first = (named, model)
                if model.kind == "embedding":
                    problems += _embedding_route_problems(at, route)
            elif model.kind != first[1].kind:
                problems.append(
                    Problem(
                        f"{where}.model",
                        f"{named} is {_a(model.kind)} model but {first[0]} is {_a(first[1].kind)} "
                        "model: a route serves one kind",
                    )
                )
                continue
            # (an embedding route's max_tokens is a problem of its own: _embedding_route_problems)
            answer_limit = route.max_tokens if model.kind == "chat" else None
            if answer_limit is not None and answer_limit > model.max_tokens:
                problems.append(
                    Problem(
                        f"{at}.max_tokens",
                        f"{route.max_tokens} is above {target.provider}/{target.model}'s "
                        f"max_tokens {model.max_tokens}",
                    )
                )
            if route.context_tokens is not None and route.context_tokens > model.max_context_tokens:
                problems.append(
                    Problem(
                        f"{at}.context_tokens",
                        f"{route.context_tokens} is above {target.provider}/{target.model}'s "
                        f"context window {model.max_context_tokens}",
                    )
                )
    return problems


def validate_provider_config(
    raw: object, env: Mapping[str, str] | None = None, resolver: KeyResolver | None = None
) -> tuple[ProviderConfig | None, list[Problem]]:
    """The parsed configuration and every problem found (None if its shape is wrong).

    Providers and routes are checked one by one, so a malformed entry does not hide the
    problems of the others: an operator fixes the whole file in one round. `resolver` (default:
    the environment's) resolves each key directive.
    """
    resolver = resolver or env_resolver(os.environ if env is None else env)
    try:
        config = ProviderConfig.model_validate(raw)
    except ValidationError as error:
        shape_problems = [
            Problem(loc_path(e["loc"]) or "(root)", str(e["msg"]).removeprefix("Value error, "))
            for e in error.errors()
        ]
    else:
        return config, _semantic_problems(config, resolver)
    if not isinstance(raw, dict):
        return None, shape_problems
    providers: list[ProviderSpec] = []
    provider_at: list[int] = []  # each kept entry's index in the file, for the problem paths
    malformed: set[str] = set()  # named but malformed: routes to them are not "unknown"
    for i, entry in enumerate(_entries(raw, "providers")):
        try:
            providers.append(ProviderSpec.model_validate(entry))
            provider_at.append(i)
        except ValidationError:
            if isinstance(entry, dict) and "name" in entry:
                malformed.add(str(entry["name"]))
    routes: list[RouteSpec] = []
    route_at: list[int] = []
    for i, entry in enumerate(_entries(raw, "routes")):
        try:
            routes.append(RouteSpec.model_validate(entry))
            route_at.append(i)
        except ValidationError:
            continue
    partial = ProviderConfig.model_construct(
        providers=providers,
        routes=routes,
        allow_literal_keys=raw.get("allow_literal_keys") is True,
    )
    semantic = _semantic_problems(partial, resolver, malformed, (provider_at, route_at))
    return None, shape_problems + semantic


def _entries(raw: dict[str, Any], section: str) -> list[Any]:
    entries = raw.get(section)
    return entries if isinstance(entries, list) else []


def loc_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a path: `providers[0].api_keys[1]`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def parse_provider_text(text: str, source: str = "provider file") -> object:
    """YAML or JSON (JSON is YAML); a syntax error, or a shape no provider file has (nested
    past the stack, a cyclic alias, aliases expanding past a limit: app.core.documents),
    is one problem with where it is."""
    try:
        return load_yaml(text)
    except DocumentInvalid as error:
        raise ProviderConfigInvalid([Problem(error.where, error.message)], source) from None


def load_provider_file(path: Path, env: Mapping[str, str] | None = None) -> ProviderConfig:
    """Read and validate a provider file; ProviderConfigInvalid lists every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProviderConfigInvalid(
            [Problem(str(path), f"cannot be read ({exc.strerror})")]
        ) from None
    config, problems = validate_provider_config(parse_provider_text(text, str(path)), env)
    if problems or config is None:
        raise ProviderConfigInvalid(problems, str(path))
    return config


def canonical_json(config: ProviderConfig | Mapping[str, Any]) -> str:
    """Stable serialisation, hashed for the audit log."""
    data = config.model_dump(mode="json") if isinstance(config, ProviderConfig) else config
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
