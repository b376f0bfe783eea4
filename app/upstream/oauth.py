"""OAuth2 token caches: one token shared by every request, refreshed by exactly one of them.

Many concurrent turns that find the token missing or near expiry wait on one refresh instead
of each asking the token endpoint (which would be rate-limited and slow the turns down).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import KW_ONLY, dataclass, field

import httpx

from app.core.errors import (
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)


@dataclass(frozen=True)
class AccessToken:
    value: str
    expires_at: float  # time.monotonic() seconds


@dataclass(frozen=True)
class TokenRequest:
    """What to POST to a token endpoint: form fields and optional HTTP Basic client credentials."""

    url: str
    form: dict[str, str]
    basic_auth: tuple[str, str] | None = None


def client_credentials(
    url: str,
    client_id: str,
    client_secret: str,
    *,
    scope: str | None = None,
    audience: str | None = None,
    secret_in_body: bool = False,
) -> TokenRequest:
    """The client-credentials grant (RFC 6749 section 4.4): the client authenticates with HTTP
    Basic (the RFC's default, section 2.3.1) or, for servers that ask for it, with
    `client_id`/`client_secret` form fields. `audience` is the Auth0/Okta-style extension."""
    form = {"grant_type": "client_credentials"}
    if scope:
        form["scope"] = scope
    if audience:
        form["audience"] = audience
    if secret_in_body:
        return TokenRequest(url, {**form, "client_id": client_id, "client_secret": client_secret})
    return TokenRequest(url, form, (client_id, client_secret))


@dataclass(eq=False, repr=False)  # the token request holds the client secret
class TokenCache:
    """Caches one access token until `margin_seconds` before its `expires_in`."""

    http: httpx.AsyncClient
    request: TokenRequest
    _: KW_ONLY
    margin_seconds: float = 60.0
    timeout_seconds: float = 5.0
    upstream: str = "oauth"
    fetch_count: int = field(default=0, init=False)
    _token: AccessToken | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    def _fresh(self) -> AccessToken | None:
        token = self._token
        if token is not None and time.monotonic() < token.expires_at - self.margin_seconds:
            return token
        return None

    async def get(self) -> str:
        token = self._fresh()
        if token is not None:
            return token.value
        async with self._lock:
            token = self._fresh()  # another waiter may have refreshed it meanwhile
            if token is None:
                token = await self._fetch()
                self._token = token
            return token.value

    def invalidate(self, value: str) -> None:
        """Drop the token the upstream just refused, unless a newer one already replaced it."""
        if self._token is not None and self._token.value == value:
            self._token = None

    async def _fetch(self) -> AccessToken:
        self.fetch_count += 1
        try:
            response = await self.http.post(
                self.request.url,
                data=self.request.form,
                auth=self.request.basic_auth or httpx.USE_CLIENT_DEFAULT,
                timeout=self.timeout_seconds,
            )
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("token endpoint timed out", upstream=self.upstream) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"token endpoint unreachable: {type(exc).__name__}", upstream=self.upstream
            ) from exc
        if response.status_code in (400, 401, 403):
            raise UpstreamRejected(
                f"token endpoint refused the credentials ({response.status_code})",
                upstream=self.upstream,
                status=response.status_code,
            )
        if response.status_code != 200:
            raise UpstreamUnavailable(
                f"token endpoint answered {response.status_code}",
                upstream=self.upstream,
                status=response.status_code,
            )
        try:
            payload = response.json()
            value = str(payload["access_token"])
            expires_in = float(payload.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamProtocolError(
                "token endpoint answered without access_token", upstream=self.upstream
            ) from exc
        return AccessToken(value, time.monotonic() + expires_in)
