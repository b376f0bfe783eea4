"""What a built router holds per provider and per route, and the factory of provider clients:
the parts the router walks, and that health checks and metering read."""

from __future__ import annotations

from dataclasses import dataclass

from app.services.llm.catalog import ModelSpec, ProviderSpec
from app.services.llm.circuit import CircuitBreaker
from app.services.llm.keys import KeyPool
from app.services.llm.openai_compat import OpenAICompatibleProvider
from app.services.llm.ratelimit import RateLimiter, Unlimited
from app.services.llm.types import ProviderClient


@dataclass
class ProviderRuntime:
    spec: ProviderSpec
    client: ProviderClient
    keys: KeyPool
    breaker: CircuitBreaker
    limiter: RateLimiter | Unlimited


@dataclass(frozen=True)
class Target:
    provider: ProviderRuntime
    model: ModelSpec


@dataclass(frozen=True)
class Route:
    name: str
    targets: tuple[Target, ...]
    max_tokens: int | None = None
    temperature: float | None = None
    context_tokens: int | None = None

    @property
    def context_window(self) -> int:
        """The prompt + answer limit every target of the chain takes (so a fallback fits too)."""
        windows = [t.model.max_context_tokens for t in self.targets]
        if self.context_tokens is not None:
            windows.append(self.context_tokens)
        return min(windows)


def build_client(spec: ProviderSpec) -> ProviderClient:
    if spec.kind == "anthropic":
        from app.services.llm.anthropic import AnthropicProvider

        return AnthropicProvider(spec.name, spec.base_url, spec.auth_header)
    if spec.transport == "websocket":
        from app.services.llm.websocket import OpenAIWebSocketProvider

        return OpenAIWebSocketProvider(spec.name, spec.base_url, spec.auth_header, spec.ws_url)
    return OpenAICompatibleProvider(spec.name, spec.base_url, spec.auth_header)
