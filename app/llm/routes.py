"""What a built router holds per provider and per route, and the factory of provider clients:
the parts the router walks, and that health checks and metering read.

A provider with `oauth` in the provider file gets its wire client wrapped in OAuthProviderClient,
which puts an OAuth2 access token where a static key would go; the router, the health probes and
the provisioning health check see an ordinary ProviderClient (a keyless one, to the key pool).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import httpx

from app.core.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.llm.catalog import ModelKind, ModelSpec, OAuthSpec, ProviderSpec, resolve_key
from app.llm.circuit import CircuitBreaker
from app.llm.embeddings import EmbeddingRequest, EmbeddingResult, embedding_client
from app.llm.keys import KeyPool
from app.llm.openai_provider import OpenAICompatibleProvider
from app.llm.ratelimit import ProviderLimiter
from app.llm.streaming import close_stream
from app.llm.types import (
    ChatRequest,
    ChatResult,
    ProviderClient,
    StreamChunk,
    StreamingProviderClient,
)
from app.upstream.oauth import TokenCache, client_credentials

log = logging.getLogger("cxrelay.providers")

# Below this, a call (or its retry after a refused token) is not worth starting.
MIN_RETRY_SECONDS = 0.05

T = TypeVar("T")


@dataclass
class ProviderRuntime:
    spec: ProviderSpec
    client: ProviderClient
    keys: KeyPool
    breaker: CircuitBreaker
    limiter: ProviderLimiter


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
    def kind(self) -> ModelKind:
        """Chat or embedding: every entry of a chain is of one kind (the provider file's rule)."""
        return self.targets[0].model.kind

    @property
    def context_window(self) -> int:
        """The prompt + answer limit every target of the chain takes (so a fallback fits too)."""
        windows = [t.model.max_context_tokens for t in self.targets]
        if self.context_tokens is not None:
            windows.append(self.context_tokens)
        return min(windows)


def build_client(
    spec: ProviderSpec, env: Mapping[str, str] | None = None
) -> StreamingProviderClient:
    """The provider's wire client; with `oauth`, wrapped so that every call carries a token
    (`env` resolves the client secret directive; the process environment by default)."""
    auth_header = "Authorization" if spec.oauth is not None else spec.auth_header
    client: StreamingProviderClient
    if spec.kind == "anthropic":
        from app.llm.anthropic_provider import AnthropicProvider

        client = AnthropicProvider(spec.name, spec.base_url, auth_header)
    elif spec.transport == "websocket":
        from app.llm.websocket_provider import OpenAIWebSocketProvider

        client = OpenAIWebSocketProvider(
            spec.name, spec.base_url, auth_header, spec.ws_url, spec.json_schema_models()
        )
    else:
        client = OpenAICompatibleProvider(
            spec.name, spec.base_url, auth_header, spec.json_schema_models()
        )
    if spec.oauth is None:
        return client
    secret = resolve_key(
        str(spec.oauth.client_secret), allow_literal=True, env=os.environ if env is None else env
    )  # validated (literal only where the file allows it) before any client is built
    return OAuthProviderClient(client, spec.oauth, secret)


class OAuthProviderClient:
    """A provider whose credential is an OAuth2 access token (client credentials grant).

    One token per provider, shared by every call and refreshed by one of them (TokenCache:
    single-flight, `refresh_margin_seconds` before `expires_in` runs out); it goes where a key
    would (`Authorization: Bearer`) on JSON, SSE and WebSocket calls alike. A 401 drops it and
    the call is tried once more with a fresh one, as the CXone client does. A token endpoint
    failure is this provider's failure, typed (a refused client → 401, as a refused key; down →
    UpstreamUnavailable/UpstreamTimeout), so the router falls back; its message names neither
    the secret nor the token.

    The token cache is built on first use with the client the caller passes: the app's shared
    httpx client, the one every call of the router gets.
    """

    def __init__(self, inner: StreamingProviderClient, oauth: OAuthSpec, secret: str) -> None:
        self.name, self.kind, self.inner = inner.name, inner.kind, inner
        if (models_url := getattr(inner, "models_url", None)) is not None:
            self.models_url: str = models_url  # what the provisioning health check names
        scope = " ".join(oauth.scope) if isinstance(oauth.scope, list) else oauth.scope
        self._request = client_credentials(
            oauth.token_url,
            oauth.client_id,
            secret,
            scope=scope,
            audience=oauth.audience,
            secret_in_body=oauth.client_auth == "body",
        )
        self._margin, self._timeout = oauth.refresh_margin_seconds, oauth.timeout_seconds
        self._tokens: TokenCache | None = None
        self._http: httpx.AsyncClient | None = None

    def _cache(self, http: httpx.AsyncClient) -> TokenCache:
        if self._tokens is None or self._http is not http:
            self._http = http
            self._tokens = TokenCache(
                http,
                self._request,
                margin_seconds=self._margin,
                timeout_seconds=self._timeout,
                upstream=self.name,
            )
        return self._tokens

    async def token(self, http: httpx.AsyncClient, timeout: float) -> str:
        """The current token (fetched if needed), within `timeout`; typed errors otherwise."""
        try:
            return await asyncio.wait_for(self._cache(http).get(), timeout)
        except (TimeoutError, UpstreamError) as error:
            failure = self._token_failure(error, timeout)
        log.warning(
            "OAuth token request failed: %s",
            failure,
            extra={"provider": self.name, "status": failure.status},
        )
        raise failure

    def _token_failure(self, error: Exception, timeout: float) -> UpstreamError:
        """The provider's error for a token that did not come (the message names the endpoint's
        answer, never the credentials)."""
        if isinstance(error, UpstreamRejected):  # the client credentials: refused like a key
            return UpstreamRejected(
                f"{self.name}: the token endpoint refused the client credentials ({error.status})",
                upstream=self.name,
                status=401,
            )
        if isinstance(error, (UpstreamTimeout, UpstreamUnavailable, UpstreamProtocolError)):
            return type(error)(f"{self.name}: {error}", upstream=self.name, status=error.status)
        if isinstance(error, UpstreamError):
            return UpstreamUnavailable(f"{self.name}: {error}", upstream=self.name)
        return UpstreamTimeout(
            f"{self.name}: the token endpoint did not answer within {timeout:.2f}s",
            upstream=self.name,
        )

    def _refused(self, error: UpstreamRejected, token: str) -> bool:
        """A 401 means the token (expired early, revoked): drop it so the next call refreshes."""
        if error.status != 401:
            return False
        if self._tokens is not None:
            self._tokens.invalidate(token)
        return True

    async def complete(
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float, api_key: str | None
    ) -> ChatResult:
        """`api_key` is unused: the token is the credential. `timeout` bounds the whole call,
        the token request and the one retry included."""
        return await self._with_token(
            http, timeout, lambda token, left: self.inner.complete(http, request, left, token)
        )

    async def embed(
        self,
        http: httpx.AsyncClient,
        request: EmbeddingRequest,
        timeout: float,
        api_key: str | None,
    ) -> EmbeddingResult:
        """As `complete`, for embeddings."""
        inner = embedding_client(self.inner)
        return await self._with_token(
            http, timeout, lambda token, left: inner.embed(http, request, left, token)
        )

    async def _with_token(
        self,
        http: httpx.AsyncClient,
        timeout: float,
        call: Callable[[str, float], Awaitable[T]],
    ) -> T:
        """`call(token, time_left)`, once more with a fresh token when the first is refused."""
        started = time.monotonic()
        token = await self.token(http, timeout)
        try:
            return await call(token, self._left(started, timeout))
        except UpstreamRejected as error:
            if not self._refused(error, token) or _left(started, timeout) < MIN_RETRY_SECONDS:
                raise
        token = await self.token(http, _left(started, timeout))
        try:
            return await call(token, self._left(started, timeout))
        except UpstreamRejected as error:
            self._refused(error, token)
            raise

    def _left(self, started: float, timeout: float) -> float:
        """What the call may still take after the token request; too little is a timeout."""
        left = _left(started, timeout)
        if left < MIN_RETRY_SECONDS:
            raise UpstreamTimeout(
                f"{self.name}: no time left for the call after the token request",
                upstream=self.name,
            )
        return left

    async def stream(
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float, api_key: str | None
    ) -> AsyncIterator[StreamChunk]:
        """As `complete`, streamed. A 401 before the first chunk is retried once with a fresh
        token; `timeout` bounds the token request and each read, as for the wire client."""
        token = await self.token(http, timeout)
        for attempt in (1, 2):
            passed_on = False
            chunks = self.inner.stream(http, request, timeout, token)
            try:
                async for chunk in chunks:
                    passed_on = True
                    yield chunk
                return
            except UpstreamRejected as error:
                if not self._refused(error, token) or passed_on or attempt == 2:
                    raise
            finally:
                await close_stream(chunks)  # also when our consumer stops early
            token = await self.token(http, timeout)

    async def probe(self, http: httpx.AsyncClient, api_key: str | None, timeout: float) -> bool:
        """Does a token come, and does the provider take it? (No model call is made.)"""
        started = time.monotonic()
        try:
            token = await self.token(http, timeout)
        except UpstreamError:
            return False
        return await self.inner.probe(http, token, max(_left(started, timeout), MIN_RETRY_SECONDS))


def _left(started: float, timeout: float) -> float:
    return max(0.0, timeout - (time.monotonic() - started))
