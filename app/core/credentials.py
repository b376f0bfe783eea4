"""`value:tenant` credential entries, the one reading for every credential setting (client keys,
Cognigy secrets and API keys, CXone Authorization values). Here in core because the settings
validate them at start-up, and core imports nothing above itself."""

from __future__ import annotations

import re
from typing import NamedTuple

from app.core.principal import DEFAULT_TENANT
from app.core.scopes import split_scopes

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
