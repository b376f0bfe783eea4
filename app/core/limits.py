"""The `name=limit` form of the *_BY_TENANT settings, parsed where the settings are validated."""

from __future__ import annotations


def parse_limit_map(text: str) -> dict[str, int | None]:
    """`acme=8192, beta=none` -> {"acme": 8192, "beta": None}: the form for *_BY_TENANT/_BY_KEY."""
    limits: dict[str, int | None] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip().lower()
        if not sep or not name:
            raise ValueError(f"expected name=limit, got {part.strip()!r}")
        if value in ("none", "unlimited", ""):
            limits[name] = None
        elif value.isdigit():
            limits[name] = int(value)
        else:
            raise ValueError(f"limit for {name!r} must be a whole number of tokens or 'none'")
    return limits
