"""Inbound limits per client key and per tenant, as a caller notices them: 429 with Retry-After on
the chat routes (OpenAI's body on /v1), the fallback on the webhooks, 4429 on /ws/chat; the same
counts on two app instances sharing the real Redis (127.0.0.1:6379, a prefix of this test only).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from app.accounting.inbound_limits import InboundLimiter, Limits, LimitsSpec
from app.auth.signatures import fingerprint
from app.core.errors import RateLimited
from app.core.principal import Principal
from app.core.settings import Settings
from app.llm.catalog import validate_provider_config
from app.main import create_app
from app.simulator.faults import Fault, FaultPlan
from app.store import StoreUnavailable
from app.store.counters import MemoryCounters
from app.store.redis_counters import RedisCounters
from app.surfaces.chat.websocket import LIMITED
from tests.helpers import cxone_turn, post_turn, trigger
from tests.metric_samples import changes, labels, snapshot
from tests.store.test_store import REDIS_URL, redis_prefix

KEYS = {"a1": "ck-acme-one", "a2": "ck-acme-two", "g1": "ck-globex-one", "g2": "ck-globex-two"}
TENANT_OF = {"a1": "acme", "a2": "acme", "g1": "globex", "g2": "globex"}
CLIENT_KEYS = [SecretStr(f"{key}:{TENANT_OF[name]}") for name, key in KEYS.items()]


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def ask(text: str = "hello", **fields: Any) -> dict[str, Any]:
    body = {
        "session_id": f"s-{uuid.uuid4().hex[:8]}",
        "messages": [{"role": "user", "content": text}],
    }
    return body | fields


async def chat(client: httpx.AsyncClient, name: str, **fields: Any) -> httpx.Response:
    return await client.post("/chat", json=ask(**fields), headers=bearer(name))


def requests_delta(before: Any, surface: str, outcome: str, reason: str) -> float:
    return changes(before)["cxrelay_requests_total"].get(
        labels(surface=surface, outcome=outcome, reason=reason), 0.0
    )


# --- requests per minute -------------------------------------------------------------------------


async def test_a_burst_over_a_keys_rpm_is_429_with_retry_after_and_other_tenants_go_on(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with app_client(client_api_keys=CLIENT_KEYS, client_rate_limit_rpm=3) as client:
        for n in range(3):
            assert (await chat(client, "a1", text=f"hello {n}")).status_code == 200
        before = snapshot()
        refused = await chat(client, "a1", text="hello 3")
        assert refused.status_code == 429
        assert 19 <= int(refused.headers["retry-after"]) <= 21  # one request per 20 s frees up
        body = refused.json()
        assert body["error"] == "rate_limit_exceeded"
        assert body["scope"] == "key" and body["limit"] == "requests" and body["allowed"] == 3
        assert "3 requests per minute" in body["message"]
        assert requests_delta(before, "chat", "rejected", "rate_limited") == 1

        openai = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers=bearer("a1"),
        )
        assert openai.status_code == 429 and "retry-after" in openai.headers
        error = openai.json()["error"]
        assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded"
        assert error["limit"]["scope"] == "key"

        assert (await chat(client, "g1")).status_code == 200  # another tenant's key: unaffected
    assert len(llm_plan.requests) == 4  # nothing refused reached the provider


def limits_file(tmp_path: Path, url: str, limits: dict[str, Any]) -> Path:
    path = tmp_path / "providers.yaml"
    config = {
        "allow_literal_keys": True,
        "providers": [
            {
                "name": "sim",
                "base_url": url,
                "api_keys": ["literal:sk-test"],
                "models": [{"name": "gpt-4o-mini"}],
            }
        ],
        "limits": limits,
    }
    path.write_text(json.dumps(config))
    return path


async def test_a_tenants_limit_holds_across_its_keys_and_a_key_override_binds_one_key(
    app_client: Callable[..., Any], llm_server: Any, tmp_path: Path
) -> None:
    limits = {"tenants": {"acme": {"rpm": 3}}, "keys": {fingerprint(KEYS["g1"]): {"rpm": 1}}}
    path = limits_file(tmp_path, llm_server.url, limits)
    async with app_client(client_api_keys=CLIENT_KEYS, providers_file=path) as client:
        assert [(await chat(client, k)).status_code for k in ("a1", "a2", "a1")] == [200] * 3
        refused = await chat(client, "a2")  # a2 has sent one: the tenant's three are spent
        assert refused.status_code == 429 and refused.json()["scope"] == "tenant"
        assert "tenant acme may use 3 requests per minute" in refused.json()["message"]

        assert (await chat(client, "g1")).status_code == 200
        own = await chat(client, "g1")
        assert own.status_code == 429 and own.json()["scope"] == "key"
        assert (await chat(client, "g2")).status_code == 200  # globex itself has room


def test_overrides_keep_omitted_fields_and_null_lifts_a_limit() -> None:
    spec = LimitsSpec.model_validate(
        {"tenants": {"acme": {"tpm": None}}, "keys": {"ABCDEF12": {"rpm": 5}}}
    )
    limiter = InboundLimiter(MemoryCounters(), Limits(600, 1000, 20), lambda: spec)
    key, tenant = limiter.limits_for(Principal("acme", "abcdef12", "client"))
    assert key == Limits(5, 1000, 20)  # the id is matched whatever its case in the file
    assert tenant == Limits(600, None, 20)


async def test_a_call_is_limited_by_its_own_configuration_snapshot_not_one_applied_since() -> None:
    """The pipeline passes its CallContext's overrides: a configuration applied between the
    request's admission and its token charge does not give one call two sets of limits."""
    tight = LimitsSpec.model_validate({"tenants": {"acme": {"rpm": 1, "tpm": 10}}})
    caller = Principal("acme", "abcdef12", "client")

    def limiter(in_service: LimitsSpec | None) -> InboundLimiter:
        return InboundLimiter(MemoryCounters(), Limits(600, 1000, 20), lambda: in_service)

    none_in_service = limiter(None)
    await none_in_service.admit(caller, tight)
    with pytest.raises(RateLimited):
        await none_in_service.admit(caller, tight)  # the snapshot's 1 rpm

    tight_in_service = limiter(tight)
    await tight_in_service.admit(caller, None)
    await tight_in_service.admit(caller, None)  # the snapshot has no overrides: 600 rpm
    with pytest.raises(RateLimited):
        await tight_in_service.admit(caller)  # no snapshot given: the one in service, 1 rpm

    charged = limiter(tight)
    with pytest.raises(RateLimited):
        await charged.charge(caller, 11, tight)
    assert await charged.charge(caller, 11, None) is not None
    with pytest.raises(RateLimited):
        await charged.charge(caller, 11)


def test_the_limits_section_is_validated_with_paths() -> None:
    raw = {
        "providers": [{"name": "p", "base_url": "https://p.test", "models": [{"name": "m"}]}],
        "limits": {
            "tenants": {"acme": {"rpm": 0, "rpn": 5}},
            "keys": {"my-key": {"streams": 2}},
        },
    }
    _, problems = validate_provider_config(raw, env={})
    found = {p.path: p.message for p in problems}
    assert "greater than or equal to 1" in found["limits.tenants.acme.rpm"]
    assert "not permitted" in found["limits.tenants.acme.rpn"]
    assert "not a key id" in found["limits.keys"] and "sha256sum" in found["limits.keys"]
    raw["limits"] = {"tenants": {"bad name": {}}}
    _, problems = validate_provider_config(raw, env={})
    assert "not a tenant name" in {p.path: p.message for p in problems}["limits.tenants"]
    raw["limits"] = {"keys": {12345678: {"rpm": 1}}}  # YAML reads an unquoted id as a number
    _, problems = validate_provider_config(raw, env={})
    assert any("quote it" in p.message for p in problems)


# --- tokens per minute ---------------------------------------------------------------------------


async def test_tokens_are_estimated_before_the_call_and_settled_to_the_usage_after(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with app_client(client_api_keys=CLIENT_KEYS, client_rate_limit_tpm=1000) as client:
        # ~110 prompt tokens + 500: two estimates (~1,220) would not fit the minute's 1,000; the
        # first is settled to its real ~120 tokens, so the second fits
        assert (await chat(client, "a1", text="first", max_tokens=500)).status_code == 200
        assert (await chat(client, "a1", text="second", max_tokens=500)).status_code == 200
        crowded = await chat(client, "a1", text="third", max_tokens=800)
        assert crowded.status_code == 429
        assert crowded.json()["limit"] == "tokens"
        assert 1 <= int(crowded.headers["retry-after"]) <= 60
        never = await chat(client, "a1", text="fourth", max_tokens=950)  # over the whole minute
        assert never.status_code == 429 and "retry-after" not in never.headers
        assert "can never fit" in never.json()["message"]
        assert (await chat(client, "g1", text="other", max_tokens=800)).status_code == 200
    assert len(llm_plan.requests) == 3


# --- concurrent streams --------------------------------------------------------------------------


async def test_the_streams_over_the_limit_are_refused_until_one_ends(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    slow = Fault(chunks=["one ", "two ", "three ", "four"], chunk_delay=0.25)
    llm_plan.push(slow, slow)
    async with app_client(client_api_keys=CLIENT_KEYS, client_max_concurrent_streams=2) as client:
        running = [
            asyncio.create_task(chat(client, "a1", text=f"long {n}", stream=True)) for n in (1, 2)
        ]
        deadline = time.monotonic() + 5
        while len(llm_plan.requests) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        refused = await chat(client, "a1", text="third", stream=True)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["limit"] == "streams"
        openai = await client.post(
            "/v1/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            },
            headers=bearer("a1"),
        )
        assert openai.status_code == 429
        assert (await chat(client, "a1", text="whole")).status_code == 200  # not a stream
        assert (await chat(client, "g1", text="other", stream=True)).status_code == 200
        assert [(await task).status_code for task in running] == [200, 200]
        again = await chat(client, "a1", text="after", stream=True)
        assert again.status_code == 200 and '"type": "complete"' in again.text


@contextmanager
def sync_app(make_settings: Callable[..., Settings], **overrides: Any) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(client_api_keys=CLIENT_KEYS, **overrides))) as tc:
        yield tc


def refused_with(ws: WebSocketTestSession) -> tuple[dict[str, Any], int]:
    frame = ws.receive_json()
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    return frame, closed.value.code


def test_a_socket_over_the_stream_limit_gets_an_error_frame_and_4429(
    make_settings: Callable[..., Settings],
) -> None:
    with sync_app(make_settings, client_max_concurrent_streams=2) as tc:
        with tc.websocket_connect("/ws/chat", headers=bearer("a1")) as first:
            with tc.websocket_connect("/ws/chat", headers=bearer("a2")) as second:
                with tc.websocket_connect("/ws/chat", headers=bearer("a1")) as third:
                    frame, code = refused_with(third)
                assert code == LIMITED
                assert frame["code"] == "rate_limit_exceeded"
                assert frame["detail"]["limit"] == "streams"
                sse = tc.post("/chat", json=ask(stream=True), headers=bearer("a1"))
                assert sse.status_code == 429  # the sockets are streams of the same key
                second.send_json(ask())
                while second.receive_json()["type"] == "content":
                    pass  # a socket within the limit answers as usual
            first.send_json(ask())
            while first.receive_json()["type"] == "content":
                pass
        # both closed: their places are free again (the server may take a moment to see it)
        for _ in range(50):
            with tc.websocket_connect("/ws/chat", headers=bearer("a1")) as ws:
                ws.send_json(ask())
                if ws.receive_json()["type"] != "error":
                    break
            time.sleep(0.02)
        else:
            pytest.fail("the closed sockets' places were never freed")


def test_a_socket_over_the_rpm_gets_an_error_frame_and_stays_open(
    make_settings: Callable[..., Settings],
) -> None:
    with (
        sync_app(make_settings, client_rate_limit_rpm=1) as tc,
        tc.websocket_connect("/ws/chat", headers=bearer("a1")) as ws,
    ):
        ws.send_json(ask())
        while ws.receive_json()["type"] == "content":
            pass
        ws.send_json(ask("again"))
        frame = ws.receive_json()
        assert frame["type"] == "error" and frame["code"] == "rate_limit_exceeded"
        assert frame["detail"]["limit"] == "requests"
        assert frame["detail"]["retry_after_seconds"] >= 59
        ws.send_json({"type": "nonsense"})
        assert ws.receive_json()["code"] == "invalid_request"  # still open


# --- several replicas ----------------------------------------------------------------------------


async def test_two_instances_on_one_redis_share_the_rpm(
    app_client: Callable[..., Any],
) -> None:
    async with redis_prefix() as prefix:
        shared = {
            "client_api_keys": CLIENT_KEYS,
            "client_rate_limit_rpm": 3,
            "store_backend": "redis",
            "redis_url": REDIS_URL,
            "redis_key_prefix": prefix,
        }
        async with app_client(**shared) as one, app_client(**shared) as two:
            statuses = [(await chat(c, "a1")).status_code for c in (one, two, one)]
            assert statuses == [200, 200, 200]
            refused = await chat(two, "a1")
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 19
            assert (await chat(one, "a2")).status_code == 429  # acme's 3 (the default) are spent
            assert (await chat(two, "g1")).status_code == 200  # globex's are not
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            keys = [k async for k in client.scan_iter(match=f"{prefix}*:lim:*")]
        finally:
            await client.aclose()
        assert any(k.startswith(f"{prefix}{{acme}}:lim:rpm") for k in keys)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_counters_take_adjust_and_lease_alike_in_memory_and_redis(backend: str) -> None:
    async with redis_prefix() as prefix:
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        counters: Any = (
            MemoryCounters() if backend == "memory" else RedisCounters(client, prefix=prefix)
        )
        try:
            buckets = [("tpm:k:x", 600), ("tpm:t", 1200)]
            assert await counters.take("acme", buckets, 600) == (0.0, -1)
            wait, index = await counters.take("acme", buckets, 60)  # the key's minute is spent
            assert index == 0 and 5.9 <= wait <= 6.01  # 60 tokens at 10 a second
            await counters.adjust("acme", buckets, -300)  # settled: 300 were not used
            assert await counters.take("acme", buckets, 60) == (0.0, -1)
            slots = [("streams:k:x", 1)]
            assert await counters.lease("acme", slots, "one", 0.3) == -1
            assert await counters.lease("acme", slots, "two", 0.3) == 0
            assert await counters.lease("acme", slots, "one", 0.3) == -1  # a renewal
            await counters.unlease("acme", ["streams:k:x"], "one")
            assert await counters.lease("acme", slots, "two", 0.2) == -1
            await asyncio.sleep(0.3)  # never given back: it expires by itself
            assert await counters.lease("acme", slots, "three", 5) == -1
        finally:
            await client.aclose()


async def test_a_whole_minute_taken_at_once_fits_whatever_the_clock_reads() -> None:
    """rpm=1 (or a charge of the whole tpm) fills the bucket exactly; at this clock reading
    `tat - now` rounds a few nanoseconds over the minute, which once refused the first request."""
    counters = MemoryCounters(clock=lambda: 268394.06491604133)
    assert await counters.take("acme", [("rpm:k", 1)], 1) == (0.0, -1)
    wait, index = await counters.take("acme", [("rpm:k", 1)], 1)
    assert index == 0 and wait == pytest.approx(60.0)


async def test_a_store_that_cannot_count_lets_requests_through() -> None:
    class Down(MemoryCounters):
        async def take(self, *args: Any) -> tuple[float, int]:
            raise StoreUnavailable("Redis store unreachable")

    limiter = InboundLimiter(Down(), Limits(rpm=1))
    principal = Principal("acme", "abcdef12", "client")
    for _ in range(3):
        await limiter.admit(principal)  # logged, not refused: the budgets still meter spending
    counting = InboundLimiter(MemoryCounters(), Limits(rpm=1))
    await counting.admit(principal)
    with pytest.raises(RateLimited):
        await counting.admit(principal)


# --- the webhooks answer their fallback ----------------------------------------------------------


async def test_a_cognigy_turn_over_the_limit_gets_the_fallback_and_no_upstream_call(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with app_client(client_rate_limit_rpm=1) as client:
        assert (await post_turn(client, trigger())).json()["status"] == "success"
        before = snapshot()
        response = await post_turn(client, trigger(conversationId="contact-43"))
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "rate_limited"
    assert body["fallback_action"] == "route_to_human"
    assert "1 requests per minute" in body["reason"]
    assert body["attempts"] == [] and len(llm_plan.requests) == 1
    assert requests_delta(before, "cognigy", "fallback", "rate_limited") == 1


async def test_a_cxone_turn_over_the_limit_hands_back_with_the_reason(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with app_client(client_rate_limit_rpm=1) as client:
        assert (await cxone_turn(client)).json()["branchName"] == "PromptAndCollectNextResponse"
        before = snapshot()
        response = await cxone_turn(client, "And my refund?")
    assert response.status_code == 200
    body = response.json()
    assert body["branchName"] == "ReturnControlToScript"
    assert body["customPayload"]["handoffReason"] == "rate_limited"
    assert body["errorDetails"]["systemErrorMessage"].startswith("rate_limited: rate limit")
    assert len(llm_plan.requests) == 1
    assert requests_delta(before, "cxone", "fallback", "rate_limited") == 1
