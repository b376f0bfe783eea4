"""Templates a /chat caller sends: rendered in the sandbox, and never allowed to build a value or
an output bigger than the limits, whatever the source does."""

from __future__ import annotations

import pytest

from app.prompts.caller_templates import CallerTemplates

TEMPLATES = CallerTemplates(max_source_chars=500, max_output_chars=2000)


def test_renders_variables() -> None:
    assert TEMPLATES.render("Order {{ order }} for {{ name }}", {"order": 7, "name": "Ann"}) == (
        "Order 7 for Ann"
    )


def test_small_arithmetic_and_repetition_still_work() -> None:
    assert TEMPLATES.render("{{ 'ab' * 3 }} {{ 2 ** 10 }} {{ 7 % 3 }}", {}) == "ababab 1024 1"


def test_customer_text_in_a_variable_is_data_not_source() -> None:
    assert TEMPLATES.render("{{ text }}", {"text": "{{ 7*7 }}"}) == "{{ 7*7 }}"


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("{{ 'x' * 1000000000 }}", "repetition"),
        ("{{ [1] * 100000000 }}", "repetition"),
        ("{{ 2 ** 100000000 }}", "power too large"),
        ("{{ '%1000000000s' % 'a' }}", "%-formatting"),
        ("{{ 'a'.ljust(1000000000) }}", "unsafe"),
        ("{{ '{:>1000000000}'.format(1) }}", "unsafe"),
        ("{{ '{x:>1000000000}'.format_map({'x': 1}) }}", "unsafe"),
        ("{{ 'a'['format']('{:>1000000000}') }}", "unsafe"),
        ("{{ 'a'|center(1000000000) }}", "No filter named 'center'"),
        ("{{ 'a'|indent(1000000000) }}", "No filter named 'indent'"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{% for i in range(100000) %}{{ 'abcdefghij' }}{% endfor %}", "more than 2000"),
    ],
)
def test_sources_that_would_blow_up_are_refused(source: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        TEMPLATES.render(source, {})


def test_missing_variable_is_named() -> None:
    with pytest.raises(ValueError, match="'customer' is undefined"):
        TEMPLATES.render("Hi {{ customer }}", {})


def test_source_over_the_limit_is_refused_before_compiling() -> None:
    with pytest.raises(ValueError, match="501 characters; the limit is 500"):
        TEMPLATES.render("x" * 501, {})


def test_file_templates_come_from_app_templates_only() -> None:
    assert "assistant" in TEMPLATES.render("chat_system.j2", {})
    for name in ("nope.j2", "../../../etc/passwd.j2"):
        with pytest.raises(ValueError, match="is not a file under app/templates/"):
            TEMPLATES.render(name, {})


def test_empty_output_is_refused() -> None:
    with pytest.raises(ValueError, match="empty message"):
        TEMPLATES.render("{{ '' }}  ", {})
