"""Settings read under more than one name, and tutorial settings the service cannot honour.

A setting whose field declares `validation_alias=AliasChoices(own_name, *other_names)` is read
under each name (the integration tutorials' beside cx-relay's own, so their `.env` works).
pydantic-settings takes the first name it finds and says nothing about the others, so
`NamesChecked` looks at what the environment and `.env` hold under every name before the values
are read: two names of one setting holding different values, or a tutorial name holding a value
cx-relay would have to misread, stop start-up with a message naming the variable and what to set
instead (never the value of a secret).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource

from app.core.errors import ConfigError

# CXone's tenant ids are UUIDs (the access token's `tenantId` claim, what discovery takes).
_TENANT_ID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def _cxone_tenant(value: str) -> str | None:
    if _TENANT_ID.match(value.strip()):
        return None
    return (
        f"CXONE_TENANT={value.strip()!r} is a tenant name (the CXone tutorial builds an API host "
        "from it); cx-relay finds your tenant's API host through CXone's discovery, which takes "
        "the tenant id: set CXONE_TENANT_ID to that id (a UUID), or CXONE_API_BASE_URL to the "
        "API host (e.g. https://api-na1.niceincontact.com), or remove CXONE_TENANT (the access "
        "token's tenantId claim is used)"
    )


# A tutorial's name -> what is wrong with a value of it cx-relay cannot honour (None: fine).
UNHONOURED: dict[str, Callable[[str], str | None]] = {"cxone_tenant": _cxone_tenant}


def names_of(field: FieldInfo, field_name: str) -> tuple[str, ...]:
    """Every name a setting is read under, its own first (lower case, as the sources hold them)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return tuple(str(choice).lower() for choice in alias.choices if isinstance(choice, str))
    return (field_name,)


def other_names(settings_cls: type[BaseSettings]) -> dict[str, tuple[str, ...]]:
    """Setting -> the other names it is also read under, for the settings that have any."""
    found = {}
    for name, field in settings_cls.model_fields.items():
        names = names_of(field, name)
        if len(names) > 1:
            found[name] = tuple(n for n in names if n != name)
    return found


class NamesChecked(PydanticBaseSettingsSource):
    """Contributes no value: checks the names the environment and `.env` use (see the module).
    Placed before them in Settings.settings_customise_sources; init arguments are not checked
    (they are the code's, not an operator's)."""

    def __init__(
        self, settings_cls: type[BaseSettings], *sources: PydanticBaseSettingsSource
    ) -> None:
        super().__init__(settings_cls)
        self._sources = sources  # highest priority first, as pydantic-settings orders them

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        present: dict[str, str] = {}
        for source in reversed(self._sources):  # the environment overrides `.env`, as it does
            if isinstance(source, EnvSettingsSource):
                present.update({k: v for k, v in source.env_vars.items() if v and v.strip()})
        problems = [
            problem
            for name, field in self.settings_cls.model_fields.items()
            if (problem := _disagreeing(name, field, present))
        ]
        problems += [
            problem
            for name, check in UNHONOURED.items()
            if name in present and (problem := check(present[name]))
        ]
        if problems:
            raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))
        return {}


def _disagreeing(name: str, field: FieldInfo, present: dict[str, str]) -> str | None:
    names = [n for n in names_of(field, name) if n in present]
    values = {present[n].strip().rstrip("/") for n in names}
    if len(values) < 2:
        return None
    shown = " and ".join(n.upper() for n in names)
    secret = "SecretStr" in str(field.annotation) or isinstance(field.default, SecretStr)
    detail = "" if secret else " (" + " and ".join(present[n].strip() for n in names) + ")"
    return (
        f"{shown} are both set, to different values{detail}: they name the same setting, "
        "keep one"
    )
