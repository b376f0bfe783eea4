"""Provider routing against two fake providers on loopback: key rotation, fallbacks, circuit
breaking and the outgoing rate limit, each as a user of the router would notice it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest

from app.core.deadline import Deadline
from app.core.errors import UnknownModel, UpstreamError, UpstreamRejected
from app.llm import router as router_module
from app.llm.catalog import ProviderConfig
from app.llm.retry import RetryPolicy
from app.llm.router import LLMRouter, RouterOptions
from app.llm.types import ChatRequest
from app.simulator.faults import Fault, FaultPlan

KEYS = {"A_KEY_1": "sk-a-one", "A_KEY_2": "sk-a-two", "A_KEY_3": "sk-a-three", "B_KEY": "sk-b"}


def config(
    urls: tuple[str, str],
    *,
    rpm_a: int | None = None,
    timeout_a: float = 5.0,
    b_kind: str = "openai",
) -> ProviderConfig:
    return ProviderConfig.model_validate(
        {
            "providers": [
                {
                    "name": "alpha",
                    "base_url": urls[0],
                    "api_keys": ["env:A_KEY_1", "env:A_KEY_2", "env:A_KEY_3"],
                    "timeout_seconds": timeout_a,
                    "rpm": rpm_a,
                    "models": [{"name": "gpt-4o-mini", "max_tokens": 256}],
                },
                {
                    "name": "beta",
                    "kind": b_kind,
                    "base_url": urls[1],
                    "api_keys": ["env:B_KEY"],
                    "models": [{"name": "claude-haiku", "max_tokens": 1024}],
                },
            ],
            "routes": [
                {
                    "name": "smart",
                    "chain": [
                        {"provider": "alpha", "model": "gpt-4o-mini"},
                        {"provider": "beta", "model": "claude-haiku"},
                    ],
                }
            ],
        }
    )


def router(http: httpx.AsyncClient, cfg: ProviderConfig, **options: Any) -> LLMRouter:
    opts = RouterOptions(
        retry=RetryPolicy(max_attempts=1, initial_wait=0.01, max_wait=0.02), **options
    )
    return LLMRouter(http, cfg, opts, env=KEYS)


def request(model: str = "smart", max_tokens: int = 512) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": "user", "content": "hello"}],
        model=model,
        temperature=0.2,
        max_tokens=max_tokens,
    )


def keys_used(plan: FaultPlan) -> list[str]:
    return [r["headers"]["authorization"].removeprefix("Bearer ") for r in plan.requests]


async def test_keys_rotate_round_robin(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers))
    for _ in range(4):
        await llm.complete(request(), Deadline.after(5))
    assert keys_used(plan_a) == ["sk-a-one", "sk-a-two", "sk-a-three", "sk-a-one"]


async def test_on_failure_rotation_stays_on_a_key_until_it_fails(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    """`key_rotation: on_failure` (the gateway tutorial's ROUND_ROBIN_ON_FAILURE): every call
    takes the same key; a 401 or a 429 moves that call, and the ones after it, to the next."""
    cfg = config(servers)
    cfg.providers[0].key_rotation = "on_failure"
    llm = router(http, cfg)
    for _ in range(3):
        await llm.complete(request(), Deadline.after(5))
    plan_a.push(Fault(status=429, headers={"Retry-After": "30"}))
    for _ in range(3):
        await llm.complete(request(), Deadline.after(5))
    plan_a.push(Fault(status=401))
    await llm.complete(request(), Deadline.after(5))
    await llm.complete(request(), Deadline.after(5))
    assert keys_used(plan_a) == [
        *["sk-a-one"] * 3,
        "sk-a-one",  # 429: cooling
        *["sk-a-two"] * 3,
        "sk-a-two",  # 401: set aside
        "sk-a-three",
        "sk-a-three",
    ]


async def test_revoked_key_is_set_aside_and_the_next_key_answers(
    http: httpx.AsyncClient,
    servers: tuple[str, str],
    plan_a: FaultPlan,
    caplog: pytest.LogCaptureFixture,
) -> None:
    llm = router(http, config(servers))
    plan_a.push(Fault(status=401))
    with caplog.at_level(logging.WARNING):
        result = await llm.complete(request(), Deadline.after(5))
    assert result.provider == "alpha"
    assert [a.outcome for a in result.trail] == ["unauthorized", "ok"]
    assert keys_used(plan_a) == ["sk-a-one", "sk-a-two"]
    warning = next(r for r in caplog.records if "refused" in r.getMessage())
    assert warning.key_id == result.trail[0].key_id  # type: ignore[attr-defined]
    assert "sk-a-one" not in caplog.text  # named by fingerprint, never the key
    # the revoked key is skipped from now on
    for _ in range(3):
        await llm.complete(request(), Deadline.after(5))
    assert "sk-a-one" not in keys_used(plan_a)[2:]
    assert llm.providers["alpha"].keys.healthy_count == 2


async def test_revoked_key_returns_after_a_successful_probe(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers))
    plan_a.push(Fault(status=403))
    await llm.complete(request(), Deadline.after(5))
    assert llm.providers["alpha"].keys.healthy_count == 2
    assert await llm.probe_unhealthy_keys() == 1  # the fake now accepts it again
    assert llm.providers["alpha"].keys.healthy_count == 3


async def test_a_still_revoked_key_stays_aside_after_a_probe(
    http: httpx.AsyncClient, servers: tuple[str, str]
) -> None:
    revoked = {**KEYS, "A_KEY_1": "revoked-a-one"}
    llm = LLMRouter(http, config(servers), RouterOptions(), env=revoked)
    llm.providers["alpha"].keys.mark_unauthorized(llm.providers["alpha"].keys.keys[0], 401)
    assert await llm.probe_unhealthy_keys() == 0
    assert llm.providers["alpha"].keys.healthy_count == 2


async def test_rate_limited_key_cools_down_then_returns_by_itself(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers))
    plan_a.push(Fault(status=429, headers={"Retry-After": "0.3"}))
    result = await llm.complete(request(), Deadline.after(5))
    assert [a.outcome for a in result.trail] == ["rate_limited", "ok"]
    await llm.complete(request(), Deadline.after(5))  # key 3
    await llm.complete(request(), Deadline.after(5))  # key 2 again: key 1 still cooling
    assert keys_used(plan_a) == ["sk-a-one", "sk-a-two", "sk-a-three", "sk-a-two"]
    await asyncio.sleep(0.35)
    await llm.complete(request(), Deadline.after(5))
    await llm.complete(request(), Deadline.after(5))
    assert "sk-a-one" in keys_used(plan_a)[4:]


async def test_a_pass_that_finds_every_key_cooling_waits_for_one_instead_of_spending_a_retry(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    """Another turn's 429 can re-cool a key after this turn's Retry-After was read: the pass
    waits for the first key to cool down (within the deadline) rather than sending nothing and
    failing with its only attempt."""
    llm = router(http, config(servers))  # max_attempts=1: a wasted pass would fail the turn
    pool = llm.providers["alpha"].keys
    for key, seconds in zip(pool.keys, (0.3, 0.2, 0.4), strict=True):
        pool.mark_rate_limited(key, seconds)
    started = time.monotonic()
    result = await llm.complete(request("gpt-4o-mini"), Deadline.after(5))
    assert 0.2 <= time.monotonic() - started < 0.3
    assert [a.outcome for a in result.trail] == ["ok"]
    assert keys_used(plan_a) == ["sk-a-two"]


async def test_a_cooling_wait_longer_than_the_deadline_is_not_waited(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers))
    pool = llm.providers["alpha"].keys
    for key in pool.keys:
        pool.mark_rate_limited(key, 3.0)
    started = time.monotonic()
    with pytest.raises(UpstreamError, match="every key is cooling down"):
        await llm.complete(request("gpt-4o-mini"), Deadline.after(1))
    assert time.monotonic() - started < 0.1
    assert plan_a.requests == []


async def test_cooling_keys_send_a_chain_to_its_next_entry_without_waiting(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers))
    pool = llm.providers["alpha"].keys
    for key in pool.keys:
        pool.mark_rate_limited(key, 0.5)
    started = time.monotonic()
    result = await llm.complete(request(), Deadline.after(5))
    assert result.provider == "beta"
    assert time.monotonic() - started < 0.3
    assert plan_a.requests == []


async def test_429_on_every_key_falls_back_to_the_next_route_entry(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan, plan_b: FaultPlan
) -> None:
    llm = router(http, config(servers))
    plan_a.push(*[Fault(status=429, headers={"Retry-After": "30"})] * 3)
    result = await llm.complete(request(), Deadline.after(5))
    assert (result.provider, plan_b.requests[0]["body"]["model"]) == ("beta", "claude-haiku")
    assert [a.outcome for a in result.trail] == ["rate_limited"] * 3 + ["ok"]
    assert len(plan_a.requests) == 3


async def test_5xx_falls_back_to_the_next_route_entry(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers))
    plan_a.push(Fault(status=503))
    result = await llm.complete(request(), Deadline.after(5))
    assert result.provider == "beta"
    assert [(a.provider, a.outcome) for a in result.trail] == [
        ("alpha", "unavailable"),
        ("beta", "ok"),
    ]


async def test_timeout_falls_back_within_the_deadline(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers, timeout_a=0.3))
    plan_a.push(Fault(delay=3.0))
    started = time.monotonic()
    result = await llm.complete(request(), Deadline.after(2))
    assert result.provider == "beta"
    assert result.trail[0].outcome == "timeout"
    assert time.monotonic() - started < 1.5


async def test_context_length_error_falls_back_to_a_larger_model(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers))
    plan_a.push(
        Fault(
            status=400,
            json_body={
                "error": {
                    "message": "This model's maximum context length is 128000 tokens",
                    "code": "context_length_exceeded",
                }
            },
        )
    )
    result = await llm.complete(request(), Deadline.after(5))
    assert result.provider == "beta"
    assert result.trail[0].outcome == "context_length"


async def test_callers_400_does_not_fall_back(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan, plan_b: FaultPlan
) -> None:
    llm = router(http, config(servers))
    plan_a.push(Fault(status=400, json_body={"error": {"message": "messages: invalid role"}}))
    with pytest.raises(UpstreamRejected) as caught:
        await llm.complete(request(), Deadline.after(5))
    assert plan_b.requests == []
    assert [a.outcome for a in caught.value.trail] == ["rejected"]  # type: ignore[attr-defined]


async def test_every_entry_failing_raises_with_the_whole_trail(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan, plan_b: FaultPlan
) -> None:
    llm = router(http, config(servers))
    plan_a.push(Fault(status=500))
    plan_b.push(Fault(status=502))
    with pytest.raises(UpstreamError) as caught:
        await llm.complete(request(), Deadline.after(5))
    outcomes = [(a.provider, a.outcome) for a in caught.value.trail]  # type: ignore[attr-defined]
    assert outcomes == [("alpha", "unavailable"), ("beta", "unavailable")]


async def test_circuit_opens_after_failures_and_closes_after_recovery(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers), failure_threshold=2, circuit_reset_seconds=0.4)
    plan_a.push(Fault(status=500), Fault(status=500))
    for _ in range(2):
        assert (await llm.complete(request(), Deadline.after(5))).provider == "beta"
    assert llm.providers["alpha"].breaker.state == "open"
    skipped = await llm.complete(request(), Deadline.after(5))
    assert skipped.provider == "beta"
    assert skipped.trail[0].outcome == "circuit_open"
    assert len(plan_a.requests) == 2  # the open circuit sent nothing to alpha
    await asyncio.sleep(0.45)
    assert llm.providers["alpha"].breaker.state == "half_open"
    recovered = await llm.complete(request(), Deadline.after(5))
    assert recovered.provider == "alpha"
    assert llm.providers["alpha"].breaker.state == "closed"


async def test_failed_trial_reopens_the_circuit(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers), failure_threshold=1, circuit_reset_seconds=0.3)
    plan_a.push(Fault(status=500), Fault(status=500))
    await llm.complete(request(), Deadline.after(5))
    await asyncio.sleep(0.35)
    trial = await llm.complete(request(), Deadline.after(5))
    assert [a.outcome for a in trial.trail] == ["unavailable", "ok"]
    assert llm.providers["alpha"].breaker.state == "open"


async def test_with_every_circuit_of_the_route_open_nothing_is_retried(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan, plan_b: FaultPlan
) -> None:
    """Nothing to try: one pass, each provider skipped once, no backoff before the failure
    (before, each call walked the chain max_attempts times with a backoff between passes)."""
    llm = LLMRouter(
        http,
        config(servers),
        RouterOptions(
            retry=RetryPolicy(max_attempts=3, initial_wait=0.3, max_wait=0.3),
            failure_threshold=1,
            circuit_reset_seconds=60,
        ),
        env=KEYS,
    )
    plan_a.push(Fault(status=500))
    plan_b.push(Fault(status=500))
    with pytest.raises(UpstreamError):  # both fail once: both circuits open
        await llm.complete(request(), Deadline.after(5))
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        await llm.complete(request(), Deadline.after(5))
    took = time.monotonic() - started
    outcomes = [(a.provider, a.outcome) for a in caught.value.trail]  # type: ignore[attr-defined]
    assert outcomes == [("alpha", "circuit_open"), ("beta", "circuit_open")]
    assert "circuit open" in str(caught.value)
    assert "answered 500" in caught.value.for_operator()  # the cause that opened it
    assert took < 0.3  # no backoff: one wait would have been 0.3 s
    assert len(plan_a.requests) == len(plan_b.requests) == 1


async def test_rate_limit_holds_a_burst_at_the_configured_rpm(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan, plan_b: FaultPlan
) -> None:
    llm = router(http, config(servers, rpm_a=240))  # 4 per second, bursts of 4
    started = time.monotonic()
    results = await asyncio.gather(*(llm.complete(request(), Deadline.after(10)) for _ in range(8)))
    assert all(r.provider == "alpha" for r in results)  # queued briefly, none fell back
    arrivals = sorted(r["at"] for r in plan_a.requests)
    # Lower bounds only (a loaded machine can delay a request, never hurry one): the k-th
    # request beyond the burst of 4 cannot reach the provider before its slot.
    for k in range(4, 8):
        assert arrivals[k] - started >= (k - 3) * 0.25 - 0.02, (k, arrivals[k] - started)
    assert plan_b.requests == []


async def test_burst_beyond_the_queue_limit_falls_back_instead_of_waiting(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan, plan_b: FaultPlan
) -> None:
    llm = router(http, config(servers, rpm_a=60))  # 1 per second; waits over 2 s fall back
    results = await asyncio.gather(*(llm.complete(request(), Deadline.after(10)) for _ in range(5)))
    providers = sorted(r.provider for r in results)
    assert providers == ["alpha"] * 3 + ["beta"] * 2
    assert len(plan_a.requests) == 3


async def test_route_sets_the_target_model_and_clamps_max_tokens(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    llm = router(http, config(servers))
    await llm.complete(request(max_tokens=4000), Deadline.after(5))
    sent = plan_a.requests[0]["body"]
    assert sent["model"] == "gpt-4o-mini"
    assert sent["max_tokens"] == 256  # the model's own limit


async def test_anthropic_provider_serves_as_a_fallback(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan, plan_b: FaultPlan
) -> None:
    llm = router(http, config(servers, b_kind="anthropic"))
    plan_a.push(Fault(status=503))
    result = await llm.complete(request(), Deadline.after(5))
    assert result.provider == "beta"
    assert plan_b.requests[0]["headers"]["x-api-key"] == "sk-b"
    assert result.usage.prompt_tokens > 0


async def test_a_plain_model_name_served_by_one_provider_is_a_route(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_b: FaultPlan
) -> None:
    llm = router(http, config(servers))
    result = await llm.complete(request(model="claude-haiku"), Deadline.after(5))
    assert result.provider == "beta"
    with pytest.raises(UnknownModel):
        await llm.complete(request(model="gpt-9"), Deadline.after(5))
    assert set(llm.model_names()) == {"smart", "gpt-4o-mini", "claude-haiku"}


async def test_tenacity_is_built_only_for_a_retry_and_replays_the_first_pass(
    http: httpx.AsyncClient,
    servers: tuple[str, str],
    plan_a: FaultPlan,
    plan_b: FaultPlan,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call answered at once builds no retry loop; one whose first pass fails gets a loop that
    counts that pass as its first attempt (two passes in all with max_attempts=2, not three)."""
    built: list[Any] = []

    class Counted(router_module.AsyncRetrying):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(router_module, "AsyncRetrying", Counted)
    retry = RetryPolicy(max_attempts=2, initial_wait=0.01, max_wait=0.02)
    llm = LLMRouter(http, config(servers), RouterOptions(retry=retry), env=KEYS)
    await llm.complete(request(), Deadline.after(5))
    assert built == []
    plan_a.push(*[Fault(status=503)] * 4)  # alpha fails both passes; beta too, then answers
    plan_b.push(Fault(status=503))
    result = await llm.complete(request(), Deadline.after(5))
    assert len(built) == 1
    assert [(a.provider, a.outcome) for a in result.trail] == [
        ("alpha", "unavailable"),
        ("beta", "unavailable"),
        ("alpha", "unavailable"),
        ("beta", "ok"),
    ]
