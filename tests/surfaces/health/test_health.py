"""Health probes as an orchestrator and an operator meet them: liveness needs nothing, readiness
follows the store and the routes (and recovers with them), `/health` probes every provider for
real but never more than once per provider per cache period, and never shows key material."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from app.auth.signatures import fingerprint
from app.deps import get_store
from app.llm.catalog import canonical_json
from app.simulator.faults import FaultPlan
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer
from app.store import StoreUnavailable
from tests.helpers import free_port, parts
from tests.store.test_store import redis_prefix

TEST_KEY = "sk-test-provider-key"  # what conftest configures as LLM_GATEWAY_API_KEY
DEAD_URL = "http://127.0.0.1:9"  # the discard port: nothing listens there


class ProbeLog:
    """Wraps the simulated provider: records every `GET /v1/models` (with the credential it
    carried) and can make the provider slow to answer it."""

    def __init__(self) -> None:
        self.credentials: list[str] = []
        self.delay = 0.0

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == "/v1/models":
                headers = dict(scope["headers"])
                credential = headers.get(b"authorization") or headers.get(b"x-api-key", b"")
                self.credentials.append(credential.decode())
                await asyncio.sleep(self.delay)
            await app(scope, receive, send)

        return counted


@pytest.fixture
def probe_log() -> ProbeLog:
    return ProbeLog()


@pytest.fixture
def llm_server(llm_plan: FaultPlan, probe_log: ProbeLog) -> Iterator[LoopbackServer]:
    """conftest's simulated provider, seen through the probe log."""
    with LoopbackServer(probe_log.wrap(create_llm_simulator(llm_plan))) as server:
        yield server


def providers_file(tmp_path: Path, providers: list[dict[str, Any]], **extra: Any) -> Path:
    path = tmp_path / "providers.json"
    path.write_text(canonical_json({"providers": providers, **extra}))
    return path


class PingReplaced:
    """The app's store with another ping, handed to the health routes through their store
    dependency (app.deps.get_store)."""

    def __init__(self, store: Any, ping: Callable[[], Any]) -> None:
        self._store = store
        self.ping = ping

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def replace_ping(running: Any, ping: Callable[[], Any]) -> None:
    store = PingReplaced(parts(running.app).store, ping)
    running.app.dependency_overrides[get_store] = lambda: store


async def get(client: httpx.AsyncClient, path: str) -> tuple[int, dict[str, Any]]:
    response = await client.get(path)
    return response.status_code, response.json()


# --- liveness and readiness ----------------------------------------------------------------------


async def test_liveness_answers_even_when_the_store_is_down(
    app_client: Callable[..., Any],
) -> None:
    running = app_client()
    async with running as client:

        async def down() -> None:
            raise StoreUnavailable("disk gone")

        replace_ping(running, down)
        assert await get(client, "/health/live") == (200, {"status": "alive"})
        assert (await client.get("/health/ready")).status_code == 503


async def test_ready_when_the_store_answers_and_a_route_is_usable(
    app_client: Callable[..., Any], probe_log: ProbeLog
) -> None:
    async with app_client() as client:
        status, body = await get(client, "/health/ready")
    assert status == 200
    assert body["status"] == "ready" and "failing" not in body
    checks = body["checks"]
    assert checks["config"] == {"ok": True, "source": "env", "default_model": "gpt-4o-mini"}
    assert checks["store"]["ok"] is True and checks["store"]["backend"] == "sqlite"
    assert checks["providers"]["routes"] == {"gpt-4o-mini": True, "text-embedding-3-small": True}
    assert checks["providers"]["providers"]["default"] == {
        "usable": True,
        "circuit": "closed",
        "keys_healthy": 1,
        "keys_total": 1,
    }
    assert probe_log.credentials == []  # readiness never costs an upstream call


async def test_not_ready_while_the_store_fails_and_ready_again_when_it_answers(
    app_client: Callable[..., Any],
) -> None:
    running = app_client()
    async with running as client:

        async def down() -> None:
            raise StoreUnavailable("SQLite store error: disk I/O error")

        replace_ping(running, down)
        status, body = await get(client, "/health/ready")
        assert status == 503
        assert body["status"] == "not_ready" and body["failing"] == ["store"]
        assert body["checks"]["store"] == {
            "ok": False,
            "backend": "sqlite",
            "error": "SQLite store error: disk I/O error",
        }
        assert body["checks"]["providers"]["ok"] is True
        running.app.dependency_overrides.clear()  # the store answers again
        status, body = await get(client, "/health/ready")
        assert (status, body["status"]) == (200, "ready")


async def test_a_store_that_hangs_fails_readiness_within_the_timeout(
    app_client: Callable[..., Any],
) -> None:
    running = app_client(health_store_timeout_seconds=0.1)
    async with running as client:

        async def hangs() -> None:
            await asyncio.sleep(5)

        replace_ping(running, hangs)
        started = time.monotonic()
        status, body = await get(client, "/health/ready")
    assert time.monotonic() - started < 1.0
    assert status == 503 and body["failing"] == ["store"]
    assert body["checks"]["store"]["error"] == "no answer within 0.1s"


class TcpProxy:
    """A loopback TCP relay to the real Redis that can be cut and restored on the same port,
    so the app's own Redis client lives through an outage. Its port is from free_port(): one
    from bind(0) could be taken by another worker while the proxy is down."""

    def __init__(self, target_port: int = 6379) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_readiness_follows_a_redis_store_through_an_outage(
    app_client: Callable[..., Any],
) -> None:
    proxy = TcpProxy()
    await proxy.start()  # the real Redis must be up: the app's start-up pings it through here
    try:
        async with (
            redis_prefix() as prefix,
            app_client(
                store_backend="redis",
                redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                redis_key_prefix=prefix,
                health_store_timeout_seconds=1.0,
            ) as client,
        ):
            assert (await client.get("/health/ready")).status_code == 200
            await proxy.stop()
            status, body = await get(client, "/health/ready")
            assert status == 503 and body["failing"] == ["store"]
            assert body["checks"]["store"]["backend"] == "redis"
            assert body["checks"]["store"]["error"]
            await proxy.start()
            status, body = await get(client, "/health/ready")
            assert (status, body["checks"]["store"]["ok"]) == (200, True)
    finally:
        await proxy.stop()


async def test_not_ready_while_every_circuit_is_open_then_ready_in_half_open(
    app_client: Callable[..., Any],
) -> None:
    running = app_client(circuit_failure_threshold=1, circuit_reset_seconds=0.5)
    async with running as client:
        runtime = parts(running.app).llm.current.providers["default"]
        runtime.breaker.record_failure()
        status, body = await get(client, "/health/ready")
        assert status == 503 and body["failing"] == ["providers"]
        providers = body["checks"]["providers"]
        assert providers["routes"] == {"gpt-4o-mini": False, "text-embedding-3-small": False}
        assert providers["providers"]["default"]["circuit"] == "open"
        assert "circuit not open" in providers["error"]
        await asyncio.sleep(0.6)  # the reset period: the router will send one trial again
        status, body = await get(client, "/health/ready")
        assert status == 200
        assert body["checks"]["providers"]["providers"]["default"]["circuit"] == "half_open"


async def test_not_ready_while_every_key_is_set_aside_then_ready_when_one_returns(
    app_client: Callable[..., Any], probe_log: ProbeLog
) -> None:
    running = app_client()
    async with running as client:
        keys = parts(running.app).llm.current.providers["default"].keys
        (key,) = keys.keys
        keys.mark_unauthorized(key, 401)
        status, body = await get(client, "/health/ready")
        assert status == 503 and body["failing"] == ["providers"]
        assert body["checks"]["providers"]["providers"]["default"]["keys_healthy"] == 0
        status, health = await get(client, "/health")
        assert (status, health["status"]) == (503, "unhealthy")
        default = health["providers"]["default"]
        assert (default["reachable"], default["usable"], default["keys_healthy"]) == (
            False,
            False,
            0,
        )
        assert "set aside" in default["probe_error"]
        assert probe_log.credentials == []  # no healthy key: nothing is sent upstream
        keys.restore(key)
        assert (await client.get("/health/ready")).status_code == 200


# --- /health -------------------------------------------------------------------------------------


async def test_health_details_a_reachable_provider(
    app_client: Callable[..., Any], llm_server: Any
) -> None:
    async with app_client() as client:
        status, body = await get(client, "/health")
    assert status == 200
    assert body["status"] == "healthy" and body["warnings"] == []
    assert body["simulated"] == {}
    assert body["version"]
    assert body["store"]["ok"] is True
    assert body["routes"] == {
        "gpt-4o-mini": {"usable": True, "chain": ["default/gpt-4o-mini"]},
        "text-embedding-3-small": {"usable": True, "chain": ["default/text-embedding-3-small"]},
    }
    assert body["config_checks"] == {  # the integration tutorial's shape
        "ok": True,
        "source": "env",
        "default_model": "gpt-4o-mini",
        "temperature_ok": True,
        "max_tokens_ok": True,
        "key_format_ok": True,
        # the CXone tutorial's shape, in the same object
        "valid": True,
        "checks": {
            "endpoint_reachable": True,
            "temperature_valid": True,
            "model_format_valid": True,
        },
    }
    default = body["providers"]["default"]
    assert {k: v for k, v in default.items() if k not in ("probe_latency_ms", "models")} == {
        "kind": "openai",
        "base_url": llm_server.url,
        "usable": True,
        "reachable": True,
        "circuit": "closed",
        "keys_healthy": 1,
        "keys_total": 1,
        "keyless": False,
        "key_format_ok": True,
        "temperature_ok": True,
        "max_tokens_ok": True,
    }
    assert default["models"] == [
        {
            "name": "gpt-4o-mini",
            "kind": "chat",
            "max_tokens": 4096,
            "max_context_tokens": 128000,
            "max_tokens_ok": True,
            "routes": {"gpt-4o-mini": True},
        },
        {  # LLM_EMBEDDING_MODELS' default
            "name": "text-embedding-3-small",
            "kind": "embedding",
            "max_tokens": 4096,
            "max_context_tokens": 8192,
            "max_tokens_ok": True,
            "routes": {"text-embedding-3-small": True},
        },
    ]


def dead_and_live(live_url: str) -> list[dict[str, Any]]:
    """Provider "dead" (model m1) where nothing listens, "sim" (model m2) at `live_url`."""
    return [
        {
            "name": "dead",
            "base_url": DEAD_URL,
            "api_keys": ["env:SIM_KEY"],
            "models": [{"name": "m1"}],
        },
        {
            "name": "sim",
            "base_url": live_url,
            "api_keys": ["env:SIM_KEY"],
            "models": [{"name": "m2"}],
        },
    ]


async def test_a_dead_provider_in_a_fallback_chain_degrades_but_the_route_works(
    app_client: Callable[..., Any],
    llm_server: LoopbackServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIM_KEY", TEST_KEY)
    path = providers_file(
        tmp_path,
        dead_and_live(llm_server.url),
        routes=[
            {
                "name": "assistant",
                "chain": [{"provider": "dead", "model": "m1"}, {"provider": "sim", "model": "m2"}],
            }
        ],
    )
    async with app_client(providers_file=path, llm_model="assistant") as client:
        status, body = await get(client, "/health")
        ready = (await client.get("/health/ready")).status_code
    assert (status, body["status"]) == (200, "degraded")
    assert body["providers"]["dead"]["reachable"] is False
    assert body["providers"]["dead"]["probe_error"]
    assert body["providers"]["sim"]["reachable"] is True
    assert body["routes"]["assistant"] == {"usable": True, "chain": ["dead/m1", "sim/m2"]}
    assert body["routes"]["m1"]["usable"] is False
    assert body["providers"]["dead"]["models"][0]["routes"] == {"assistant": True, "m1": False}
    assert any(w.startswith("dead: unreachable") for w in body["warnings"])
    # LLM_MODEL's route still reaches a provider: the tutorial's endpoint check holds
    assert body["config_checks"]["checks"]["endpoint_reachable"] is True
    assert body["config_checks"]["valid"] is True
    assert ready == 200  # readiness does not probe upstreams: the circuit decides there


async def test_a_single_dead_provider_makes_health_unhealthy(
    app_client: Callable[..., Any],
) -> None:
    async with app_client(llm_gateway_base_url=DEAD_URL) as client:
        status, body = await get(client, "/health")
    assert (status, body["status"]) == (503, "unhealthy")
    assert body["providers"]["default"]["reachable"] is False
    assert body["routes"]["gpt-4o-mini"]["usable"] is False
    assert body["config_checks"]["valid"] is False
    assert body["config_checks"]["checks"] == {
        "endpoint_reachable": False,
        "temperature_valid": True,
        "model_format_valid": True,
    }


async def test_the_tutorial_checks_follow_the_route_of_llm_model_only(
    app_client: Callable[..., Any],
    llm_server: LoopbackServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dead provider that LLM_MODEL's route does not use degrades /health, but the CXone
    tutorial's endpoint check is about the webhooks' model: it holds; pointed at the dead
    provider's model it fails."""
    monkeypatch.setenv("SIM_KEY", TEST_KEY)
    path = providers_file(
        tmp_path,
        dead_and_live(llm_server.url),
    )
    async with app_client(providers_file=path, llm_model="m2") as client:
        _, on_live = await get(client, "/health")
    async with app_client(providers_file=path, llm_model="m1") as client:
        _, on_dead = await get(client, "/health")
    assert on_live["status"] == "degraded"
    assert on_live["config_checks"]["checks"]["endpoint_reachable"] is True
    assert on_live["config_checks"]["valid"] is True
    assert on_dead["config_checks"]["checks"]["endpoint_reachable"] is False
    assert on_dead["config_checks"]["valid"] is False


async def test_a_slow_provider_counts_as_unreachable_after_the_probe_timeout(
    app_client: Callable[..., Any], probe_log: ProbeLog
) -> None:
    probe_log.delay = 1.0
    async with app_client(health_probe_timeout_seconds=0.2) as client:
        started = time.monotonic()
        status, body = await get(client, "/health")
    assert time.monotonic() - started < 1.5
    assert status == 503
    assert body["providers"]["default"]["probe_error"] == "no answer within 0.2s"


async def test_limits_and_key_shapes_are_checked_per_provider_kind(
    app_client: Callable[..., Any],
    llm_server: LoopbackServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_KEY", "gw_live_0123456789")  # no sk- prefix: still plausible
    monkeypatch.setenv("BROKEN_KEY", "abc")  # a truncated paste
    path = providers_file(
        tmp_path,
        [
            {
                "name": "gateway",
                "base_url": llm_server.url,
                "api_keys": ["env:GATEWAY_KEY"],
                "models": [{"name": "gpt-4o-mini"}],
            },
            {
                "name": "claude",
                "kind": "anthropic",
                "base_url": llm_server.url,
                "api_keys": ["env:BROKEN_KEY"],
                "models": [{"name": "haiku", "max_tokens": 256, "max_context_tokens": 1000}],
            },
        ],
    )
    async with app_client(providers_file=path, llm_temperature=1.5) as client:
        status, body = await get(client, "/health")
    gateway, claude = body["providers"]["gateway"], body["providers"]["claude"]
    assert (gateway["temperature_ok"], gateway["max_tokens_ok"], gateway["key_format_ok"]) == (
        True,
        True,
        True,
    )
    assert (claude["temperature_ok"], claude["max_tokens_ok"], claude["key_format_ok"]) == (
        False,
        False,
        False,
    )
    assert claude["kind"] == "anthropic" and claude["reachable"] is True
    assert claude["models"][0]["max_tokens_ok"] is False
    assert (status, body["status"]) == (200, "degraded")
    assert "claude: LLM_TEMPERATURE 1.5 is outside anthropic's 0-1" in body["warnings"]
    checks = body["config_checks"]
    assert checks["ok"] is False and checks["temperature_ok"] is False
    assert checks["key_format_ok"] is False and checks["max_tokens_ok"] is False
    assert checks["valid"] is False
    assert checks["checks"]["temperature_valid"] is False
    assert checks["checks"]["endpoint_reachable"] is True


async def test_concurrent_health_calls_share_one_probe_per_provider_and_reuse_it(
    app_client: Callable[..., Any],
    llm_server: LoopbackServer,
    probe_log: ProbeLog,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEY_A", "sk-provider-a-0001")
    monkeypatch.setenv("KEY_B", "sk-provider-b-0002")
    path = providers_file(
        tmp_path,
        [
            {
                "name": "a",
                "base_url": llm_server.url,
                "api_keys": ["env:KEY_A"],
                "models": [{"name": "ma"}],
            },
            {
                "name": "b",
                "base_url": llm_server.url,
                "api_keys": ["env:KEY_B"],
                "models": [{"name": "mb"}],
            },
        ],
    )
    probe_log.delay = 0.2  # a slow provider: all 20 calls arrive while the first probe runs
    async with app_client(providers_file=path, llm_model="ma", health_cache_seconds=0.5) as client:
        answers = await asyncio.gather(*(client.get("/health") for _ in range(20)))
        assert {a.status_code for a in answers} == {200}
        assert sorted(probe_log.credentials) == [
            "Bearer sk-provider-a-0001",
            "Bearer sk-provider-b-0002",
        ]
        cached = (await client.get("/health")).json()
        assert len(probe_log.credentials) == 2  # within HEALTH_CACHE_SECONDS: reused
        assert cached["probes"]["cache_seconds"] == 0.5
        assert 0 < cached["probes"]["age_seconds"] < 0.5
        await asyncio.sleep(0.6)
        await client.get("/health")
        assert len(probe_log.credentials) == 4  # expired: one fresh probe per provider


async def test_without_a_cache_concurrent_calls_still_share_one_probe(
    app_client: Callable[..., Any], probe_log: ProbeLog
) -> None:
    probe_log.delay = 0.2
    async with app_client(health_cache_seconds=0) as client:
        await asyncio.gather(*(client.get("/health") for _ in range(20)))
        assert probe_log.credentials == [f"Bearer {TEST_KEY}"]
        await client.get("/health")
        assert len(probe_log.credentials) == 2


async def test_a_configuration_swap_is_probed_at_once_despite_the_cache(
    app_client: Callable[..., Any], probe_log: ProbeLog
) -> None:
    from app.bootstrap.options import provider_config_from_env, router_options
    from app.llm.router import LLMRouter

    running = app_client(health_cache_seconds=60)
    async with running as client:
        services = parts(running.app)
        assert (await client.get("/health")).json()["providers"]["default"]["reachable"] is True
        dead = services.settings.model_copy(update={"llm_gateway_base_url": DEAD_URL})
        services.llm.swap(
            LLMRouter(services.http, provider_config_from_env(dead), router_options(dead))
        )
        body = (await client.get("/health")).json()
    assert body["providers"]["default"]["reachable"] is False
    assert len(probe_log.credentials) == 1  # the new router's probe went to the dead URL


async def test_no_key_material_appears_in_any_probe(app_client: Callable[..., Any]) -> None:
    running = app_client()
    async with running as client:
        healthy = (await client.get("/health")).text
        keys = parts(running.app).llm.current.providers["default"].keys
        keys.mark_unauthorized(keys.keys[0], 401)  # the warnings path too
        texts = [healthy, (await client.get("/health")).text]
        texts.append((await client.get("/health/ready")).text)
    assert keys.keys[0].key_id == fingerprint(TEST_KEY)
    for text in texts:
        assert TEST_KEY not in text
        assert fingerprint(TEST_KEY) not in text
        json.loads(text)


async def test_simulated_upstreams_are_flagged(app_client: Callable[..., Any]) -> None:
    """As `serve --simulate` runs it: conftest's simulated provider, keyless, named in
    SIMULATED_UPSTREAMS by the command that started it."""
    overrides = {"simulate": True, "simulated_upstreams": ["llm"], "llm_gateway_api_key": []}
    async with app_client(**overrides) as client:
        status, body = await get(client, "/health")
    assert status == 200
    assert body["simulated"] == {"llm": True}
    assert body["warnings"] == [
        "the llm upstream is SIMULATED: answers are not from a real service"
    ]
    default = body["providers"]["default"]
    assert (default["reachable"], default["keyless"], default["keys_total"]) == (True, True, 0)
    assert body["status"] == "healthy"
