"""/api/v2/gateways from outside, against the service as users run it (`python -m app serve`,
two workers on the real Redis): a gateway endpoint that lies (200 with a web page), one that
never answers, racing creates and health checks, ids that are not ids. Real sockets, httpx."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import yaml
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from app.simulator.faults import FaultPlan
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer
from tests.helpers import ServiceProcess, running_service
from tests.store.test_store import REDIS_URL
from tests.tutorials.test_002_provisioning import gateway_payload

ADMIN = "admin-token-gateway-attacks-5e1f"
WRITER = "ck-gateway-writer-7a2c"  # acme: gateway:write, provider:read, invoke
GATEWAY_KEY = "sk-gateway-attacks-key"


def _web_page_app() -> FastAPI:
    """A server that answers every path 200 with HTML: a login page, a catch-all proxy."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def page(path: str) -> PlainTextResponse:
        return PlainTextResponse("<html><body>Sign in</body></html>", media_type="text/html")

    return app


class Silent:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@dataclass
class World:
    service: ServiceProcess
    simulator: str
    web_page: str
    silent: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    home = tmp_path_factory.mktemp("gateway-attacks")
    prefix = f"cxrelay-test-{uuid.uuid4().hex}:"
    silent = Silent()
    try:
        with (
            LoopbackServer(create_llm_simulator(FaultPlan())) as simulator,
            LoopbackServer(_web_page_app()) as web_page,
        ):
            providers = {
                "providers": [
                    {
                        "name": "openai",
                        "base_url": simulator.url,
                        "api_keys": ["env:OPENAI_API_KEY"],
                        "models": [
                            {"name": "gpt-4o-mini", "max_tokens": 16384},
                            {"name": "gpt-4-turbo", "max_tokens": 4096},
                        ],
                    }
                ],
                "routes": [
                    {"name": "support", "chain": [{"provider": "openai", "model": "gpt-4o-mini"}]}
                ],
            }
            (home / "providers.yaml").write_text(yaml.safe_dump(providers))
            env = {
                "PROVIDERS_FILE": str(home / "providers.yaml"),
                "LLM_MODEL": "support",
                "ADMIN_TOKEN": ADMIN,
                "CLIENT_API_KEYS": f"{WRITER}:acme;scopes=gateway:write+provider:read"
                "+llm.gateway:invoke",
                "OPENAI_API_KEY": "sk-provider-file-key",
                "CXR_PROVIDER_KEY_GATEWAY": GATEWAY_KEY,
                "COGNIGY_WEBHOOK_SECRET": "whsec-gateway-attacks",
                "WORKERS": "2",
                "STORE_BACKEND": "redis",
                "REDIS_URL": REDIS_URL,
                "REDIS_KEY_PREFIX": prefix,
                "BOT_STATE_SECRET": "gateway-attacks-bot-state-secret",
            }
            with running_service(home, **env) as service:
                yield World(service, simulator.url, web_page.url, silent.url)
    finally:
        silent.close()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


AUTH = {"Authorization": f"Bearer {WRITER}"}


def _fresh(world: World) -> httpx.Client:
    """A new connection per call, so both workers answer over a test."""
    return httpx.Client(base_url=world.service.url, headers=AUTH, timeout=30)


def _create(world: World, name: str, endpoint: str) -> dict[str, Any]:
    with _fresh(world) as http:
        created = http.post("/api/v2/gateways", json=gateway_payload(name, endpoint))
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


def test_an_endpoint_answering_200_with_a_web_page_fails_its_check(world: World) -> None:
    """Found from outside: a server answering every path 200 with HTML made the gateway
    `active`, and its model then failed every chat call."""
    created = _create(world, "web-page", world.web_page)
    with _fresh(world) as http:
        checked = http.post(created["health_check_url"])
    assert checked.status_code == 200, checked.text
    body = checked.json()
    assert body["status"] == "failed", body
    assert "model list" in body["reasons"][0]["message"]
    with _fresh(world) as http:
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "web-page/gpt-4-turbo", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert 400 <= chat.status_code < 500, chat.text  # not served


def test_an_endpoint_that_never_answers_fails_within_a_bounded_time(world: World) -> None:
    created = _create(world, "silent", world.silent)
    started = time.monotonic()
    with _fresh(world) as http:
        checked = http.post(created["health_check_url"])
    assert time.monotonic() - started < 15
    assert checked.status_code == 200 and checked.json()["status"] == "failed"
    assert checked.json()["reasons"], checked.text


def test_racing_creates_and_checks_across_two_workers(world: World) -> None:
    async def race() -> str:
        async def create() -> httpx.Response:
            async with httpx.AsyncClient(base_url=world.service.url, headers=AUTH) as http:
                body = gateway_payload("raced", world.simulator)
                return await http.post("/api/v2/gateways", json=body)

        created = await asyncio.gather(*(create() for _ in range(8)))
        assert sorted(r.status_code for r in created) == [201] + [409] * 7
        first = next(r.json() for r in created if r.status_code == 201)

        async def check() -> httpx.Response:
            async with httpx.AsyncClient(
                base_url=world.service.url, headers=AUTH, timeout=30
            ) as http:
                return await http.post(first["health_check_url"])

        checked = await asyncio.gather(*(check() for _ in range(6)))
        assert {(r.status_code, r.json()["status"]) for r in checked} == {(200, "active")}
        return str(first["id"])

    gateway_id = asyncio.run(race())
    with _fresh(world) as http:  # applied once: the other worker found it served already
        admin = {"Authorization": f"Bearer {ADMIN}"}
        records = http.get("/admin/audit?limit=200", headers=admin).json()["records"]
    applied = [r for r in records if r["action"] == "apply" and r["result"] == "ok"]
    assert len(applied) == 1, applied
    for _ in range(6):  # whichever worker answers reads the same status
        with _fresh(world) as http:
            assert http.get(f"/api/v2/gateways/{gateway_id}").json()["status"] == "active"


@pytest.mark.parametrize(
    ("gateway_id", "status"),
    [("..%2F..%2Fadmin", 404), ("%00", 404), ("gw_" + "a" * 5000, 422), ("nope", 404)],
)
def test_ids_that_are_not_ids_are_clear_4xx(world: World, gateway_id: str, status: int) -> None:
    with _fresh(world) as http:
        for answer in (
            http.get(f"/api/v2/gateways/{gateway_id}"),
            http.post(f"/api/v2/gateways/{gateway_id}/health-check"),
        ):
            assert answer.status_code == status, answer.text
            assert "detail" in answer.json()
