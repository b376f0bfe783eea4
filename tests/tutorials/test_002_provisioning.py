"""Tutorial 002 (gateway provisioning over REST v2) against cx-relay, end to end.

`TutorialClient` is written here from the tutorial's wire format (its own code, not the
tutorial's): provider discovery and the model matrix, the gateway payload checked against it,
the create (201) and the health-check trigger (200/202), the status read. The flow runs against
the real app (its lifespan, a provider file, real loopback providers): created gateways stay
`pending_validation` and route nothing, the health check makes one `active` and its model
answers a chat call through the official `openai` client, answered by the simulated provider the
gateway points at; a failed check says why; bad payloads list every problem with its path; each
step is in the audit log with the payload's hash; the status is read by another app instance on
the same store (SQLite and the real Redis at 127.0.0.1:6379).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from fastapi import FastAPI, Request
from pydantic import SecretStr

from app.simulator.faults import FaultPlan
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer
from tests.store.test_store import REDIS_URL, redis_prefix

ADMIN = "admin-token-002-tests-7d1e"
PROVISIONER = "ck-provisioner-002-9a7f"  # gateway:write and provider:read
INVOKER = "ck-invoker-002-5c3b"  # llm.gateway:invoke only
UNSCOPED = "ck-unscoped-002-e41d"  # no scope list: every chat route, no provisioning
READER = "ck-reader-002-0b6a"  # provider:read only
GATEWAY_KEY = "sk-gateway-002-key"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens


# --- the tutorial's client, from its wire format ------------------------------------------------


@dataclass(frozen=True)
class ModelEndpoint:
    model_id: str
    endpoint_url: str
    max_tokens: int
    max_context: int


class TutorialClient:
    """What a reader of tutorial 002 has: bearer-authenticated JSON calls under /api/v2."""

    ENGINES = ("openai", "anthropic", "azure")

    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    async def fetch_providers(self) -> list[dict[str, Any]]:
        response = await self.http.get("/api/v2/providers", headers=self.headers)
        assert response.status_code == 200, response.text
        providers = response.json()
        assert isinstance(providers, list)  # the tutorial decodes into a slice of providers
        return providers

    def model_matrix(self, providers: list[dict[str, Any]]) -> dict[str, dict[str, ModelEndpoint]]:
        return {
            p["id"]: {
                m["model_id"]: ModelEndpoint(
                    m["model_id"], m["endpoint_url"], m["max_tokens"], m["max_context_tokens"]
                )
                for m in p["models"]
            }
            for p in providers
            if p["engine"] in self.ENGINES
        }

    @staticmethod
    def check(payload: dict[str, Any], matrix: dict[str, dict[str, ModelEndpoint]]) -> str | None:
        """The tutorial's client-side validation: the first problem, or None."""
        models = matrix.get(payload["provider_id"])
        if models is None:
            return "provider not in matrix"
        for model_id, route in payload["model_routing"].items():
            known = models.get(model_id)
            if known is None:
                return f"model {model_id} not available"
            if route["max_tokens"] > known.max_tokens:
                return "route max_tokens over the model's"
            if payload["max_context_tokens"] > known.max_context:
                return "max_context_tokens over the model's"
        return None if payload["rate_limit_rpm"] > 0 else "rate_limit_rpm must be above 0"

    async def create_gateway(self, payload: dict[str, Any]) -> httpx.Response:
        headers = {**self.headers, "Content-Type": "application/json"}
        return await self.http.post(
            "/api/v2/gateways", content=json.dumps(payload), headers=headers
        )

    async def trigger_health_check(self, health_check_url: str) -> httpx.Response:
        return await self.http.post(health_check_url, headers=self.headers)

    async def gateway(self, gateway_id: str) -> httpx.Response:
        return await self.http.get(f"/api/v2/gateways/{gateway_id}", headers=self.headers)


def gateway_payload(name: str, endpoint: str, **changes: Any) -> dict[str, Any]:
    """The tutorial's create payload, for the provider file's provider and model."""
    payload: dict[str, Any] = {
        "name": name,
        "provider_id": "openai",
        "api_key_directive": "env:CXR_PROVIDER_KEY_GATEWAY",
        "model_routing": {
            "gpt-4-turbo": {
                "endpoint_url": f"{endpoint}/v1/chat/completions",
                "max_tokens": 4096,
                "timeout_ms": 15000,
            }
        },
        "max_context_tokens": 8192,
        "rate_limit_rpm": 120,
    }
    return payload | changes


def payload_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


# --- fakes and fixtures --------------------------------------------------------------------------


class Receiver:
    """ADMIN_NOTIFY_URLS' receiver, and a provider endpoint a caller owns: records every request
    (its method, path, Authorization and JSON body) and answers 200."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.app = FastAPI()

        @self.app.api_route("/{path:path}", methods=["GET", "POST"])
        async def record(path: str, request: Request) -> dict[str, Any]:
            raw = await request.body()
            with self.lock:
                self.requests.append(
                    {
                        "method": request.method,
                        "path": f"/{path}",
                        "authorization": request.headers.get("authorization"),
                        "json": json.loads(raw) if raw else None,
                    }
                )
            return {"object": "list", "data": []}

    @property
    def posted(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r["json"] for r in self.requests if r["method"] == "POST"]


@dataclass
class World:
    endpoint: LoopbackServer  # where the gateway's model_routing points: a simulated provider
    endpoint_plan: FaultPlan
    receiver: LoopbackServer
    received: Receiver


@pytest.fixture
def world() -> Iterator[World]:
    plan, received = FaultPlan(), Receiver()
    with (
        LoopbackServer(create_llm_simulator(plan)) as endpoint,
        LoopbackServer(received.app) as receiver,
    ):
        yield World(endpoint, plan, receiver, received)


@pytest.fixture
def service(
    app_client: Callable[..., Any],
    llm_server: LoopbackServer,
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Any]:
    """`service(**overrides)`: the app on a provider file whose provider `openai` knows the
    tutorial's model; the provisioning, invoking and unscoped client keys; notifications on."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider-file-key")  # the file may name any variable
    monkeypatch.setenv("CXR_PROVIDER_KEY_GATEWAY", GATEWAY_KEY)
    providers = {
        "providers": [
            {
                "name": "openai",
                "base_url": llm_server.url,
                "api_keys": ["env:OPENAI_API_KEY"],
                "models": [
                    {"name": "gpt-4o-mini", "max_tokens": 16384, "max_context_tokens": 128000},
                    {"name": "gpt-4-turbo", "max_tokens": 4096, "max_context_tokens": 128000},
                ],
            }
        ],
        "routes": [{"name": "support", "chain": [{"provider": "openai", "model": "gpt-4o-mini"}]}],
    }
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump(providers))

    def start(**overrides: Any) -> Any:
        values: dict[str, Any] = {
            "providers_file": str(path),
            "llm_model": "support",
            "admin_token": SecretStr(ADMIN),
            "client_api_keys": [
                SecretStr(f"{PROVISIONER}:acme;scopes=gateway:write+provider:read"),
                SecretStr(f"{INVOKER}:acme;scopes=llm.gateway:invoke"),
                SecretStr(f"{UNSCOPED}:acme"),
                SecretStr(f"{READER}:acme;scopes=provider:read"),
            ],
            "admin_notify_urls": [f"{world.receiver.url}/gateway-events"],
            "data_dir": str(tmp_path / "data"),
        }
        return app_client(**(values | overrides))

    return start


@asynccontextmanager
async def store_settings(backend: str) -> AsyncIterator[dict[str, Any]]:
    if backend == "sqlite":
        yield {}
        return
    async with redis_prefix() as prefix:
        yield {"store_backend": "redis", "redis_url": REDIS_URL, "redis_key_prefix": prefix}


def openai_client(http: httpx.AsyncClient, key: str = INVOKER) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key, base_url="http://cx-relay.test/v1", http_client=http, max_retries=0
    )


async def ask(http: httpx.AsyncClient, model: str) -> str:
    completion = await openai_client(http).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Where is my parcel?"}]
    )
    return completion.choices[0].message.content or ""


async def audit(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await http.get(
        "/admin/audit", params={"limit": 50}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["records"]))  # oldest first


def gateway_calls(plan: FaultPlan) -> list[str]:
    return [r["body"]["model"] for r in plan.requests if r.get("body")]


# --- the tutorial's flow -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_create_pending_health_check_active_serves(
    service: Callable[..., Any], world: World, backend: str
) -> None:
    payload = gateway_payload("production-llm-gateway-01", world.endpoint.url)
    async with (
        store_settings(backend) as store,
        service(**store) as first,
        service(**store) as second,
    ):
        tutorial = TutorialClient(first, PROVISIONER)
        matrix = tutorial.model_matrix(await tutorial.fetch_providers())
        assert matrix["openai"]["gpt-4-turbo"].max_context == 128000
        assert matrix["openai"]["gpt-4-turbo"].max_tokens == 4096
        assert TutorialClient.check(payload, matrix) is None

        created = await tutorial.create_gateway(payload)
        assert created.status_code == 201, created.text
        body = created.json()
        assert set(body) == {"id", "name", "status", "created_at", "health_check_url"}
        gateway_id = body["id"]
        assert gateway_id.startswith("gw_")
        assert body["name"] == "production-llm-gateway-01"
        assert body["status"] == "pending_validation"
        assert body["created_at"].endswith("Z")
        assert body["health_check_url"] == f"/api/v2/gateways/{gateway_id}/health-check"

        model = "production-llm-gateway-01/gpt-4-turbo"
        with pytest.raises(openai.NotFoundError):  # pending: nothing routes to it
            await ask(first, model)
        assert gateway_calls(world.endpoint_plan) == []

        # another worker (another app on the same store) reads the same record
        other = TutorialClient(second, PROVISIONER)
        pending = await other.gateway(gateway_id)
        assert pending.status_code == 200, pending.text
        assert pending.json()["status"] == "pending_validation"

        checked = await tutorial.trigger_health_check(body["health_check_url"])
        assert checked.status_code in (200, 202), checked.text
        result = checked.json()
        assert result["status"] == "active", result
        assert result["reasons"] == []
        assert result["models"] == [model]

        answer = await ask(first, model)
        assert answer
        assert gateway_calls(world.endpoint_plan) == ["gpt-4-turbo"]
        sent = world.endpoint_plan.requests[-1]["headers"]
        assert sent["authorization"] == f"Bearer {GATEWAY_KEY}"
        assert (await other.gateway(gateway_id)).json()["status"] == "active"

        records = await audit(first)
    steps = [(r["action"], r["result"]) for r in records]
    assert steps == [("gateway_create", "ok"), ("apply", "ok"), ("gateway_health_check", "ok")]
    create, apply, check = records
    assert create["payload_sha256"] == check["payload_sha256"] == payload_hash(payload)
    assert gateway_id in create["detail"] and gateway_id in check["detail"]
    assert "production-llm-gateway-01" in apply["detail"]  # the provider it added
    assert GATEWAY_KEY not in json.dumps(records)


async def test_the_health_check_callback_carries_the_metrics(
    service: Callable[..., Any], world: World
) -> None:
    async with service() as client:
        tutorial = TutorialClient(client, PROVISIONER)
        good = (
            await tutorial.create_gateway(gateway_payload("gw-good", world.endpoint.url))
        ).json()
        bad = (await tutorial.create_gateway(gateway_payload("gw-bad", UNREACHABLE))).json()
        assert (await tutorial.trigger_health_check(good["health_check_url"])).status_code == 200
        last = await tutorial.trigger_health_check(bad["health_check_url"])
        for _ in range(200):
            if len(world.received.posted) >= 2:
                break
            await asyncio.sleep(0.01)
    events = [e for e in world.received.posted if e["event"] == "gateway_status_changed"]
    assert [(e["gateway_id"], e["status"]) for e in events] == [
        (good["id"], "active"),
        (bad["id"], "failed"),
    ]
    metrics = events[-1]["metrics"]
    assert metrics["window_seconds"] == 3600
    assert metrics["total_configurations"] == 2
    assert metrics["success_rate"] == 50.0
    assert metrics["avg_latency_ms"] > 0
    assert last.json()["metrics"] == metrics
    assert events[-1]["payload_sha256"] == payload_hash(gateway_payload("gw-bad", UNREACHABLE))


async def test_a_failed_health_check_says_why_and_routes_nothing(
    service: Callable[..., Any], world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_PROVIDER_KEY_REVOKED", "revoked-gateway-key")  # the provider refuses
    refused = gateway_payload(
        "gw-refused", world.endpoint.url, api_key_directive="env:CXR_PROVIDER_KEY_REVOKED"
    )
    async with service() as client:
        tutorial = TutorialClient(client, PROVISIONER)
        for payload in (refused, gateway_payload("gw-unreachable", UNREACHABLE)):
            created = (await tutorial.create_gateway(payload)).json()
            checked = await tutorial.trigger_health_check(created["health_check_url"])
            assert checked.status_code == 200, checked.text
            result = checked.json()
            assert result["status"] == "failed"
            (reason,) = result["reasons"]
            assert reason["path"] == "model_routing.gpt-4-turbo.endpoint_url"
            assert "failed the health check" in reason["message"]
            assert "GET " in reason["message"] and "/v1/models" in reason["message"]
            assert result["models"] == []
            status = (await tutorial.gateway(created["id"])).json()
            assert status["status"] == "failed" and status["reasons"] == result["reasons"]
            with pytest.raises(openai.NotFoundError):
                await ask(client, f"{payload['name']}/gpt-4-turbo")
        records = await audit(client)
    assert [r["result"] for r in records if r["action"] == "gateway_health_check"] == [
        "health_check_failed",
        "health_check_failed",
    ]
    assert "revoked-gateway-key" not in json.dumps(records)
    assert gateway_calls(world.endpoint_plan) == []


async def test_a_failed_gateway_passes_once_its_key_is_fixed(
    service: Callable[..., Any], world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_PROVIDER_KEY_GATEWAY", "revoked-for-now")
    async with service() as client:
        tutorial = TutorialClient(client, PROVISIONER)
        created = (
            await tutorial.create_gateway(gateway_payload("gw-retry", world.endpoint.url))
        ).json()
        first = (await tutorial.trigger_health_check(created["health_check_url"])).json()
        monkeypatch.setenv("CXR_PROVIDER_KEY_GATEWAY", GATEWAY_KEY)
        second = (await tutorial.trigger_health_check(created["health_check_url"])).json()
        again = (await tutorial.trigger_health_check(created["health_check_url"])).json()
        assert await ask(client, "gw-retry/gpt-4-turbo")
    assert (first["status"], second["status"], again["status"]) == ("failed", "active", "active")


# --- refusals ------------------------------------------------------------------------------------


async def test_validation_lists_every_problem_with_its_path(
    service: Callable[..., Any], world: World
) -> None:
    routing = {
        "gpt-4-turbo": {
            "endpoint_url": f"{world.endpoint.url}/v1/messages",
            "max_tokens": 8192,
            "timeout_ms": 1000,
        },
        "gpt-5": {"endpoint_url": world.endpoint.url, "max_tokens": 10, "timeout_ms": 1000},
        "gpt-4o-mini": {"endpoint_url": "ftp://example.com", "max_tokens": 100, "timeout_ms": 1000},
    }
    semantic = gateway_payload(
        "gw-invalid", world.endpoint.url, model_routing=routing, max_context_tokens=200000
    )
    shape = {**gateway_payload("", world.endpoint.url), "rate_limit_rpm": 0, "region": "eu"}
    del shape["provider_id"]
    tutorials_directive = gateway_payload(
        "gw-directive", world.endpoint.url, api_key_directive="env:COGNIGY_LLM_API_KEY"
    )
    vault = gateway_payload("gw-vault", world.endpoint.url, api_key_directive="vault:llm/key")
    async with service() as client:
        tutorial = TutorialClient(client, PROVISIONER)
        responses = [
            await tutorial.create_gateway(p) for p in (semantic, shape, tutorials_directive, vault)
        ]
        unknown_provider = await tutorial.create_gateway(
            gateway_payload("gw-x", world.endpoint.url, provider_id="prov_8x9k2m4p")
        )
        not_json = await client.post(
            "/api/v2/gateways",
            content=b"{not json",
            headers={**tutorial.headers, "Content-Type": "application/json"},
        )
        records = await audit(client)
    for response in (*responses, unknown_provider, not_json):
        assert response.status_code == 422, response.text
    listed = [r.json()["problems"] for r in responses]
    problems = [{p["path"]: p["message"] for p in found} for found in listed]
    assert len(listed[0]) == 5
    assert problems[0] == {
        "model_routing.gpt-4-turbo.max_tokens": (
            "8192 is above openai/gpt-4-turbo's max_tokens 4096"
        ),
        "max_context_tokens": "200000 is above openai/gpt-4-turbo's context window 128000",
        "model_routing.gpt-4-turbo.endpoint_url": (
            "is a /messages endpoint, but 'openai' speaks the openai wire format "
            "(/chat/completions)"
        ),
        "model_routing.gpt-5": (
            "provider 'openai' has no chat model 'gpt-5' (it has: gpt-4o-mini, gpt-4-turbo)"
        ),
        "model_routing.gpt-4o-mini.endpoint_url": "must be an http:// or https:// URL",
    }
    assert set(problems[1]) == {"name", "provider_id", "rate_limit_rpm", "region"}
    assert problems[2] == {
        "api_key_directive": (
            "env:COGNIGY_LLM_API_KEY is refused: through the API, env: may name only variables "
            "starting with PROVISIONING_ENV_PREFIX (CXR_PROVIDER_KEY_)"
        )
    }
    assert set(problems[3]) == {"api_key_directive"}
    assert "malformed key directive" in problems[3]["api_key_directive"]
    assert "unknown provider 'prov_8x9k2m4p'" in unknown_provider.json()["problems"][0]["message"]
    assert not_json.json()["problems"][0]["path"] == "(root)"
    invalid = [r for r in records if r["action"] == "gateway_create"]
    assert [r["result"] for r in invalid] == ["invalid"] * 5  # the unparsable body is not audited
    assert invalid[0]["payload_sha256"] == payload_hash(semantic)
    assert world.endpoint_plan.requests == []


async def test_a_refused_directive_never_reaches_the_provider(
    service: Callable[..., Any], world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20 item 6 on the tutorial's endpoint: the service's secrets pointed at a server the
    caller owns (the receiver) are refused at create, so no health check can send them; an
    allowed directive is what the health check sends there."""
    monkeypatch.setenv("ADMIN_TOKEN", ADMIN)
    owned = world.receiver.url
    async with service(admin_notify_urls=[]) as client:
        tutorial = TutorialClient(client, PROVISIONER)
        for directive in ("env:ADMIN_TOKEN", "env:CLIENT_API_KEYS", "file:/etc/hostname"):
            response = await tutorial.create_gateway(
                gateway_payload("gw-steal", owned, api_key_directive=directive)
            )
            problems = {p["path"]: p["message"] for p in response.json()["problems"]}
            assert response.status_code == 422
            assert "refused" in problems["api_key_directive"]
            assert ADMIN not in response.text
        assert world.received.requests == []
        allowed = (await tutorial.create_gateway(gateway_payload("gw-owned", owned))).json()
        await tutorial.trigger_health_check(allowed["health_check_url"])
    assert {(r["method"], r["path"], r["authorization"]) for r in world.received.requests} == {
        ("GET", "/v1/models", f"Bearer {GATEWAY_KEY}")
    }


async def test_unknown_ids_conflicting_names_and_credentials(
    service: Callable[..., Any], world: World
) -> None:
    payload = gateway_payload("gw-once", world.endpoint.url)
    async with service() as client:
        tutorial = TutorialClient(client, PROVISIONER)
        assert (await tutorial.gateway("gw_000000000000")).status_code == 404
        missing = await tutorial.trigger_health_check("/api/v2/gateways/gw_nope/health-check")
        assert missing.status_code == 404
        assert (await tutorial.create_gateway(payload)).status_code == 201
        again = await tutorial.create_gateway(payload)
        assert again.status_code == 409 and "gw-once" in again.json()["detail"]
        as_admin = await TutorialClient(client, ADMIN).fetch_providers()
        assert [p["id"] for p in as_admin] == ["openai"]
        for key, status, scope in (
            (UNSCOPED, 403, "gateway:write"),
            (INVOKER, 403, "gateway:write"),
            ("ck-not-a-key", 401, None),
        ):
            refused = await TutorialClient(client, key).create_gateway(
                gateway_payload("gw-other", world.endpoint.url)
            )
            listing = await client.get(
                "/api/v2/providers", headers={"Authorization": f"Bearer {key}"}
            )
            assert refused.status_code == status, refused.text
            assert listing.status_code == status
            if scope:
                assert scope in refused.json()["detail"]
                assert "insufficient_scope" in refused.headers["www-authenticate"]
        anonymous = await client.post("/api/v2/gateways", json=payload)
        assert anonymous.status_code == 401
        reader = TutorialClient(client, READER)
        assert len(await reader.fetch_providers()) == 1  # provider:read reads
        assert (await reader.create_gateway(payload)).status_code == 403  # and writes nothing
        as_yaml = await client.post(
            "/api/v2/gateways",
            content=yaml.safe_dump(payload),
            headers={**tutorial.headers, "Content-Type": "application/yaml"},
        )
        assert as_yaml.status_code == 415


async def test_an_active_gateway_survives_a_restart_and_a_revert_removes_it(
    service: Callable[..., Any], world: World
) -> None:
    model = "gw-kept/gpt-4-turbo"
    async with service() as client:
        tutorial = TutorialClient(client, PROVISIONER)
        created = (
            await tutorial.create_gateway(gateway_payload("gw-kept", world.endpoint.url))
        ).json()
        checked = await tutorial.trigger_health_check(created["health_check_url"])
        assert checked.json()["status"] == "active"
    async with service() as restarted:  # the same DATA_DIR: the applied configuration
        assert await ask(restarted, model)
        reverted = await restarted.delete(
            "/admin/config/applied", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert reverted.status_code == 200, reverted.text
        with pytest.raises(openai.NotFoundError):
            await ask(restarted, model)
        status = await TutorialClient(restarted, PROVISIONER).gateway(created["id"])
        assert status.json()["status"] == "active"  # the record keeps its last health check
    assert gateway_calls(world.endpoint_plan) == ["gpt-4-turbo"]


async def test_the_tutorials_token_manager_then_the_flow(
    service: Callable[..., Any], world: World
) -> None:
    """The tutorial's TokenManager: client credentials form-posted to `{BaseURL}/oauth/token`,
    `access_token` used as the bearer, refreshed `expires_in - 120` seconds later."""
    client_entry = "go-provisioner:go-client-secret-002:acme;scopes=gateway:write+provider:read"
    async with service(oauth_clients=[SecretStr(client_entry)]) as client:
        form = (
            "grant_type=client_credentials&client_id=go-provisioner"
            "&client_secret=go-client-secret-002"
        )
        issued = await client.post(
            "/oauth/token",
            content=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert issued.status_code == 200, issued.text
        token = issued.json()
        assert token["token_type"].lower() == "bearer"
        assert token["expires_in"] > 120  # the tutorial refreshes 120 s early
        tutorial = TutorialClient(client, token["access_token"])
        matrix = tutorial.model_matrix(await tutorial.fetch_providers())
        payload = gateway_payload("gw-oauth", world.endpoint.url)
        assert TutorialClient.check(payload, matrix) is None
        created = await tutorial.create_gateway(payload)
        assert created.status_code == 201, created.text
        checked = await tutorial.trigger_health_check(created.json()["health_check_url"])
        assert checked.json()["status"] == "active"
        assert await ask(client, "gw-oauth/gpt-4-turbo")
        (record,) = [r for r in await audit(client) if r["action"] == "gateway_create"]
    assert record["actor"].startswith("client:") and "(acme)" in record["actor"]


async def test_each_endpoint_becomes_a_provider_with_the_gateways_limits(
    service: Callable[..., Any], world: World, llm_server: LoopbackServer
) -> None:
    routing = {
        "gpt-4-turbo": {
            "endpoint_url": f"{world.endpoint.url}/v1/chat/completions",
            "max_tokens": 2048,
            "timeout_ms": 12000,
        },
        "gpt-4o-mini": {
            "endpoint_url": f"{llm_server.url}/v1/chat/completions",
            "max_tokens": 1024,
            "timeout_ms": 9000,
        },
    }
    payload = gateway_payload("gw-multi", world.endpoint.url, model_routing=routing)
    async with service() as client:
        tutorial = TutorialClient(client, PROVISIONER)
        created = (await tutorial.create_gateway(payload)).json()
        checked = (await tutorial.trigger_health_check(created["health_check_url"])).json()
        assert checked["models"] == ["gw-multi/gpt-4-turbo", "gw-multi/gpt-4o-mini"]
        listed = {p["id"]: p for p in await tutorial.fetch_providers()}
        admin = await client.get("/admin/providers", headers={"Authorization": f"Bearer {ADMIN}"})
        assert await ask(client, "gw-multi/gpt-4-turbo")
    assert set(listed) == {"openai", "gw-multi-1", "gw-multi-2"}
    first, second = listed["gw-multi-1"], listed["gw-multi-2"]
    assert first["engine"] == second["engine"] == "openai"
    assert first["rate_limit_per_minute"] == second["rate_limit_per_minute"] == 120
    assert first["models"] == [
        {
            "model_id": "gpt-4-turbo",
            "endpoint_url": f"{world.endpoint.url}/v1/chat/completions",
            "max_tokens": 2048,
            "max_context_tokens": 8192,
        }
    ]
    assert second["models"][0]["endpoint_url"] == f"{llm_server.url}/v1/chat/completions"
    timeouts = {p["name"]: p["timeout_seconds"] for p in admin.json()["providers"]}
    assert (timeouts["gw-multi-1"], timeouts["gw-multi-2"]) == (12.0, 9.0)
    assert gateway_calls(world.endpoint_plan) == ["gpt-4-turbo"]


async def test_on_the_llm_gateway_provider_alone_a_create_says_to_use_a_provider_file(
    service: Callable[..., Any], world: World
) -> None:
    async with service(providers_file=None, llm_model="gpt-4o-mini") as client:
        tutorial = TutorialClient(client, PROVISIONER)
        (provider,) = await tutorial.fetch_providers()
        response = await tutorial.create_gateway(
            gateway_payload("gw-env", world.endpoint.url, provider_id=provider["id"])
            | {
                "model_routing": {
                    "gpt-4o-mini": {
                        "endpoint_url": f"{world.endpoint.url}/v1/chat/completions",
                        "max_tokens": 1024,
                        "timeout_ms": 5000,
                    }
                }
            }
        )
    assert response.status_code == 422, response.text
    (problem,) = response.json()["problems"]
    assert problem["path"] == "(service)"
    assert "PROVIDERS_FILE" in problem["message"]
    assert "sk-test-provider-key" not in response.text
