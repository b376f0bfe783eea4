"""Bursts of turns while a dependency other than the LLM fails: the CXone token endpoint (history
is optional: the Cognigy webhook answers with `context: "unavailable"`, never an error) and the
Redis store, killed under load and started again on the same port. The README's promise for the
store: nothing is spent unmetered while it is down (Cognigy `budget_unavailable`, CXone's
fallback prompt, 503 `budget_unavailable` on the chat routes), usage settled meanwhile waits in
the write-behind ledger, and the service recovers by itself when the store is back.

The Redis here is this test's own `redis-server` on a free port, never the shared one on 6379.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import Fault, FaultPlan
from app.store.redis_store import RedisStore
from tests.helpers import free_port, parts
from tests.reliability.conftest import (
    AUTH,
    MetricWatch,
    Scenario,
    Turn,
    assert_well_formed,
    expected_requests,
    outcomes,
)


async def test_cxone_token_endpoint_down_means_context_unavailable_not_an_error(
    relay: Any, cxone_state: CXoneSimulatorState, scenario: Scenario
) -> None:
    watch = MetricWatch("cxrelay_turns_total")
    cxone_state.token_faults.push(*[Fault(status=503)] * 200)
    async with relay() as client:
        cognigy, cxone = await asyncio.gather(
            scenario.burst("cognigy", client, 20), scenario.burst("cxone", client, 10)
        )
        down = cognigy + cxone
        assert cxone_state.token_requests == 0  # no token was ever issued
        cxone_state.token_faults.reset()  # the endpoint is back
        recovered = await scenario.burst("cognigy", client, 10)
    turns = down + recovered
    assert_well_formed(turns)
    assert {kind for kind, _ in outcomes(turns)} == {"answered"}
    assert {t.body["context"] for t in cognigy} == {"unavailable"}
    assert {t.body["context"] for t in recovered} == {"available"}
    assert cxone_state.token_requests == 1  # the recovered turns shared one token
    assert watch.delta("cxrelay_requests_total") == expected_requests(turns)
    assert watch.total("cxrelay_turns_total", surface="cognigy", outcome="answered") == 30


# --- Redis restarted mid-load --------------------------------------------------------------------


class RedisServer:
    """A redis-server of this test's own, without persistence, on one port for its whole life."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: the Redis store scenario needs it")
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on {self.port}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.kill()


async def test_connections_pooled_before_a_redis_restart_serve_after_it(
    redis_server: RedisServer,
) -> None:
    """The regression under the scenario below: each connection pooled before a restart used to
    fail its next command (redis-py skipped its checkout check), one refused turn each."""
    store = await RedisStore.open(redis_server.url, prefix="cxrelay-reliability:")
    try:
        await asyncio.gather(*(store.ping() for _ in range(10)))  # ten pooled connections
        redis_server.kill()
        await asyncio.sleep(0.05)  # the event loop sees the server close them
        redis_server.start()
        after = await asyncio.gather(*(store.ping() for _ in range(10)), return_exceptions=True)
    finally:
        await store.close()
    assert after == [None] * 10


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def ready_status(client: Any) -> tuple[int, list[str]]:
    response = await client.get("/health/ready")
    return response.status_code, response.json().get("failing", [])


async def test_redis_restarted_mid_load_degrades_then_recovers_without_a_restart(
    relay: Any, llm_plan: FaultPlan, redis_server: RedisServer, scenario: Scenario
) -> None:
    watch = MetricWatch()
    settings = {"store_backend": "redis", "redis_url": redis_server.url}
    running = relay(**settings, ledger_batch_interval_ms=20)
    async with running as client:
        ledger = parts(running.app).ledger
        surfaces = ("cognigy", "cxone", "chat")

        async def everywhere(n: int, *also: str) -> list[Turn]:
            bursts = await asyncio.gather(
                *(scenario.burst(s, client, n) for s in (*surfaces, *also))
            )
            return [t for burst in bursts for t in burst]

        healthy = await everywhere(8)
        assert {kind for kind, _ in outcomes(healthy)} == {"answered"}
        assert await ledger.flush(timeout=5)

        # Killed while ten /chat turns are with the (slowed) provider: reserved before, settled
        # after; their answers stand and their usage waits in the ledger.
        llm_plan.push(*[Fault(delay=0.5)] * 10)
        in_flight = asyncio.ensure_future(scenario.burst("chat", client, 10))
        await until(lambda: len(llm_plan.requests) == 8 * 3 + 10)  # all ten at the provider
        redis_server.kill()
        caught = await in_flight
        assert outcomes(caught) == {("answered", "answered"): 10}
        assert ledger.pending >= 10  # not written: the store is down

        down = await everywhere(8, "openai")
        assert await ready_status(client) == (503, ["store"])
        assert ledger.pending >= 10

        redis_server.start()  # the same port, empty (no persistence)
        recovered = await everywhere(8)
        assert await ready_status(client) == (200, [])
        assert await ledger.flush(timeout=5)  # the outage's rows are written now
        assert ledger.pending == 0
        status = await client.get("/budget/status", headers=AUTH)
    turns = healthy + caught + down + recovered
    assert_well_formed(turns)
    assert outcomes(down) == {
        ("fallback", "budget_unavailable"): 8 * 3,  # Cognigy's status, the chat routes' code
        ("fallback", "fallback"): 8,  # CXone: the fallback prompt
    }
    assert {t.status for t in down if t.surface in ("chat", "openai")} == {503}
    assert {
        t.body["errorDetails"]["systemErrorMessage"][:28] for t in down if t.surface == "cxone"
    } == {"the budget store cannot be a"}
    assert max(t.latency_ms for t in down) < 1000  # refused at once, no deadline waited out
    assert {kind for kind, _ in outcomes(recovered)} == {"answered"}
    assert ledger.write_failures_total >= 1
    # the new Redis holds the ten rows settled during the outage plus the eight after it
    assert status.status_code == 200
    assert status.json()["totals"]["calls"] == 10 + 8
    assert watch.delta("cxrelay_requests_total") == expected_requests(turns)
