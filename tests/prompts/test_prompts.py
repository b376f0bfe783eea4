"""Prompt templates: sandboxed Jinja2 with StrictUndefined, and the shipped Cognigy templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jinja2.sandbox import SecurityError

from app.core.errors import ConfigError
from app.prompts.renderer import PromptRenderer
from app.upstream.cxone_context import Turn


@pytest.fixture
def template_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "templates"
    directory.mkdir()
    return directory


def _renderer(template_dir: Path, **templates: str) -> PromptRenderer:
    for name, source in templates.items():
        (template_dir / f"{name}.j2").write_text(source, encoding="utf-8")
    return PromptRenderer(template_dir)


def test_renders_variables(template_dir: Path) -> None:
    renderer = _renderer(
        template_dir,
        greet="Hello {{ name }}, you said: {{ message }}\n"
        "{% for t in items %}- {{ t }}\n{% endfor %}",
    )
    rendered = renderer.render("greet.j2", {"name": "Ada", "message": "hi", "items": ["a", "b"]})
    assert rendered == "Hello Ada, you said: hi\n- a\n- b"


def test_tojson_compact_filter(template_dir: Path) -> None:
    renderer = _renderer(template_dir, meta="{{ metadata|tojson_compact }}")
    rendered = renderer.render("meta.j2", {"metadata": {"b": 1, "a": "ü"}})
    assert rendered == '{"a": "ü", "b": 1}'


def test_undefined_variable_fails_check_naming_the_template(template_dir: Path) -> None:
    renderer = _renderer(template_dir, typo="Customer said: {{ last_mesage }}")
    with pytest.raises(ConfigError) as failure:
        renderer.check("typo.j2", {"last_message": "hello"})
    assert "typo.j2" in str(failure.value)
    assert "last_mesage" in str(failure.value)


def test_check_passes_for_a_good_template(template_dir: Path) -> None:
    renderer = _renderer(template_dir, good="Customer said: {{ last_message }}")
    renderer.check("good.j2", {"last_message": "hello"})


def test_syntax_error_fails_check(template_dir: Path) -> None:
    renderer = _renderer(template_dir, broken="{% if x %}never closed")
    with pytest.raises(ConfigError, match=r"broken\.j2"):
        renderer.check("broken.j2", {"x": True})


def test_missing_template_fails_check(template_dir: Path) -> None:
    renderer = PromptRenderer(template_dir)
    with pytest.raises(ConfigError, match=r"nowhere\.j2"):
        renderer.check("nowhere.j2", {})


def test_template_rendering_to_nothing_fails_check(template_dir: Path) -> None:
    renderer = _renderer(template_dir, empty="{% if false %}text{% endif %}   \n")
    with pytest.raises(ConfigError, match="empty"):
        renderer.check("empty.j2", {})


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    ],
)
def test_sandbox_blocks_python_internals(template_dir: Path, source: str) -> None:
    renderer = _renderer(template_dir, escape=source)
    with pytest.raises(SecurityError):
        renderer.render("escape.j2", {})
    with pytest.raises(ConfigError, match=r"escape\.j2"):
        renderer.check("escape.j2", {})


def test_variable_values_are_not_evaluated(template_dir: Path) -> None:
    renderer = _renderer(template_dir, echo="Customer said: {{ last_message }}")
    payload = "{{ 7*7 }} {% for x in range(3) %}loop{% endfor %} {{ cycler.__init__ }}"
    rendered = renderer.render("echo.j2", {"last_message": payload})
    assert rendered == f"Customer said: {payload}"
    assert "49" not in rendered


# --- the shipped templates ----------------------------------------------------------------------

VARIABLES: dict[str, Any] = {
    "history": [
        Turn("customer", "My invoice number is INV-5531"),
        Turn("agent", "Thanks, let me look that up."),
    ],
    "detected_intent": "billing",
    "confidence": 0.4123,
    "last_message": "Why was I charged twice? {{ 7*7 }}",
    "metadata": {"channel": "chat", "locale": "en-GB"},
}


def test_shipped_system_template_renders() -> None:
    renderer = PromptRenderer()
    renderer.check("cognigy_routing_system.j2", VARIABLES)
    rendered = renderer.render("cognigy_routing_system.j2", VARIABLES)
    for key in (
        "classified_intent",
        "confidence",
        "extracted_parameters",
        "suggested_response",
        "requires_human_agent",
    ):
        assert f'"{key}"' in rendered


def test_shipped_user_template_shows_history_and_message() -> None:
    renderer = PromptRenderer()
    renderer.check("cognigy_routing_user.j2", VARIABLES)
    rendered = renderer.render("cognigy_routing_user.j2", VARIABLES)
    assert "customer: My invoice number is INV-5531" in rendered
    assert "agent: Thanks, let me look that up." in rendered
    assert rendered.index("INV-5531") < rendered.index("let me look that up")
    assert "Why was I charged twice? {{ 7*7 }}" in rendered
    assert '"billing" with confidence 0.41' in rendered
    assert '{"channel": "chat", "locale": "en-GB"}' in rendered
    assert "No earlier conversation" not in rendered


def test_shipped_user_template_without_history_or_intent() -> None:
    variables = {**VARIABLES, "history": [], "detected_intent": None, "metadata": {}}
    rendered = PromptRenderer().render("cognigy_routing_user.j2", variables)
    assert "No earlier conversation is available." in rendered
    assert 'intent "none"' in rendered
    assert "Context from the flow" not in rendered
    assert "Why was I charged twice?" in rendered
