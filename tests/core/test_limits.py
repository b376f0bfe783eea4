"""The `name=limit` form of the *_BY_TENANT settings."""

from __future__ import annotations

import pytest

from app.core.limits import parse_limit_map


def test_parse_limit_map() -> None:
    assert parse_limit_map("acme=8192, beta=none,, gamma=0") == {
        "acme": 8192,
        "beta": None,
        "gamma": 0,
    }
    assert parse_limit_map("") == {}
    with pytest.raises(ValueError):
        parse_limit_map("acme")
    with pytest.raises(ValueError):
        parse_limit_map("acme=lots")
