"""OAuth2 client credentials (RFC 6749 4.4): configured clients, and the short-lived access
tokens issued to them.

A token is a JWT signed with HMAC-SHA256 (RFC 7519, `alg: HS256`; PyJWT signs and checks it)
under a key every worker and replica shares (derived from ACCESS_TOKEN_SECRET, or from
BOT_STATE_SECRET): any of them verifies any token without shared state or a store round trip. It
names the client (`sub`), the client's tenant and the scopes granted, and expires after
ACCESS_TOKEN_TTL_SECONDS. A token is also held to the configuration in service: a client that
was removed, moved to another tenant, or lost a scope no longer gets through with a token issued
before, expired or not.

Secrets are held as SHA-256 digests only and compared in constant time, with no early exit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from app.auth.signatures import fingerprint
from app.core.credentials import OAuthClientEntry
from app.core.errors import AuthenticationFailed
from app.core.principal import Principal

ISSUER = "cx-relay"
ALGORITHM = "HS256"


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


def looks_like_token(presented: str) -> bool:
    """A JWT's shape (three base64url parts, a JSON header): worth verifying as a token."""
    return presented.count(".") == 2 and presented.startswith("eyJ")


class AccessTokens:
    def __init__(self, clients: Sequence[OAuthClient], secret: bytes, ttl_seconds: int) -> None:
        self._clients = list(clients)
        self._by_id = {c.client_id: c for c in clients}
        # the signing key: 32 bytes whatever the secret's length (HS256 wants at least that)
        self._key = hmac.new(secret, b"cx-relay access-token signing key", hashlib.sha256).digest()
        self._ttl = ttl_seconds

    @property
    def configured(self) -> bool:
        return bool(self._clients)

    @property
    def client_count(self) -> int:
        return len(self._clients)

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
        requested, RFC 6749 3.3; the answer's `scope` says which were granted); invalid_scope
        when none of those requested is allowed."""
        if requested is None or not requested.strip():
            granted = client.scopes
        else:
            granted = frozenset(requested.split()) & client.scopes
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
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify(self, token: str, now: float | None = None) -> Principal:
        """The token's Principal (role client, its client's tenant and the scopes granted), or
        AuthenticationFailed saying why not (never echoing the token)."""
        claims = self._claims(token, time.time() if now is None else now)
        client = self._by_id.get(str(claims.get("sub")))
        scopes = frozenset(str(claims.get("scope", "")).split())
        if client is None or claims.get("tenant") != client.tenant or not scopes <= client.scopes:
            raise AuthenticationFailed(
                "access token no longer valid: its client, tenant or scopes changed"
            )
        return Principal(client.tenant, client.key_id, "client", "access_token", scopes)

    def _claims(self, token: str, now: float) -> dict[str, Any]:
        """Signature, algorithm, issuer and expiry checked by PyJWT; each refusal named."""
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.DecodeError:
            raise AuthenticationFailed("malformed access token", "malformed") from None
        if algorithm != ALGORITHM:
            raise AuthenticationFailed("access token not signed with HS256", "malformed")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                # iat is not checked: a replica whose clock runs behind the issuer's would refuse
                options={"require": ["exp", "iss", "sub"], "verify_iat": False},
                # PyJWT reads the clock itself: `now` (tests) moves the expiry check by leeway
                leeway=time.time() - now,
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed(
                "access token expired: request a new one from /api/v1/auth/token", "expired"
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthenticationFailed("access token signature invalid") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationFailed("access token not issued here", "malformed") from None
        except jwt.MissingRequiredClaimError as error:
            raise AuthenticationFailed(
                f"access token without a {error.claim} claim", "malformed"
            ) from None
        except jwt.InvalidTokenError as error:  # a non-numeric exp, bad base64 or JSON ...
            raise AuthenticationFailed(f"malformed access token: {error}", "malformed") from None
        return claims
