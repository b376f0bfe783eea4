"""`.env.example` is the operator's list of settings: it names every one, only real ones, each with
the value the code uses when it is not set. So `cp .env.example .env` changes nothing until it is
edited, and `make run` (`serve --simulate`, which reads `.env`) stays fully simulated."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import httpx
import pytest
from pydantic import model_validator

from app.auth.signatures import sign_hmac
from app.core.settings import Settings
from tests.helpers import readme_samples, running_service
from tests.service.test_cli import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / ".env.example"


def _example_lines() -> list[tuple[str, str]]:
    """Each `NAME=value` line, in order (a name listed twice shows up twice)."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            lines.append((name.strip(), value))
    return lines


class _ValuesOnly(Settings):
    """Settings' own parsing of every value, without the checks across settings: those reject
    the defaults themselves (no provider URL) or fill them in (simulated mode's development
    credentials). Each validator below replaces Settings' validator of the same name."""

    @model_validator(mode="after")
    def _tutorial_aliases(self) -> _ValuesOnly:
        return self

    @model_validator(mode="after")
    def _coherent(self) -> _ValuesOnly:
        return self


def test_env_example_lists_every_setting_once_and_nothing_else() -> None:
    names = [name for name, _ in _example_lines()]
    assert len(names) == len(set(names)), "a setting is listed twice"
    assert set(names) == {name.upper() for name in Settings.model_fields}


def test_every_value_in_env_example_is_the_default() -> None:
    example = _ValuesOnly(_env_file=str(EXAMPLE))  # type: ignore[call-arg]
    defaults = _ValuesOnly(_env_file=None)  # type: ignore[call-arg]
    differing = {
        name.upper(): (getattr(example, name), getattr(defaults, name))
        for name in Settings.model_fields
        if getattr(example, name) != getattr(defaults, name)
    }
    assert not differing, f"(.env.example, default): {differing}"


def test_settings_unset_by_default_are_empty_in_env_example() -> None:
    """Not `none` or a sample value: an empty line is what "unset" looks like in the file."""
    values = dict(_example_lines())
    unset = [
        name.upper()
        for name, field in Settings.model_fields.items()
        if field.default_factory is None and field.default is None
    ]
    assert unset, "Settings has no setting unset by default?"
    written = {name: values[name] for name in unset if values[name] != ""}
    assert not written, written


@pytest.mark.slow
def test_make_run_with_a_copied_env_example_stays_simulated(tmp_path: Path) -> None:
    """`cp .env.example .env && make run`: the README's signed Cognigy sample still answers from
    the simulated provider (an example naming a real provider's URL made it llm_unavailable)."""
    shutil.copy(EXAMPLE, tmp_path / ".env")
    with running_service(tmp_path, "--simulate") as service:
        base_url = service.url
        health = httpx.get(f"{base_url}/health", timeout=15).json()
        assert health["simulated"] == {"llm": True, "cxone": True}, health

        samples = readme_samples()
        body = samples.cognigy_body
        signature = sign_hmac(samples.cognigy_secret, body)
        answer = httpx.post(
            f"{base_url}/webhook/cognigy/fallback",
            content=body,
            headers={"Content-Type": "application/json", "X-Webhook-Signature": signature},
            timeout=15,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "success", answer.json()
        assert answer.json()["model"].endswith("-simulated")

        turn = httpx.post(
            f"{base_url}/webhook/cxone",
            json=samples.cxone_body,
            headers={"Authorization": samples.cxone_authorization},
            timeout=15,
        )
        assert turn.status_code == 200, turn.text
        assert turn.json()["branchName"] == "PromptAndCollectNextResponse", turn.json()
        assert "errorDetails" not in turn.json(), turn.json()

        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=TIMEOUT) == 0, service.log_path.read_text()[-2000:]
