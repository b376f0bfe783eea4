"""The settings reference (docs/configuration.md) and `.env.example`, both rendered from `Settings`.

Both files used to be written by hand and drifted from the code; now each field's
`Field(description=...)`, default, type, constraints and `AliasChoices` are the one source, and
the `# --- section ---` comments in app/core/settings.py group them. `python -m app config-docs`
(`make docs`) writes both files; `--check` (in `make lint`) fails when either is stale, so a
setting added on a branch is documented by running one command after the merge.
"""

from __future__ import annotations

import inspect
import re
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from app.core.setting_names import names_of

CONFIGURATION_MD = Path("docs/configuration.md")
ENV_EXAMPLE = Path(".env.example")
_SECTION = re.compile(r"^\s*# --- (.+?) -*\s*$")
_FIELD = re.compile(r"^    (\w+): ")
_GENERATED = "generated from app/core/settings.py by `make docs` (python -m app config-docs)"


@dataclass(frozen=True)
class Setting:
    """One setting as a reader sees it: its variable, what it holds and what it does."""

    name: str  # the environment variable
    aliases: tuple[str, ...]  # other variables it is read from (the tutorials' names)
    kind: str  # the type, in words
    limits: str  # e.g. ">= 1, <= 65535"; "" when unconstrained
    env_value: str  # the default as it is written in an env file ("" for unset)
    secret: bool
    description: str


def sections(settings_cls: type[BaseSettings]) -> list[tuple[str, list[Setting]]]:
    """The settings in declaration order, under the section comment each one follows."""
    titles = _section_of_each_field(settings_cls)
    grouped: dict[str, list[Setting]] = {}
    for name, field in settings_cls.model_fields.items():
        grouped.setdefault(titles.get(name, "other"), []).append(_setting(name, field))
    return list(grouped.items())


def _section_of_each_field(settings_cls: type[BaseSettings]) -> dict[str, str]:
    source = inspect.getsource(settings_cls)
    found: dict[str, str] = {}
    title = "general"
    for line in source.splitlines():
        if section := _SECTION.match(line):
            title = section.group(1).strip()
            title = title[:1].upper() + title[1:]  # a heading: "serving" -> "Serving"
        elif (field := _FIELD.match(line)) and field.group(1) in settings_cls.model_fields:
            found.setdefault(field.group(1), title)
    return found


def _setting(name: str, field: FieldInfo) -> Setting:
    if not field.description:
        raise ValueError(
            f"setting {name.upper()} has no description: give it "
            '`Field(<default>, description="...")` in app/core/settings.py'
        )
    secret = _is_secret(field.annotation)
    names = names_of(field, name)
    return Setting(
        name=name.upper(),
        aliases=tuple(n.upper() for n in names if n != name),
        kind=_kind(field.annotation),
        limits=_limits(field),
        env_value="" if secret else _env_value(_default(field)),
        secret=secret,
        description=" ".join(field.description.split()),
    )


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, Path):
        return str(value) if value.is_absolute() else f"./{value}"
    if isinstance(value, dict):
        return ",".join(f"{k}={'none' if v is None else v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(_env_value(item) for item in value)
    return str(value)


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _is_secret(annotation: Any) -> bool:
    annotation = _strip(annotation)
    if annotation is SecretStr:
        return True
    return any(_is_secret(arg) for arg in get_args(annotation))


def _kind(annotation: Any) -> str:
    annotation = _strip(annotation)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        inner = " or ".join(_kind(a) for a in members)
        return f"{inner}, optional" if len(members) < len(get_args(annotation)) else inner
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        item = _strip(item)
        if get_origin(item) is Literal:
            return "comma-separated list of " + ", ".join(f"`{v}`" for v in get_args(item))
        return f"comma-separated list of {_kind(item)}s"
    if origin is dict:
        return "comma-separated `name=value` pairs"
    if annotation is SecretStr:
        return "secret"
    if annotation is bool:
        return "boolean (`true`/`false`)"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "Path": "path"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _limits(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(item, getattr(annotated_types, attr.capitalize())):
                parts.append(f"{sign} {getattr(item, attr)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length > 1:
            parts.append(f"at least {item.min_length} characters")
        if isinstance(item, annotated_types.MaxLen):
            parts.append(f"at most {item.max_length} characters")
        if getattr(item, "pattern", None):
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts)


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def render_markdown(settings_cls: type[BaseSettings]) -> str:
    """docs/configuration.md: one heading per setting, so each can be linked to and searched."""
    groups = sections(settings_cls)
    count = sum(len(settings) for _, settings in groups)
    out = [
        "# Configuration reference",
        "",
        f"Every one of cx-relay's {count} settings: what it does, its type and limits, its "
        "default and the other names it is read under. You need this page when you deploy "
        "cx-relay or change how it behaves. Settings come from environment variables (no "
        "prefix, any case) or a `.env` file in the working directory (the environment wins); "
        "`.env.example` lists every one with its default, so `cp .env.example .env` changes "
        "nothing until you edit it. A wrong value stops start-up with a message naming the "
        "variable (`cx-relay: invalid settings: LLM_TEMPERATURE: Input should be less than or "
        "equal to 2`). Secrets are never logged and have no default here.",
        "",
        "Names under *also read as* are the integration tutorials' names for the same setting, "
        "so their `.env` files work; setting two names of one setting to different values stops "
        "start-up.",
        "",
        f"<!-- {_GENERATED}: edit the descriptions there, not here -->",
        "",
        "## Contents",
        "",
    ]
    out += [f"- [{title}](#{_anchor(title)}) ({len(items)})" for title, items in groups]
    out.append("")
    for title, items in groups:
        out += [f"## {title}", ""]
        for setting in items:
            out += [f"### `{setting.name}`", ""]
            facts = [f"Type: {setting.kind}"]
            if setting.limits:
                facts.append(f"limits: {setting.limits}")
            if setting.secret:
                facts.append("default: none (secret)")
            elif setting.env_value == "":
                facts.append("default: unset")
            else:
                facts.append(f"default: `{setting.env_value}`")
            if setting.aliases:
                facts.append("also read as " + ", ".join(f"`{a}`" for a in setting.aliases))
            out += ["; ".join(facts) + ".", "", setting.description, ""]
    return "\n".join(out).rstrip("\n") + "\n"


def render_env_example(settings_cls: type[BaseSettings]) -> str:
    """`.env.example`: every setting with its default (empty: unset), its description above it."""
    header = (
        "cx-relay settings. Copy to .env (or set in the environment); names carry no prefix. "
        "Every setting is listed with its default (empty: unset), so a copy changes nothing "
        "until you edit it: `make run` stays simulated. Secrets are never logged. The full "
        "reference, with types, limits and the tutorials' names, is docs/configuration.md. "
        f"This file is {_GENERATED}."
    )
    out = textwrap.wrap(header, width=99, initial_indent="# ", subsequent_indent="# ")
    for title, items in sections(settings_cls):
        out += ["", f"# --- {title} ".ljust(99, "-")]
        for setting in items:
            out += textwrap.wrap(
                setting.description, width=99, initial_indent="# ", subsequent_indent="# "
            )
            if setting.aliases:
                out.append("# Also read as " + ", ".join(setting.aliases) + ".")
            out.append(f"{setting.name}={setting.env_value}")
    return "\n".join(out) + "\n"


def rendered(settings_cls: type[BaseSettings], root: Path) -> Iterator[tuple[Path, str]]:
    """Each generated file's path and the text it should hold."""
    yield root / CONFIGURATION_MD, render_markdown(settings_cls)
    yield root / ENV_EXAMPLE, render_env_example(settings_cls)


def stale_files(settings_cls: type[BaseSettings], root: Path) -> list[Path]:
    """The generated files whose text differs from what Settings renders today."""
    return [
        path
        for path, text in rendered(settings_cls, root)
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]


def write_files(settings_cls: type[BaseSettings], root: Path) -> list[Path]:
    """Write the generated files that changed; returns them."""
    changed = stale_files(settings_cls, root)
    for path, text in rendered(settings_cls, root):
        if path in changed:
            path.write_text(text, encoding="utf-8")
    return changed
