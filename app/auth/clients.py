"""Who is calling a client route: a client API key (`CLIENT_API_KEYS`: `key:tenant`, or
`key:tenant:tokens` to give the key its own per-session token budget, either followed by
`;scopes=a+b` to limit what it may do) or the admin token.
Keys are held only as SHA-256 digests and compared in constant time. The
`key:tenant[:tokens][;scopes=...]` syntax is read by app.core.credentials (settings validate it
too).

A key's scope list may also come from the configuration in service: the provider file's
`client_keys: {<key id>: {scopes: [...]}}` (ClientKeySpec). There, a key's list replaces the
setting's for that key, and a change applied through the provisioning API holds from the next
request on, without a restart. Only client keys: an access token's scopes are its client's
(OAUTH_CLIENTS), the admin token has none.

Keys created at run time (/admin/keys) come from `ManagedKeys` (app.keys.directory): a loaded
one is found without waiting; `verify` also asks the store for one this worker has not loaded
yet, so a key created through another worker works on the next request."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Annotated, Any, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

from app.auth.signatures import fingerprint
from app.auth.tokens import AccessTokens, looks_like_token
from app.core.credentials import parse_client_key
from app.core.errors import AuthenticationFailed
from app.core.principal import DEFAULT_TENANT, Principal
from app.core.scopes import scope_names, unknown_scopes


def _known(scope: str) -> str:
    if problem := unknown_scopes([scope]):
        raise ValueError(problem)
    return scope


class ClientKeySpec(BaseModel):
    """One client key's entry in the provider file's `client_keys`, named by the key's id.
    `scopes`: a list, or one string in the setting's form (`a+b` or `a b`); it replaces the
    key's CLIENT_API_KEYS list. Never empty: a key refused on every guarded route is revoked by
    taking it out of CLIENT_API_KEYS."""

    model_config = ConfigDict(extra="forbid")

    scopes: list[Annotated[str, AfterValidator(_known)]]

    @field_validator("scopes", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        """The setting's string form split; an empty list named as such (not as a length)."""
        names = scope_names(value) if isinstance(value, str) else value
        if names == []:
            raise ValueError(
                "an empty scope list would refuse the key on every scope-guarded route: list "
                "its scopes, or leave the key out of client_keys to keep CLIENT_API_KEYS' list"
            )
        return names


# The configuration in service's client_keys, read once per authentication.
KeySettings = Callable[[], Mapping[str, ClientKeySpec]]


def _no_key_settings() -> Mapping[str, ClientKeySpec]:
    return {}


class ManagedKeys(Protocol):
    """The client keys created at run time, looked up by the SHA-256 digest of the key."""

    def find(self, digest: bytes) -> Principal | None:
        """Among the keys this worker has loaded (no waiting)."""

    async def fetch(self, digest: bytes) -> Principal | None:
        """In the store: a key created since this worker last loaded them."""


class ClientAuthenticator:
    def __init__(
        self,
        client_keys: Sequence[str],
        admin_token: str | None,
        tokens: AccessTokens | None = None,
        key_settings: KeySettings = _no_key_settings,
        managed: ManagedKeys | None = None,
    ) -> None:
        self.tokens = tokens  # access tokens (POST /api/v1/auth/token), accepted like a key
        self.managed = managed  # keys created at run time
        self._key_settings = key_settings  # read per request: a change applies at once
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
    def environment_keys(self) -> list[Principal]:
        """CLIENT_API_KEYS' keys as callers (id, tenant, scopes; never the key), for listing
        beside the keys created at run time."""
        return [principal for _, principal in self._clients]

    @property
    def credentials(self) -> dict[str, int]:
        """How many of each credential the client routes accept (counts only, for the start-up
        summary): none at all, and every client route answers 401."""
        return {
            "client_keys": len(self._clients),
            "oauth_clients": self.tokens.client_count if self.tokens is not None else 0,
            "admin_token": int(self._admin is not None),
        }

    async def verify(self, headers: Mapping[str, str]) -> Principal:
        """`authenticate`, and then a key created at run time that this worker has not loaded
        yet (one store look-up; an unknown key's digest is remembered, app.keys.directory)."""
        try:
            return self.authenticate(headers)
        except AuthenticationFailed as failure:
            presented = _presented(headers)
            if failure.reason != "invalid" or self.managed is None or presented is None:
                raise
            match = await self.managed.fetch(hashlib.sha256(presented.encode()).digest())
            if match is None:
                raise
            return self._with_key_settings(match)

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """Without waiting: CLIENT_API_KEYS, the admin token, an access token, or a key created
        at run time that this worker has loaded."""
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
        if match is None and self.managed is not None:
            match = self.managed.find(digest)
        if match is None and self.tokens is not None and looks_like_token(presented):
            return self.tokens.verify(presented)
        if match is None:
            raise AuthenticationFailed("unknown API key")
        return self._with_key_settings(match)

    def _with_key_settings(self, match: Principal) -> Principal:
        """The provider file's `client_keys` scopes for this key id, when it names it."""
        if match.role == "client" and (own := self._key_settings().get(match.key_id)) is not None:
            return replace(match, scopes=frozenset(own.scopes))
        return match


def _presented(headers: Mapping[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None
