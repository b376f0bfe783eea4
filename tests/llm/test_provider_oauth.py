"""Providers behind OAuth2 client credentials: the fake provider on loopback issues the tokens
(`POST /oauth/token`) and accepts only those, a second fake with a static key is the fallback.
Through the router (what a user of it notices: who answered, what went on the wire) and through
the app (webhook, /chat, the admin listing, /health and the logs)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import SecretStr

from app.core.deadline import Deadline
from app.llm.catalog import load_provider_file, validate_provider_config
from app.llm.embeddings import EmbeddingRequest
from app.llm.retry import RetryPolicy
from app.llm.router import LLMRouter, RouterOptions
from app.llm.types import ChatRequest
from app.observability.logs import JsonFormatter
from app.simulator.faults import Fault, FaultPlan
from app.simulator.llm import TokenIssuer, create_llm_simulator
from app.simulator.server import LoopbackServer
from tests.helpers import post_turn, trigger

ROOT = Path(__file__).resolve().parents[2]
SECRET_ENV = "CXR_PROVIDER_KEY_ALPHA_CLIENT_SECRET"
BETA_KEY = "sk-beta-static-key"
SCOPE = "llm-gateway:manage"  # the NICE gateway tutorial's scope
AUDIENCE = "https://llm-gateway.example"
ROUTE = "support"
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens


@dataclass
class Fakes:
    issuer: TokenIssuer
    urls: tuple[str, str]  # alpha (behind OAuth: serves /oauth/token too), beta (a static key)
    alpha_plan: FaultPlan
    beta_plan: FaultPlan

    @property
    def token_requests(self) -> list[dict[str, Any]]:
        return self.issuer.plan.requests


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fakes]:
    issuer, alpha_plan, beta_plan = TokenIssuer(), FaultPlan(), FaultPlan()
    monkeypatch.setenv(SECRET_ENV, issuer.client_secret)
    monkeypatch.setenv("CXR_PROVIDER_KEY_WRONG_SECRET", "not-the-client-secret")
    monkeypatch.setenv("CXR_PROVIDER_KEY_BETA", BETA_KEY)
    with (
        LoopbackServer(create_llm_simulator(alpha_plan, oauth=issuer)) as alpha,
        LoopbackServer(create_llm_simulator(beta_plan)) as beta,
    ):
        yield Fakes(issuer, (alpha.url, beta.url), alpha_plan, beta_plan)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def raw_config(urls: tuple[str, str], *, alpha: dict[str, Any] | None = None, **oauth: Any) -> Any:
    """Alpha behind OAuth (its own token endpoint), beta with a static key, one route over both."""
    alpha_spec = {
        "name": "alpha",
        "base_url": urls[0],
        "oauth": {
            "token_url": f"{urls[0]}/oauth/token",
            "client_id": TokenIssuer.client_id,
            "client_secret": f"env:{SECRET_ENV}",
            "scope": SCOPE,
            "audience": AUDIENCE,
        }
        | oauth,
        "models": [{"name": "gpt-4o-mini"}],
    } | (alpha or {})
    beta_spec = {
        "name": "beta",
        "base_url": urls[1],
        "api_keys": ["env:CXR_PROVIDER_KEY_BETA"],
        "models": [{"name": "gpt-4o"}],
    }
    chain = [{"provider": "alpha", "model": "gpt-4o-mini"}, {"provider": "beta", "model": "gpt-4o"}]
    return {"providers": [alpha_spec, beta_spec], "routes": [{"name": ROUTE, "chain": chain}]}


def build_router(
    http: httpx.AsyncClient, fakes: Fakes, alpha: dict[str, Any] | None = None, **oauth: Any
) -> LLMRouter:
    config, problems = validate_provider_config(raw_config(fakes.urls, alpha=alpha, **oauth))
    assert problems == [] and config is not None, problems
    options = RouterOptions(retry=RetryPolicy(max_attempts=1, initial_wait=0.01, max_wait=0.02))
    return LLMRouter(http, config, options)


def request(text: str = "hello") -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], ROUTE, 0.2, 64)


def steps(result: Any) -> list[str]:
    return [f"{a.provider}:{a.outcome}" for a in result.trail]


def bearers(plan: FaultPlan) -> list[str]:
    return [r["headers"].get("authorization", "").removeprefix("Bearer ") for r in plan.requests]


async def ask(llm: LLMRouter, via: str = "json") -> Any:
    if via == "json":
        return await llm.complete(request(), Deadline.after(5))
    return await llm.complete_streamed(request(), Deadline.after(5), first_token_timeout=2)


# --- the token on the wire -----------------------------------------------------------------------


async def test_many_concurrent_calls_share_one_token_request(
    http: httpx.AsyncClient, fakes: Fakes
) -> None:
    llm = build_router(http, fakes)
    fakes.issuer.plan.push(Fault(delay=0.2))  # a slow token endpoint: every call waits on it
    results = await asyncio.gather(*(ask(llm, "json" if i % 2 else "sse") for i in range(20)))
    assert {r.provider for r in results} == {"alpha"}
    assert len(fakes.token_requests) == 1
    (token,) = fakes.issuer.issued
    assert bearers(fakes.alpha_plan) == [token] * 20


@pytest.mark.parametrize(("client_auth", "kind"), [("basic", "openai"), ("body", "anthropic")])
async def test_the_grant_is_sent_as_rfc_6749_asks_and_the_token_as_bearer(
    http: httpx.AsyncClient, fakes: Fakes, client_auth: str, kind: str
) -> None:
    llm = build_router(http, fakes, alpha={"kind": kind}, client_auth=client_auth)
    assert (await ask(llm)).provider == "alpha"
    (sent,) = fakes.token_requests
    assert sent["headers"]["content-type"] == "application/x-www-form-urlencoded"
    grant = {"grant_type": "client_credentials", "scope": SCOPE, "audience": AUDIENCE}
    client = f"{fakes.issuer.client_id}:{fakes.issuer.client_secret}"
    basic = f"Basic {base64.b64encode(client.encode()).decode()}"
    if client_auth == "basic":
        assert (sent["form"], sent["headers"]["authorization"]) == (grant, basic)
    else:
        client_id, client_secret = fakes.issuer.client_id, fakes.issuer.client_secret
        assert sent["form"] == grant | {"client_id": client_id, "client_secret": client_secret}
        assert "authorization" not in sent["headers"]
    assert bearers(fakes.alpha_plan) == list(fakes.issuer.issued)
    assert "x-api-key" not in fakes.alpha_plan.requests[0]["headers"]  # Anthropic's key header


async def test_the_token_is_reused_until_its_refresh_margin_then_refreshed(
    http: httpx.AsyncClient, fakes: Fakes
) -> None:
    fakes.issuer.expires_in = 2.0  # with a 1.7 s margin: fresh for 0.3 s
    llm = build_router(http, fakes, refresh_margin_seconds=1.7)
    await ask(llm)
    await ask(llm, "sse")
    assert len(fakes.token_requests) == 1
    await asyncio.sleep(0.4)
    await ask(llm)
    assert len(fakes.token_requests) == 2
    first, second = list(fakes.issuer.issued)
    assert bearers(fakes.alpha_plan) == [first, first, second]


# --- 401: refresh once ---------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["json", "sse", "websocket"])
async def test_a_401_drops_the_token_refreshes_it_and_retries_once(
    http: httpx.AsyncClient, fakes: Fakes, via: str
) -> None:
    transport = {"transport": "websocket"} if via == "websocket" else {}
    llm = build_router(http, fakes, alpha=transport)
    await ask(llm, via)
    fakes.issuer.revoke_all()  # the cached token is now refused with 401
    result = await ask(llm, via)
    assert steps(result) == ["alpha:ok"]  # the retry is inside the one attempt
    assert len(fakes.token_requests) == 2
    (fresh,) = fakes.issuer.issued
    assert bearers(fakes.alpha_plan)[-1] == fresh
    assert llm.providers["alpha"].keys.healthy_count == 1  # nothing set aside


async def test_embeddings_carry_the_token_and_a_refused_one_is_refreshed_once(
    http: httpx.AsyncClient, fakes: Fakes
) -> None:
    models = [{"name": "gpt-4o-mini"}, {"name": "text-embedding-3-small", "kind": "embedding"}]
    llm = build_router(http, fakes, alpha={"models": models})
    asked = EmbeddingRequest("text-embedding-3-small", ("where is my order?",))
    first = await llm.embed(asked, Deadline.after(5))
    (old,) = fakes.issuer.issued
    fakes.issuer.revoke_all()  # the cached token is now refused with 401
    second = await llm.embed(asked, Deadline.after(5))
    (fresh,) = fakes.issuer.issued
    assert steps(first) == steps(second) == ["alpha:ok"]  # the retry is inside the one attempt
    assert first.vectors == second.vectors and len(first.vectors) == 1
    assert len(fakes.token_requests) == 2
    assert bearers(fakes.alpha_plan) == [old, old, fresh]
    assert llm.providers["alpha"].keys.healthy_count == 1  # nothing set aside


async def test_a_provider_that_keeps_refusing_is_tried_once_more_then_falls_back(
    http: httpx.AsyncClient, fakes: Fakes
) -> None:
    llm = build_router(http, fakes)
    fakes.alpha_plan.push(Fault(status=401), Fault(status=401))
    result = await ask(llm)
    assert result.provider == "beta"
    assert steps(result) == ["alpha:unauthorized", "beta:ok"]
    assert len(fakes.token_requests) == 2 and len(fakes.alpha_plan.requests) == 2


# --- the token endpoint fails: the provider fails, the route falls back ---------------------------


FAILURES = [("503", "unavailable"), ("unreachable", "timeout unavailable"), ("slow", "timeout")]


@pytest.mark.parametrize(("failure", "outcome"), [*FAILURES, ("refused", "unauthorized")])
async def test_a_token_endpoint_failure_falls_back_to_the_next_provider(
    http: httpx.AsyncClient, fakes: Fakes, failure: str, outcome: str
) -> None:
    changes: dict[str, Any] = {}
    if failure == "503":
        fakes.issuer.plan.push(Fault(status=503), Fault(status=503))
    elif failure == "unreachable":
        changes["token_url"] = f"{UNREACHABLE}/oauth/token"
    elif failure == "slow":
        fakes.issuer.plan.push(Fault(delay=0.4), Fault(delay=0.4))
        changes["timeout_seconds"] = 0.1
    else:
        changes["client_secret"] = "env:CXR_PROVIDER_KEY_WRONG_SECRET"
    llm = build_router(http, fakes, **changes)
    result = await ask(llm)
    assert steps(result) in [[f"alpha:{o}", "beta:ok"] for o in outcome.split()]
    assert (await ask(llm, "sse")).provider == "beta"
    assert fakes.alpha_plan.requests == []  # nothing went to the provider without a token
    assert bearers(fakes.beta_plan) == [BETA_KEY, BETA_KEY]


async def test_refused_client_credentials_set_the_provider_aside_until_a_probe_succeeds(
    http: httpx.AsyncClient, fakes: Fakes
) -> None:
    llm = build_router(http, fakes)
    fakes.issuer.plan.push(Fault(status=401, json_body={"error": "invalid_client"}))
    assert (await ask(llm)).provider == "beta"
    assert (await ask(llm)).provider == "beta"  # set aside: the token endpoint is not asked
    assert len(fakes.token_requests) == 1
    assert await llm.probe_unhealthy_keys() == 1  # a token comes now, and the provider takes it
    assert (await ask(llm)).provider == "alpha"


# --- the provider file ---------------------------------------------------------------------------


def test_the_oauth_example_file_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CLIENT_SECRET", "s3cret")
    monkeypatch.setenv("OPENAI_KEY_1", "sk-1")
    config = load_provider_file(ROOT / "examples/providers.oauth.yaml")
    oauth = config.providers[0].oauth
    assert oauth is not None and oauth.scope == SCOPE and oauth.client_auth == "basic"


@pytest.mark.parametrize(
    ("alpha", "path", "reason"),
    [
        ({"api_keys": ["env:CXR_PROVIDER_KEY_BETA"]}, ".oauth", "not both"),
        ({"auth_header": "x-api-key"}, ".auth_header", "Bearer"),
        ({"oauth": {"client_secret": "env:CX_RELAY_UNSET"}}, ".oauth.client_secret", "not set"),
        ({"oauth": {"client_secret": "pasted-secret"}}, ".oauth.client_secret", "bare key"),
        ({"oauth": {"client_secret": {"env": "X"}}}, ".oauth.client_secret", "mapping"),
        ({"oauth": {"token_url": "ftp://idp"}}, ".oauth.token_url", "http"),
        ({"oauth": {"client_auth": "jwt"}}, ".oauth.client_auth", "basic"),
        ({"oauth": {"token_url": None}}, ".oauth.token_url", ""),
    ],
)
def test_oauth_mistakes_are_reported_with_their_path(
    monkeypatch: pytest.MonkeyPatch, alpha: dict[str, Any], path: str, reason: str
) -> None:
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    monkeypatch.setenv("CXR_PROVIDER_KEY_BETA", BETA_KEY)
    raw = raw_config(("https://llm.example", "https://fallback.example"))
    spec = raw["providers"][0]
    for field, value in alpha.items():
        spec[field] = spec[field] | value if field == "oauth" else value
    problems = validate_provider_config(raw)[1]
    assert [p.path for p in problems] == [f"providers[0]{path}"], problems
    assert reason in problems[0].message


# --- through the app -----------------------------------------------------------------------------


ADMIN = "admin-token-for-oauth-tests"
CLIENT_KEY = "client-key-for-oauth-tests"


@pytest.fixture
def gateway(app_client: Callable[..., Any], fakes: Fakes, tmp_path: Path) -> Any:
    """`gateway(alpha_changes)`: the app on a provider file with alpha behind OAuth."""

    def start(alpha: dict[str, Any] | None = None) -> Any:
        path = tmp_path / "providers.yaml"
        path.write_text(yaml.safe_dump(raw_config(fakes.urls, alpha=alpha)))
        return app_client(
            providers_file=str(path),
            llm_model=ROUTE,
            admin_token=SecretStr(ADMIN),
            client_api_keys=[SecretStr(f"{CLIENT_KEY}:acme")],
            llm_max_attempts=1,
            data_dir=str(tmp_path / "data"),
        )

    return start


async def chat(client: httpx.AsyncClient, text: str) -> httpx.Response:
    body = {"session_id": "oauth-session", "messages": [{"role": "user", "content": text}]}
    return await client.post("/chat", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"})


async def test_the_webhook_and_chat_fall_back_when_the_token_endpoint_is_down(
    gateway: Any, fakes: Fakes
) -> None:
    async with gateway() as client:
        first = (await post_turn(client, trigger(lastMessage="first question"))).json()
        assert first["provider"] == "alpha"
        fakes.issuer.revoke_all()
        fakes.issuer.plan.push(*[Fault(status=503)] * 10)  # no fresh token can be had
        second = (await post_turn(client, trigger(lastMessage="second question"))).json()
        assert (second["status"], second["provider"]) == ("success", "beta")
        assert (await chat(client, "a chat question")).status_code == 200
        fakes.beta_plan.push(*[Fault(status=503)] * 10)  # now nobody can answer
        down = (await post_turn(client, trigger(lastMessage="third question"))).json()
        refused = await chat(client, "another chat question")
    assert (down["status"], down["fallback_action"]) == ("llm_unavailable", "route_to_human")
    assert refused.status_code == 502


async def test_the_admin_api_health_checks_an_oauth_provider_with_a_real_token(
    gateway: Any, fakes: Fakes
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with gateway() as client:
        wrong = raw_config(fakes.urls, client_secret="env:CXR_PROVIDER_KEY_WRONG_SECRET")
        refused = await client.put("/admin/config", json=wrong, headers=admin)
        changed = raw_config(fakes.urls, scope=["llm-gateway:read", "llm-gateway:chat"])
        applied = await client.put("/admin/config", json=changed, headers=admin)
        turn = (await post_turn(client, trigger(lastMessage="after the change"))).json()
    assert refused.status_code == 424, refused.text
    assert "'alpha'" in refused.json()["problems"][0]["message"]
    assert applied.status_code == 200, applied.text
    assert turn["provider"] == "alpha"
    assert fakes.token_requests[-1]["form"]["scope"] == "llm-gateway:read llm-gateway:chat"
    assert "not-the-client-secret" not in refused.text


class JsonLines(logging.Handler):
    """cx-relay's log lines as written (JsonFormatter: extras included), at DEBUG. The fakes'
    own uvicorn (their threads), logging what they received, is not cx-relay's log."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.threadName).startswith("loopback-"):
            self.lines.append(self.format(record))


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[JsonLines]:
    for name in (None, "websockets", "httpx", "httpcore", "cxrelay"):  # levels restored after
        caplog.set_level(logging.DEBUG, logger=name)
    handler = JsonLines()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


async def test_no_secret_or_token_in_the_admin_listing_health_or_logs(
    gateway: Any, fakes: Fakes, logs: JsonLines
) -> None:
    async with gateway({"transport": "websocket"}) as client:
        assert (await post_turn(client, trigger(lastMessage="one"))).json()["provider"] == "alpha"
        fakes.issuer.revoke_all()  # 401, refresh, retry
        assert (await chat(client, "two")).status_code == 200
        fakes.issuer.revoke_all()
        fakes.issuer.plan.push(Fault(status=401, json_body={"error": "invalid_client"}))
        assert (await post_turn(client, trigger(lastMessage="three"))).json()["provider"] == "beta"
        listing = await client.get("/admin/providers", headers={"Authorization": f"Bearer {ADMIN}"})
        health = await client.get("/health")
    assert listing.status_code == 200 and health.status_code in (200, 503)
    alpha = next(p for p in listing.json()["providers"] if p["name"] == "alpha")
    assert alpha["keys"] == []  # no key material of any kind to list
    tokens = set(bearers(fakes.alpha_plan))  # every token that went on the wire
    assert len(tokens) == 2
    secrets = [fakes.issuer.client_secret, *tokens]
    surfaces = {"listing": listing.text, "health": health.text, "logs": "\n".join(logs.lines)}
    assert "OAuth token request failed" in surfaces["logs"]  # the failure itself is logged
    for name, text in surfaces.items():
        for secret in secrets:
            assert secret not in text, f"{secret[:10]}… appears in {name}"
    assert json.loads(health.text)["providers"]["alpha"]["keyless"] is True
