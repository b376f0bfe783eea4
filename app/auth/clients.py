"""Who is calling a client route: a client API key (`CLIENT_API_KEYS`: `key:tenant`, or
`key:tenant:tokens` to give the key its own per-session token budget, either followed by
`;scopes=a+b` to limit what it may do) or the admin token.
Keys are held only as SHA-256 digests and compared in constant time. The
`key:tenant[:tokens][;scopes=...]` syntax is read by app.core.credentials (settings validate it
too)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

from app.auth.signatures import fingerprint
from app.auth.tokens import AccessTokens, looks_like_token
from app.core.credentials import parse_client_key
from app.core.errors import AuthenticationFailed
from app.core.principal import DEFAULT_TENANT, Principal


class ClientAuthenticator:
    def __init__(
        self,
        client_keys: Sequence[str],
        admin_token: str | None,
        tokens: AccessTokens | None = None,
    ) -> None:
        self.tokens = tokens  # access tokens (POST /api/v1/auth/token), accepted like a key
        self._clients: list[tuple[bytes, Principal]] = []
        self.session_tokens_by_key: dict[str, int | None] = {}
        for entry in client_keys:
            key, tenant, budget, scopes = parse_client_key(entry)
            principal = Principal(tenant, fingerprint(key), "client", "api_key", scopes)
            self._clients.append((hashlib.sha256(key.encode()).digest(), principal))
            if budget is not None:
                self.session_tokens_by_key[principal.key_id] = budget
        self._admin = (
            (hashlib.sha256(admin_token.encode()).digest(), fingerprint(admin_token))
            if admin_token
            else None
        )

    @property
    def credentials(self) -> dict[str, int]:
        """How many of each credential the client routes accept (counts only, for the start-up
        summary): none at all, and every client route answers 401."""
        return {
            "client_keys": len(self._clients),
            "oauth_clients": self.tokens.client_count if self.tokens is not None else 0,
            "admin_token": int(self._admin is not None),
        }

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        presented = _presented(headers)
        if presented is None:
            raise AuthenticationFailed(
                "missing credential: send Authorization: Bearer <client API key or access "
                "token> or X-API-Key",
                "missing",
            )
        digest = hashlib.sha256(presented.encode()).digest()
        match: Principal | None = None
        for expected, principal in self._clients:  # no early exit: timing tells nothing
            if hmac.compare_digest(expected, digest):
                match = principal
        if self._admin is not None and hmac.compare_digest(self._admin[0], digest):
            match = Principal(DEFAULT_TENANT, self._admin[1], "admin", "admin_token")
        if match is None and self.tokens is not None and looks_like_token(presented):
            return self.tokens.verify(presented)
        if match is None:
            raise AuthenticationFailed("unknown API key")
        return match


def _presented(headers: Mapping[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None
