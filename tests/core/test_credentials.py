"""`value:tenant` credential entries: one reading for every credential setting."""

from __future__ import annotations

import base64

import pytest

from app.core.credentials import parse_client_key, split_tenant
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
