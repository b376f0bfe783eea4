"""The start-up summary an operator reads first: one "cx-relay started" line (and `/health`'s
`startup`) naming the surfaces on and off, each provider's URL with its credentials masked, the
store, the workers and what is simulated; never a secret, whatever the configuration holds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from app.bootstrap.summary import masked_url
from app.core.settings import (
    DEV_BOT_STATE_SECRET,
    DEV_CLIENT_API_KEY,
    DEV_CXONE_AUTHORIZATION,
    DEV_WEBHOOK_SECRET,
    Settings,
)
from app.llm.catalog import canonical_json
from app.main import create_app
from app.serving import start_simulators
from app.simulator.server import LoopbackServer
from tests.helpers import TEST_BASE_URL, Captured, capture_logs, free_port, service_env
from tests.observability.test_metrics_multiprocess import wait_until_both_live

STARTED = "cx-relay started"
REDIS_PASSWORD = "redis-pass-5e0f7a"  # the real Redis's default user is `nopass`: any is taken
URL_PASSWORD = "url-pass-4b1e92"
URL_KEY = "url-query-key-9c2d41"
PROVIDER_KEY = "sk-provider-file-key-77ab"
SECRETS = {
    "cognigy_webhook_secret": "whsec-summary-secret-1a2b3c",
    "cognigy_api_keys": "cognigy-summary-api-key-2b3c4d",
    "cxone_webhook_authorization": "Bearer cxone-summary-token-3c4d5e",
    "bot_state_secret": "bot-state-summary-secret-4d5e6f",
    "session_id_secret": "session-id-summary-secret-5e6f70",
    "client_api_keys": "ck-summary-client-key-6f7081",
    "admin_token": "admin-summary-token-708192",
    "metrics_token": "metrics-summary-token-8192a3",
    "access_token_secret": "access-token-summary-secret-92a3b4",
}
OAUTH_SECRET = "oauth-client-summary-secret-a3b4c5"


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[tuple[Captured, httpx.AsyncClient]]:
    """The app's real lifespan with every log line captured, and a client to reach it."""
    app = create_app(settings)
    with capture_logs() as captured:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=TEST_BASE_URL) as client:
                yield captured, client


def only_started_line(captured: Captured) -> dict[str, Any]:
    lines = captured.with_message(STARTED)
    assert len(lines) == 1, captured.text
    line = lines[0]
    assert (line["level"], line["logger"]) == ("INFO", "cxrelay")
    return line


def summary_of(line: dict[str, Any]) -> dict[str, Any]:
    """The logged line's summary: every field but the line's own (time, level, message...)."""
    own = {"ts", "level", "logger", "message", "version", "started_at"}
    return {k: v for k, v in line.items() if k not in own}


def secret(name: str, value: str) -> SecretStr | list[SecretStr]:
    """A SECRETS value as its setting takes it (a list setting: one entry)."""
    annotation = str(Settings.model_fields[name].annotation)
    return [SecretStr(value)] if annotation.startswith("list") else SecretStr(value)


def assert_no_secret(text: str, secrets: list[str]) -> None:
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"secrets in the output: {leaked}"


@pytest.fixture
def simulated_settings(tmp_path: Path) -> Iterator[Settings]:
    """What `python -m app serve --simulate` (`make run`) starts with: its simulators running."""
    base = Settings(_env_file=None, simulate=True, data_dir=tmp_path)
    with ExitStack() as stack:
        overrides = start_simulators(base, stack)
        yield base.model_copy(update=overrides)


async def test_the_default_simulated_setup_is_summarised_once_and_in_health(
    simulated_settings: Settings, tmp_path: Path
) -> None:
    settings = simulated_settings
    async with started(settings) as (captured, client):
        response = await client.get("/health")
    line = only_started_line(captured)
    summary = summary_of(line)
    surfaces = summary["surfaces"]
    # the development credentials simulated mode configures: both webhooks and the client routes
    assert surfaces["cognigy_webhook"] == {
        "on": True,
        "path": "/webhook/cognigy/fallback",
        "auth": ["standard_webhooks", "hmac"],
    }
    assert surfaces["cxone_webhook"]["on"] is True
    for name in ("chat", "openai", "ws_chat", "budget_reads", "gateway"):
        assert (surfaces[name]["on"], surfaces[name]["auth"]) == (True, ["client_keys"]), name
    assert surfaces["openai"]["path"] == "/v1" and surfaces["ws_chat"]["path"] == "/ws/chat"
    assert surfaces["admin"] == {"on": False, "path": "/admin"}  # no ADMIN_TOKEN
    assert surfaces["oauth_tokens"]["on"] is False
    assert surfaces["metrics"]["auth"] == ["none"]
    assert summary["credentials"] == {"client_keys": 1, "oauth_clients": 0, "admin_token": 0}
    assert summary["budgets"]["on"] is True and summary["budgets"]["session_tokens"] == 4096
    llm_url = settings.llm_gateway_base_url
    assert summary["providers"] == {
        "default": {
            "kind": "openai",
            "base_url": llm_url,
            "auth": "none",
            "models": ["gpt-4o-mini", "text-embedding-3-small"],
        }
    }
    assert summary["routes"] == {
        "gpt-4o-mini": ["default/gpt-4o-mini"],
        "text-embedding-3-small": ["default/text-embedding-3-small"],
    }
    assert (summary["provider_config"], summary["default_model"]) == ("env", "gpt-4o-mini")
    assert summary["cxone_context"]["on"] is True
    assert summary["cxone_context"]["token_url"] == settings.cxone_token_url
    assert summary["store"] == {
        "backend": "sqlite",
        "path": str((tmp_path / "cx-relay.sqlite3").resolve()),
        "synchronous": "normal",
    }
    assert (summary["workers"], summary["simulated"]) == (1, ["llm", "cxone"])
    assert summary["token_counting"] == "exact"
    assert isinstance(summary["pid"], int)
    # /health carries the same summary, its other fields as before
    body = response.json()
    assert body["startup"] == summary
    assert {"status", "version", "simulated", "warnings", "store", "providers"} <= set(body)
    # the development credentials are not secrets (the start-up warnings name two of them), but
    # the summary names none of them, nor the simulated CXone's client secrets
    assert settings.cxone_client_secret is not None and settings.cxone_access_key_secret
    shown = [
        DEV_WEBHOOK_SECRET,
        DEV_CLIENT_API_KEY,
        DEV_BOT_STATE_SECRET,
        DEV_CXONE_AUTHORIZATION.split()[-1],
        settings.cxone_client_secret.get_secret_value(),
        settings.cxone_access_key_secret.get_secret_value(),
    ]
    assert_no_secret(str(line), shown)
    assert_no_secret(response.text, shown)


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    prefix = f"cxrelay-summary-{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_redis_and_a_provider_file_are_summarised_with_every_credential_masked(
    llm_server: LoopbackServer,
    tmp_path: Path,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SUMMARY_PROVIDER_KEY", PROVIDER_KEY)
    port = llm_server.url.rsplit(":", 1)[1]
    with_credentials = f"http://gateway-user:{URL_PASSWORD}@127.0.0.1:{port}/v1?key={URL_KEY}"
    providers = tmp_path / "providers.json"
    providers.write_text(
        canonical_json(
            {
                "providers": [
                    {
                        "name": "primary",
                        "base_url": with_credentials,
                        "api_keys": ["env:SUMMARY_PROVIDER_KEY", "env:SUMMARY_PROVIDER_KEY"],
                        "models": [{"name": "m1"}],
                    },
                    {
                        "name": "backup",
                        "base_url": llm_server.url,
                        "api_keys": ["env:SUMMARY_PROVIDER_KEY"],
                        "models": [{"name": "m2"}],
                    },
                ],
                "routes": [
                    {
                        "name": "assistant",
                        "chain": [
                            {"provider": "primary", "model": "m1"},
                            {"provider": "backup", "model": "m2"},
                        ],
                    }
                ],
            }
        )
    )
    settings = Settings(
        _env_file=None,
        providers_file=providers,
        llm_model="assistant",
        store_backend="redis",
        redis_url=f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6379/0",
        redis_key_prefix=redis_prefix,
        data_dir=tmp_path,
        oauth_clients=[SecretStr(f"summary-client:{OAUTH_SECRET}:acme;scopes=llm.gateway:invoke")],
        **{name: secret(name, value) for name, value in SECRETS.items()},
    )
    async with started(settings) as (captured, client):
        response = await client.get("/health")
    summary = summary_of(only_started_line(captured))
    assert summary["store"] == {
        "backend": "redis",
        "url": "redis://***:***@127.0.0.1:6379/0",
        "key_prefix": redis_prefix,
    }
    assert summary["providers"] == {
        "primary": {
            "kind": "openai",
            "base_url": f"http://***:***@127.0.0.1:{port}/v1?key=***",
            "auth": "2 keys",
            "models": ["m1"],
        },
        "backup": {"kind": "openai", "base_url": llm_server.url, "auth": "1 key", "models": ["m2"]},
    }
    assert summary["routes"] == {
        "assistant": ["primary/m1", "backup/m2"],
        "m1": ["primary/m1"],
        "m2": ["backup/m2"],
    }
    assert (summary["provider_config"], summary["default_model"]) == ("providers_file", "assistant")
    assert summary["simulated"] == [] and summary["cxone_context"] == {"on": False}
    surfaces = summary["surfaces"]
    assert surfaces["admin"]["on"] is True
    assert surfaces["oauth_tokens"]["on"] is True
    assert surfaces["metrics"]["auth"] == ["bearer"]
    assert surfaces["cognigy_webhook"]["auth"] == ["standard_webhooks", "hmac", "api_key", "oauth2"]
    assert surfaces["chat"]["auth"] == ["client_keys", "oauth_clients", "admin_token"]
    assert summary["credentials"] == {"client_keys": 1, "oauth_clients": 1, "admin_token": 1}
    assert response.json()["startup"] == summary
    # no configured secret anywhere in what the service logged, nor in /health
    secrets = [*SECRETS.values(), OAUTH_SECRET, PROVIDER_KEY, REDIS_PASSWORD]
    secrets += [URL_PASSWORD, URL_KEY, "gateway-user"]
    assert_no_secret(captured.text, secrets)
    assert_no_secret(response.text, secrets)


async def test_surfaces_without_their_credential_are_off(
    llm_server: LoopbackServer, tmp_path: Path
) -> None:
    """Only the CXone webhook configured (the CXone tutorial's .env): the Cognigy webhook, the
    client routes and admin say off, as each answers 401 "disabled"."""
    settings = Settings(
        _env_file=None,
        llm_gateway_base_url=llm_server.url,
        cxone_webhook_authorization=[SecretStr(SECRETS["cxone_webhook_authorization"])],
        budget_session_tokens="none",
        data_dir=tmp_path,
    )
    async with started(settings) as (captured, client):
        cognigy = await client.post("/webhook/cognigy/fallback", json={})
        chat = await client.post("/chat", json={})
    surfaces = summary_of(only_started_line(captured))["surfaces"]
    assert surfaces["cognigy_webhook"] == {
        "on": False,
        "path": "/webhook/cognigy/fallback",
        "auth": [],
    }
    assert cognigy.status_code == 401 and "disabled" in cognigy.text
    assert surfaces["cxone_webhook"]["on"] is True
    for name in ("chat", "openai", "ws_chat", "budget_reads", "gateway", "admin", "oauth_tokens"):
        assert surfaces[name]["on"] is False, name
    assert chat.status_code == 401
    budgets = summary_of(only_started_line(captured))["budgets"]
    assert budgets["on"] is False and budgets["session_tokens"] is None


@pytest.mark.slow
def test_each_worker_logs_its_own_summary(tmp_path: Path) -> None:
    """`serve --simulate` with WORKERS=2: two "cx-relay started" lines, one per worker process
    (told apart by `pid`), each with the same summary otherwise; /health shows the answering
    worker's."""
    port = free_port()
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--simulate", "--port", str(port)],
            cwd=tmp_path,
            env=service_env(WORKERS="2"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            wait_until_both_live(base_url, process, log)
            health = httpx.get(f"{base_url}/health", timeout=15).json()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    lines = [json.loads(ln) for ln in log.read_text().splitlines() if STARTED in ln]
    assert len(lines) == 2, log.read_text()[-3000:]
    summaries = [summary_of(line) for line in lines]
    pids = {summary.pop("pid") for summary in summaries}
    assert len(pids) == 2 and summaries[0] == summaries[1]
    assert summaries[0]["workers"] == 2 and summaries[0]["simulated"] == ["llm", "cxone"]
    assert health["startup"]["pid"] in pids


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pa55word@llm.example.com/v1", "https://***:***@llm.example.com/v1"),
        (
            "https://llm.example.com/v1?key=abc123&api-version=1",
            "https://llm.example.com/v1?key=***&api-version=***",
        ),
        (
            "https://u:p@llm.example.com:8443/openai?key=abc123#frag",
            "https://***:***@llm.example.com:8443/openai?key=***",
        ),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://sk-only-a-user@redis:6379/0", "redis://***@redis:6379/0"),
        ("http://[::1]:8080/v1", "http://[::1]:8080/v1"),
        ("https://llm.example.com/v1", "https://llm.example.com/v1"),
        ("https://llm.example.com/v1?flag", "https://llm.example.com/v1?flag="),
        ("http://host:notaport/v1", "(not a URL)"),
    ],
)
def test_a_url_is_shown_with_its_credentials_masked(url: str, shown: str) -> None:
    assert masked_url(url) == shown
