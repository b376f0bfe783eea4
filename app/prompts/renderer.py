"""Prompt rendering with Jinja2 in a sandbox, from versioned files under app/templates/.

Customer text only ever enters as a variable's value, never as template source, so `{{ 7*7 }}`
typed by a customer reaches the model as those characters. The sandbox limits what a template
author's own expressions can reach; StrictUndefined turns a misspelt variable into a start-up
error (every template is rendered once with sample data before the service accepts traffic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from app.core.errors import ConfigError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


class PromptRenderer:
    def __init__(self, template_dir: Path = TEMPLATE_DIR) -> None:
        self._env = SandboxedEnvironment(
            loader=FileSystemLoader(str(template_dir)),
            undefined=StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
        )
        self._env.filters["tojson_compact"] = _tojson_compact

    def render(self, name: str, variables: dict[str, Any]) -> str:
        return self._env.get_template(name).render(**variables).strip()

    def check(self, name: str, sample: dict[str, Any]) -> None:
        """Render once at start-up; a broken template stops start-up with its name and reason."""
        try:
            rendered = self.render(name, sample)
        except (TemplateError, OSError) as exc:
            raise ConfigError(f"prompt template {name!r} does not render: {exc}") from exc
        if not rendered:
            raise ConfigError(f"prompt template {name!r} renders to an empty prompt")


def _tojson_compact(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
