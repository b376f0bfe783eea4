"""docs/configuration.md and `.env.example` are rendered from Settings: a test fails (and so does
`make lint`) the moment either drifts from the code, and the drift is found, not just a diff."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import AliasChoices, Field, SecretStr

from app.__main__ import main
from app.core.settings import Settings
from app.core.settings_reference import (
    CONFIGURATION_MD,
    ENV_EXAMPLE,
    render_env_example,
    render_markdown,
    sections,
    stale_files,
)

ROOT = Path(__file__).resolve().parents[2]


def test_both_generated_files_match_settings() -> None:
    """If this fails: `make docs`, then commit docs/configuration.md and .env.example."""
    assert stale_files(Settings, ROOT) == []


def test_every_setting_has_a_description_and_a_section() -> None:
    listed = [s for _, items in sections(Settings) for s in items]
    assert {s.name for s in listed} == {name.upper() for name in Settings.model_fields}
    assert all(len(s.description) > 15 for s in listed), [s.name for s in listed]
    assert "other" not in dict(sections(Settings)), "a setting above the first section comment"


def test_the_reference_names_type_default_limits_and_aliases() -> None:
    text = render_markdown(Settings)
    port = text.split("### `PORT`\n", 1)[1].split("\n### ", 1)[0]
    assert "integer" in port and "≥ 1, ≤ 65535" in port and "default: `8080`" in port
    base_url = text.split("### `LLM_GATEWAY_BASE_URL`\n", 1)[1].split("\n### ", 1)[0]
    assert "also read as `LLM_GATEWAY_URL`" in base_url
    tenant = text.split("### `CXONE_TENANT_ID`\n", 1)[1].split("\n### ", 1)[0]
    assert "also read as `CXONE_TENANT`" in tenant
    assert "## Cognigy fallback webhook\n" in text


def test_secrets_show_no_default() -> None:
    class WithDefaultSecret(Settings):
        demo_secret: SecretStr = Field(SecretStr("do-not-print"), description="A demo secret.")

    markdown = render_markdown(WithDefaultSecret)
    env = render_env_example(WithDefaultSecret)
    assert "do-not-print" not in markdown and "do-not-print" not in env
    assert "DEMO_SECRET=\n" in env
    assert "default: none (secret)" in markdown.split("### `DEMO_SECRET`", 1)[1]


def _copy_generated(tmp_path: Path) -> None:
    for relative in (CONFIGURATION_MD, ENV_EXAMPLE):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)


def test_a_setting_added_without_regenerating_makes_both_files_stale(tmp_path: Path) -> None:
    _copy_generated(tmp_path)

    class WithNewSetting(Settings):
        otel_demo_endpoint: str | None = Field(
            None,
            validation_alias=AliasChoices("otel_demo_endpoint", "otel_demo_url"),
            description="Where demo spans go.",
        )

    assert stale_files(WithNewSetting, tmp_path) == [
        tmp_path / CONFIGURATION_MD,
        tmp_path / ENV_EXAMPLE,
    ]
    assert "OTEL_DEMO_ENDPOINT=\n" in render_env_example(WithNewSetting)


def test_a_setting_without_a_description_is_refused_by_name() -> None:
    class Undescribed(Settings):
        mystery: int = 3

    with pytest.raises(ValueError, match="MYSTERY has no description"):
        render_markdown(Undescribed)


def test_the_command_checks_then_regenerates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m app config-docs --check` (make lint) names the stale file and what to run;
    `python -m app config-docs` (make docs) fixes it."""
    _copy_generated(tmp_path)
    assert main(["config-docs", "--check", "--root", str(tmp_path)]) == 0
    (tmp_path / ENV_EXAMPLE).write_text("PORT=8080\n")
    assert main(["config-docs", "--check", "--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert ".env.example is stale" in error and "make docs" in error
    assert main(["config-docs", "--root", str(tmp_path)]) == 0
    assert (tmp_path / ENV_EXAMPLE).read_text() == (ROOT / ENV_EXAMPLE).read_text()
    assert main(["config-docs", "--check", "--root", str(tmp_path)]) == 0
