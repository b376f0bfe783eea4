"""The provisioning (admin) API end to end: two fake providers on loopback, a provider file with
`env:` keys, the real lifespan, the Cognigy webhook as the proof of which provider serves."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from app.auth.signatures import fingerprint
from app.llm.catalog import canonical_json
from app.simulator.faults import Fault, FaultPlan
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer
from app.store.audit import DB_FILENAME, AuditLog
from app.surfaces.admin.router import actor_name
from tests.helpers import parts, post_turn, trigger

TOKEN = "admin-token-for-tests-5f2c9e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_ID = f"admin:{fingerprint(TOKEN)}"
SECRETS = {
    "CXR_PROVIDER_KEY_ALPHA_1": "sk-alpha-secret-one",
    "CXR_PROVIDER_KEY_ALPHA_2": "sk-alpha-secret-two",
    "CXR_PROVIDER_KEY_BETA": "sk-beta-secret-three",
}
ROUTE = "support"  # LLM_MODEL: what the webhook asks for
MODEL = "gpt-4o-mini"
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens
REVOKED = "revoked-beta-secret"  # the simulated provider refuses keys starting with "revoked"
QUORUM_WAIT_SECONDS = 3.0  # under the 5 s probe timeout
STALL_SECONDS = 6.0  # over the 5 s probe timeout


# --- fakes and fixtures --------------------------------------------------------------------------


class Recorder:
    """A tiny HTTP service that records every request: a notification receiver, and a provider
    whose key probe (GET /v1/models) answers 200, optionally after a delay."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.probe_delay = 0.0
        # Probes are answered 200 only once this many have arrived (each waits up to
        # QUORUM_WAIT_SECONDS for the rest, else 503): only probes sent together all pass.
        self.probe_quorum = 0
        self.stalled_keys: set[str] = set()  # probes with these keys get no answer in time
        self.app = FastAPI()

        @self.app.api_route("/{path:path}", methods=["GET", "POST", "PUT"])
        async def record(path: str, request: Request) -> JSONResponse:
            raw = await request.body()
            authorization = request.headers.get("authorization")
            with self._lock:
                self.requests.append(
                    {
                        "method": request.method,
                        "path": f"/{path}",
                        "authorization": authorization,
                        "json": json.loads(raw) if raw else None,
                    }
                )
            if path.endswith("models"):
                if (authorization or "").removeprefix("Bearer ") in self.stalled_keys:
                    await asyncio.sleep(STALL_SECONDS)
                if self.probe_quorum and not await self._quorum():
                    return JSONResponse({"error": "alone"}, 503)
                if self.probe_delay:
                    await asyncio.sleep(self.probe_delay)
            return JSONResponse({"object": "list", "data": []})

    async def _quorum(self) -> bool:
        deadline = time.monotonic() + QUORUM_WAIT_SECONDS
        while len(self.probes()) < self.probe_quorum:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def probes(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["path"].endswith("models")]

    def posted(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r["json"] for r in self.requests if r["method"] == "POST"]


@dataclass
class Upstreams:
    alpha: LoopbackServer
    alpha_plan: FaultPlan
    beta: LoopbackServer
    beta_plan: FaultPlan
    recorder: LoopbackServer
    recorded: Recorder


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    alpha_plan, beta_plan, recorded = FaultPlan(), FaultPlan(), Recorder()
    with (
        LoopbackServer(create_llm_simulator(alpha_plan)) as alpha,
        LoopbackServer(create_llm_simulator(beta_plan)) as beta,
        LoopbackServer(recorded.app) as recorder,
    ):
        yield Upstreams(alpha, alpha_plan, beta, beta_plan, recorder, recorded)


def provider(name: str, url: str, *keys: str) -> dict[str, Any]:
    return {"name": name, "base_url": url, "api_keys": list(keys), "models": [{"name": MODEL}]}


def config(providers: list[dict[str, Any]], chain: list[str], **extra: Any) -> dict[str, Any]:
    route = {"name": ROUTE, "chain": [{"provider": p, "model": MODEL} for p in chain]}
    return {"providers": providers, "routes": [route], **extra}


def alpha_spec(u: Upstreams) -> dict[str, Any]:
    return provider(
        "alpha", u.alpha.url, "env:CXR_PROVIDER_KEY_ALPHA_1", "env:CXR_PROVIDER_KEY_ALPHA_2"
    )


def beta_spec(u: Upstreams) -> dict[str, Any]:
    return provider("beta", u.beta.url, "env:CXR_PROVIDER_KEY_BETA")


def to_beta(u: Upstreams) -> dict[str, Any]:
    """The second configuration: alpha unchanged, beta added and serving the route."""
    return config([alpha_spec(u), beta_spec(u)], ["beta"])


def sha(raw: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(raw).encode()).hexdigest()


@pytest.fixture
def provider_file(tmp_path: Path, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump(config([alpha_spec(upstreams)], ["alpha"])))
    return path


@pytest.fixture
def gateway(app_client: Callable[..., Any], provider_file: Path, tmp_path: Path) -> Any:
    """`async with gateway(**overrides) as client:`: the app on the provider file, admin on."""

    def start(**overrides: Any) -> Any:
        values: dict[str, Any] = {
            "providers_file": str(provider_file),
            "admin_token": SecretStr(TOKEN),
            "llm_model": ROUTE,
            "data_dir": str(tmp_path / "data"),
        }
        return app_client(**(values | overrides))

    return start


async def served_by(client: httpx.AsyncClient) -> str:
    response = await post_turn(client, trigger())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    return str(body["provider"])


async def put_config(client: httpx.AsyncClient, raw: object, **headers: str) -> httpx.Response:
    return await client.put("/admin/config", json=raw, headers={**AUTH, **headers})


async def audit_records(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/admin/audit", params=params, headers=AUTH)
    assert response.status_code == 200, response.text
    return list(response.json()["records"])


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- authentication ------------------------------------------------------------------------------


async def test_admin_api_is_disabled_until_admin_token_is_set(
    gateway: Any, upstreams: Upstreams
) -> None:
    running = gateway(admin_token=None)
    async with running as client:
        listing = await client.get("/admin/providers", headers=AUTH)
        change = await put_config(client, config([provider("gamma", upstreams.recorder.url)], []))
        config_in_service = parts(running.app).llm.current.config
        assert await served_by(client) == "alpha"
    for response in (listing, change):
        assert response.status_code == 401
        assert "disabled until ADMIN_TOKEN is set" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert upstreams.recorded.requests == []  # no probe went out
    assert [p.name for p in config_in_service.providers] == ["alpha"]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token-value-1234", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"],
)
async def test_missing_or_wrong_token_is_401_logged_without_the_token(
    gateway: Any,
    upstreams: Upstreams,
    caplog: pytest.LogCaptureFixture,
    authorization: str | None,
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with gateway() as client:
        with caplog.at_level(logging.WARNING, logger="cxrelay.admin"):
            change = await client.put(
                "/admin/config",
                json=config([provider("gamma", upstreams.recorder.url)], ["gamma"]),
                headers=headers,
            )
        audit = await client.get("/admin/audit", headers={"Authorization": authorization or ""})
        assert await served_by(client) == "alpha"
    for response in (change, audit):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    assert upstreams.recorded.requests == []
    failures = [r for r in caplog.records if r.getMessage() == "admin authentication failed"]
    assert failures, "a failed attempt must be logged"
    logged = failures[0]
    assert logged.levelno == logging.WARNING
    assert logged.__dict__["route"] == "/admin/config"
    assert logged.__dict__["remote"]
    assert logged.__dict__["reason"]
    presented = (authorization or "").partition(" ")[2]
    for record in caplog.records:
        text = json.dumps(record.__dict__, default=str)
        assert TOKEN not in text
        if presented:
            assert presented not in text


def test_actor_header_is_sanitised() -> None:
    assert actor_name(None, "1a2b3c4d") == "admin:1a2b3c4d"
    assert actor_name("  ali\x07ce\u200b \r\n", "1a2b3c4d") == "alice (admin:1a2b3c4d)"
    assert actor_name("x" * 100, "1a2b3c4d") == "x" * 64 + " (admin:1a2b3c4d)"
    assert actor_name("\x00\x1b", "1a2b3c4d") == "admin:1a2b3c4d"
    assert actor_name("Jos\xc3\xa9", "1a2b3c4d") == "José (admin:1a2b3c4d)"  # UTF-8 via latin-1


# --- reading the configuration -------------------------------------------------------------------


async def test_providers_listing_masks_every_key(
    gateway: Any, upstreams: Upstreams, tmp_path: Path
) -> None:
    key_file = tmp_path / "beta.key"
    key_file.write_text("sk-beta-from-file-secret\n")
    literal = "sk-literal-secret-value"
    candidate = config(
        [
            alpha_spec(upstreams),
            provider("beta", upstreams.beta.url, f"file:{key_file}"),
            provider("gamma", upstreams.recorder.url, f"literal:{literal}"),
        ],
        ["alpha", "beta"],
        allow_literal_keys=True,
    )
    upstreams.alpha_plan.push(Fault(status=401))  # the first alpha key gets refused
    async with gateway(provisioning_secrets_dir=str(tmp_path)) as client:
        assert await served_by(client) == "alpha"
        assert (await put_config(client, candidate)).status_code == 200
        response = await client.get("/admin/providers", headers=AUTH)
    assert response.status_code == 200
    for secret in [*SECRETS.values(), "sk-beta-from-file-secret", literal, TOKEN]:
        assert secret not in response.text
    listing = response.json()
    assert listing["source"] == "applied"
    assert listing["sha256"] == sha(candidate)
    assert listing["default_model"] == ROUTE
    alpha, beta, gamma = listing["providers"]
    assert [k["source"] for k in alpha["keys"]] == [
        "env:CXR_PROVIDER_KEY_ALPHA_1",
        "env:CXR_PROVIDER_KEY_ALPHA_2",
    ]
    assert [k["key_id"] for k in alpha["keys"]] == [
        fingerprint(SECRETS["CXR_PROVIDER_KEY_ALPHA_1"]),
        fingerprint(SECRETS["CXR_PROVIDER_KEY_ALPHA_2"]),
    ]
    assert beta["keys"][0]["source"] == f"file:{key_file}"
    assert gamma["keys"][0]["source"] == "literal:***"
    assert gamma["keys"][0]["key_id"] == fingerprint(literal)
    assert all(k["healthy"] and not k["cooling"] for k in alpha["keys"])  # a fresh router
    assert alpha["healthy_keys"] == 2 and alpha["circuit"] == "closed"
    assert [r["name"] for r in listing["routes"]] == [ROUTE]
    assert [t["provider"] for t in listing["routes"][0]["chain"]] == ["alpha", "beta"]


async def test_listing_shows_live_key_and_circuit_state(gateway: Any, upstreams: Upstreams) -> None:
    upstreams.alpha_plan.push(Fault(status=401))  # ALPHA_KEY_1 is refused, ALPHA_KEY_2 serves
    async with gateway() as client:
        assert await served_by(client) == "alpha"
        listing = (await client.get("/admin/providers", headers=AUTH)).json()
    assert listing["source"] == "providers_file"
    (alpha,) = listing["providers"]
    assert [k["healthy"] for k in alpha["keys"]] == [False, True]
    assert alpha["healthy_keys"] == 1
    assert alpha["circuit"] == "closed"


# --- validation ----------------------------------------------------------------------------------


async def test_validate_lists_every_seeded_problem_with_its_path(
    gateway: Any, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CXR_PROVIDER_KEY_UNSET", raising=False)
    bad = config(
        [
            provider(
                "alpha",
                upstreams.alpha.url,
                "env:CXR_PROVIDER_KEY_ALPHA_1",
                "env:CXR_PROVIDER_KEY_UNSET",
            ),
            {**provider("beta", upstreams.recorder.url), "rpm": 0},
            provider("alpha", upstreams.beta.url),
        ],
        ["alpha", "ghost"],
    )
    async with gateway() as client:
        response = await client.post("/admin/config/validate", json=bad, headers=AUTH)
        good = await client.post("/admin/config/validate", json=to_beta(upstreams), headers=AUTH)
        no_route = await client.post(
            "/admin/config/validate",
            json={"providers": [alpha_spec(upstreams)], "routes": []},
            headers=AUTH,
        )
        records = await audit_records(client)
        listing = (await client.get("/admin/providers", headers=AUTH)).json()
    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is False
    problems = {p["path"]: p["message"] for p in body["problems"]}
    assert "CXR_PROVIDER_KEY_UNSET is not set" in problems["providers[0].api_keys[1]"]
    assert "above 0" in problems["providers[1].rpm"]
    assert "duplicate provider name 'alpha'" in problems["providers"]
    assert "unknown provider 'ghost'" in problems["routes[0].chain[1].provider"]
    assert len(body["problems"]) == 4
    assert good.json() == {"valid": True, "problems": []}
    assert no_route.status_code == 200
    assert [p["path"] for p in no_route.json()["problems"]] == ["routes"]
    assert "LLM_MODEL 'support'" in no_route.json()["problems"][0]["message"]
    # a dry run: nothing changed, no provider was probed, but the attempts are audited
    assert [p["name"] for p in listing["providers"]] == ["alpha"]
    assert upstreams.recorded.requests == []
    assert [(r["action"], r["result"]) for r in records] == [
        ("validate", "invalid"),
        ("validate", "ok"),
        ("validate", "invalid"),
    ]
    assert records[2]["payload_sha256"] == sha(bad)
    assert "providers[1].rpm" in records[2]["detail"]


# --- applying ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/yaml", "application/x-yaml", "text/yaml"]
)
async def test_apply_swaps_in_the_new_configuration(
    gateway: Any, upstreams: Upstreams, content_type: str
) -> None:
    candidate = to_beta(upstreams)
    text = json.dumps(candidate) if content_type.endswith("json") else yaml.safe_dump(candidate)
    async with gateway() as client:
        assert await served_by(client) == "alpha"
        response = await client.put(
            "/admin/config", content=text, headers={**AUTH, "Content-Type": content_type}
        )
        assert response.status_code == 200, response.text
        assert await served_by(client) == "beta"
    assert response.json() == {
        "applied": True,
        "sha256": sha(candidate),
        "providers": ["alpha", "beta"],
        "routes": [ROUTE],
        "unhealthy_keys": [],
    }
    assert len(upstreams.beta_plan.requests) == 1
    assert len(upstreams.alpha_plan.requests) == 1


async def test_only_new_or_changed_providers_are_probed_with_every_key(
    gateway: Any, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_PROVIDER_KEY_GAMMA_1", "sk-gamma-one")
    monkeypatch.setenv("CXR_PROVIDER_KEY_GAMMA_2", "sk-gamma-two")
    gamma = provider(
        "gamma",
        upstreams.recorder.url,
        "env:CXR_PROVIDER_KEY_GAMMA_1",
        "env:CXR_PROVIDER_KEY_GAMMA_2",
    )
    first = config([alpha_spec(upstreams), gamma], ["alpha"])
    same_gamma = config([alpha_spec(upstreams), gamma], ["alpha", "gamma"])
    changed_gamma = config([alpha_spec(upstreams), {**gamma, "timeout_seconds": 9}], ["alpha"])
    probes = upstreams.recorded.requests
    async with gateway() as client:
        assert (await put_config(client, first)).status_code == 200
        assert {(r["method"], r["path"]) for r in probes} == {("GET", "/v1/models")}
        assert sorted(r["authorization"] for r in probes) == [
            "Bearer sk-gamma-one",
            "Bearer sk-gamma-two",
        ]
        assert (await put_config(client, same_gamma)).status_code == 200
        assert len(probes) == 2  # gamma's spec did not change: not probed again
        assert (await put_config(client, changed_gamma)).status_code == 200
        assert len(probes) == 4


@pytest.mark.parametrize("revoked_at", [0, 1, 2])
async def test_a_revoked_key_anywhere_in_the_pool_is_reported_not_refused(
    gateway: Any, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch, revoked_at: int
) -> None:
    """Issue 16 item 9: [revoked, good, good] was refused with 424 (only the first key was
    probed) while [good, revoked, good] was accepted without a word about the bad key."""
    monkeypatch.setenv("CXR_PROVIDER_KEY_BETA_REVOKED", REVOKED)
    monkeypatch.setenv("CXR_PROVIDER_KEY_BETA_2", "sk-beta-secret-four")
    keys = ["env:CXR_PROVIDER_KEY_BETA", "env:CXR_PROVIDER_KEY_BETA_2"]
    keys.insert(revoked_at, "env:CXR_PROVIDER_KEY_BETA_REVOKED")
    candidate = config(
        [alpha_spec(upstreams), provider("beta", upstreams.beta.url, *keys)], ["beta"]
    )
    async with gateway() as client:
        response = await put_config(client, candidate)
        assert response.status_code == 200, response.text
        for turn in range(3):  # round robin over the pool: the revoked key is never tried
            answer = await post_turn(client, trigger(lastMessage=f"question {turn}"))
            assert answer.json()["provider"] == "beta"
        listing = (await client.get("/admin/providers", headers=AUTH)).json()
        (record,) = await audit_records(client)
    unhealthy = {
        "provider": "beta",
        "key_id": fingerprint(REVOKED),
        "source": "env:CXR_PROVIDER_KEY_BETA_REVOKED",
    }
    assert response.json()["unhealthy_keys"] == [unhealthy]
    assert REVOKED not in response.text and REVOKED not in json.dumps(listing)
    assert record["result"] == "ok"
    assert (
        f"unhealthy keys: beta key {fingerprint(REVOKED)} (env:CXR_PROVIDER_KEY_BETA_REVOKED)"
        in record["detail"]
    )
    beta = listing["providers"][1]
    assert [k["healthy"] for k in beta["keys"]] == [i != revoked_at for i in range(3)]
    used = [r["headers"]["authorization"] for r in upstreams.beta_plan.requests]
    assert len(used) == 3 and all(REVOKED not in a for a in used)


async def test_a_provider_with_every_key_revoked_fails_naming_the_keys(
    gateway: Any, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_PROVIDER_KEY_BETA_REVOKED", REVOKED)
    monkeypatch.setenv("CXR_PROVIDER_KEY_BETA_REVOKED_2", REVOKED + "-2")
    beta = provider(
        "beta",
        upstreams.beta.url,
        "env:CXR_PROVIDER_KEY_BETA_REVOKED",
        "env:CXR_PROVIDER_KEY_BETA_REVOKED_2",
    )
    async with gateway() as client:
        response = await put_config(client, config([alpha_spec(upstreams), beta], ["beta"]))
        assert await served_by(client) == "alpha"
        (record,) = await audit_records(client)
    assert response.status_code == 424
    (problem,) = response.json()["problems"]
    assert problem["path"] == "providers[1]"
    assert "'beta'" in problem["message"] and "with any of its 2 keys" in problem["message"]
    for secret in (REVOKED, REVOKED + "-2"):
        assert fingerprint(secret) in problem["message"]
        assert fingerprint(secret) in record["detail"]
    assert record["result"] == "health_check_failed"


async def test_keys_are_probed_together(
    gateway: Any, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each probe waits for the others: one at a time, all but the last would fail."""
    secrets = [f"sk-gamma-{i}" for i in range(3)]
    for i, secret in enumerate(secrets):
        monkeypatch.setenv(f"CXR_PROVIDER_KEY_GAMMA_{i}", secret)
    gamma = provider(
        "gamma", upstreams.recorder.url, *(f"env:CXR_PROVIDER_KEY_GAMMA_{i}" for i in range(3))
    )
    upstreams.recorded.probe_quorum = 3
    async with gateway() as client:
        response = await put_config(client, config([alpha_spec(upstreams), gamma], ["alpha"]))
    assert response.status_code == 200, response.text
    assert response.json()["unhealthy_keys"] == []
    assert len(upstreams.recorded.probes()) == 3


async def test_a_key_that_never_answers_is_bounded_by_the_probe_timeout(
    gateway: Any, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_PROVIDER_KEY_GAMMA_1", "sk-gamma-good")
    monkeypatch.setenv("CXR_PROVIDER_KEY_GAMMA_2", "sk-gamma-stalls")
    upstreams.recorded.stalled_keys = {"sk-gamma-stalls"}
    gamma = provider(
        "gamma",
        upstreams.recorder.url,
        "env:CXR_PROVIDER_KEY_GAMMA_1",
        "env:CXR_PROVIDER_KEY_GAMMA_2",
    )
    async with gateway() as client:
        started = time.monotonic()
        response = await put_config(client, config([alpha_spec(upstreams), gamma], ["alpha"]))
        took = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["unhealthy_keys"] == [
        {
            "provider": "gamma",
            "key_id": fingerprint("sk-gamma-stalls"),
            "source": "env:CXR_PROVIDER_KEY_GAMMA_2",
        }
    ]
    assert took < STALL_SECONDS  # the 5 s probe timeout, not the stalled answer


async def test_unreachable_provider_fails_the_health_check_and_the_old_config_serves(
    gateway: Any, upstreams: Upstreams
) -> None:
    candidate = config(
        [
            alpha_spec(upstreams),
            provider("gamma", UNREACHABLE, "env:CXR_PROVIDER_KEY_BETA"),
            beta_spec(upstreams),
            provider("delta", f"{UNREACHABLE}/gateway"),
        ],
        ["gamma", "beta", "delta"],
    )
    async with gateway() as client:
        before = (await client.get("/admin/providers", headers=AUTH)).json()
        response = await put_config(client, candidate)
        assert await served_by(client) == "alpha"
        after = (await client.get("/admin/providers", headers=AUTH)).json()
        (record,) = await audit_records(client)
    assert response.status_code == 424
    body = response.json()
    assert body["detail"] == "provider health check failed"
    assert [p["path"] for p in body["problems"]] == ["providers[1]", "providers[3]"]
    assert "'gamma'" in body["problems"][0]["message"]
    assert "'delta'" in body["problems"][1]["message"]
    assert after == before
    assert upstreams.beta_plan.requests == []
    assert record["result"] == "health_check_failed"
    assert "'gamma'" in record["detail"] and "'delta'" in record["detail"]
    assert record["payload_sha256"] == sha(candidate)


async def test_invalid_or_unreadable_candidates_change_nothing(
    gateway: Any, upstreams: Upstreams
) -> None:
    invalid = config([alpha_spec(upstreams)], ["alpha", "ghost"])
    async with gateway(max_body_bytes=2048) as client:
        before = (await client.get("/admin/providers", headers=AUTH)).json()
        rejected = await put_config(client, invalid)
        unparsable = await client.put(
            "/admin/config",
            content="providers: [unclosed\n  - x: {",
            headers={**AUTH, "Content-Type": "application/yaml"},
        )
        not_a_mapping = await put_config(client, ["providers"])
        wrong_type = await client.put(
            "/admin/config", content="providers: []", headers={**AUTH, "Content-Type": "text/plain"}
        )
        too_big = await client.put(
            "/admin/config",
            content=json.dumps({"pad": "x" * 4096}),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert await served_by(client) == "alpha"
        after = (await client.get("/admin/providers", headers=AUTH)).json()
        records = await audit_records(client)
    assert rejected.status_code == 422
    assert rejected.json()["detail"].startswith("the provider configuration is invalid")
    assert [p["path"] for p in rejected.json()["problems"]] == ["routes[0].chain[1].provider"]
    assert unparsable.status_code == 422
    assert unparsable.json()["problems"][0]["path"].startswith("line ")
    assert not_a_mapping.status_code == 422
    assert wrong_type.status_code == 415
    assert too_big.status_code == 413
    assert after == before
    assert [r["result"] for r in records] == ["invalid", "invalid", "invalid"]
    assert records[2]["payload_sha256"] == sha(invalid)


async def test_a_turn_in_flight_finishes_on_the_old_router(
    gateway: Any, upstreams: Upstreams
) -> None:
    upstreams.alpha_plan.push(Fault(delay=1.0))
    async with gateway() as client:
        slow = asyncio.create_task(post_turn(client, trigger()))
        await eventually(lambda: len(upstreams.alpha_plan.requests) == 1)
        response = await put_config(client, to_beta(upstreams))
        assert response.status_code == 200
        assert not slow.done(), "the apply must not wait for turns in flight"
        assert await served_by(client) == "beta"
        old = await slow
    assert old.status_code == 200
    assert old.json()["status"] == "success"
    assert old.json()["provider"] == "alpha"
    assert len(upstreams.alpha_plan.requests) == 1


async def test_concurrent_applies_do_not_interleave(gateway: Any, upstreams: Upstreams) -> None:
    """The first apply's probe is slow; the second must wait for it, so it is the one in force."""
    upstreams.recorded.probe_delay = 0.5
    slow = config([alpha_spec(upstreams), provider("gamma", upstreams.recorder.url)], ["alpha"])
    fast = to_beta(upstreams)
    async with gateway() as client:
        first = asyncio.create_task(put_config(client, slow))
        await eventually(lambda: len(upstreams.recorded.requests) == 1)  # probing gamma now
        second = await put_config(client, fast)
        assert (await first).status_code == 200 and second.status_code == 200
        assert await served_by(client) == "beta"
        records = await audit_records(client)
    assert [(r["payload_sha256"], r["result"]) for r in records] == [
        (sha(fast), "ok"),
        (sha(slow), "ok"),
    ]


# --- audit, restart and revert -------------------------------------------------------------------


async def test_audit_records_and_the_applied_config_survive_a_restart(
    gateway: Any, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    candidate = to_beta(upstreams)
    async with gateway() as client:
        assert (await put_config(client, candidate, **{"X-Actor": "alice"})).status_code == 200
        bad = config([alpha_spec(upstreams)], ["ghost"])
        assert (await put_config(client, bad)).status_code == 422
        before = await audit_records(client)
    with caplog.at_level(logging.WARNING):
        async with gateway() as client:
            assert await served_by(client) == "beta"
            after = await audit_records(client)
            total = (await client.get("/admin/audit", headers=AUTH)).json()["total"]
    assert after == before and total == 2
    failed, applied = after
    assert applied["actor"] == f"alice ({ADMIN_ID})"
    assert applied["action"] == "apply"
    assert applied["payload_sha256"] == sha(candidate)
    assert applied["result"] == "ok"
    assert applied["latency_ms"] > 0
    assert applied["time"].endswith("Z") and applied["time"] <= failed["time"]
    assert "providers: alpha, beta" in applied["detail"]
    assert failed["actor"] == ADMIN_ID
    assert (failed["action"], failed["result"]) == ("apply", "invalid")
    assert "unknown provider 'ghost'" in failed["detail"]
    assert failed["id"] > applied["id"]
    started = [r for r in caplog.records if "applied through the admin API" in r.getMessage()]
    assert started and started[0].levelno == logging.WARNING
    assert "DELETE /admin/config/applied" in started[0].getMessage()


async def test_revert_goes_back_to_the_provider_file_and_stays_there(
    gateway: Any, upstreams: Upstreams, tmp_path: Path
) -> None:
    async with gateway() as client:
        assert (await put_config(client, to_beta(upstreams))).status_code == 200
        assert await served_by(client) == "beta"
        response = await client.delete("/admin/config/applied", headers={**AUTH, "X-Actor": "bob"})
        assert await served_by(client) == "alpha"
        listing = (await client.get("/admin/providers", headers=AUTH)).json()
        latest = (await audit_records(client, limit=1))[0]
    assert response.status_code == 200
    body = response.json()
    assert body["applied"] is True
    assert (body["providers"], body["routes"]) == (["alpha"], [ROUTE])
    assert listing["source"] == "providers_file" and listing["sha256"] == body["sha256"]
    assert (latest["action"], latest["result"]) == ("revert", "ok")
    assert latest["actor"] == f"bob ({ADMIN_ID})"
    assert latest["payload_sha256"] == body["sha256"]
    async with gateway() as client:  # the revert is durable too
        assert await served_by(client) == "alpha"
    with sqlite3.connect(tmp_path / "data" / DB_FILENAME) as db:
        assert db.execute("SELECT COUNT(*) FROM applied_provider_config").fetchone()[0] == 0


async def test_applied_config_that_no_longer_validates_is_not_used_at_start_up(
    gateway: Any,
    upstreams: Upstreams,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with gateway() as client:
        assert (await put_config(client, to_beta(upstreams))).status_code == 200
    monkeypatch.delenv("CXR_PROVIDER_KEY_BETA")
    with caplog.at_level(logging.WARNING):
        async with gateway() as client:
            assert await served_by(client) == "alpha"
            listing = (await client.get("/admin/providers", headers=AUTH)).json()
    assert listing["source"] == "providers_file"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("no longer validates" in r.getMessage() for r in errors)
    assert any("CXR_PROVIDER_KEY_BETA is not set" in r.getMessage() for r in errors)


async def test_audit_pagination_is_newest_first_and_bounded(
    gateway: Any, upstreams: Upstreams
) -> None:
    async with gateway() as client:
        for chain in (["ghost1"], ["ghost2"], ["ghost3"]):
            await put_config(client, config([alpha_spec(upstreams)], chain))
        page = (await client.get("/admin/audit?limit=2", headers=AUTH)).json()
        rest = (await client.get("/admin/audit?limit=2&offset=2", headers=AUTH)).json()
        too_small = await client.get("/admin/audit?limit=0", headers=AUTH)
        too_big = await client.get("/admin/audit?limit=501", headers=AUTH)
        largest = await client.get("/admin/audit?limit=500", headers=AUTH)
    assert page["total"] == rest["total"] == 3
    assert ["ghost3" in r["detail"] for r in page["records"]] == [True, False]
    assert "ghost2" in page["records"][1]["detail"]
    assert len(rest["records"]) == 1 and "ghost1" in rest["records"][0]["detail"]
    assert too_small.status_code == too_big.status_code == 422
    assert largest.status_code == 200


async def test_audit_log_is_append_only_in_wal_mode(tmp_path: Path) -> None:
    audit = await AuditLog.open(tmp_path / "new" / "dir")
    try:
        record = await audit.append(
            actor="a", action="apply", payload_sha256="0" * 64, result="ok", latency_ms=1.25
        )
        assert record.id == 1 and record.latency_ms == 1.2
        assert await audit.count() == 1
    finally:
        await audit.close()
    with sqlite3.connect(tmp_path / "new" / "dir" / DB_FILENAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit_log SET result = 'error'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit_log")


# --- notification --------------------------------------------------------------------------------


async def test_a_successful_change_is_announced_to_the_notify_urls(
    gateway: Any, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = f"{upstreams.recorder.url}/hooks/T000/secret-path"
    broken = f"{UNREACHABLE}/hooks/other-secret-path"
    candidate = to_beta(upstreams)
    with caplog.at_level(logging.WARNING, logger="cxrelay.notifications"):
        async with gateway(admin_notify_urls=[broken, receiver]) as client:
            invalid = config([alpha_spec(upstreams)], ["ghost"])
            assert (await put_config(client, invalid)).status_code == 422
            response = await put_config(client, candidate, **{"X-Actor": "carol"})
            assert response.status_code == 200  # a broken receiver does not fail the apply
            await eventually(lambda: len(upstreams.recorded.posted()) >= 1)
            await eventually(lambda: any("failed" in r.getMessage() for r in caplog.records))
            (latest,) = await audit_records(client, limit=1)
    (event,) = upstreams.recorded.posted()  # one: the refused apply is not announced
    assert event == {"event": "provider_config_changed", **latest}
    assert event["action"] == "apply" and event["result"] == "ok"
    assert event["payload_sha256"] == sha(candidate)
    assert event["actor"] == f"carol ({ADMIN_ID})"
    assert upstreams.recorded.requests[-1]["path"] == "/hooks/T000/secret-path"
    warning = next(r for r in caplog.records if "notification failed" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "secret-path" not in json.dumps(warning.__dict__, default=str)


# --- key directives sent through the API (issue 20 item 6) ----------------------------------------


def refusal(response: httpx.Response, path: str) -> str:
    """The 422's message for `path`: a refused directive is a problem of the candidate."""
    assert response.status_code == 422, response.text
    problems = {p["path"]: p["message"] for p in response.json()["problems"]}
    assert path in problems, problems
    return problems[path]


def to_recorder(u: Upstreams, *keys: str) -> dict[str, Any]:
    """alpha unchanged, plus a provider at a server the caller owns (the recorder) with `keys`."""
    return config([alpha_spec(u), provider("gamma", u.recorder.url, *keys)], ["alpha"])


@pytest.mark.parametrize(
    ("directive", "rule"),
    [
        ("env:ADMIN_TOKEN", "env:ADMIN_TOKEN is refused: it is one of the service's own"),
        ("env:admin_token", "env:admin_token is refused: it is one of the service's own"),
        ("env:BOT_STATE_SECRET", "one of the service's own credentials"),
        ("env:CLIENT_API_KEYS", "one of the service's own credentials"),
        ("env:COGNIGY_WEBHOOK_SECRET", "one of the service's own credentials"),
        ("env:CXONE_CLIENT_SECRET", "one of the service's own credentials"),
        ("env:HOME", "env: may name only variables starting with PROVISIONING_ENV_PREFIX"),
        ("file:/etc/hostname", "below PROVISIONING_SECRETS_DIR, which is not set"),
    ],
)
async def test_an_api_directive_cannot_name_the_services_secrets_or_leave_the_allow_list(
    gateway: Any,
    upstreams: Upstreams,
    monkeypatch: pytest.MonkeyPatch,
    directive: str,
    rule: str,
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)  # as a deployment sets it
    monkeypatch.setenv("BOT_STATE_SECRET", "test-bot-state-secret")
    async with gateway() as client:
        applied = await put_config(client, to_recorder(upstreams, directive))
        checked = await client.post(
            "/admin/config/validate", json=to_recorder(upstreams, directive), headers=AUTH
        )
        assert await served_by(client) == "alpha"
        (latest, _) = await audit_records(client, limit=2)
    assert rule in refusal(applied, "providers[1].api_keys[0]")
    assert checked.json()["valid"] is False
    assert (
        rule
        in {p["path"]: p["message"] for p in checked.json()["problems"]}["providers[1].api_keys[0]"]
    )
    assert upstreams.recorded.requests == []  # the health check never called the provider
    assert latest["result"] == "invalid" and rule in latest["detail"]
    assert TOKEN not in latest["detail"]


async def test_a_variable_under_the_prefix_holding_a_service_secret_is_refused_by_value(
    gateway: Any, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_PROVIDER_KEY_COPY", TOKEN)  # ADMIN_TOKEN's value under an allowed name
    async with gateway() as client:
        response = await put_config(client, to_recorder(upstreams, "env:CXR_PROVIDER_KEY_COPY"))
    assert "holds the value of one of the service's own credentials" in refusal(
        response, "providers[1].api_keys[0]"
    )
    assert TOKEN not in response.text
    assert upstreams.recorded.requests == []


async def test_a_service_secret_is_refused_even_when_it_matches_the_prefix(
    gateway: Any, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOT_STATE_SECRET", "test-bot-state-secret")
    async with gateway(provisioning_env_prefix="BOT_") as client:
        response = await put_config(client, to_recorder(upstreams, "env:BOT_STATE_SECRET"))
    assert "one of the service's own credentials" in refusal(response, "providers[1].api_keys[0]")
    assert upstreams.recorded.requests == []


async def test_files_only_below_the_secrets_dir_resolved_without_symlink_escape(
    gateway: Any, upstreams: Upstreams, tmp_path: Path
) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "gamma.key").write_text("sk-gamma-from-file\n")
    outside = tmp_path / "outside.key"
    outside.write_text("sk-not-for-the-api\n")
    (secrets_dir / "escape.key").symlink_to(outside)
    dotdot = f"file:{secrets_dir}/../outside.key"
    async with gateway(provisioning_secrets_dir=str(secrets_dir)) as client:
        escaped = await put_config(client, to_recorder(upstreams, f"file:{secrets_dir}/escape.key"))
        climbed = await put_config(client, to_recorder(upstreams, dotdot))
        elsewhere = await put_config(client, to_recorder(upstreams, f"file:{outside}"))
        assert upstreams.recorded.requests == []
        allowed = await put_config(client, to_recorder(upstreams, f"file:{secrets_dir}/gamma.key"))
    for response in (escaped, climbed, elsewhere):
        message = refusal(response, "providers[1].api_keys[0]")
        assert f"file: may name only files below PROVISIONING_SECRETS_DIR ({secrets_dir})" in (
            message
        )
        assert "sk-not-for-the-api" not in response.text
    assert allowed.status_code == 200, allowed.text
    assert [r["authorization"] for r in upstreams.recorded.probes()] == [
        "Bearer sk-gamma-from-file"
    ]


async def test_an_allowed_variable_is_resolved_and_probed(
    gateway: Any, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_PROVIDER_KEY_GAMMA", "sk-gamma-allowed")
    async with gateway() as client:
        response = await put_config(client, to_recorder(upstreams, "env:CXR_PROVIDER_KEY_GAMMA"))
    assert response.status_code == 200, response.text
    assert [r["authorization"] for r in upstreams.recorded.probes()] == ["Bearer sk-gamma-allowed"]


async def test_a_provider_file_key_cannot_be_moved_to_another_url_through_the_api(
    gateway: Any, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The provider file may name any variable; through the API a provider keeps such a key only
    while it still points where the file pointed it."""
    monkeypatch.setenv("OPENAI_KEY", "sk-from-the-provider-file")
    path = tmp_path / "providers-any-name.yaml"
    path.write_text(
        yaml.safe_dump(
            config([provider("alpha", upstreams.alpha.url, "env:OPENAI_KEY")], ["alpha"])
        )
    )
    moved = config([provider("alpha", upstreams.recorder.url, "env:OPENAI_KEY")], ["alpha"])
    kept = config(
        [{**provider("alpha", upstreams.alpha.url, "env:OPENAI_KEY"), "rpm": 100}], ["alpha"]
    )
    async with gateway(providers_file=str(path)) as client:  # start-up: any name, as before
        assert await served_by(client) == "alpha"
        refused = await put_config(client, moved)
        assert upstreams.recorded.requests == []
        unchanged_destination = await put_config(client, kept)
    assert "PROVISIONING_ENV_PREFIX" in refusal(refused, "providers[0].api_keys[0]")
    assert unchanged_destination.status_code == 200, unchanged_destination.text
