"""Tutorial 000 (the Cognigy LLM gateway's inference API) against cx-relay, end to end.

`GatewayClient` below is this project's own client, written from the tutorial's wire format only:
its REST calls (`GET /api/v1/llm-gateway/health`, `POST /api/v1/llm-gateway/providers`), its
inference payload (camelCase: sessionId, template + variables, modelId, streaming,
fallbackModels, safetyFilters, responseFormat) and its WebSocket frames (`content` with `delta`,
`complete` with `usage` and `model`, `error` with `message`). It talks to the real service on a
real uvicorn server (in this process), whose providers are the simulated ones on loopback, so
every hop crosses a socket: register provider -> 409 on repeat -> health -> inference over the
WebSocket path and over HTTP (streaming, with responseFormat).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websockets
import yaml
from fastapi import FastAPI
from pydantic import BaseModel, SecretStr

from app.auth.signatures import fingerprint
from app.core.settings import Settings
from app.main import create_app
from app.simulator.faults import Fault, FaultPlan
from app.simulator.server import LoopbackServer
from tests.reliability.test_faults_clients import (  # noqa: F401 (store_settings: a fixture)
    Service,
    store_settings,
    until_no_slot_is_held,
)

ADMIN_TOKEN = "tutorial-000-admin-token"
CLIENT_KEY = "tutorial-000-client-key"  # no scope list
# the tutorial's key: all three of its scopes
TUTORIAL_KEY = "tutorial-000-scoped-key"
TUTORIAL_SCOPES = ["llm-gateway:manage", "llm-inference:execute", "llm-inference:read"]
INVOKE_ONLY_KEY = "tutorial-000-invoke-only"  # llm-inference:execute alone
METRICS_ONLY_KEY = "tutorial-000-metrics-only"  # tutorial 001's read scope alone
KEYS = {
    "CXR_PROVIDER_KEY_T000_KEY_1": "sk-t000-one",
    "CXR_PROVIDER_KEY_T000_KEY_2": "sk-t000-two",
    "CXR_PROVIDER_KEY_T000_BACKUP": "sk-t000-b",
}
PRIMARY_MODEL = "gpt-4-1106-preview"
BACKUP_MODEL = "claude-3-haiku-20240307"
BASE_MODEL = "gpt-4o-mini"  # LLM_MODEL, served by the provider file's own provider
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens
INTENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "intent": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "entities": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["intent", "confidence", "entities"],
}


class Intent(BaseModel):
    """What the tutorial's reader validates the streamed text against."""

    intent: str
    confidence: float
    entities: list[str]


@dataclass
class Streamed:
    """What a streamed inference gave the client: the joined deltas and the last frame's data."""

    text: str = ""
    deltas: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    error: str | None = None
    last: dict[str, Any] = field(default_factory=dict)
    close_code: int | None = None  # the server's close code, when the socket closed first

    def take(self, frame: dict[str, Any]) -> bool:
        """Fold one frame in; True once the answer has ended."""
        kind = frame.get("type")
        if kind == "content":
            self.text += frame.get("delta", "")
            self.deltas += 1
            return False
        self.last = frame
        if kind == "error":
            self.error = frame.get("message", "unknown error")
            return True
        if kind == "complete":
            usage = frame.get("usage", {})
            self.prompt_tokens = usage.get("prompt_tokens", 0)
            self.completion_tokens = usage.get("completion_tokens", 0)
            self.model = frame.get("model", "")
            return True
        raise AssertionError(f"a frame the tutorial does not know: {frame}")


class GatewayClient:
    """The tutorial's calls, as a reader of it would write them against any base URL."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}

    async def health(self) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as http:
            return await http.get("/api/v1/llm-gateway/health", headers=self.headers)

    async def register_provider(self, payload: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=15) as http:
            return await http.post(
                "/api/v1/llm-gateway/providers", headers=self.headers, json=payload
            )

    async def stream_over_websocket(self, payload: dict[str, Any]) -> Streamed:
        url = self.base_url.replace("http://", "ws://") + "/ws/v1/llm-gateway/stream"
        result = Streamed()
        try:
            async with websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {self.api_key}"}
            ) as ws:
                await ws.send(json.dumps(payload))
                while not result.take(json.loads(await asyncio.wait_for(ws.recv(), 30))):
                    pass
        except websockets.ConnectionClosed as closed:  # as the tutorial's client handles it
            result.error = f"WebSocket closed: {closed}"
            result.close_code = closed.rcvd.code if closed.rcvd else None
        return result

    async def stream_over_http(self, payload: dict[str, Any]) -> Streamed:
        result = Streamed()
        async with (
            httpx.AsyncClient(base_url=self.base_url, timeout=30) as http,
            http.stream("POST", "/chat", headers=self.headers, json=payload) as response,
        ):
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and result.take(json.loads(line[6:])):
                    break
        return result


def registration(name: str, keys: list[str], model: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "OPENAI",
        "apiKeyRotation": {
            "enabled": True,
            "keys": keys,
            "rotationStrategy": "ROUND_ROBIN_ON_FAILURE",
        },
        "defaultModel": model,
        "timeoutMs": 15000,
        "retryOnRateLimit": True,
        **extra,
    }


def inference(session: str, text: str, **extra: Any) -> dict[str, Any]:
    return {
        "sessionId": session,
        "template": "Extract the intent and entities from: {{user_input}}. Answer in JSON only.",
        "variables": {"user_input": text},
        "modelId": PRIMARY_MODEL,
        "streaming": True,
        "fallbackModels": [BACKUP_MODEL],
        "safetyFilters": ["profanity", "pii", "self_harm"],
        "responseFormat": {"type": "json_schema", "schema": INTENT_SCHEMA},
        **extra,
    }


def keys_sent(plan: FaultPlan) -> list[str]:
    return [r["headers"].get("authorization", "").removeprefix("Bearer ") for r in plan.requests]


# --- the service ---------------------------------------------------------------------------------


class ServiceServer(LoopbackServer):
    """The service itself on a real uvicorn server, its app at hand for a white-box look."""

    def __init__(self, app: FastAPI) -> None:
        super().__init__(app, lifespan="on")
        self.app = app


@pytest.fixture
def provider_file(tmp_path: Path, llm_server: LoopbackServer) -> Callable[..., Path]:
    def write(**top: Any) -> Path:
        path = tmp_path / "providers.yaml"
        base = {
            "name": "base",
            "base_url": llm_server.url,
            "api_keys": ["env:CXR_PROVIDER_KEY_T000_KEY_1"],
            "models": [{"name": BASE_MODEL}],
        }
        path.write_text(yaml.safe_dump({"providers": [base], **top}))
        return path

    return write


@pytest.fixture
def start(
    make_settings: Callable[..., Settings],
    provider_file: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Any]:
    """`with start(**settings) as service:` the service on a real uvicorn server."""
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)

    def run(literal_keys: bool = False, **overrides: Any) -> ServiceServer:
        values: dict[str, Any] = {
            "providers_file": provider_file(
                **({"allow_literal_keys": True} if literal_keys else {})
            ),
            "admin_token": SecretStr(ADMIN_TOKEN),
            "client_api_keys": [
                SecretStr(f"{CLIENT_KEY}:acme"),
                SecretStr(f"{TUTORIAL_KEY}:acme;scopes={'+'.join(TUTORIAL_SCOPES)}"),
                SecretStr(f"{INVOKE_ONLY_KEY}:acme;scopes=llm-inference:execute"),
                SecretStr(f"{METRICS_ONLY_KEY}:acme;scopes=llm.gateway:metrics:read"),
            ],
            "intent_cache_enabled": False,
            **overrides,
        }
        return ServiceServer(create_app(make_settings(**values)))

    return run


@pytest.fixture
def service(start: Callable[..., ServiceServer]) -> Iterator[ServiceServer]:
    with start() as server:
        yield server


def admin(server: LoopbackServer) -> GatewayClient:
    return GatewayClient(server.url, ADMIN_TOKEN)


def client(server: LoopbackServer) -> GatewayClient:
    return GatewayClient(server.url, CLIENT_KEY)


# --- the tutorial's flow -------------------------------------------------------------------------


async def test_register_then_409_then_health_then_inference_over_websocket_and_http(
    service: LoopbackServer, servers: tuple[str, str], plan_a: FaultPlan, plan_b: FaultPlan
) -> None:
    primary, backup = servers
    operator = GatewayClient(service.url, TUTORIAL_KEY)  # the tutorial's one key does it all
    registered = await operator.register_provider(
        registration(
            "production-openai",
            ["env:CXR_PROVIDER_KEY_T000_KEY_1", "env:CXR_PROVIDER_KEY_T000_KEY_2"],
            PRIMARY_MODEL,
            baseUrl=primary,
        )
    )
    assert registered.status_code == 201, registered.text
    body = registered.json()
    assert body["name"] == "production-openai" and body["status"] == "active"
    assert body["rotationStrategy"] == "ROUND_ROBIN_ON_FAILURE" and body["unhealthyKeys"] == []

    again = await operator.register_provider(
        registration(
            "production-openai", ["env:CXR_PROVIDER_KEY_T000_KEY_1"], PRIMARY_MODEL, baseUrl=primary
        )
    )
    assert again.status_code == 409
    assert "already exists" in again.json()["detail"]

    backup_provider = registration(
        "backup", ["env:CXR_PROVIDER_KEY_T000_BACKUP"], BACKUP_MODEL, baseUrl=backup
    )
    backup_provider["type"] = "ANTHROPIC"
    assert (await operator.register_provider(backup_provider)).status_code == 201

    checked = await operator.health()
    assert checked.status_code == 200
    assert checked.headers["x-permissions"].split(",") == TUTORIAL_SCOPES

    reader = operator
    over_ws = await reader.stream_over_websocket(inference("dialog-9f8a7b6c", "reset my password"))
    assert over_ws.error is None, over_ws.last
    assert Intent.model_validate_json(over_ws.text)  # the reader's own validation passes
    assert over_ws.prompt_tokens > 0 and over_ws.completion_tokens > 0
    assert over_ws.model.endswith("-simulated")
    assert over_ws.last["model_used"] == PRIMARY_MODEL
    assert over_ws.last["cost"] == 0  # a registered model has no prices until configured
    sent = plan_a.requests[-1]
    assert sent["body"]["model"] == PRIMARY_MODEL
    assert sent["body"]["response_format"]["json_schema"]["schema"] == INTENT_SCHEMA
    assert "reset my password" in sent["body"]["messages"][-1]["content"]

    over_http = await reader.stream_over_http(inference("dialog-2", "update my billing address"))
    assert over_http.error is None, over_http.last
    assert over_http.deltas > 1  # streamed, not sent whole
    assert over_http.last["output"] == json.loads(over_http.text)
    assert Intent.model_validate(over_http.last["output"])

    # the primary fails: fallbackModels answers, from the Anthropic provider
    plan_a.push(*[Fault(status=503)] * 6)
    fell_back = await reader.stream_over_websocket(inference("dialog-3", "cancel my plan"))
    assert fell_back.error is None, fell_back.last
    assert fell_back.last["model_used"] == BACKUP_MODEL
    assert (
        plan_b.requests[-1]["headers"]["x-api-key"] == KEYS["CXR_PROVIDER_KEY_T000_BACKUP"]
    )  # Anthropic's
    assert Intent.model_validate_json(fell_back.text)


@pytest.mark.parametrize(
    "failure",
    [
        Fault(status=429, headers={"Retry-After": "60"}),  # each key: cooling past the deadline
        Fault(delay=3.0),  # over the provider's timeoutMs (1,000)
    ],
    ids=["429", "timeout"],
)
async def test_fallback_models_answer_when_the_primary_times_out_or_is_rate_limited(
    service: LoopbackServer,
    servers: tuple[str, str],
    plan_a: FaultPlan,
    plan_b: FaultPlan,
    failure: Fault,
) -> None:
    """The tutorial's two cases: the primary model times out, or answers 429. A timeout is
    retried on the primary first (LLM_MAX_ATTEMPTS passes, 3), then fallbackModels answers;
    a key cooling past the deadline is not retried."""
    operator = GatewayClient(service.url, TUTORIAL_KEY)
    keys = ["env:CXR_PROVIDER_KEY_T000_KEY_1", "env:CXR_PROVIDER_KEY_T000_KEY_2"]
    primary = registration("primary", keys, PRIMARY_MODEL, baseUrl=servers[0], timeoutMs=1000)
    backup = registration(
        "backup", ["env:CXR_PROVIDER_KEY_T000_BACKUP"], BACKUP_MODEL, baseUrl=servers[1]
    )
    backup["type"] = "ANTHROPIC"
    for payload in (primary, backup):
        assert (await operator.register_provider(payload)).status_code == 201
    plan_a.push(*[failure] * 3)
    answer = await operator.stream_over_websocket(inference("fb-1", "cancel my plan"))
    assert answer.error is None, answer.last
    assert answer.last["model_used"] == BACKUP_MODEL
    assert plan_b.requests[-1]["headers"]["x-api-key"] == KEYS["CXR_PROVIDER_KEY_T000_BACKUP"]
    assert Intent.model_validate_json(answer.text)


async def test_round_robin_on_failure_stays_on_a_key_until_it_is_refused(
    service: LoopbackServer, servers: tuple[str, str], plan_a: FaultPlan
) -> None:
    keys = ["env:CXR_PROVIDER_KEY_T000_KEY_1", "env:CXR_PROVIDER_KEY_T000_KEY_2"]
    payload = registration("rotating", keys, PRIMARY_MODEL, baseUrl=servers[0])
    assert (await admin(service).register_provider(payload)).status_code == 201
    reader = client(service)
    plan_a.requests.clear()
    for n in range(4):
        if n == 2:
            plan_a.push(Fault(status=401))  # the first key is refused
        ask = inference(f"r-{n}", "hello", fallbackModels=[])
        assert (await reader.stream_over_http(ask)).error is None
    one, two = KEYS["CXR_PROVIDER_KEY_T000_KEY_1"], KEYS["CXR_PROVIDER_KEY_T000_KEY_2"]
    assert keys_sent(plan_a) == [one, one, one, two, two]


async def test_registration_is_audited_and_listed_with_masked_keys(
    service: LoopbackServer, servers: tuple[str, str]
) -> None:
    payload = registration(
        "audited", ["env:CXR_PROVIDER_KEY_T000_KEY_2"], PRIMARY_MODEL, baseUrl=servers[0]
    )
    assert (await admin(service).register_provider(payload)).status_code == 201
    async with httpx.AsyncClient(base_url=service.url) as http:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        audit = (await http.get("/admin/audit", headers=auth)).json()["records"][0]
        listed = (await http.get("/admin/providers", headers=auth)).json()
    assert audit["action"] == "apply" and audit["result"] == "ok"
    assert audit["actor"] == f"admin:{fingerprint(ADMIN_TOKEN)}"
    assert "audited" in audit["detail"]
    assert listed["source"] == "applied"
    mine = next(p for p in listed["providers"] if p["name"] == "audited")
    assert mine["keys"][0]["source"] == "env:CXR_PROVIDER_KEY_T000_KEY_2"
    assert mine["key_rotation"] == "on_failure"
    assert KEYS["CXR_PROVIDER_KEY_T000_KEY_2"] not in json.dumps(listed)


async def test_a_registered_provider_survives_a_restart(
    start: Callable[..., ServiceServer], servers: tuple[str, str]
) -> None:
    payload = registration(
        "kept", ["env:CXR_PROVIDER_KEY_T000_KEY_1"], PRIMARY_MODEL, baseUrl=servers[0]
    )
    with start() as first:
        assert (await admin(first).register_provider(payload)).status_code == 201
    with start() as second:  # the same DATA_DIR: the applied configuration is read back
        again = await admin(second).register_provider(payload)
        answer = await client(second).stream_over_http(inference("k-1", "hi", fallbackModels=[]))
    assert again.status_code == 409
    assert answer.error is None and answer.last["model_used"] == PRIMARY_MODEL


# --- registration refused, with reasons ----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        ({"apiKeyRotation": {"keys": ["sk-key1"]}}, "apiKeyRotation.keys[0]", "bare key"),
        ({"apiKeyRotation": {"keys": ["literal:sk-1"]}}, "apiKeyRotation.keys[0]", "literal"),
        (
            {"apiKeyRotation": {"keys": ["env:CXR_PROVIDER_KEY_T000_UNSET"]}},
            "apiKeyRotation.keys[0]",
            "not set",
        ),
        (
            {
                "apiKeyRotation": {
                    "keys": ["env:CXR_PROVIDER_KEY_T000_KEY_1"],
                    "rotationStrategy": "RANDOM",
                }
            },
            "apiKeyRotation.rotationStrategy",
            "ROUND_ROBIN_ON_FAILURE",
        ),
        (
            {
                "apiKeyRotation": {
                    "keys": ["env:CXR_PROVIDER_KEY_T000_KEY_1", "env:CXR_PROVIDER_KEY_T000_KEY_2"],
                    "enabled": False,
                }
            },
            "apiKeyRotation",
            "exactly one key",
        ),
        ({"retryOnRateLimit": False}, "(root)", "retryOnRateLimit"),
        ({"type": "COHERE"}, "type", "OPENAI"),
        ({"type": "AZURE_OPENAI", "baseUrl": None}, "(root)", "baseUrl"),
        ({"timeoutMs": 0}, "timeoutMs", "greater than 0"),
        ({"defaultModel": BASE_MODEL}, "defaultModel", "already leads"),
        ({"baseUrl": "ftp://x"}, "baseUrl", "http"),
        ({"surprise": 1}, "surprise", "not permitted"),
    ],
)
async def test_a_bad_registration_is_422_naming_the_field(
    service: LoopbackServer,
    servers: tuple[str, str],
    change: dict[str, Any],
    path: str,
    words: str,
) -> None:
    payload = registration(
        "bad", ["env:CXR_PROVIDER_KEY_T000_KEY_1"], PRIMARY_MODEL, baseUrl=servers[0]
    )
    for name, value in change.items():
        if isinstance(value, dict):
            payload[name] = {**payload[name], **value}
        elif value is None:
            payload.pop(name)
        else:
            payload[name] = value
    response = await admin(service).register_provider(payload)
    assert response.status_code == 422, response.text
    problems = response.json()["problems"]
    assert any(p["path"] == path and words in p["message"] for p in problems), problems


async def test_literal_keys_where_the_configuration_allows_them(
    start: Callable[..., ServiceServer], servers: tuple[str, str]
) -> None:
    payload = registration("dev", ["literal:sk-dev-literal"], PRIMARY_MODEL, baseUrl=servers[0])
    with start(literal_keys=True) as server:
        response = await admin(server).register_provider(payload)
    assert response.status_code == 201, response.text
    assert response.json()["unhealthyKeys"] == []


async def test_a_provider_that_fails_its_health_check_is_424_and_not_added(
    service: LoopbackServer,
) -> None:
    payload = registration(
        "down", ["env:CXR_PROVIDER_KEY_T000_KEY_1"], PRIMARY_MODEL, baseUrl=UNREACHABLE
    )
    response = await admin(service).register_provider(payload)
    assert response.status_code == 424, response.text
    assert response.json()["problems"][0]["path"] == "(provider)"
    assert "health check" in response.json()["problems"][0]["message"]
    async with httpx.AsyncClient(base_url=service.url) as http:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        listed = (await http.get("/admin/providers", headers=auth)).json()
        audit = (await http.get("/admin/audit", headers=auth)).json()["records"][0]
    assert [p["name"] for p in listed["providers"]] == ["base"]  # nothing changed
    assert audit["result"] == "health_check_failed"


async def test_a_revoked_key_is_reported_and_set_aside(
    service: LoopbackServer, servers: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_PROVIDER_KEY_T000_REVOKED", "revoked-key")
    keys = ["env:CXR_PROVIDER_KEY_T000_REVOKED", "env:CXR_PROVIDER_KEY_T000_KEY_1"]
    payload = registration("half", keys, PRIMARY_MODEL, baseUrl=servers[0])
    response = await admin(service).register_provider(payload)
    assert response.status_code == 201, response.text
    assert response.json()["unhealthyKeys"] == [
        {"key_id": fingerprint("revoked-key"), "source": "env:CXR_PROVIDER_KEY_T000_REVOKED"}
    ]


@pytest.mark.parametrize("key", [CLIENT_KEY, INVOKE_ONLY_KEY])
async def test_registration_needs_llm_gateway_manage_or_the_admin_token(
    service: LoopbackServer, servers: tuple[str, str], key: str
) -> None:
    """A key without a scope list passes the other guards, as before scopes; not this one."""
    payload = registration(
        "nope", ["env:CXR_PROVIDER_KEY_T000_KEY_1"], PRIMARY_MODEL, baseUrl=servers[0]
    )
    refused = await GatewayClient(service.url, key).register_provider(payload)
    assert refused.status_code == 403
    assert "llm-gateway:manage" in refused.json()["detail"]
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    assert (await GatewayClient(service.url, "wrong").register_provider(payload)).status_code == 401
    assert (await admin(service).register_provider(payload)).status_code == 201


async def test_registration_on_the_llm_gateway_provider_is_refused(
    start: Callable[..., ServiceServer], servers: tuple[str, str]
) -> None:
    """Without a provider file the service runs on LLM_GATEWAY_*, whose literal keys would
    otherwise be written into the stored configuration. A key sent as a literal through the API
    is stored already: it does not stop the next registration."""
    payload = registration(
        "x", ["env:CXR_PROVIDER_KEY_T000_KEY_1"], PRIMARY_MODEL, baseUrl=servers[0]
    )
    with start(providers_file=None) as server:
        response = await admin(server).register_provider(payload)
        async with httpx.AsyncClient(base_url=server.url) as http:
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            audit = (await http.get("/admin/audit", headers=auth)).json()["records"][0]
    assert response.status_code == 422
    problem = response.json()["problems"][0]
    assert problem["path"] == "(service)" and "PROVIDERS_FILE" in problem["message"]
    assert audit["result"] == "invalid"
    assert "sk-test-provider-key" not in json.dumps(response.json()) + json.dumps(audit)
    literal = registration("dev", ["literal:sk-dev"], PRIMARY_MODEL, baseUrl=servers[0])
    with start(literal_keys=True) as server:
        assert (await admin(server).register_provider(literal)).status_code == 201
        other = registration("x", ["env:CXR_PROVIDER_KEY_T000_KEY_1"], "gpt-4o", baseUrl=servers[0])
        assert (await admin(server).register_provider(other)).status_code == 201


# --- health --------------------------------------------------------------------------------------


async def test_health_is_a_credential_check(service: LoopbackServer) -> None:
    scoped = await GatewayClient(service.url, TUTORIAL_KEY).health()
    assert scoped.status_code == 200
    assert scoped.json()["tenant"] == "acme"
    assert scoped.headers["x-permissions"] == ",".join(TUTORIAL_SCOPES)
    assert scoped.json()["scopes"] == TUTORIAL_SCOPES
    unscoped = await client(service).health()  # may call models and read, not register
    assert unscoped.headers["x-permissions"] == "llm-inference:execute,llm-inference:read"
    operator = await admin(service).health()
    assert operator.headers["x-permissions"] == ",".join(TUTORIAL_SCOPES)
    no_read = await GatewayClient(service.url, METRICS_ONLY_KEY).health()
    assert no_read.status_code == 403 and "llm-inference:read" in no_read.json()["detail"]
    assert (await GatewayClient(service.url, "wrong").health()).status_code == 401
    async with httpx.AsyncClient(base_url=service.url) as http:
        assert (await http.get("/api/v1/llm-gateway/health")).status_code == 401


# --- the WebSocket path ---------------------------------------------------------------------------


async def test_websocket_error_frames(service: LoopbackServer, plan_a: FaultPlan) -> None:
    reader = client(service)
    unknown = await reader.stream_over_websocket(inference("e-1", "hi", fallbackModels=[]))
    assert unknown.last["code"] == "model_not_found" and unknown.error
    missing = inference("e-2", "hi", modelId=BASE_MODEL, fallbackModels=[], variables={})
    not_rendered = await reader.stream_over_websocket(missing)
    assert not_rendered.last["code"] == "invalid_request"
    assert "user_input" in (not_rendered.error or "")
    bad = await reader.stream_over_websocket({"sessionId": "e-3", "template": "x", "modelId": 7})
    assert bad.last["code"] == "invalid_request" and "modelId" in (bad.error or "")


async def test_websocket_needs_llm_inference_execute(service: LoopbackServer) -> None:
    url = service.url.replace("http://", "ws://") + "/ws/v1/llm-gateway/stream"
    auth = {"Authorization": f"Bearer {METRICS_ONLY_KEY}"}
    async with websockets.connect(url, additional_headers=auth) as ws:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert frame["type"] == "error" and "llm-inference:execute" in frame["message"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
    allowed = GatewayClient(service.url, INVOKE_ONLY_KEY)
    answer = await allowed.stream_over_websocket(
        inference("s-1", "hi", modelId=BASE_MODEL, fallbackModels=[])
    )
    assert answer.error is None, answer.last


@pytest.mark.parametrize("key", ["wrong-key", ADMIN_TOKEN])
async def test_websocket_with_a_wrong_key_or_the_admin_token(
    service: LoopbackServer, llm_plan: FaultPlan, key: str
) -> None:
    """The tutorial's client sends its payload and reads: a wrong key's answer is an
    `unauthorized` error frame, then close 4401 (which its send may meet first: either way the
    client ends with an error); the admin token is answered."""
    payload = inference("k-1", "hi", modelId=BASE_MODEL, fallbackModels=[])
    answer = await GatewayClient(service.url, key).stream_over_websocket(payload)
    if key == ADMIN_TOKEN:
        assert answer.error is None, answer.last
    else:
        assert answer.error
        assert answer.last.get("code") == "unauthorized" or answer.close_code == 4401
        assert llm_plan.requests == []


async def test_websocket_answer_that_breaks_the_schema_is_an_error_frame(
    service: LoopbackServer, llm_plan: FaultPlan
) -> None:
    """On the socket the answer is validated whole and repaired once before any text goes out:
    a second invalid answer ends with an output_invalid error frame, and no content frame."""
    llm_plan.push(Fault(content='{"intent": 3}'), Fault(content="still not it"))
    payload = inference("e-4", "hi", modelId=BASE_MODEL, fallbackModels=[])
    answer = await client(service).stream_over_websocket(payload)
    assert answer.last["code"] == "output_invalid" and answer.deltas == 0
    assert answer.last["detail"]["errors"]


async def test_http_stream_that_breaks_the_schema_ends_with_the_validation_error(
    service: LoopbackServer, llm_plan: FaultPlan
) -> None:
    llm_plan.push(Fault(chunks=['{"intent": ', '"billing"}']))
    payload = inference("e-5", "hi", modelId=BASE_MODEL, fallbackModels=[])
    answer = await client(service).stream_over_http(payload)
    assert answer.text == '{"intent": "billing"}'
    assert answer.last["code"] == "output_invalid"
    paths = sorted(e["path"] for e in answer.last["detail"]["errors"])
    assert paths == ["$", "$"]  # confidence and entities missing (both at the root)


async def test_websocket_client_that_asks_the_moment_it_reads_complete(
    service: LoopbackServer,
) -> None:
    url = service.url.replace("http://", "ws://") + "/ws/v1/llm-gateway/stream"
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with websockets.connect(url, additional_headers=auth) as ws:
        for turn in range(15):
            ask = inference(f"hurry-{turn % 3}", f"question {turn}", modelId=BASE_MODEL)
            ask["fallbackModels"] = []
            await ws.send(json.dumps(ask))
            result = Streamed()
            while not result.take(json.loads(await asyncio.wait_for(ws.recv(), 10))):
                pass
            assert result.error is None, (turn, result.last)


async def test_websockets_that_hang_up_mid_stream_leave_no_slot(
    start: Callable[..., ServiceServer],
    llm_plan: FaultPlan,
    store_settings: dict[str, Any],  # noqa: F811 (the fixture imported above)
) -> None:
    """On SQLite (slots in process memory) and on Redis (slots shared by replicas)."""
    slow = Fault(content=" ".join(f"word{i}" for i in range(40)), chunk_delay=0.25)
    llm_plan.push(*[slow] * 25)
    with start(client_max_concurrent_streams=3, **store_settings) as server:
        url = server.url.replace("http://", "ws://") + "/ws/v1/llm-gateway/stream"
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        for n in range(8):  # more sockets than the limit, one after another
            async with websockets.connect(url, additional_headers=auth) as ws:
                ask = {"sessionId": f"gone-{n}", "messages": [{"role": "user", "content": "tell"}]}
                await ws.send(json.dumps(ask))
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert frame["type"] == "content", frame  # never refused: earlier slots are back
        assert await until_no_slot_is_held(Service(server.url, server.app)) == 0


# --- the official client is unaffected ----------------------------------------------------------


async def test_official_openai_client_still_works(service: LoopbackServer) -> None:
    llm = openai.AsyncOpenAI(base_url=f"{service.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    try:
        reply = await llm.chat.completions.create(
            model=BASE_MODEL, messages=[{"role": "user", "content": "Where is my order?"}]
        )
        assert reply.choices[0].message.content
        streamed = await llm.chat.completions.create(
            model=BASE_MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in streamed if c.choices])
        assert text
        with pytest.raises(openai.BadRequestError):  # /v1 still refuses stream + json_schema
            await llm.chat.completions.create(
                model=BASE_MODEL,
                messages=[{"role": "user", "content": "Hello"}],
                stream=True,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "intent", "schema": INTENT_SCHEMA},
                },
            )
    finally:
        await llm.close()
