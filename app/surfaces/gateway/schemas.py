"""The Cognigy LLM-gateway tutorial's provider registration, and how it maps to a provider-file
entry (docs/providers.md, "Providers, keys and routes"): what each of its fields means here, and the
values cx-relay cannot honour refused by name rather than dropped."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.llm.keys import KeyRotation

ProviderType = Literal["OPENAI", "AZURE_OPENAI", "ANTHROPIC"]
RotationStrategy = Literal["ROUND_ROBIN", "ROUND_ROBIN_ON_FAILURE"]

# The provider-file kind, and the base URL when the payload names none (Azure has no public one).
KINDS: dict[str, tuple[str, str | None]] = {
    "OPENAI": ("openai", "https://api.openai.com"),
    "AZURE_OPENAI": ("openai", None),
    "ANTHROPIC": ("anthropic", "https://api.anthropic.com"),
}
# What the key pool does for each strategy (app.llm.keys.KeyPool)
ROTATIONS: dict[str, KeyRotation] = {
    "ROUND_ROBIN": "round_robin",
    "ROUND_ROBIN_ON_FAILURE": "on_failure",
}
# A provider-file path of the entry, as the payload names that field (for problems' paths).
PAYLOAD_PATHS = (
    (".api_keys", "apiKeyRotation.keys"),
    (".key_rotation", "apiKeyRotation.rotationStrategy"),
    (".base_url", "baseUrl"),
    (".timeout_seconds", "timeoutMs"),
    (".models[0].name", "defaultModel"),
    (".models", "defaultModel"),
    (".kind", "type"),
    (".name", "name"),
)


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiKeyRotation(_Closed):
    enabled: bool = True
    # key directives: env:VAR or file:/path; literal:<key> only where the configuration in
    # service allows literal keys (allow_literal_keys). A bare key is refused, naming the index.
    keys: list[str] = Field(min_length=1, max_length=32)
    rotationStrategy: RotationStrategy = "ROUND_ROBIN"

    @model_validator(mode="after")
    def _one_key_without_rotation(self) -> ApiKeyRotation:
        if not self.enabled and len(self.keys) != 1:
            raise ValueError(
                "with rotation disabled (enabled: false) send exactly one key; to keep "
                "several, enable rotation"
            )
        return self


class ProviderRegistration(_Closed):
    """The tutorial's payload, plus `baseUrl` (cx-relay's: where the provider is; defaults to
    the type's public API, and Azure OpenAI needs it)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    type: ProviderType
    apiKeyRotation: ApiKeyRotation
    defaultModel: str = Field(min_length=1, max_length=200)
    timeoutMs: int = Field(30_000, gt=0, le=600_000)
    retryOnRateLimit: bool = True
    baseUrl: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _honourable(self) -> ProviderRegistration:
        if not self.retryOnRateLimit:
            raise ValueError(
                "retryOnRateLimit: false is not supported: a rate-limited key always cools "
                "down for its Retry-After and the call moves to the next key or route entry "
                "(send true, or leave it out)"
            )
        if self.baseUrl is None and KINDS[self.type][1] is None:
            raise ValueError(f"type {self.type} needs baseUrl (the resource's endpoint)")
        return self

    def provider_entry(self) -> dict[str, Any]:
        """The provider-file entry this registration stands for."""
        kind, default_url = KINDS[self.type]
        return {
            "name": self.name,
            "kind": kind,
            "base_url": self.baseUrl or default_url,
            "api_keys": list(self.apiKeyRotation.keys),
            "key_rotation": ROTATIONS[self.apiKeyRotation.rotationStrategy],
            "timeout_seconds": self.timeoutMs / 1000,
            "models": [{"name": self.defaultModel}],
        }


def payload_path(path: str, prefix: str) -> str:
    """A problem's provider-file path (`providers[3].api_keys[1]`) as the payload's
    (`apiKeyRotation.keys[1]`) when it is about the registered entry (`prefix`)."""
    if path == prefix:
        return "(provider)"
    if not path.startswith(prefix):
        return path
    rest = path.removeprefix(prefix)
    for field, named in PAYLOAD_PATHS:
        if rest.startswith(field):
            return named + rest.removeprefix(field)
    return rest.lstrip(".")


class KeyOut(BaseModel):
    key_id: str  # fingerprint (first 8 hex of SHA-256), as in the logs
    source: str  # `env:NAME`, `file:/path` or `literal:***`: where the key lives


class RegisteredProvider(BaseModel):
    """201: the provider serves from now on; its keys named, never shown."""

    name: str
    type: ProviderType
    defaultModel: str
    baseUrl: str
    timeoutMs: int
    rotationStrategy: RotationStrategy
    retryOnRateLimit: bool
    status: Literal["active"] = "active"
    sha256: str  # of the configuration now in service (GET /admin/providers, the audit log)
    unhealthyKeys: list[KeyOut] = []  # failed the health check: set aside


class GatewayHealth(BaseModel):
    status: Literal["ok"] = "ok"
    tenant: str
    key_id: str
    role: str
    scopes: list[str]
