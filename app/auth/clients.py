"""Who is calling a client route: a client API key (`CLIENT_API_KEYS`: `key:tenant`, or
`key:tenant:tokens` to give the key its own per-session token budget) or the admin token.
Keys are held only as SHA-256 digests and compared in constant time.

`split_tenant` is the one reading of `value:tenant` for every credential setting (client keys,
Cognigy secrets and API keys, CXone Authorization values)."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence

from app.auth.signatures import fingerprint
from app.core.errors import AuthenticationFailed
from app.core.principal import DEFAULT_TENANT, Principal

# What may follow a credential's last ':' as its tenant: a letter or digit, then letters, digits,
# '.', '_' or '-' (64 at most). Never '/', '+', '=' or a space, so the tail of a base64 value or a
# "Bearer <token>" is not taken for a tenant; a tenant is a metric label, so it stays this plain.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def split_tenant(entry: str) -> tuple[str, str]:
    """`value:tenant` → (value, tenant). The split is at the LAST ':', and only when what follows
    is a tenant name (or nothing: `value:` is the default tenant); otherwise the whole entry is
    the value, of the default tenant. So `whsec_<base64>:acme` and `Bearer abc:acme` name acme,
    `Basic dXNlcjpwYXNz` names none; a value that itself ends in `:<name>` must carry its tenant
    explicitly (`a:b:default`)."""
    value, sep, tenant = entry.rpartition(":")
    if sep and value and (not tenant or TENANT_NAME.fullmatch(tenant)):
        return value, tenant or DEFAULT_TENANT
    return entry, DEFAULT_TENANT


def parse_client_key(entry: str) -> tuple[str, str, int | None]:
    """`key:tenant[:tokens]` → (key, tenant, session tokens or None); a bare key belongs to the
    default tenant and the default session budget."""
    tokens: int | None = None
    head, sep, last = entry.rpartition(":")
    if sep and head and last.isdigit() and ":" in head:
        entry, tokens = head, int(last)
    key, tenant = split_tenant(entry)
    return key, tenant, tokens


class ClientAuthenticator:
    def __init__(self, client_keys: Sequence[str], admin_token: str | None) -> None:
        self._clients: list[tuple[bytes, Principal]] = []
        self.session_tokens_by_key: dict[str, int | None] = {}
        for entry in client_keys:
            key, tenant, tokens = parse_client_key(entry)
            principal = Principal(tenant, fingerprint(key), "client", "api_key")
            self._clients.append((hashlib.sha256(key.encode()).digest(), principal))
            if tokens is not None:
                self.session_tokens_by_key[principal.key_id] = tokens
        self._admin = (
            (hashlib.sha256(admin_token.encode()).digest(), fingerprint(admin_token))
            if admin_token
            else None
        )

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        presented = _presented(headers)
        if presented is None:
            raise AuthenticationFailed(
                "missing credential: send Authorization: Bearer <client API key> or X-API-Key",
                "missing",
            )
        digest = hashlib.sha256(presented.encode()).digest()
        match: Principal | None = None
        for expected, principal in self._clients:  # no early exit: timing tells nothing
            if hmac.compare_digest(expected, digest):
                match = principal
        if self._admin is not None and hmac.compare_digest(self._admin[0], digest):
            match = Principal(DEFAULT_TENANT, self._admin[1], "admin", "admin_token")
        if match is None:
            raise AuthenticationFailed("unknown API key")
        return match


def _presented(headers: Mapping[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None
