"""Bursts of turns against an LLM provider that misbehaves: 429 storms (with and without
Retry-After), 5xx bursts and a sustained outage, a refused connection, a provider that accepts
and never answers, a revoked key among three. Every turn must get its documented answer or
fallback within its deadline, and cxrelay_requests_total must count exactly what the callers saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from app.simulator.faults import Fault, FaultPlan
from tests.helpers import free_port, post_turn, trigger
from tests.metric_samples import samples
from tests.reliability.conftest import (
    MetricWatch,
    Scenario,
    Turn,
    assert_well_formed,
    expected_requests,
    outcomes,
)

THREE_KEYS = [SecretStr(k) for k in ("sk-pool-one", "sk-pool-two", "sk-pool-three")]
MODEL = "gpt-4o-mini"


def assert_waited_out(turns: list[Turn], cooldown: float, since: float) -> None:
    """The keys cooled for `cooldown`: a turn that found every key cooling waited for one to
    return, and that is most of them (a turn whose next key had not been refused yet goes on at
    once, as the docs say). Counted from the burst's start (`since`, perf_counter), not each
    turn's: the keys cool from their 429, so a turn a loaded machine started late waits less.
    Had the cool-down been skipped, they would all end within a few tens of milliseconds; the
    margin is for timer granularity, not for a skipped wait."""
    ended = sorted(round((t.ended_at - since) * 1000) for t in turns)
    assert statistics.median(ended) >= cooldown * 1000 * 0.8, ended


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    return free_port()


class Blackhole:
    """A provider that accepts every connection, takes the request and never answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="blackhole", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self._listener.accept()
                self._held.append(conn)
                self.accepted += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in [*self._held, self._listener]:
            conn.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


def gauge(name: str, **labels: str) -> float:
    return samples(name)[tuple(sorted(labels.items()))]


def attempts(watch: MetricWatch, outcome: str) -> float:
    return watch.total("cxrelay_llm_attempts_total", outcome=outcome)


def assert_counted(watch: MetricWatch, turns: list[Turn]) -> None:
    assert watch.delta("cxrelay_requests_total") == expected_requests(turns)


# --- 429 storms ----------------------------------------------------------------------------------


async def test_429_storm_with_retry_after_is_waited_out(
    relay: Any, llm_plan: FaultPlan, scenario: Scenario
) -> None:
    """Every key cools for the provider's Retry-After, then the turns go through: all answered."""
    watch = MetricWatch("cxrelay_llm_attempts_total", "cxrelay_provider_key_failures_total")
    turns: list[Turn] = []
    async with relay(llm_gateway_api_key=THREE_KEYS) as client:
        for surface in ("cognigy", "openai"):
            llm_plan.reset()
            llm_plan.push(*[Fault(status=429, headers={"Retry-After": "0.5"})] * 15)
            since = time.perf_counter()
            burst = await scenario.burst(surface, client, 15)
            assert_well_formed(burst)
            assert {kind for kind, _ in outcomes(burst)} == {"answered"}
            assert len(llm_plan.requests) == 30  # each turn: one 429, then its answer
            assert_waited_out(burst, 0.5, since)
            turns += burst
    assert_counted(watch, turns)
    assert watch.delta("cxrelay_provider_key_failures_total") == {
        (("provider", "default"), ("reason", "rate_limited")): 30
    }
    assert attempts(watch, "rate_limited") == 30
    assert attempts(watch, "ok") == 30


async def test_429_storm_without_retry_after_cools_keys_for_the_default(
    relay: Any, llm_plan: FaultPlan, scenario: Scenario
) -> None:
    """No Retry-After: each key cools KEY_COOLDOWN_SECONDS, then the streamed CXone turns and the
    /chat turns are answered."""
    watch = MetricWatch("cxrelay_llm_attempts_total", "cxrelay_provider_key_failures_total")
    turns: list[Turn] = []
    async with relay(llm_gateway_api_key=THREE_KEYS, key_cooldown_seconds=0.5) as client:
        for surface in ("cxone", "chat"):
            llm_plan.reset()
            llm_plan.push(*[Fault(status=429)] * 12)
            since = time.perf_counter()
            burst = await scenario.burst(surface, client, 12)
            assert_well_formed(burst)
            assert {kind for kind, _ in outcomes(burst)} == {"answered"}
            assert_waited_out(burst, 0.5, since)
            turns += burst
    assert_counted(watch, turns)
    assert watch.total("cxrelay_provider_key_failures_total", reason="rate_limited") == 24
    assert attempts(watch, "ok") == 24


async def test_429_storm_longer_than_the_deadline_falls_back_at_once(
    relay: Any, llm_plan: FaultPlan, scenario: Scenario
) -> None:
    """Retry-After: 30 cannot be waited out within the deadline: the fallback goes out at once
    instead of when the deadline expires. The deadline is 6 s here, so that "at once" (under half
    of it) stays distinguishable from "at the deadline" on a loaded machine running tests in
    parallel."""
    llm_plan.push(*[Fault(status=429, headers={"Retry-After": "30"})] * 40)
    watch = MetricWatch()
    deadline = 6.0
    async with relay(cognigy_deadline_seconds=deadline, chat_deadline_seconds=deadline) as client:
        cognigy, chat = await asyncio.gather(
            scenario.burst("cognigy", client, 10, deadline=deadline),
            scenario.burst("chat", client, 10, deadline=deadline),
        )
    turns = cognigy + chat
    assert_well_formed(turns)
    assert outcomes(cognigy) == {("fallback", "llm_unavailable"): 10}
    assert outcomes(chat) == {("fallback", "upstream_unavailable"): 10}
    assert max(t.latency_ms for t in turns) < deadline * 1000 / 2  # not the deadline
    assert 1 <= len(llm_plan.requests) <= 20  # the cooling key is not asked again
    assert_counted(watch, turns)


# --- 5xx -----------------------------------------------------------------------------------------


async def test_5xx_burst_is_retried_and_every_turn_answered(
    relay: Any, llm_plan: FaultPlan, scenario: Scenario
) -> None:
    statuses = [500, 502, 503, 504]
    llm_plan.push(*[Fault(status=statuses[i % 4]) for i in range(20)])
    watch = MetricWatch("cxrelay_llm_attempts_total", "cxrelay_llm_retries_total")
    async with relay() as client:
        cognigy, cxone = await asyncio.gather(
            scenario.burst("cognigy", client, 20), scenario.burst("cxone", client, 20)
        )
    turns = cognigy + cxone
    assert_well_formed(turns)
    assert {kind for kind, _ in outcomes(turns)} == {"answered"}
    assert len(llm_plan.requests) == 60  # 20 failed attempts, 40 answers
    assert attempts(watch, "unavailable") == 20
    assert attempts(watch, "ok") == 40
    assert watch.total("cxrelay_llm_retries_total", route=MODEL) == 20
    assert_counted(watch, turns)


async def test_sustained_5xx_opens_the_circuit_then_recovers(
    relay: Any, llm_plan: FaultPlan, scenario: Scenario
) -> None:
    """An outage: every turn falls back, the breaker spares the provider most of the load (and,
    once open, every turn: nothing is sent, no pass repeated), and once the provider is back
    (after CIRCUIT_RESET_SECONDS) turns are answered again."""
    llm_plan.push(*[Fault(status=503)] * 500)
    watch = MetricWatch("cxrelay_llm_attempts_total")
    async with relay(circuit_failure_threshold=5, circuit_reset_seconds=2.0) as client:
        chat, openai = await asyncio.gather(
            scenario.burst("chat", client, 15), scenario.burst("openai", client, 15)
        )
        assert gauge("cxrelay_provider_circuit_state", provider="default") == 2  # open
        sent = len(llm_plan.requests)
        assert sent < 30 * 3  # without the breaker: every turn, every pass
        skips = attempts(watch, "circuit_open")
        skipped = await scenario.burst("chat", client, 5)
        outage = chat + openai + skipped
        assert_well_formed(outage)
        assert outcomes(outage) == {("fallback", "upstream_unavailable"): 35}
        assert attempts(watch, "circuit_open") - skips == 5  # one skip each: no pass repeated
        assert len(llm_plan.requests) == sent
        llm_plan.reset()  # the provider is back
        await asyncio.sleep(2.1)
        recovered = await scenario.burst("chat", client, 10)
        assert_well_formed(recovered)
        assert {kind for kind, _ in outcomes(recovered)} == {"answered"}
        assert gauge("cxrelay_provider_circuit_state", provider="default") == 0
    assert_counted(watch, outage + recovered)


# --- the provider cannot be reached, or never answers -------------------------------------------


async def test_connection_refused_falls_back_on_every_surface(
    relay: Any, closed_port: int, scenario: Scenario, caplog: pytest.LogCaptureFixture
) -> None:
    watch = MetricWatch("cxrelay_llm_attempts_total")
    url = f"http://127.0.0.1:{closed_port}"
    # 6 s deadlines: "refused at once" (under half of one) stays apart from "the deadline was
    # waited out" on a loaded machine running the tests in parallel
    deadline = 6.0
    deadlines = {f"{s}_deadline_seconds": deadline for s in ("cognigy", "cxone", "chat")}
    with caplog.at_level(logging.INFO, logger="cxrelay.router"):
        async with relay(llm_gateway_base_url=url, **deadlines) as client:
            cognigy, cxone, chat = await asyncio.gather(
                scenario.burst("cognigy", client, 10, deadline=deadline),
                scenario.burst("cxone", client, 10, deadline=deadline),
                scenario.burst("chat", client, 10, deadline=deadline),
            )
            health = (await client.get("/health")).json()
    # the operator is told which URL failed, and how (not only "unavailable", not only "open")
    failed = [r for r in caplog.records if getattr(r, "outcome", "") == "unavailable"]
    assert failed and all(r.base_url == url for r in failed)
    assert "ConnectError" in failed[0].error
    assert "connect" in failed[0].error.split("ConnectError", 1)[1].lower()  # the transport's words
    provider = health["providers"]["default"]
    assert provider["base_url"] == url and "ConnectError" in provider["last_failure"]["error"]
    assert any(url in warning for warning in health["warnings"])
    turns = cognigy + cxone + chat
    assert_well_formed(turns)
    assert outcomes(cognigy) == {("fallback", "llm_unavailable"): 10}
    assert outcomes(cxone) == {("fallback", "fallback"): 10}  # a first failure: prompt again
    assert outcomes(chat) == {("fallback", "upstream_unavailable"): 10}
    assert max(t.latency_ms for t in turns) < deadline * 1000 / 2  # refused at once
    assert attempts(watch, "unavailable") == 30 * 3  # every pass of every turn, none answered
    assert_counted(watch, turns)


async def test_provider_that_never_answers_hits_the_deadline(
    relay: Any, blackhole: Blackhole, scenario: Scenario
) -> None:
    """The provider accepts the connection and the request, then nothing: only the deadline
    can end the turn, and each surface answers its deadline fallback then, not later."""
    deadline = 1.5
    settings = {
        "llm_gateway_base_url": blackhole.url,
        "llm_timeout_seconds": 30.0,  # the per-attempt limit is not what fires
        "cognigy_deadline_seconds": deadline,
        "cxone_deadline_seconds": deadline,
        "cxone_first_token_timeout_seconds": 30.0,
        "chat_deadline_seconds": deadline,
        "chat_first_token_timeout_seconds": 30.0,
    }
    watch = MetricWatch()
    async with relay(**settings) as client:
        started = time.monotonic()
        bursts = await asyncio.gather(
            *(
                scenario.burst(surface, client, 8, deadline=deadline)
                for surface in ("cognigy", "cxone", "chat", "openai")
            )
        )
        elapsed = time.monotonic() - started
    cognigy, cxone, chat, openai = bursts
    turns = [t for burst in bursts for t in burst]
    assert_well_formed(turns)
    assert outcomes(cognigy) == {("fallback", "deadline_exceeded"): 8}
    assert outcomes(cxone) == {("fallback", "fallback"): 8}
    assert outcomes(chat) == {("fallback", "upstream_timeout"): 8}
    assert outcomes(openai) == {("fallback", "upstream_timeout"): 8}
    assert min(t.latency_ms for t in turns) >= deadline * 1000 * 0.9  # the deadline did it
    assert elapsed < deadline + 1.0  # all at once, not one after another
    assert blackhole.accepted >= 1
    assert_counted(watch, turns)


# --- keys ----------------------------------------------------------------------------------------


async def test_a_revoked_key_among_three_is_set_aside_and_every_turn_answered(
    relay: Any, llm_plan: FaultPlan, scenario: Scenario
) -> None:
    keys = [SecretStr(k) for k in ("sk-good-one", "revoked-key-two", "sk-good-three")]
    watch = MetricWatch("cxrelay_llm_attempts_total", "cxrelay_provider_key_failures_total")
    async with relay(llm_gateway_api_key=keys) as client:
        cognigy, cxone = await asyncio.gather(
            scenario.burst("cognigy", client, 15), scenario.burst("cxone", client, 15)
        )
        first = cognigy + cxone
        refused = len([r for r in llm_plan.requests if "revoked" in r["headers"]["authorization"]])
        llm_plan.reset()
        later = await scenario.burst("openai", client, 15)
    turns = first + later
    assert_well_formed(turns)
    assert {kind for kind, _ in outcomes(turns)} == {"answered"}
    assert refused >= 1
    assert watch.total("cxrelay_llm_attempts_total", outcome="unauthorized") == refused
    # quarantined once, for good: the next burst never offers the revoked key
    assert watch.delta("cxrelay_provider_key_failures_total") == {
        (("provider", "default"), ("reason", "unauthorized")): 1
    }
    assert gauge("cxrelay_provider_keys_healthy", provider="default") == 2
    used = {r["headers"]["authorization"] for r in llm_plan.requests}
    assert used == {"Bearer sk-good-one", "Bearer sk-good-three"}
    assert_counted(watch, turns)


# --- a hang cut by the deadline, then an open circuit ---------------------------------------------


async def test_a_hang_cut_by_the_deadline_is_a_timeout_of_the_provider_that_opens_its_circuit(
    relay: Any, blackhole: Blackhole, caplog: pytest.LogCaptureFixture
) -> None:
    """The provider's timeout (30 s) outlasts Cognigy's deadline, so only the deadline ends each
    attempt. Before, the answer listed no attempt, no log line or metric counted it and the
    circuit stayed closed, so every turn waited again; then, with every circuit open, each turn
    still spent backoff passes before its fallback."""
    deadline = 1.5
    settings = {
        "llm_gateway_base_url": blackhole.url,
        "llm_timeout_seconds": 30.0,
        "cognigy_deadline_seconds": deadline,
        "circuit_failure_threshold": 2,
        "llm_max_attempts": 3,
    }
    watch = MetricWatch("cxrelay_llm_attempts_total", "cxrelay_llm_retries_total")
    bodies, took = [], []
    with caplog.at_level(logging.INFO, logger="cxrelay.router"):
        async with relay(**settings) as client:
            for n in range(3):
                started = time.monotonic()
                response = await post_turn(client, trigger(conversationId=f"hang-{n}"))
                took.append(time.monotonic() - started)
                bodies.append(response.json())
            health = (await client.get("/health")).json()
    for body in bodies[:2]:
        assert body["status"] == "deadline_exceeded", body
        assert [a["outcome"] for a in body["attempts"]] == ["timeout"]
    assert max(took[:2]) < deadline + 0.5  # the fallback inside Cognigy's deadline
    opened = bodies[2]
    assert opened["status"] == "llm_unavailable"
    assert [a["outcome"] for a in opened["attempts"]] == ["circuit_open"]  # one pass, no backoff
    assert "circuit open" in opened["reason"]
    assert took[2] < deadline / 2  # nothing to try: answered at once, not after backoff passes
    assert watch.total("cxrelay_llm_attempts_total", outcome="timeout") == 2
    assert watch.total("cxrelay_llm_retries_total") == 0
    timed_out = [
        r for r in caplog.records if r.getMessage() == "llm attempt" and r.outcome == "timeout"
    ]
    assert len(timed_out) == 2
    assert timed_out[0].base_url == blackhole.url and "did not answer" in timed_out[0].error
    provider = health["providers"]["default"]
    assert provider["circuit"] == "open"
    assert provider["base_url"] == blackhole.url
    assert "did not answer" in provider["last_failure"]["error"]
