"""`python -m app serve` as a real process: start-up errors, and a simulated end-to-end turn."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.auth.signatures import sign_hmac
from app.core.settings import DEV_WEBHOOK_SECRET
from tests.helpers import free_port, service_env

pytestmark = pytest.mark.slow  # each test runs `python -m app` in a process of its own

TIMEOUT = 30


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=tmp_path,
        env=service_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_serve_without_gateway_url_exits_2_and_says_why(tmp_path: Path) -> None:
    result = _run(tmp_path, "serve", COGNIGY_WEBHOOK_SECRET="cli-secret")
    assert result.returncode == 2, result.stderr
    assert "LLM_GATEWAY_BASE_URL" in result.stderr
    assert "--simulate" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_invalid_temperature_exits_2_naming_it(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        "serve",
        LLM_GATEWAY_BASE_URL="http://127.0.0.1:9/v1",
        COGNIGY_WEBHOOK_SECRET="cli-secret",
        LLM_TEMPERATURE="9",
    )
    assert result.returncode == 2, result.stderr
    assert "LLM_TEMPERATURE" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("several", "named"),
    [
        ({"WORKERS": "2"}, "WORKERS=2"),
        (
            {"STORE_BACKEND": "redis", "REDIS_URL": "redis://127.0.0.1:6379/0"},
            "STORE_BACKEND=redis",
        ),
    ],
    ids=["workers", "replicas"],
)
def test_several_processes_without_a_bot_state_secret_refuse_to_start(
    tmp_path: Path, several: dict[str, str], named: str
) -> None:
    """Each would sign CXone's botSessionState with its own random key: most turns of a
    conversation would land on another process, fail verification and start it afresh."""
    result = _run(
        tmp_path,
        "serve",
        LLM_GATEWAY_BASE_URL="http://127.0.0.1:9/v1",
        COGNIGY_WEBHOOK_SECRET="cli-secret",
        CXONE_WEBHOOK_AUTHORIZATION="Bearer cli-token",
        **several,
    )
    assert result.returncode == 2, result.stderr
    assert "BOT_STATE_SECRET is not set" in result.stderr
    assert named in result.stderr
    assert "random key of its own" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_reads_dotenv_from_working_directory(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "LLM_GATEWAY_BASE_URL=http://127.0.0.1:9/v1\n"
        "COGNIGY_WEBHOOK_SECRET=cli-secret\n"
        "COGNIGY_CONFIDENCE_THRESHOLD=1.5\n",
        encoding="utf-8",
    )
    result = _run(tmp_path, "serve")
    assert result.returncode == 2, result.stderr
    assert "COGNIGY_CONFIDENCE_THRESHOLD" in result.stderr


@pytest.fixture
def simulated_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    port = free_port()
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--simulate", "--port", str(port)],
            cwd=tmp_path,
            env=service_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            yield f"http://127.0.0.1:{port}", process, stderr_path
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=TIMEOUT)


def _wait_until_live(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{base_url}/health/live", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling interval only; nothing asserts on timing
    pytest.fail(f"server not live within 20 s: {log.read_text()}")


def test_serve_simulate_answers_a_signed_turn(
    simulated_server: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    base_url, process, log = simulated_server
    _wait_until_live(base_url, process, log)

    health = httpx.get(f"{base_url}/health", timeout=5)
    assert health.status_code == 200
    assert health.json()["simulated"] == {"llm": True, "cxone": True}
    assert any("SIMULATED" in warning for warning in health.json()["warnings"])

    body = json.dumps(
        {
            "conversationId": "contact-42",
            "userId": "user-7",
            "lastMessage": "I was charged twice for my subscription",
            "confidenceScore": 0.41,
            "detectedIntent": "billing",
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Webhook-Signature": sign_hmac(DEV_WEBHOOK_SECRET, body),
    }
    response = httpx.post(
        f"{base_url}/webhook/cognigy/fallback", content=body, headers=headers, timeout=15
    )
    assert response.status_code == 200, response.text
    decision = response.json()
    assert decision["status"] == "success"
    assert decision["context"] == "available"
    assert decision["conversationId"] == "contact-42"

    unsigned = httpx.post(
        f"{base_url}/webhook/cognigy/fallback",
        content=body,
        headers={**headers, "X-Webhook-Signature": sign_hmac("wrong-secret", body)},
        timeout=15,
    )
    assert unsigned.status_code == 401

    process.send_signal(signal.SIGTERM)
    process.wait(timeout=TIMEOUT)
    stderr = log.read_text()
    assert "SIMULATED" in stderr
    assert "cx-relay-dev-secret" in stderr  # the dev-secret warning is shown


def test_serve_simulate_keeps_uvicorn_logs_as_json(
    simulated_server: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    base_url, process, log = simulated_server
    _wait_until_live(base_url, process, log)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=TIMEOUT)
    lines = log.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    messages = [json.loads(line)["message"] for line in lines]
    assert any(message.startswith(f"Uvicorn running on {base_url}") for message in messages)
    assert "Shutting down" in messages
