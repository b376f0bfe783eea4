"""Building Settings with an error message a person can act on (kept apart from app.core.settings,
which holds the settings themselves)."""

from __future__ import annotations

from pydantic import ValidationError

from app.core.errors import ConfigError
from app.core.setting_names import other_names
from app.core.settings import Settings


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, naming the environment variable rather than the Python field (and
    the other names it is read under, since the value may have come through one of them)."""
    aliases = other_names(Settings)
    lines = []
    for problem in error.errors():
        names = [str(part).upper() for part in problem["loc"] if isinstance(part, str)]
        where = names[0] if names else "settings"
        if names and names[0].lower() in aliases:
            also = " or ".join(n.upper() for n in aliases[names[0].lower()])
            where = f"{where} (or {also})"
        message = str(problem["msg"]).removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if names else message)
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Build Settings or raise ConfigError with a message a person can act on."""
    return load_settings_as(Settings, **overrides)


def load_settings_as(settings_class: type[Settings], /, **overrides: object) -> Settings:
    """load_settings with a subclass of Settings that checks less, for a command that needs
    less (`python -m app keys`)."""
    try:
        return settings_class(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from error
