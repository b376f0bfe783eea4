"""`value:tenant` credential entries, the one reading for every credential setting (client keys,
Cognigy secrets and API keys, CXone Authorization values). Here in core because the settings
validate them at start-up, and core imports nothing above itself."""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

from app.core.principal import DEFAULT_TENANT
from app.core.scopes import split_scopes

# What may follow a credential's last ':' as its tenant: a letter or digit, then letters, digits,
# '.', '_' or '-' (64 at most). Never '/', '+', '=' or a space, so the tail of a base64 value or a
# "Bearer <token>" is not taken for a tenant; a tenant is a metric label, so it stays this plain.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# How the provider file names a client key (its limits, its scopes): the key's id, the first 8 hex
# digits of its SHA-256 (the `key_id` of the logs), never the key itself.
KEY_ID = re.compile(r"[0-9a-f]{8}")


def key_ids(entries: object) -> object:
    """A provider-file mapping keyed by key id (`limits.keys`, `client_keys`), its names checked
    and lower-cased; ValueError naming a name that is not an id, so a misspelt or pasted key is
    named as such before its entry is read. Anything but a mapping is left to the schema."""
    if not isinstance(entries, dict):
        return entries
    for name in entries:
        if not isinstance(name, str):
            raise ValueError(f"{name!r} was read as a number: quote it (e.g. '{name}':)")
        if not KEY_ID.fullmatch(name.lower()):
            raise ValueError(
                f"{name!r} is not a key id: the first 8 hex digits of the key's SHA-256 "
                "(`printf %s KEY | sha256sum | cut -c1-8`), as key_id in the logs"
            )
    return {name.lower(): value for name, value in entries.items()}


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


class ClientKey(NamedTuple):
    key: str
    tenant: str
    tokens: int | None  # the key's own session budget, or None for the tenant's
    scopes: frozenset[str] | None  # None: no scope list, allowed everywhere a client key is


def parse_client_key(entry: str) -> ClientKey:
    """`key:tenant[:tokens][;scopes=a+b]` → ClientKey; a bare key belongs to the default tenant
    and the default session budget, and has no scope list. The scope list is split off first
    (at the last `;scopes=`: scopes contain ':'), then the rest as before. ValueError on an
    empty or unknown scope."""
    entry, scopes = split_scopes(entry)
    tokens: int | None = None
    head, sep, last = entry.rpartition(":")
    if sep and head and last.isdigit() and ":" in head:
        entry, tokens = head, int(last)
    key, tenant = split_tenant(entry)
    return ClientKey(key, tenant, tokens, scopes)


SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class OAuthClientEntry(NamedTuple):
    client_id: str
    secret_sha256: str  # hex digest: the secret itself is never kept
    tenant: str
    scopes: frozenset[str]


def _id_secret_tenant(head: str) -> tuple[str, str, str] | None:
    """`id:secret:tenant` → its parts, or None: the id ends at the FIRST ':', the tenant starts
    after the LAST, the secret is what lies between (it may hold ':')."""
    ident, _, rest = head.partition(":")
    secret, _, tenant = rest.rpartition(":")
    if not ident or not secret or not TENANT_NAME.fullmatch(tenant):
        return None
    return ident, secret, tenant


def parse_oauth_client(entry: str) -> OAuthClientEntry:
    """`client_id:secret:tenant;scopes=a+b` (OAUTH_CLIENTS) → OAuthClientEntry. The client id
    cannot hold ':' (HTTP Basic could not carry it); a secret written `sha256:<64 hex>` is taken
    as its digest, so the setting need not hold the secret. The tenant and the scope list are
    required: a token always has both. ValueError naming what is wrong (never the secret)."""
    head, scopes = split_scopes(entry, "OAUTH_CLIENTS")
    parts = _id_secret_tenant(head)
    if parts is None:
        raise ValueError(
            "an OAUTH_CLIENTS entry is `client_id:secret:tenant;scopes=scope+scope` (the "
            "secret may be `sha256:<hex digest>`)"
        )
    client_id, secret, tenant = parts
    if not scopes:
        raise ValueError(
            f"OAUTH_CLIENTS entry for client {client_id!r} has no `;scopes=`: list what its "
            "tokens may be granted"
        )
    kind, _, digest = secret.partition(":")
    if kind == "sha256" and SHA256_HEX.fullmatch(digest):
        secret_sha256 = digest.lower()
    else:
        secret_sha256 = hashlib.sha256(secret.encode()).hexdigest()
    return OAuthClientEntry(client_id, secret_sha256, tenant, scopes)


def parse_basic_credential(entry: str) -> tuple[str, str, str]:
    """`username:password:tenant` (COGNIGY_BASIC_AUTH) → its parts, read as OAUTH_CLIENTS'
    (the username cannot hold ':', RFC 7617; the password may). The tenant is required, as
    `user:pass` alone could not say whether `pass` is a password or a tenant."""
    parts = _id_secret_tenant(entry)
    if parts is None:
        raise ValueError("a COGNIGY_BASIC_AUTH entry is `username:password:tenant`")
    return parts
