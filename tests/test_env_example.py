"""`.env.example` is the operator's list of settings: it must name every one, and only real ones."""

from __future__ import annotations

from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def _example_names() -> set[str]:
    names = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            names.add(line.split("=", 1)[0].strip())
    return names


def test_env_example_lists_every_setting_and_nothing_else() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    assert _example_names() == fields


def test_env_example_loads_as_valid_settings(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    text = (ROOT / ".env.example").read_text()
    env.write_text(text.replace("COGNIGY_WEBHOOK_SECRET=\n", "COGNIGY_WEBHOOK_SECRET=s3cret\n"))
    settings = Settings(_env_file=str(env))
    assert settings.llm_gateway_base_url == "https://api.openai.com"
    assert settings.cxone_configured is False
