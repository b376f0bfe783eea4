"""Creating, listing, rotating and revoking client keys: the steps /admin/keys and
`python -m app keys` share, each change audited like a provider change.

A key is `cxr_` and 43 characters of `secrets.token_urlsafe(32)` (256 bits). Only its SHA-256
digest is stored; the key is in the answer to create and rotate, and nowhere else, ever. A key's
id (8 hex digits, as CLIENT_API_KEYS' key ids) is what logs, budgets, the provider file's
`limits.keys` and `client_keys` name; it stays the same through a rotation.

Rotation has no grace period: the old key stops working when the new one is issued (on every
worker within the directory's refresh interval). To change keys without a moment of refusals,
create a second key for the tenant, move the clients, then revoke the first.

CLIENT_API_KEYS' keys are listed too (source `environment`) but are changed only there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from app.core.credentials import TENANT_NAME
from app.core.principal import Principal
from app.core.scopes import unknown_scopes
from app.keys.directory import iso
from app.store.audit import AuditAction, AuditLog
from app.store.base import StoreUnavailable
from app.store.client_keys import ClientKeyRegistry, StoredClientKey

KEY_PREFIX = "cxr_"
SHOWN_CHARS = len(KEY_PREFIX) + 4  # how much of a key a list shows (4 of its 43 random chars)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}")
MAX_SESSION_TOKENS = 100_000_000
_ATTEMPTS = 8  # a generated id or digest that is taken (ids are 32 bits): generate another

Source = Literal["api", "environment"]


class KeyRequestInvalid(ValueError):
    """The request names something that cannot be (answered 422 with this message)."""


class KeyNotFound(LookupError):
    """No key has this id (404)."""


class KeyConflict(Exception):
    """The change cannot be made to this key (409): a name taken, or a key from the
    environment."""


# --- what a request may ask for (the API's schemas and the CLI check the same) --------------------


def check_tenant(tenant: str) -> str:
    if not TENANT_NAME.fullmatch(tenant):
        raise KeyRequestInvalid(
            f"tenant {tenant!r} is not a tenant name: a letter or digit, then letters, digits, "
            "'.', '_' or '-', 64 characters at most"
        )
    return tenant


def check_name(name: str | None) -> str | None:
    if name is not None and not NAME.fullmatch(name):
        raise KeyRequestInvalid(
            f"name {name!r} is not a key name: a letter or digit, then letters, digits, spaces, "
            "'.', '_', '@' or '-', 64 characters at most"
        )
    return name


def check_scopes(scopes: Sequence[str] | None) -> list[str] | None:
    if scopes is None:
        return None
    if not scopes:
        raise KeyRequestInvalid(
            "an empty scope list would refuse the key on every scope-guarded route: list its "
            "scopes, or leave scopes out for a key allowed everywhere a client key is"
        )
    if problem := unknown_scopes(scopes):
        raise KeyRequestInvalid(problem)
    return sorted(set(scopes))


def check_session_tokens(tokens: int | None) -> int | None:
    if tokens is not None and not 1 <= tokens <= MAX_SESSION_TOKENS:
        raise KeyRequestInvalid(
            f"session_tokens must be between 1 and {MAX_SESSION_TOKENS} (or left out for the "
            "tenant's budget)"
        )
    return tokens


# --- what the service answers ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeyView:
    """A key as listed: never the key, never its full digest."""

    id: str
    source: Source
    tenant: str
    name: str | None
    scopes: list[str] | None
    session_tokens: int | None
    masked: str | None  # `cxr_AbCd…` (api keys; an environment key's text is not known here)
    created_at: str | None = None
    rotated_at: str | None = None
    last_used_at: str | None = None

    @classmethod
    def of(cls, key: StoredClientKey) -> KeyView:
        return cls(
            id=key.id,
            source="api",
            tenant=key.tenant,
            name=key.name,
            scopes=key.scopes,
            session_tokens=key.session_tokens,
            masked=f"{key.prefix}…",
            created_at=key.created_at,
            rotated_at=key.rotated_at,
            last_used_at=key.last_used_at,
        )


@dataclass(frozen=True)
class IssuedKey:
    """The answer to create and rotate: `key` is shown this once."""

    key: str
    view: KeyView


def _new_secret() -> tuple[str, str]:
    """(key, SHA-256 hex digest)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()


class ClientKeyService:
    def __init__(
        self,
        registry: ClientKeyRegistry,
        audit: AuditLog,
        environment: Sequence[Principal] = (),
        environment_session_tokens: Mapping[str, int | None] | None = None,
        changed: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.registry = registry
        # after each change: this worker's directory reloads at once (the others within their
        # refresh interval), so a revoke answered here is in force here before the answer
        self._changed = changed
        self._audit = audit
        self._environment = {p.key_id: p for p in environment}
        self._environment_tokens = dict(environment_session_tokens or {})

    async def create(
        self,
        *,
        tenant: str,
        actor: str,
        name: str | None = None,
        scopes: Sequence[str] | None = None,
        session_tokens: int | None = None,
    ) -> IssuedKey:
        started = time.perf_counter()
        tenant, name = check_tenant(tenant), check_name(name)
        listed, tokens = check_scopes(scopes), check_session_tokens(session_tokens)
        for _ in range(_ATTEMPTS):
            key_id = secrets.token_hex(4)
            if key_id in self._environment:
                continue
            secret, digest = _new_secret()
            record = StoredClientKey(
                id=key_id,
                digest=digest,
                prefix=secret[:SHOWN_CHARS],
                tenant=tenant,
                name=name,
                scopes=listed,
                session_tokens=tokens,
                created_at=iso(time.time()),
            )
            conflict = await self.registry.create(record)
            if conflict == "name":
                raise KeyConflict(
                    f"a key named {name!r} exists: choose another name, or rotate that key"
                )
            if conflict is None:
                await self._record("key_create", actor, record, started)
                return IssuedKey(secret, KeyView.of(record))
        raise StoreUnavailable("could not find a free key id; try again")

    async def list(self) -> list[KeyView]:
        """CLIENT_API_KEYS' keys first (as configured), then those created at run time, oldest
        first."""
        environment = [
            KeyView(
                id=p.key_id,
                source="environment",
                tenant=p.tenant,
                name=None,
                scopes=sorted(p.scopes) if p.scopes is not None else None,
                session_tokens=self._environment_tokens.get(p.key_id),
                masked=None,
            )
            for p in self._environment.values()
        ]
        return environment + [KeyView.of(key) for key in await self.registry.all()]

    async def rotate(self, key_id: str, *, actor: str) -> IssuedKey:
        started = time.perf_counter()
        self._refuse_environment(key_id, "rotated")
        secret, digest = _new_secret()
        record = await self.registry.rotate(key_id, digest, secret[:SHOWN_CHARS], iso(time.time()))
        if record is None:
            raise KeyNotFound(f"no client key has id {key_id!r} (GET /admin/keys lists them)")
        await self._record("key_rotate", actor, record, started)
        return IssuedKey(secret, KeyView.of(record))

    async def revoke(self, key_id: str, *, actor: str) -> KeyView:
        started = time.perf_counter()
        self._refuse_environment(key_id, "revoked")
        record = await self.registry.revoke(key_id)
        if record is None:
            raise KeyNotFound(f"no client key has id {key_id!r} (GET /admin/keys lists them)")
        await self._record("key_revoke", actor, record, started)
        return KeyView.of(record)

    def _refuse_environment(self, key_id: str, done: str) -> None:
        if key_id in self._environment:
            raise KeyConflict(
                f"key {key_id} comes from CLIENT_API_KEYS and cannot be {done} here: change "
                "CLIENT_API_KEYS and restart the service"
            )

    async def _record(
        self, action: AuditAction, actor: str, key: StoredClientKey, started: float
    ) -> None:
        """The change in the audit log: the key's id, tenant and settings (digested as the
        payload, for comparing); never the key or its digest. Then this worker's directory
        (if that read fails, its refresh task catches up: the change itself is made)."""
        described = {
            "id": key.id,
            "tenant": key.tenant,
            "name": key.name,
            "scopes": key.scopes,
            "session_tokens": key.session_tokens,
        }
        payload = json.dumps(described, sort_keys=True, separators=(",", ":"))
        detail = f"key {key.id} tenant {key.tenant}" + (f" name {key.name!r}" if key.name else "")
        await self._audit.append(
            actor=actor,
            action=action,
            payload_sha256=hashlib.sha256(payload.encode()).hexdigest(),
            result="ok",
            latency_ms=(time.perf_counter() - started) * 1000,
            detail=detail,
        )
        if self._changed is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._changed()
