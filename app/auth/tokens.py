"""OAuth2 client credentials (RFC 6749 4.4): configured clients, and the short-lived access
tokens issued to them.

A token is a JWT signed with HMAC-SHA256 (RFC 7519, `alg: HS256`) under a key every worker and
replica shares (ACCESS_TOKEN_SECRET, or one derived from BOT_STATE_SECRET): any of them verifies
any token without shared state or a store round trip. It names the client (`sub`), the client's
tenant and the scopes granted, and expires after ACCESS_TOKEN_TTL_SECONDS. A token is also held
to the configuration in service: a client that was removed, moved to another tenant, or lost a
scope no longer gets through with a token issued before, expired or not.

Secrets are held as SHA-256 digests only and compared in constant time, with no early exit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.auth.signatures import fingerprint
from app.core.credentials import OAuthClientEntry
from app.core.errors import AuthenticationFailed
from app.core.principal import Principal
from app.core.scopes import parse_scope_list

ISSUER = "cx-relay"
_HEADER = {"alg": "HS256", "typ": "JWT"}


class TokenRequestRefused(Exception):
    """A token request refused with an RFC 6749 5.2 error (`error`, `error_description`)."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True)
class OAuthClient:
    client_id: str
    secret_digest: bytes  # SHA-256 of the secret
    tenant: str
    scopes: frozenset[str]  # what it may be granted

    @classmethod
    def from_entry(cls, entry: OAuthClientEntry) -> OAuthClient:
        return cls(entry.client_id, bytes.fromhex(entry.secret_sha256), entry.tenant, entry.scopes)

    @property
    def key_id(self) -> str:
        """Its tokens' key id (limits, logs): one per client, never the secret's."""
        return fingerprint(f"oauth-client:{self.client_id}")


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int
    scopes: frozenset[str]

    def as_dict(self) -> dict[str, Any]:
        """The RFC 6749 5.1 answer."""
        return {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": " ".join(sorted(self.scopes)),
        }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def looks_like_token(presented: str) -> bool:
    """A JWT's shape (three base64url parts, a JSON header): worth verifying as a token."""
    return presented.count(".") == 2 and presented.startswith("eyJ")


class AccessTokens:
    def __init__(self, clients: Sequence[OAuthClient], key: bytes, ttl_seconds: int) -> None:
        self._clients = list(clients)
        self._by_id = {c.client_id: c for c in clients}
        self._key = key
        self._ttl = ttl_seconds

    @property
    def configured(self) -> bool:
        return bool(self._clients)

    def client(self, client_id: str, secret: str) -> OAuthClient:
        """The client these credentials are, or invalid_client (401)."""
        id_digest = hashlib.sha256(client_id.encode()).digest()
        secret_digest = hashlib.sha256(secret.encode()).digest()
        match: OAuthClient | None = None
        for candidate in self._clients:  # no early exit: timing tells nothing
            same_id = hmac.compare_digest(
                hashlib.sha256(candidate.client_id.encode()).digest(), id_digest
            )
            same_secret = hmac.compare_digest(candidate.secret_digest, secret_digest)
            if same_id and same_secret:
                match = candidate
        if match is None:
            raise TokenRequestRefused("invalid_client", "unknown client or wrong secret", 401)
        return match

    def issue(
        self, client: OAuthClient, requested: str | None, now: float | None = None
    ) -> IssuedToken:
        """A token for the requested scopes the client may have (all of them when none is
        requested, RFC 6749 3.3); invalid_scope when none of those requested is allowed."""
        if requested is None or not requested.strip():
            granted = client.scopes
        else:
            try:
                asked = parse_scope_list(requested)
            except ValueError as unknown:
                raise TokenRequestRefused("invalid_scope", str(unknown)) from None
            granted = asked & client.scopes
            if not granted:
                raise TokenRequestRefused(
                    "invalid_scope",
                    f"none of the requested scopes is allowed for this client (allowed: "
                    f"{' '.join(sorted(client.scopes))})",
                )
        issued_at = int(time.time() if now is None else now)
        claims = {
            "iss": ISSUER,
            "sub": client.client_id,
            "tenant": client.tenant,
            "scope": " ".join(sorted(granted)),
            "iat": issued_at,
            "exp": issued_at + self._ttl,
            "jti": secrets.token_urlsafe(12),
        }
        return IssuedToken(self._sign(claims), self._ttl, granted)

    def _sign(self, claims: dict[str, Any]) -> str:
        header = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(signature)}"

    def verify(self, token: str, now: float | None = None) -> Principal:
        """The token's Principal (role client, its client's tenant and the scopes granted), or
        AuthenticationFailed saying why not (never echoing the token)."""
        claims = self._claims(token)
        if float(claims.get("exp", 0)) <= (time.time() if now is None else now):
            raise AuthenticationFailed(
                "access token expired: request a new one from /api/v1/auth/token", "expired"
            )
        client = self._by_id.get(str(claims.get("sub")))
        scopes = frozenset(str(claims.get("scope", "")).split())
        if client is None or claims.get("tenant") != client.tenant or not scopes <= client.scopes:
            raise AuthenticationFailed(
                "access token no longer valid: its client, tenant or scopes changed"
            )
        return Principal(client.tenant, client.key_id, "client", "access_token", scopes)

    def _claims(self, token: str) -> dict[str, Any]:
        try:
            header_part, payload_part, signature_part = token.split(".")
            header = json.loads(_unb64(header_part))
            signature = _unb64(signature_part)
        except (ValueError, binascii.Error):
            raise AuthenticationFailed("malformed access token", "malformed") from None
        if not isinstance(header, dict) or header.get("alg") != "HS256":
            raise AuthenticationFailed("access token not signed with HS256", "malformed")
        expected = hmac.new(
            self._key, f"{header_part}.{payload_part}".encode(), hashlib.sha256
        ).digest()
        if not hmac.compare_digest(expected, signature):
            raise AuthenticationFailed("access token signature invalid")
        try:
            claims = json.loads(_unb64(payload_part))
        except (ValueError, binascii.Error):
            raise AuthenticationFailed("malformed access token", "malformed") from None
        if not isinstance(claims, dict) or claims.get("iss") != ISSUER:
            raise AuthenticationFailed("access token not issued here", "malformed")
        return claims
