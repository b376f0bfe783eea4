"""Shared fixtures: fake upstreams as real HTTP servers on loopback, and the app under test.

The fakes are the project's own simulators (they speak the real OpenAI and CXone wire formats)
driven by a FaultPlan; the app runs its real lifespan and is reached through httpx's ASGI
transport, so every outbound call it makes crosses a real socket.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.core.setting_names import names_of
from app.core.settings import Settings
from app.main import create_app
from app.simulator.cxone import CXoneSimulatorState, create_cxone_simulator
from app.simulator.faults import FaultPlan
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer
from tests.helpers import API_KEY, CXONE_AUTH, SECRET, TEST_BASE_URL, Captured, capture_logs

# --- `make test-fast`: the unit tests, `-m "not slow and not integration"` ---------------------
# slow: starts a process (the service, redis-server, a script, a fork; marked where it does), or
# is in tests/reliability/ (fault injection, abuse timing, fuzzing: what `make reliability` runs).
# integration: runs the app against the simulated upstreams (these fixtures, and make_settings,
# app_client and client built on them). What is left tests the parts themselves.

RELIABILITY = Path(__file__).parent / "reliability"
UPSTREAM_FIXTURES = {"llm_server", "cxone_server", "servers"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if RELIABILITY in item.path.parents:
            item.add_marker(pytest.mark.slow)
        if UPSTREAM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `-m "not slow"`, a test that starts a process fails, naming the mark it lacks, so
    the unit selection stays what it says."""
    if "not slow" not in (request.config.option.markexpr or ""):
        return
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow "
            "(`make test-fast` runs only tests that start none)"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Settings read the environment: keep the machine's variables out of every test."""
    for name, field in Settings.model_fields.items():
        for env_name in names_of(field, name):  # the tutorials' names too
            monkeypatch.delenv(env_name.upper(), raising=False)
    for name in [n for n in os.environ if n.startswith("OTEL_")]:  # tracing: off unless asked
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env is read


@pytest.fixture
def llm_plan() -> FaultPlan:
    return FaultPlan()


@pytest.fixture
def llm_server(llm_plan: FaultPlan) -> Iterator[LoopbackServer]:
    with LoopbackServer(create_llm_simulator(llm_plan)) as server:
        yield server


@pytest.fixture
def cxone_state() -> CXoneSimulatorState:
    return CXoneSimulatorState()


@pytest.fixture
def cxone_server(cxone_state: CXoneSimulatorState) -> Iterator[LoopbackServer]:
    with LoopbackServer(create_cxone_simulator(cxone_state)) as server:
        yield server


@pytest.fixture
def make_settings(
    llm_server: LoopbackServer, cxone_server: LoopbackServer, cxone_state: CXoneSimulatorState
) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "llm_gateway_base_url": llm_server.url,
            "llm_gateway_api_key": [SecretStr("sk-test-provider-key")],
            "cognigy_webhook_secret": [SecretStr(SECRET)],
            "cognigy_api_keys": [SecretStr(API_KEY)],
            "cxone_webhook_authorization": [SecretStr(CXONE_AUTH)],
            "bot_state_secret": SecretStr("test-bot-state-secret"),
            "cxone_client_id": cxone_state.client_id,
            "cxone_client_secret": SecretStr(cxone_state.client_secret),
            "cxone_access_key_id": cxone_state.access_key_id,
            "cxone_access_key_secret": SecretStr(cxone_state.access_key_secret),
            "cxone_token_url": f"{cxone_server.url}/auth/token",
            "cxone_api_base_url": cxone_server.url,
            "llm_retry_initial_seconds": 0.01,
            "llm_retry_max_seconds": 0.05,
            "data_dir": os.getcwd(),
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return build


@pytest.fixture
def app_client(
    make_settings: Callable[..., Settings],
) -> Callable[..., Any]:
    """`async with app_client(**setting_overrides) as client:` runs the app's real lifespan."""

    class _Running:
        def __init__(self, **overrides: Any) -> None:
            self.app = create_app(make_settings(**overrides))
            self._lifespan = self.app.router.lifespan_context(self.app)

        async def __aenter__(self) -> httpx.AsyncClient:
            await self._lifespan.__aenter__()
            self._client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=self.app), base_url=TEST_BASE_URL
            )
            return self._client

        async def __aexit__(self, *exc: object) -> None:
            await self._client.aclose()
            await self._lifespan.__aexit__(None, None, None)

    return _Running


@pytest.fixture
def captured() -> Iterator[Captured]:
    """Every log line of the test, as the service would write it (tests.helpers.capture_logs)."""
    with capture_logs() as capture:
        yield capture


@pytest.fixture
async def client(app_client: Callable[..., Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client() as running:
        yield running


# --- two simulated providers, for the router's fallback and limit tests -------------------------


@pytest.fixture
def plan_a() -> FaultPlan:
    return FaultPlan()


@pytest.fixture
def plan_b() -> FaultPlan:
    return FaultPlan()


@pytest.fixture
def servers(plan_a: FaultPlan, plan_b: FaultPlan) -> Iterator[tuple[str, str]]:
    """Providers "a" and "b": their base URLs, each answering from its own FaultPlan."""
    with (
        LoopbackServer(create_llm_simulator(plan_a)) as a,
        LoopbackServer(create_llm_simulator(plan_b)) as b,
    ):
        yield a.url, b.url


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client
