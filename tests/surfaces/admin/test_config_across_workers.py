"""Provider registrations (POST /api/v1/llm-gateway/providers) against the service with two
workers sharing DATA_DIR, as users run it: each worker serves its own router, but a change
must build on what another worker stored, never overwrite it. Found from outside: eight
registrations each answered 201, and after a restart five of them were gone; the same name
was registered twice (201 on the worker that had not seen it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.simulator.faults import FaultPlan
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer
from tests.helpers import running_service

pytestmark = pytest.mark.slow  # the service runs as a process

ADMIN = "admin-token-across-workers-3b9d"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@dataclass
class Setup:
    home: Path
    env: dict[str, str]
    simulator: str


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with LoopbackServer(create_llm_simulator(FaultPlan())) as simulator:
        providers = {
            "providers": [
                {
                    "name": "openai",
                    "base_url": simulator.url,
                    "api_keys": ["env:OPENAI_API_KEY"],
                    "models": [{"name": "gpt-4o-mini"}],
                }
            ]
        }
        (tmp_path / "providers.yaml").write_text(yaml.safe_dump(providers))
        env = {
            "PROVIDERS_FILE": str(tmp_path / "providers.yaml"),
            "LLM_MODEL": "gpt-4o-mini",
            "ADMIN_TOKEN": ADMIN,
            "OPENAI_API_KEY": "sk-provider-file-key",
            "CXR_PROVIDER_KEY_REGISTERED": "sk-registered-key",
            "COGNIGY_WEBHOOK_SECRET": "whsec-across-workers",
            "WORKERS": "2",
            "BOT_STATE_SECRET": "across-workers-bot-state-secret",
        }
        yield Setup(tmp_path, env, simulator.url)


def registration(name: str, base_url: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "OPENAI",
        "baseUrl": base_url,
        "apiKeyRotation": {
            "enabled": False,
            "keys": ["env:CXR_PROVIDER_KEY_REGISTERED"],
            "rotationStrategy": "ROUND_ROBIN",
        },
        "defaultModel": f"{name}-model",
    }


def _register(url: str, body: dict[str, Any]) -> int:
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:  # a new connection
        return http.post("/api/v1/llm-gateway/providers", json=body).status_code


def _served(url: str) -> set[str]:
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        return {p["name"] for p in http.get("/admin/providers").json()["providers"]}


def test_registrations_on_two_workers_all_survive_a_restart(setup: Setup) -> None:
    names = [f"one-by-one-{i}" for i in range(6)]
    together = [f"together-{i}" for i in range(10)]
    with running_service(setup.home, **setup.env) as service:
        for name in names:  # one after another, on whichever worker takes the connection
            assert _register(service.url, registration(name, setup.simulator)) == 201

        async def at_once() -> list[int]:
            async def one(name: str) -> int:
                async with httpx.AsyncClient(base_url=service.url, headers=AUTH, timeout=60) as h:
                    body = registration(name, setup.simulator)
                    return (await h.post("/api/v1/llm-gateway/providers", json=body)).status_code

            return list(await asyncio.gather(*(one(n) for n in together)))

        codes = asyncio.run(at_once())
        assert codes == [201] * len(together), _problems(service.log_path)
        for _ in range(4):  # a name registered on one worker is taken on both
            assert _register(service.url, registration(names[0], setup.simulator)) == 409
    with running_service(setup.home, **setup.env) as restarted:
        assert _served(restarted.url) >= {"openai", *names, *together}


def _problems(log_path: Path) -> list[str]:
    """The service's WARNING and ERROR lines, to show with a failure."""
    lines = log_path.read_text().splitlines()
    return [line for line in lines if '"level": "ERROR"' in line or '"level": "WARNING"' in line]
