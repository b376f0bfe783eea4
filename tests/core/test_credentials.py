"""`value:tenant` credential entries: one reading for every credential setting."""

from __future__ import annotations

import base64
import hashlib

import pytest

from app.core.credentials import (
    parse_basic_credential,
    parse_client_key,
    parse_oauth_client,
    split_tenant,
)
from app.core.principal import DEFAULT_TENANT

WHSEC_GLOBEX = "whsec_" + base64.b64encode(b"globex-standard-webhooks-key-32b").decode()


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("secret:acme", ("secret", "acme")),
        ("secret", ("secret", DEFAULT_TENANT)),
        ("secret:", ("secret", DEFAULT_TENANT)),
        (f"{WHSEC_GLOBEX}:globex", (WHSEC_GLOBEX, "globex")),
        (WHSEC_GLOBEX, (WHSEC_GLOBEX, DEFAULT_TENANT)),
        ("Bearer abc:acme", ("Bearer abc", "acme")),
        ("Basic dXNlcjpwYXNz", ("Basic dXNlcjpwYXNz", DEFAULT_TENANT)),
        ("a:b:c", ("a:b", "c")),  # the LAST ':' splits
        ("a:b:default", ("a:b", DEFAULT_TENANT)),  # a value with a ':' of its own
        ("tok:en/+=", ("tok:en/+=", DEFAULT_TENANT)),  # not a tenant name: no split
        ("tok:two words", ("tok:two words", DEFAULT_TENANT)),
        (":acme", (":acme", DEFAULT_TENANT)),  # no value before the ':'
    ],
)
def test_value_tenant_splits_at_the_last_colon_before_a_tenant_name(
    entry: str, expected: tuple[str, str]
) -> None:
    assert split_tenant(entry) == expected


def test_client_keys_read_the_same_syntax() -> None:
    assert parse_client_key("ck:acme:500") == ("ck", "acme", 500, None)
    assert parse_client_key("ck:acme") == ("ck", "acme", None, None)
    assert parse_client_key("ck") == ("ck", DEFAULT_TENANT, None, None)
    assert parse_client_key("ck:a/b") == ("ck:a/b", DEFAULT_TENANT, None, None)


def test_oauth_client_entries_split_id_secret_and_tenant() -> None:
    entry = parse_oauth_client("app-1:se:cr:et:acme;scopes=llm.gateway:invoke")
    assert entry.client_id == "app-1" and entry.tenant == "acme"
    assert entry.secret_sha256 == hashlib.sha256(b"se:cr:et").hexdigest()  # ':' in a secret
    assert entry.scopes == frozenset({"llm.gateway:invoke"})
    digest = "AB" * 32
    assert parse_oauth_client(f"app-2:sha256:{digest}:acme;scopes=gateway:write").secret_sha256 == (
        digest.lower()
    )


@pytest.mark.parametrize(
    "entry",
    ["app:secret;scopes=llm.gateway:invoke", ":s:acme;scopes=llm.gateway:invoke", "app:s:acme"],
)
def test_an_oauth_client_needs_an_id_a_secret_a_tenant_and_scopes(entry: str) -> None:
    with pytest.raises(ValueError, match="OAUTH_CLIENTS"):
        parse_oauth_client(entry)


def test_basic_credentials_need_their_tenant() -> None:
    assert parse_basic_credential("flow:pa:ss:acme") == ("flow", "pa:ss", "acme")
    with pytest.raises(ValueError, match="username:password:tenant"):
        parse_basic_credential("flow:pass")
