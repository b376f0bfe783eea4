"""Outgoing limits per provider beyond rpm: a tokens-per-minute cap and a maximum of requests in
flight. Over either, a request waits for room within its queue time (and its deadline), or the
route moves on to its next provider, as for rpm; against two fake providers on loopback."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from app.core.deadline import Deadline
from app.llm.catalog import ProviderConfig, validate_provider_config
from app.llm.ratelimit import ProviderLimiter, request_tokens
from app.llm.retry import RetryPolicy
from app.llm.router import LLMRouter, RouterOptions
from app.llm.types import ChatRequest
from app.simulator.faults import Fault, FaultPlan

KEYS = {"A_KEY": "sk-a", "B_KEY": "sk-b"}


def router(http: httpx.AsyncClient, urls: tuple[str, str], **alpha: Any) -> LLMRouter:
    config = ProviderConfig.model_validate(
        {
            "providers": [
                {
                    "name": "alpha",
                    "base_url": urls[0],
                    "api_keys": ["env:A_KEY"],
                    "models": [{"name": "m-a"}],
                    **alpha,
                },
                {
                    "name": "beta",
                    "base_url": urls[1],
                    "api_keys": ["env:B_KEY"],
                    "models": [{"name": "m-b"}],
                },
            ],
            "routes": [
                {
                    "name": "smart",
                    "chain": [
                        {"provider": "alpha", "model": "m-a"},
                        {"provider": "beta", "model": "m-b"},
                    ],
                }
            ],
        }
    )
    retry = RetryPolicy(max_attempts=1, initial_wait=0.01, max_wait=0.02)
    return LLMRouter(http, config, RouterOptions(retry=retry), env=KEYS)


def request(text: str = "hello", max_tokens: int = 100) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], "smart", 0.2, max_tokens)


async def test_a_burst_over_the_tpm_falls_back_and_settled_calls_keep_the_room(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    assert request_tokens(request().messages, 100) == 106  # "hello": 2 + 4 framing + 100
    llm = router(http, servers, tpm=600)  # a minute's 600 at once, then 10 a second
    burst = await asyncio.gather(*(llm.complete(request(), Deadline.after(10)) for _ in range(8)))
    # five estimates of 106 fit; a sixth would wait 3.6 s, past the 2 s queue: the next provider
    assert sorted(r.provider for r in burst) == ["alpha"] * 5 + ["beta"] * 3
    fallen = next(r for r in burst if r.provider == "beta")
    assert [a.outcome for a in fallen.trail] == ["local_rate_limit", "ok"]

    calm = router(http, servers, tpm=600)
    plan_a.reset()
    for _ in range(10):  # one at a time: each estimate is settled to the ~7 tokens reported
        assert (await calm.complete(request(), Deadline.after(10))).provider == "alpha"
    assert len(plan_a.requests) == 10


async def test_max_concurrent_makes_a_request_wait_for_a_free_slot(
    http: httpx.AsyncClient, servers: tuple[str, str], plan_a: FaultPlan, plan_b: FaultPlan
) -> None:
    llm = router(http, servers, max_concurrent=1)
    plan_a.push(Fault(delay=0.4))
    first = asyncio.create_task(llm.complete(request("one"), Deadline.after(5)))
    while not plan_a.requests:
        await asyncio.sleep(0.01)
    second = await llm.complete(request("two"), Deadline.after(5))
    assert second.provider == "alpha" and (await first).provider == "alpha"
    arrivals = [r["at"] for r in plan_a.requests]
    assert arrivals[1] - arrivals[0] >= 0.35  # it waited for the first to finish
    assert plan_b.requests == []


async def test_max_concurrent_falls_back_when_the_wait_is_too_long(
    http: httpx.AsyncClient,
    servers: tuple[str, str],
    plan_a: FaultPlan,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("app.llm.router.MAX_QUEUE_SECONDS", 0.2)
    llm = router(http, servers, max_concurrent=1)
    plan_a.push(Fault(delay=1.0))
    first = asyncio.create_task(llm.complete(request("one"), Deadline.after(5)))
    while not plan_a.requests:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    second = await llm.complete(request("two"), Deadline.after(5))
    assert second.provider == "beta"
    assert [a.outcome for a in second.trail] == ["local_rate_limit", "ok"]
    assert 0.15 <= time.monotonic() - started < 0.9  # waited its queue time, not the first call
    await first
    plan_a.push(Fault(status=503))  # a failed call gives its slot back too
    assert (await llm.complete(request("three"), Deadline.after(5))).provider == "beta"
    assert (await llm.complete(request("four"), Deadline.after(5))).provider == "alpha"


async def test_a_cancelled_wait_leaves_the_slots_as_they_were() -> None:
    limiter = ProviderLimiter(max_concurrent=1)
    held = await limiter.acquire(0.0)
    assert not isinstance(held, str)
    assert await limiter.acquire(0.0) == "max_concurrent"
    waiting = asyncio.create_task(limiter.acquire(5.0))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    held.release()
    held.release()  # given back once only
    again = await limiter.acquire(0.0)
    assert not isinstance(again, str)
    assert await limiter.acquire(0.0) == "max_concurrent"


async def test_tpm_refused_gives_back_the_rpm_slot_it_took() -> None:
    limiter = ProviderLimiter(rpm=120, tpm=100)  # rpm: bursts of 2
    assert await limiter.acquire(0.0, tokens=500) == "tpm"  # more than a minute's tokens
    first = await limiter.acquire(0.0, tokens=10)
    second = await limiter.acquire(0.0, tokens=10)
    assert not isinstance(first, str) and not isinstance(second, str)  # the burst of 2 intact
    assert await limiter.acquire(0.0, tokens=10) == "rpm"


def test_tpm_and_max_concurrent_must_be_positive() -> None:
    raw = {
        "providers": [
            {
                "name": "p",
                "base_url": "https://p.test",
                "tpm": 0,
                "max_concurrent": -1,
                "models": [{"name": "m"}],
            }
        ]
    }
    _, problems = validate_provider_config(raw, env={})
    found = {p.path: p.message for p in problems}
    assert found["providers[0].tpm"] == "must be above 0 (got 0)"
    assert found["providers[0].max_concurrent"] == "must be above 0 (got -1)"
