"""A client key's scope list in the provider file (`client_keys: {<key id>: {scopes: [...]}}`):
it replaces the key's CLIENT_API_KEYS list, is validated with the rest of the file (every problem
with its path, in check-config and the provisioning API), and a change applied through
`PUT /admin/config` holds from the next request on, without a restart. Access tokens keep their
client's scopes (OAUTH_CLIENTS)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.auth.signatures import fingerprint
from app.core.scopes import GATEWAY_MANAGE, INFERENCE_READ, INVOKE, METRICS_READ
from app.core.settings import Settings
from app.llm.catalog import validate_provider_config
from app.main import create_app
from app.simulator.faults import FaultPlan
from tests.llm.test_provider_file import _check
from tests.tutorials.test_000_inference import registration

ADMIN_TOKEN = "admin-token-for-key-scopes"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SCOPED = "ck-scoped-in-settings"  # CLIENT_API_KEYS gives it llm.gateway:invoke
PLAIN = "ck-no-list-in-settings"  # CLIENT_API_KEYS gives it no list
KEYS = [SecretStr(f"{SCOPED}:acme;scopes={INVOKE}"), SecretStr(f"{PLAIN}:acme")]
KEY_VARIABLE = "CXR_PROVIDER_KEY_KEY_SCOPES"
PROVIDER_KEY = "sk-key-scopes-provider"  # not one of the service's own credentials
OAUTH_CLIENT = "key-scopes-client"
OAUTH_SECRET = "key-scopes-client-secret"
CHAT = {"session_id": "s-1", "messages": [{"role": "user", "content": "Where is my parcel?"}]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def config(url: str, client_keys: dict[str, Any] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "providers": [
            {
                "name": "sim",
                "base_url": url,
                "api_keys": [f"env:{KEY_VARIABLE}"],
                "models": [{"name": "gpt-4o-mini"}],
            }
        ]
    }
    if client_keys is not None:
        raw["client_keys"] = client_keys
    return raw


@pytest.fixture
def provider_file(tmp_path: Path, llm_server: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SCOPED may only read usage here, whatever CLIENT_API_KEYS says."""
    monkeypatch.setenv(KEY_VARIABLE, PROVIDER_KEY)
    path = tmp_path / "providers.yaml"
    scoped = {fingerprint(SCOPED): {"scopes": [METRICS_READ]}}
    path.write_text(json.dumps(config(llm_server.url, scoped)))
    return path


def start(app_client: Callable[..., Any], provider_file: Path, **overrides: Any) -> Any:
    return app_client(
        client_api_keys=KEYS,
        admin_token=SecretStr(ADMIN_TOKEN),
        providers_file=provider_file,
        **overrides,
    )


async def chat(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/chat", json=CHAT, headers=bearer(key))


async def put_config(client: httpx.AsyncClient, raw: dict[str, Any]) -> httpx.Response:
    return await client.put("/admin/config", json=raw, headers=ADMIN)


async def test_the_files_list_replaces_the_settings_and_a_put_changes_it_for_the_next_request(
    app_client: Callable[..., Any], provider_file: Path, llm_server: Any, llm_plan: FaultPlan
) -> None:
    async with start(app_client, provider_file) as client:
        refused = await chat(client, SCOPED)  # the file's list, not the setting's invoke
        assert refused.status_code == 403
        assert INVOKE in refused.json()["detail"] and METRICS_READ in refused.json()["detail"]
        assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
        assert (await client.get("/budget/status", headers=bearer(SCOPED))).status_code == 200
        assert (await chat(client, PLAIN)).status_code == 200  # not in the file: no list
        assert len(llm_plan.requests) == 1

        # the operator gives SCOPED invoke back and takes PLAIN's reach away, through the API
        lists = {
            fingerprint(SCOPED): {"scopes": [INVOKE, METRICS_READ]},
            fingerprint(PLAIN).upper(): {"scopes": f"{METRICS_READ}+{INFERENCE_READ}"},
        }
        applied = await put_config(client, config(llm_server.url, lists))
        assert applied.status_code == 200, applied.text
        assert (await chat(client, SCOPED)).status_code == 200  # the very next request
        plain = await chat(client, PLAIN)
        assert plain.status_code == 403 and INVOKE in plain.json()["detail"]
        health = await client.get("/api/v1/llm-gateway/health", headers=bearer(PLAIN))
        assert health.headers["x-permissions"] == f"{INFERENCE_READ},{METRICS_READ}"

        # without client_keys, each key has its CLIENT_API_KEYS list again
        assert (await put_config(client, config(llm_server.url))).status_code == 200
        assert (await chat(client, PLAIN)).status_code == 200
        budget = await client.get("/budget/status", headers=bearer(SCOPED))
        assert budget.status_code == 403 and METRICS_READ in budget.json()["detail"]

        records = (await client.get("/admin/audit", headers=ADMIN)).json()["records"]
        assert [(r["action"], r["result"]) for r in records[:2]] == [("apply", "ok")] * 2
        assert records[0]["payload_sha256"] != records[1]["payload_sha256"]
        ids = ", ".join(sorted([fingerprint(SCOPED), fingerprint(PLAIN)]))
        assert records[1]["detail"].endswith(f"; client key scopes: {ids}")
        assert "client key" not in records[0]["detail"]  # none left


async def test_the_file_can_grant_provisioning_and_provisioning_keeps_the_files_lists(
    app_client: Callable[..., Any], tmp_path: Path, llm_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A right a key must be given (llm-gateway:manage) may be given here; registering a
    provider through the tutorial's endpoint adds a provider and carries client_keys over, so
    it cannot widen (or drop) anyone's scopes."""
    monkeypatch.setenv(KEY_VARIABLE, PROVIDER_KEY)
    path = tmp_path / "providers.yaml"
    lists = {fingerprint(SCOPED): {"scopes": [GATEWAY_MANAGE]}}
    path.write_text(json.dumps(config(llm_server.url, lists)))
    payload = registration("second", [f"env:{KEY_VARIABLE}"], "sim-second", baseUrl=llm_server.url)
    async with start(app_client, path) as client:
        unscoped = await client.post(
            "/api/v1/llm-gateway/providers", json=payload, headers=bearer(PLAIN)
        )
        assert unscoped.status_code == 403 and GATEWAY_MANAGE in unscoped.json()["detail"]
        registered = await client.post(
            "/api/v1/llm-gateway/providers", json=payload, headers=bearer(SCOPED)
        )
        assert registered.status_code == 201, registered.text
        refused = await chat(client, SCOPED)  # still the file's list: manage, not invoke
        assert refused.status_code == 403 and INVOKE in refused.json()["detail"]
        records = (await client.get("/admin/audit", headers=ADMIN)).json()["records"]
        assert records[0]["detail"].endswith(f"client key scopes: {fingerprint(SCOPED)}")


async def test_bad_scope_lists_are_refused_with_their_paths_and_change_nothing(
    app_client: Callable[..., Any], provider_file: Path, llm_server: Any
) -> None:
    key_id = fingerprint(PLAIN)
    bad = config(
        llm_server.url,
        {
            key_id: {"scopes": [INVOKE, "llm.gateway:invok"]},
            "ck-no-list-in-settings": {"scopes": [INVOKE]},  # the key itself, not its id
        },
    )
    async with start(app_client, provider_file) as client:
        refused = await put_config(client, bad)
        assert refused.status_code == 422
        found = {p["path"]: p["message"] for p in refused.json()["problems"]}
        assert "not a key id" in found["client_keys"]
        dry_run = await client.post("/admin/config/validate", json=bad, headers=ADMIN)
        assert dry_run.json()["valid"] is False
        at = f"client_keys.{key_id}"
        unknown = ("unknown scope llm.gateway:invok (known: ", INVOKE)
        for entry, path, named in (
            ({"scopes": [INVOKE, "llm.gateway:invok"]}, f"{at}.scopes[1]", unknown),
            ({"scopes": "llm.gateway:invok"}, f"{at}.scopes[0]", unknown),  # the setting's form
            ({"scopes": []}, f"{at}.scopes", ("empty scope list",)),
            ({"scope": [INVOKE]}, f"{at}.scope", ("not permitted",)),
        ):
            response = await put_config(client, config(llm_server.url, {key_id: entry}))
            assert response.status_code == 422, entry
            found = {p["path"]: p["message"] for p in response.json()["problems"]}
            assert all(part in found[path] for part in named), found
        assert (await chat(client, PLAIN)).status_code == 200  # nothing changed
        records = (await client.get("/admin/audit", headers=ADMIN)).json()["records"]
        assert {r["result"] for r in records if r["action"] == "apply"} == {"invalid"}


@pytest.mark.slow
def test_check_config_lists_every_scope_problem_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(
        "providers:\n"
        "  - name: sim\n"
        "    base_url: https://sim.test\n"
        "    allow: nothing\n"
        "    models: [{name: m}]\n"
        "client_keys:\n"
        "  '3f9a1c2e': {scopes: [llm.gateway:invoke, gateway:wrte]}\n"
        "  'abcdef12': {scopes: []}\n"
    )
    done = _check(path, {})
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(
        line.strip().startswith("client_keys.3f9a1c2e.scopes[1]: ") and "gateway:wrte" in line
        for line in lines
    ), done.stdout
    assert any(line.strip().startswith("client_keys.abcdef12.scopes: ") for line in lines)
    assert any(line.strip().startswith("providers[0].allow: ") for line in lines)  # and the rest


def test_a_valid_list_is_kept_in_its_order_and_its_id_in_lower_case() -> None:
    raw = config("https://sim.test", {"ABCDEF12": {"scopes": f"{METRICS_READ} {INVOKE}"}})
    parsed, problems = validate_provider_config(raw, env={KEY_VARIABLE: "sk"})
    assert problems == [] and parsed is not None
    assert parsed.client_keys["abcdef12"].scopes == [METRICS_READ, INVOKE]


async def test_an_access_token_keeps_its_clients_scopes(
    app_client: Callable[..., Any], tmp_path: Path, llm_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token's key id in client_keys changes nothing: its scopes are OAUTH_CLIENTS'."""
    monkeypatch.setenv(KEY_VARIABLE, PROVIDER_KEY)
    token_key_id = fingerprint(f"oauth-client:{OAUTH_CLIENT}")
    path = tmp_path / "providers.yaml"
    path.write_text(json.dumps(config(llm_server.url, {token_key_id: {"scopes": [METRICS_READ]}})))
    clients = [SecretStr(f"{OAUTH_CLIENT}:{OAUTH_SECRET}:acme;scopes={INVOKE}")]
    async with start(app_client, path, oauth_clients=clients) as client:
        issued = await client.post(
            "/api/v1/auth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": OAUTH_CLIENT,
                "client_secret": OAUTH_SECRET,
            },
        )
        assert issued.status_code == 200, issued.text
        token = issued.json()["access_token"]
        assert (await chat(client, token)).status_code == 200
        budget = await client.get("/budget/status", headers=bearer(token))
        assert budget.status_code == 403 and METRICS_READ in budget.json()["detail"]


def test_the_files_list_holds_on_ws_chat_too(
    make_settings: Callable[..., Settings], provider_file: Path
) -> None:
    settings = make_settings(client_api_keys=KEYS, providers_file=provider_file)
    with (
        TestClient(create_app(settings)) as tc,
        tc.websocket_connect("/ws/chat", headers=bearer(SCOPED)) as ws,
    ):
        frame = ws.receive_json()
        assert frame["code"] == "forbidden" and INVOKE in frame["message"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4403
